"""Streamlit helpers shared by the pages: the job registry, cached loaders, sidebar, job panels.

The only module of the package that imports Streamlit. Never call ``st.*`` from worker threads:
workers record into the JobRegistry, and pages read it from fragments.
"""
from __future__ import annotations

import atexit
import inspect
import secrets
import time
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from .. import (ConfigError, ExportError, InputSpec, Job, JobRegistry, Run, RunConfig, RunLocked, analysis,
               delete_run, export, list_runs, data_stamp, load_data, load_generator, load_student, load_teacher,
               onnx_check, open_run, parse_spec, qimera_home, runs_dir, shared_registry)
from . import figures, paths
from .logic import (budget_rows, comparable, no_fine_tuning, overlay_default, partner_runs, preset_for, run_label,
                    same_scale, setting_label, split_damaged)

POLL_SECONDS = 2.0  # how often the panels of running jobs redraw (finished ones are drawn once)


EXIT_WAIT_SECONDS = 120  # at exit, how long to wait for jobs asked to stop (a UMAP compile cannot be stopped)


@st.cache_resource
def registry() -> JobRegistry:
    """One registry per server: jobs outlive page switches, reloads and sessions."""
    jobs = shared_registry()
    atexit.register(stop_jobs, jobs)
    return jobs


def sweep_where_caption() -> None:
    """Under a sweep form: where its runs will train (here, one after another, or on Ray)."""
    jobs = registry()
    if jobs.ray_address:
        where = ("a local Ray instance, one run per CPU core" if jobs.ray_address == "local"
                 else f"the Ray cluster at {jobs.ray_address}, one run per CPU (one GPU each where it has GPUs)")
        store = jobs.ray_runs_dir or runs_dir()
        st.caption(f"Runs as Ray tasks on {where} (`QIMERA_RAY_ADDRESS`), each into its own folder under "
                   f"`{store}`; progress shows once per epoch.")
    else:
        st.caption(f"Runs here, one after another ({jobs.max_runs} run(s) train at a time on this machine). "
                   f"Set `QIMERA_RAY_ADDRESS` before starting the app to spread a sweep over a Ray cluster.")


def stop_jobs(jobs: JobRegistry, timeout: float = EXIT_WAIT_SECONDS) -> None:
    """Cancel every active job and wait for its thread. Run at exit: a worker thread still inside a
    torch operation when the interpreter finalizes aborts the whole process ("terminate called without
    an active exception", status 134), because the thread is unwound through C++ code that cannot be."""
    for job in jobs.active():
        jobs.cancel(job.id)
    deadline = time.monotonic() + timeout
    for job in jobs.jobs():
        jobs.wait(job.id, max(0.0, deadline - time.monotonic()))


def warm_umap() -> None:
    """Compile UMAP's code in the background, once per server (while the user reads a page), so that
    the first UMAP on Feature space does not wait for it."""
    from .tasks import UMAP_PREPARE_KEY, prepare_umap_task
    if not analysis.umap_ready():
        registry().start_task(prepare_umap_task(), label="compiling UMAP", key=UMAP_PREPARE_KEY)


def device_description() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA)"
    return f"CPU ({torch.get_num_threads()} threads; no CUDA GPU found)"


def lock_down() -> None:
    """No tracebacks in the browser (only our own error boxes) and no deploy toolbar, whatever
    config file the server was started with."""
    st.set_option("client.showErrorDetails", "none")
    st.set_option("client.toolbarMode", "minimal")


def through_app_navigation() -> None:
    """Run this page through app.py's ``st.navigation``. Until app.py has run once in a server, Streamlit serves
    a link straight to a page (``/Feature_space`` as the server's first request) the way of apps without
    ``st.navigation``: the page file alone, with a sidebar listing "app" and the files of ``pages/``, and it stays
    so for every session until someone opens ``/``. Here the page runs app.py (the script run's main script)
    in its place, within the same script run, so that whatever the user just did (a button pressed) is seen
    once; app.py's navigation then shows this same page (its address is the same either way), and the rest
    of this outer run stops."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner import get_script_run_ctx
    except ImportError:  # another Streamlit: nothing to do
        return
    ctx = get_script_run_ctx()
    if not getattr(PagesManager, "uses_pages_directory", False) or ctx is None:
        return
    import runpy
    PagesManager.uses_pages_directory = False  # what st.navigation records too: from now on, app.py runs first
    runpy.run_path(str(ctx.main_script_path), run_name="__main__")
    st.stop()


def setup_page(title: str, icon: str = "🧪") -> None:
    """The page's settings and sidebar; a page whose $QIMERA_HOME is unusable says what to set and stops."""
    through_app_navigation()
    st.set_page_config(page_title=f"{title} · Qimera Explorer", page_icon=icon, layout="wide")
    lock_down()
    problem = paths.home_problem()
    if problem:
        st.error(problem)
        st.stop()
    with st.sidebar:
        st.caption(f"**Device:** {device_description()}")
        st.caption(f"**Runs stored in:** `{runs_dir()}`")
        active = registry().active()
        if active:
            st.caption(f"**{len(active)} job(s) running:** " + "; ".join(f"{j.label} ({j.progress:.0%})" for j in active))


def all_runs() -> list[Run]:
    """Readable run folders inside the app's allowed folders, newest first (read fresh each time:
    they are small files), then the shipped CIFAR-10 showcase runs, so pages open on the user's own
    runs once there are any. Damaged folders are named, with what is wrong, in a collapsed notice."""
    inside, linked_out = [], []
    for r in [r for r in list_runs() if paths.is_allowed(r.path)] + paths.shipped_runs():
        try:
            paths.check_tree(r.path)  # before any of its files is read
            inside.append(r)
        except paths.PathNotAllowed:
            linked_out.append((r.id, "a file in it links outside the app's folders, so the app does not read it"))
    runs, damaged = split_damaged(inside)
    damaged += linked_out
    if damaged:
        with st.expander(f"{len(damaged)} damaged run folder(s) left out", icon="⚠️"):
            st.markdown("\n".join(f"- **{rid}**: {problem}" for rid, problem in damaged))
    return runs


def pick_run(label: str, runs: list[Run], key: str, help: str | None = None) -> Run | None:
    """A selectbox over runs that remembers the choice in the URL (?run=ID)."""
    if not runs:
        return None
    ids = [r.id for r in runs]
    wanted = st.query_params.get("run")
    index = ids.index(wanted) if wanted in ids else 0
    chosen = st.selectbox(label, ids, index=index, key=key, help=help,
                          format_func=lambda i: run_label(runs[ids.index(i)]))
    return runs[ids.index(chosen)]


def _stamp(run: Run) -> float:
    p = run.path / Run.GENERATOR
    return p.stat().st_mtime if p.exists() else 0.0


@st.cache_resource(max_entries=6, show_spinner="Loading the run's networks...")
def _networks(run_path: str, stamp: float):
    run = open_run(run_path)
    paths.check_run(run)  # its checkpoint and files inside the allowed folders (the pages say so first)
    teacher = load_teacher(run)
    teacher.model.eval()
    generator = load_generator(run)
    student = load_student(run, teacher)
    return teacher, generator, student


def run_networks(run: Run):
    """(teacher, generator, student) of a run, cached until its weights change. Read-only: shared."""
    return _networks(str(run.path), _stamp(run))


_METRIC_ARROW = "delta_arrow" in inspect.signature(st.metric).parameters

OUTSIDE_NETWORKS = ("Its teacher's checkpoint lies outside the app's folders ($QIMERA_HOME and the folders in "
                    f"{paths.ALLOWED_ENV}), so the app does not load its networks. The command line can.")
OUTSIDE_DATA = ("Its test data lies outside the app's folders ($QIMERA_HOME and the folders in "
                f"{paths.ALLOWED_ENV}), so the app does not read its images.")


def networks_note(run: Run) -> str | None:
    """Why a page does not load this run's networks (a run made on the command line may point
    anywhere), or None when it may."""
    return None if paths.run_allowed(run) else f"Run {run.id}: {OUTSIDE_NETWORKS}"


def resume_note(run: Run) -> str | None:
    """Why the app does not resume this run (it would read its checkpoint and test data), or None."""
    if not paths.run_allowed(run):
        return f"Cannot resume {run.id} here. {OUTSIDE_NETWORKS}"
    if not paths.data_allowed(run.config.test_data):
        return f"Cannot resume {run.id} here. {OUTSIDE_DATA} The command line can resume it."
    return None


@st.cache_data(max_entries=16, show_spinner="Reading real images...")
def real_images(spec: str, input_spec: InputSpec, n: int, seed: int, home: str,
                stamp: str = "") -> tuple[np.ndarray, np.ndarray, list]:
    """n stored images (uint8, for display) with labels and class names; ``home`` and ``stamp``
    (data.data_stamp) key the cache. A spec whose files lead outside the app's folders is refused."""
    paths.check_data_spec(spec)
    data = load_data(spec, input_spec, "test")
    x, y = data.raw(n, seed)
    return x.numpy(), y.numpy(), data.classes


def real_class_images(run: Run, classes: tuple, per_class: int, ncols: int | None = None) -> np.ndarray | None:
    """A grid of ``per_class`` real test images of each of ``classes`` (``ncols`` per row, by default all in
    one), from the run's test data; None when that data is not readable here."""
    try:
        teacher = _networks(str(run.path), stamp(run))[0]
        x, y, _ = real_images(run.config.test_data, InputSpec.of(teacher), 2000, 0, home_key(),
                              data_stamp(run.config.test_data))
    except (OSError, ValueError, paths.PathNotAllowed):
        return None
    pick = [i for c in classes for i in np.flatnonzero(y == c)[:per_class]]
    return figures.image_grid(x[pick], ncols or per_class * len(classes)) if pick else None


MAX_POINT_IMAGES = 16  # images shown for points picked on the feature scatter


def point_images(run: Run, gdfq: Run | None, sources: dict, picks: list[tuple[str, int]], seed: int) -> np.ndarray:
    """The images behind points picked on Feature space's scatter, as one grid (the first
    ``MAX_POINT_IMAGES``): a real point is its test image (the same draw the features came from), a synthetic
    one is made again from its labels, coefficients and noise seed (``synthetic_features`` keeps them)."""
    from .. import generate_images
    teacher, generator, _ = run_networks(run)
    tiles = []
    for source, i in picks[:MAX_POINT_IMAGES]:
        s = sources[source]
        if source == "real":  # the features came from the first n of a draw of (up to) 2n test images
            drawn = len(s["labels"]) + len(s.get("other_labels", ()))
            x, _, _ = real_images(run.config.test_data, InputSpec.of(teacher), drawn, seed, home_key(),
                                  data_stamp(run.config.test_data))
            tiles.append(figures.image_grid(x[i:i + 1], 1, pad=0))
        else:
            gen = run_networks(gdfq)[1] if source == "gdfq" else generator
            with torch.no_grad():
                image = generate_images(gen, s["labels"][i:i + 1], s["coeffs"][i:i + 1], s["seeds"][i:i + 1])
            tiles.append(figures.image_grid(image, 1, mean=teacher.mean, std=teacher.std, pad=0))
    return figures.image_grid(np.stack([t.transpose(2, 0, 1) for t in tiles]), MAX_POINT_IMAGES // 2, scale=1, pad=2)


def home_key() -> str:
    return str(qimera_home())


def show_image_grid(images, caption: str = "", ncols: int = 8, **kw) -> None:
    st.image(figures.image_grid(images, ncols, **kw), caption=caption or None)


def job_panel(job: Job, *, curves: bool = True, key: str = "") -> None:
    """Progress, message, cancel button and (for runs) live loss/accuracy curves of one job."""
    if job.status == "cancelled":  # not the last message of the work in progress, which has stopped
        text = (f"{job.label}: cancelled at {job.progress:.0%}"
                + (": its finished epochs are kept, resume it on Quantize" if job.kind != "task" else ""))
    else:
        text = f"{job.label}: {job.message or job.status}"
    run = job.run
    preparing = run.preparing if run is not None and job.active else None
    st.progress(job.progress if preparing is None else preparing, text=text)  # a teacher in training: its own bar
    cols = st.columns([1, 4])
    if job.active:
        if cols[0].button("Cancel", key=f"cancel-{job.id}-{key}", help="Stops after the current iteration; "
                          "finished epochs stay on disk and can be resumed."):
            registry().cancel(job.id)
            st.rerun()
    if job.error:
        st.error(job.error)
    if run is None:
        return
    if run.run_dir:
        speed = f" · device {run.device} · {run.images_per_s:.0f} images/s" if run.device else ""  # (Ray cells: folder only)
        # beside Cancel while the job runs; full width after it, not indented under an empty column
        (cols[1] if job.active else st).caption(f"Run folder: `{run.run_dir}`{speed}")
    if job.kind == "sweep":
        st.caption(f"Run {job.current + 1} of {len(job.runs)}: "
                   + ", ".join(f"{_method_label(r.config)} W{r.config.get('wbits')}A{r.config.get('abits')}"
                               f" seed {r.config.get('seed')} [{r.status}]" for r in job.runs))
    if curves and (run.loss_history or run.metrics):
        c1, c2 = st.columns(2)
        loss, accuracy = _job_figures(job)
        c1.plotly_chart(loss, key=f"loss-{job.id}-{key}")
        c1.caption(LOSS_NAMES)
        c2.plotly_chart(accuracy, key=f"acc-{job.id}-{key}")
        note = above_teacher_note(run.metrics, run.fp_top1)
        if note:
            c2.caption(note)


def _method_label(config: dict) -> str:
    """A run's method as the charts name it (``qimera p=0`` apart from ``qimera``), from its config."""
    try:
        return RunConfig.from_dict(config).label
    except (ConfigError, TypeError, ValueError):  # a config of an older version: its method alone
        return str(config.get("method"))


_figures = analysis.LRUCache(16)  # (job, run) -> (what they show, when built, the two charts)
LIVE_CHART_SECONDS = 10.0  # while a run trains, its loss chart takes new points at most this often


def _job_figures(job: Job):
    """The loss and accuracy charts of a job's current run, shared by every open page. They are rebuilt when the
    run has reported something new, but while it trains at most every ``LIVE_CHART_SECONDS`` (a new epoch's
    accuracy at once): a chart that changes is drawn again by every browser watching it, on the run's CPU."""
    run = job.run
    last = run.loss_history[-1]["step"] if run.loss_history else -1
    shows = (len(run.loss_history), last, len(run.metrics), run.fp_top1, job.active)
    kept = _figures.get((job.id, job.current))
    if kept is not None:
        shown, built, charts = kept
        fresh = shown == shows or (job.active and shown[2:] == shows[2:]
                                   and time.monotonic() - built < LIVE_CHART_SECONDS)
        if fresh:
            return charts
    charts = (figures.loss_figure(run.loss_history), figures.accuracy_figure(run.metrics, run.fp_top1))
    _figures.put((job.id, job.current), (shows, time.monotonic(), charts))
    return charts


LOSS_NAMES = ("**loss_g** = ce_g + w·bns, the generator's loss: **ce_g**, the teacher's cross-entropy against the "
              "generator's (soft) targets; **bns**, how far the teacher's BatchNorm statistics on generated images "
              "are from those it learnt. **loss_s** = kd + ce_s, the student's loss: **kd**, distillation from the "
              "teacher's logits; **ce_s**, the student's cross-entropy against the targets. The student's losses "
              "are 0 during the warm-up epochs (only the generator trains).")


def above_teacher_note(metrics: list[dict], fp_top1: float | None) -> str:
    """A word when a quantized student scores above its FP teacher (noise of a small test set)."""
    if not metrics or fp_top1 is None or max(r["top1"] for r in metrics) <= fp_top1:
        return ""
    return ("The quantized student scores above its FP teacher here: on a small test set a few images decide "
            "that, so differences this small are noise, not a better model.")


def jobs_section(kind: str | None = None, *, key: str, limit: int = 3, curves: bool = True,
                 label_prefix: str = "") -> None:
    """The newest jobs of a kind (whose label starts with ``label_prefix``): those running first, redrawn
    every ``POLL_SECONDS`` in a fragment (never blocks the page), then the ended ones, drawn once."""
    jobs = [j for j in registry().jobs(kind) if j.label.startswith(label_prefix)][:limit]
    running = [j.id for j in jobs if j.active]

    @st.fragment(run_every=POLL_SECONDS if running else None)
    def _live():
        live = [j for j in map(_job_or_none, running) if j is not None]  # only these are copied, not every job
        for job in live:
            with st.container(border=True):
                job_panel(job, curves=curves, key=key)
        if live and not any(j.active for j in live):
            st.rerun()  # every job shown has ended: redraw the whole page (run lists, results)
    _live()
    for job in jobs:
        if not job.active:
            with st.container(border=True):
                job_panel(job, curves=curves, key=key)


def _job_or_none(job_id: str) -> Job | None:
    try:
        return registry().get(job_id)
    except KeyError:  # forgotten meanwhile (only the newest finished jobs are kept)
        return None


def pick_teacher_and_budget(table, key: str, help: str, side_by_side: bool = False, newest_budget: bool = False,
                            baselines: bool = False):
    """The rows of ``table`` (``logic.bitwidth_table``) of one teacher and data set and one budget, both picked
    by the user, so that runs of different scales or budgets are never pooled. They open on the newest run's
    teacher and data (``table`` comes newest first, as ``all_runs``: the user's own before the showcase), and on
    its budget with ``newest_budget`` (a comparison just run), else on the budget with the most runs (curves).
    With ``baselines``, PTQ's rows of other budgets join the chosen one's (``logic.budget_rows``), and the
    pickers open on the budget with the most fine-tuned runs.
    Widgets ``{key}_group`` and ``{key}_budget``, one beside the other with ``side_by_side``."""
    c1, c2 = st.columns(2) if side_by_side else (st, st)
    groups = sorted({(t, d) for t, d in zip(table["teacher"], table["data"])})
    newest = (table["teacher"].iloc[0], table["data"].iloc[0])
    # A widget keeps what it showed across reruns, so a page opened before a comparison finished would stay on
    # the older runs: when a newer run appears, the pickers go to it (a choice made since then is kept).
    # (Set, not deleted: a deleted key would take the value the browser still holds.)
    newest_run = (table["run"].iloc[0], newest)
    moved = st.session_state.get(f"{key}_newest") != newest_run
    if moved:
        st.session_state[f"{key}_newest"] = newest_run
        st.session_state[f"{key}_group"] = newest
    if st.session_state.get(f"{key}_group") not in groups:  # (the runs it showed were deleted)
        st.session_state[f"{key}_group"] = newest
    group = c1.selectbox("Teacher and data", groups, format_func=lambda g: f"{g[0]} on {g[1]}", key=f"{key}_group")
    part = table[(table["teacher"] == group[0]) & (table["data"] == group[1])]
    budgets = part["budget"].value_counts()
    if newest_budget:
        order = list(dict.fromkeys(part["budget"]))
    elif baselines:  # PTQ's rows join every budget: open on the one with most fine-tuned runs
        tuned = part.loc[~part["method"].map(no_fine_tuning), "budget"].value_counts()
        order = sorted(budgets.index, key=lambda b: (-tuned.get(b, 0), -budgets[b]))
    else:
        order = list(budgets.index)
    if moved or st.session_state.get(f"{key}_budget") not in order:
        st.session_state[f"{key}_budget"] = order[0]
    chosen = c2.selectbox("Budget (generated images per run)", order, key=f"{key}_budget",
                          format_func=lambda b: f"{b:,} ({budgets[b]} run(s))", help=help)
    return budget_rows(part, chosen, baselines)


def teacher_preset() -> str:
    """The preset that fits the Teacher page's data set (digits when nothing was chosen there)."""
    choice = st.session_state.get("teacher_choice")
    return preset_for(parse_spec(choice["test_data"])[0]) if choice else "digits"


def use_teacher_choice(key: str) -> dict:
    """A tick box (ticked) to use the teacher chosen on the Teacher page; its settings, or {} without one."""
    choice = st.session_state.get("teacher_choice")
    if not choice:
        return {}
    use = st.checkbox(f"Use the teacher chosen on the Teacher page ({choice['teacher']} on {choice['test_data']})",
                      value=True, key=key)
    return dict(choice) if use else {}


def setting_widget(s, default, key: str):
    """The widget of one Quantize setting (logic.Setting), showing ``default`` until changed."""
    if s.kind == "select":
        opts = list(s.options)
        return st.selectbox(s.label, opts, index=opts.index(default) if default in opts else 0, help=s.help, key=key)
    if s.kind == "bool":
        return st.checkbox(s.label, value=bool(default), help=s.help, key=key)
    if s.kind == "int":
        return int(st.number_input(s.label, int(s.lo), int(s.hi), int(default), step=1, help=s.help, key=key))
    if s.kind == "floatlog":
        return float(st.number_input(s.label, float(s.lo), float(s.hi), float(default), format="%.1e",
                                     step=float(default) / 10 or 1e-5, help=s.help, key=key))
    return float(st.number_input(s.label, float(s.lo), float(s.hi), float(default), step=0.05, help=s.help, key=key))


def session_token() -> str:
    """A random name for this browser session (its private upload folder)."""
    if "upload_token" not in st.session_state:
        st.session_state["upload_token"] = secrets.token_urlsafe(16)
    return st.session_state["upload_token"]


def save_upload(uploaded, shared: bool = False) -> Path:
    """Store an uploaded checkpoint by content hash, private to this session unless ``shared``."""
    return paths.save_upload(uploaded.getvalue(), uploaded.name, session_token(), shared)


def pick_partner(run: Run, runs: list[Run], key: str) -> Run | None:
    """The GDFQ run to compare with, chosen by the user: comparable runs (same teacher, data, bits and
    budget) unless widened on purpose; None when there is none or the user picks none."""
    wide = st.checkbox("Also GDFQ runs with other bit widths or budgets", key=f"{key}-partner-wide",
                       help="A fair comparison needs the same bit widths and the same number of generated images.")
    found = [r for r in partner_runs(run, runs, same_setting=not wide) if paths.run_allowed(r)]  # loadable here
    if not found:
        st.caption(f"No GDFQ run with this teacher{'' if wide else ' and ' + setting_label(run.config)} yet: "
                   "start one on the Quantize page (method gdfq) to compare.")
        return None
    ids = ["none"] + [r.id for r in found]
    chosen = st.selectbox("Compare with (GDFQ run)", ids, index=1, key=f"{key}-partner",
                          format_func=lambda i: "no comparison" if i == "none" else
                          f"{i} ({setting_label(found[ids.index(i) - 1].config)})")
    partner = None if chosen == "none" else found[ids.index(chosen) - 1]
    if partner is not None and not comparable(run.config, partner.config):
        st.warning(f"Not a like-for-like comparison: this run is {setting_label(run.config)}, the GDFQ run "
                   f"{setting_label(partner.config)}.")
    return partner


def runs_tools(runs: list[Run]) -> None:
    """Compare runs' curves on one chart, download a run's metrics, delete a run (with confirmation)."""
    with_metrics = [r for r in runs if r.metrics]
    if with_metrics:
        st.subheader("Compare runs")
        ids = [r.id for r in with_metrics]
        picked = st.multiselect("Runs to overlay", ids, overlay_default(with_metrics), key="q-overlay",
                                format_func=lambda i: run_label(with_metrics[ids.index(i)]))
        chosen = [with_metrics[ids.index(i)] for i in picked]
        if any(not same_scale(chosen[0].config, r.config) for r in chosen[1:]):
            st.warning("These runs have different teachers or test data: their accuracies are not on one scale.")
        if chosen:
            fp = {r.id: (r.summary or {}).get("fp_top1") for r in chosen}
            st.plotly_chart(figures.overlay_figure({run_label(r): r.metrics for r in chosen},
                                                   {k: v for k, v in fp.items() if v is not None}), key="q-overlay-chart")
            for r in chosen:
                st.download_button(f"Download metrics of {r.id} (CSV)", (r.path / Run.METRICS).read_bytes(),
                                   f"{r.id}-metrics.csv", "text/csv", key=f"q-metrics-{r.id}")
    mine = [r for r in runs if not r.read_only]
    if not mine:
        return
    with st.expander("Delete a run", icon="🗑️"):
        ids = [r.id for r in mine]
        rid = st.selectbox("Run to delete", ids, key="q-delete-run", format_func=lambda i: run_label(mine[ids.index(i)]))
        sure = st.checkbox(f"Yes, delete {rid} and all its files", key="q-delete-sure")
        if st.button("Delete run", key="q-delete-go", disabled=not sure):
            try:
                delete_run(mine[ids.index(rid)])
            except (RunLocked, OSError, ValueError) as e:  # a live writer, or a damaged lock file (RunDamaged)
                st.error(f"Cannot delete {rid}: {e}")
            else:
                st.session_state.pop("q-delete-sure", None)
                st.toast(f"Deleted {rid}")
                st.rerun()


_EXPORT_FORMATS = {"onnx": "ONNX (QDQ), for ONNX Runtime", "int": "Integer weights (.safetensors)"}


def export_panel(runs: list[Run], key: str) -> None:
    """Export a run's quantized student (ONNX or integer weights) into its folder and download it."""
    # exporting loads the teacher: not from a checkpoint outside the app's folders
    ready = [r for r in runs if (r.path / Run.STUDENT).exists() and r.state != "running" and paths.run_allowed(r)]
    if not ready:
        return
    with st.expander("Export a quantized model", icon="📦"):
        c1, c2 = st.columns([3, 2])
        ids = [r.id for r in ready]
        rid = c1.selectbox("Run", ids, key=f"{key}-export-run", format_func=lambda i: run_label(ready[ids.index(i)]))
        fmt = c2.radio("Format", list(_EXPORT_FORMATS), format_func=_EXPORT_FORMATS.get, horizontal=True,
                       key=f"{key}-export-format")
        run = ready[ids.index(rid)]
        if st.button("Export", key=f"{key}-export-go", help="Writes the file into the run's folder; then download it."):
            try:
                with st.spinner("Exporting..."):
                    # a shipped run's export goes to the app's own exports folder, replaced on each export
                    target = paths.export_target(run, fmt)
                    done = export(run, fmt, target, force=target is not None)
                    st.session_state[f"{key}-export-file"] = (run.id, fmt, str(done))
            except (ExportError, OSError, ValueError) as e:
                st.error(f"Cannot export {rid}: {e}")
        # only the file of the run and format chosen now (not one exported before with other choices)
        done_id, done_fmt, done = st.session_state.get(f"{key}-export-file") or (None, None, None)
        if done and (done_id, done_fmt) == (run.id, fmt) and Path(done).exists():
            st.download_button(f"Download {Path(done).name} ({Path(done).stat().st_size / 2**20:.2f} MB)",
                               Path(done).read_bytes(), f"{rid}-{Path(done).name}", key=f"{key}-export-download")
            st.caption("Load it with `onnxruntime.InferenceSession(file)`; see the README." if fmt == "onnx" else
                       "Load it with `qimera_engine.load_int(file)`; see the README.")
            if fmt == "onnx":
                _onnx_check_panel(run, Path(done), key)


def _onnx_check_panel(run: Run, path: Path, key: str) -> None:
    """Size, speed against the FP model and top-1 of an ONNX export, measured here on a small batch."""
    if st.button("Measure it against the FP model", key=f"{key}-export-check",
                 help="Runs the export and the full-precision teacher in ONNX Runtime on this machine, side by "
                      "side, on 500 test images (a few seconds)."):
        try:
            with st.spinner("Measuring in ONNX Runtime..."):
                st.session_state[f"{key}-export-checked"] = (str(path), path.stat().st_mtime,
                                                             onnx_check(run, path))
        except (ExportError, OSError, ValueError, RuntimeError) as e:
            st.error(f"Cannot measure {path.name}: {e}")
    done = st.session_state.get(f"{key}-export-checked")
    if not done or done[:2] != (str(path), path.stat().st_mtime):
        return
    c = done[2]
    m1, m2, m3 = st.columns(3)
    # a ratio to FP is no change up or down: no arrow (delta_arrow came after 1.46; older ones still show one)
    ratio = {"delta_color": "off", **({"delta_arrow": "off"} if _METRIC_ARROW else {})}
    m1.metric("Size", f"{c['size_mb']:.2f} MB", f"{c['size_mb'] / c['fp_size_mb']:.2f}x FP ({c['fp_size_mb']:.2f} MB)",
              **ratio)
    m2.metric("Speed (ONNX Runtime, batch of 500)", f"{c['images_per_s']:,.0f} images/s",
              f"{c['speed_vs_fp']:.2f}x FP ({c['fp_images_per_s']:,.0f})", **ratio)
    m3.metric(f"Top-1 on {c['images']} test images", f"{c['top1']:.1f}%", f"{c['top1'] - c['fp_top1']:+.1f} vs FP",
              delta_color="normal")
    if c["integer_kernels"] == "ready":
        st.caption("Every convolution runs as an integer kernel (QLinearConv). One batch on this machine, beside "
                   "whatever else it runs: `bench/bench_export.py` measures it properly.")
    else:
        st.caption(f"Not integer-kernel ready: {c['integer_kernels']}. One batch on this machine: "
                   f"`bench/bench_export.py` measures it properly.")


def need_runs_message(what: str) -> None:
    st.info(f"No {what} yet. Start one on the **Quantize** page, or press **Run the demo** on the Home page "
            f"(digits, about half a minute on a CPU).")
    st.page_link("pages/2_Quantize.py", label="Go to Quantize", icon="⚙️")



# --------------------------------------------------------------------------- boundary samples (cached)


def class_names(run_path: str, stamp: float) -> list[str]:
    """The run's class names from its test set; "class 0", "class 1"... when the data cannot be read
    or lies outside the app's folders (then it is not opened at all)."""
    return _class_names(run_path, stamp, paths.data_allowed(open_run(run_path).config.test_data))


@st.cache_data(max_entries=8, show_spinner=False)
def _class_names(run_path: str, stamp: float, readable: bool) -> list[str]:
    teacher, _, _ = _networks(run_path, stamp)
    generic = [f"class {i}" for i in range(teacher.num_classes)]
    if not readable:
        return generic
    try:
        return load_data(open_run(run_path).config.test_data, InputSpec.of(teacher), "test").classes
    except Exception:
        return generic


@st.cache_data(max_entries=64, show_spinner=False)
def mixed_samples(run_path: str, stamp: float, classes: tuple, coeffs: tuple, seeds: tuple) -> dict:
    """analysis.mix_samples, cached by (run, classes, rounded coefficients, seeds); images displayable."""
    teacher, gen, student = _networks(run_path, stamp)
    out = analysis.mix_samples(gen, teacher.model, student, list(classes), list(coeffs), list(seeds))
    out["spread"] = analysis.image_spread(out["images"], teacher) if len(seeds) > 1 else None
    out["layout"] = analysis.image_spread(out["images"], teacher, grid=4) if len(seeds) > 1 else None
    out["grid"] = figures.image_grid(out.pop("images"), 4, mean=teacher.mean, std=teacher.std)
    return out


@st.cache_data(max_entries=16, show_spinner=False)
def class_samples(run_path: str, stamp: float, classes: tuple, seed: int, ncols: int) -> dict:
    """One plain generated image per class (noise seeds ``seed``, ``seed`` + 1, ...), as a grid of ``ncols``
    per row, and the teacher's top-1 for each."""
    from .. import generate_images
    teacher, gen, _ = _networks(run_path, stamp)
    labels = torch.tensor(classes)[:, None]
    with torch.no_grad():
        images = generate_images(gen, labels, torch.ones(len(classes), 1), [seed + i for i in range(len(classes))])
        pred = teacher.model(images).argmax(1).cpu().numpy()
    return {"grid": figures.image_grid(images, ncols, mean=teacher.mean, std=teacher.std), "teacher_pred": pred}


@st.cache_data(max_entries=32, show_spinner=False)
def mixing_path(run_path: str, stamp: float, a: int, b: int, steps: int, seed: int) -> dict:
    """analysis.path_strip, cached; its images as displayable tiles (upscaled like every grid)."""
    teacher, gen, student = _networks(run_path, stamp)
    out = analysis.path_strip(gen, teacher, student, a, b, steps, seed)
    images = out.pop("images")
    out["tiles"] = [figures.image_grid(images[i:i + 1], 1, mean=teacher.mean, std=teacher.std, pad=0)
                    for i in range(len(images))]
    return out


def stamp(run: Run) -> float:
    return _stamp(run)


__all__ = ["all_runs", "class_names", "device_description", "home_key", "job_panel", "jobs_section", "mixed_samples",
           "mixing_path", "export_panel", "networks_note", "resume_note", "run_label", "need_runs_message", "pick_partner", "runs_tools", "pick_run", "real_images", "registry", "run_networks", "save_upload",
           "setting_widget", "setup_page", "show_image_grid", "stamp"]
