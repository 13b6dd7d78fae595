"""What the pages compute, without Streamlit: settings, tables of runs, samples to look at.

The pages only lay these out; tests call them directly.
"""
from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import FIELDS, SECTIONS, TEACHERS, Run, RunConfig, Spec, preset
from ..analysis import normalise_coefficients
from .paths import data_label

# --------------------------------------------------------------------------- Quantize settings


@dataclass(frozen=True)
class Setting:
    """One widget on the Quantize page: a RunConfig field, its label and a one-line explanation."""
    name: str
    label: str
    help: str
    kind: str                 # int | float | bool | select | floatlog
    options: tuple = ()
    lo: float | None = None
    hi: float | None = None
    section: str = "Method"


_WIDGET_MAX = 2**53 - 1  # the largest integer a browser's number field holds exactly


def _setting(name: str, spec: Spec) -> Setting:
    """The widget of a field, from its declaration in the config (label, help, choices, range)."""
    kind = ("select" if spec.choices else "bool" if spec.type is bool else "int" if spec.type is int
            else "floatlog" if spec.log else "float")
    lo = hi = None
    if kind in ("int", "float", "floatlog"):
        lo, hi = spec.bounds()
        if kind == "int":
            lo, hi = max(lo, -_WIDGET_MAX), min(hi, _WIDGET_MAX)
    return Setting(name, spec.label, spec.help, kind, tuple(spec.choices), lo, hi, spec.section)


# The fields the config declares with an app section, section by section, each in the dataclass's order.
SETTINGS: tuple[Setting, ...] = tuple(sorted((_setting(n, s) for n, s in FIELDS.items() if s.section),
                                             key=lambda s: SECTIONS.index(s.section)))


def settings_by_section() -> dict[str, list[Setting]]:
    out: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        out.setdefault(s.section, []).append(s)
    return out


def config_from_values(base: RunConfig, values: dict) -> RunConfig:
    """``base`` with the widget values applied (raises ConfigError with a clear message)."""
    return base.with_overrides(**values)


def start_presets() -> dict[str, str]:
    """Presets to start the Quantize form from, with a description."""
    return {"digits": "Fast demo: 8x8 digits, small CNN trained on the spot (seconds on a CPU)",
            "cifar10-resnet20-cpu": "CIFAR-10 ResNet-20 at a CPU budget, the paper's settings (with the Teacher "
                                    "page's ResNet-20: the shipped one, or your data and weights)",
            "cifar10-resnet20-fast": "Qimera+: our recipe at three quarters of the CPU budget (clipped ranges, "
                                     "roundings reconstructed at the end, a varied generator whose noise seeds "
                                     "differ in layout (mode seeking), frozen after 3 epochs, no superposed "
                                     "batches: at this budget they do not pay): more accurate, faster",
            "cifar10-resnet20": "The paper's CIFAR-10 setting (400 x 200 iterations; a GPU job)",
            "cifar100-resnet20": "The paper's CIFAR-100 setting",
            "imagenet-resnet18": "ImageNet ResNet-18 (zoo weights, an ImageNet folder)"}

# --------------------------------------------------------------------------- Teacher page


DATASETS = {"digits": "Digits (8x8, embedded, offline)", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
            "folder": "An image folder (ROOT/<class>/<image>)", "imagenet": "ImageNet validation folder"}


def teachers_for(kind: str) -> list[str]:
    """Teacher names that fit a data set (by image size and classes)."""
    if kind == "digits":
        return ["digits-cnn"]
    if kind == "cifar10":
        return [n for n in TEACHERS if n.startswith("resnet") and TEACHERS[n][1] == 32 and TEACHERS[n][5] == 10]
    if kind == "cifar100":
        return [n for n in TEACHERS if TEACHERS[n][1] == 32 and n != "resnet20_cifar10"]
    return [n for n in TEACHERS if n != "digits-cnn"]


_PAGE_HINTS = [
    (r"Pass download=True \(--set download=true\) to fetch it", "Tick **Download if missing** above to fetch it"),
    (r"give a checkpoint \(--checkpoint PATH\), (pretrained=True for zoo weights, )?or train one first "
     r"\(python -m qimera_engine train-teacher [^)]*\)",
     "choose **Checkpoint file path** or **Upload a checkpoint** under Weights, or **Model zoo (download)**"),
    (r"Give a local checkpoint instead \(--checkpoint PATH\)", "Choose **Checkpoint file path** under Weights instead"),
    (r"on a CPU use a checkpoint \(--checkpoint PATH\)", "on a CPU choose **Checkpoint file path** under Weights"),
]


def page_hint(message: str) -> str:
    """An engine error as the Teacher page says it: the page's own controls instead of command-line flags."""
    import re
    for pattern, text in _PAGE_HINTS:
        message = re.sub(pattern, text, message)
    return message


def preset_for(kind: str) -> str:
    return {"digits": "digits", "cifar10": "cifar10-resnet20-cpu", "cifar100": "cifar100-resnet20",
            "imagenet": "imagenet-resnet18"}.get(kind, "cifar10-resnet20-cpu")

# --------------------------------------------------------------------------- runs


def run_label(run: Run) -> str:
    try:
        c = run.config
        shipped = ", shipped with the app" if run.read_only else ""
        return f"{run.id}  ({c.label} W{c.wbits}A{c.abits}, {c.teacher}, seed {c.seed}{shipped})"
    except Exception:
        return run.id


def split_damaged(runs: list[Run]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Readable runs, and (run id, what is wrong) for each damaged folder."""
    ok, damaged = [], []
    for r in runs:
        problem = r.problem
        if problem is None:
            ok.append(r)
        else:
            damaged.append((r.id, problem))
    return ok, damaged


def runs_table(runs: list[Run], active_dirs: set[str] | frozenset = frozenset()) -> pd.DataFrame:
    """One row per run folder: settings, status and results (the newest first)."""
    rows = []
    for r in runs:
        try:
            c = r.config
        except Exception as e:  # a damaged folder is listed, not fatal
            rows.append({"run": r.id, "status": f"unreadable: {e}"})
            continue
        s = r.summary or {}
        status = "shipped" if r.read_only else r.state
        if status == "running" and str(r.path) not in active_dirs:
            status = "running elsewhere"  # another process (e.g. the command line) holds its lock
        metrics = r.metrics if not s else []
        # status and results first, the long data paths last: at 1280 px the table's first columns show
        rows.append({"run": r.id, "status": status,
                     "final top-1": s.get("quant_top1", metrics[-1]["top1"] if metrics else None),
                     "method": c.label, "W": c.wbits, "A": c.abits,
                     "best top-1": s.get("best_top1", max((m["top1"] for m in metrics), default=None)),
                     "FP top-1": s.get("fp_top1"),
                     "epochs": f"{s.get('epochs_done', len(metrics))}/{c.epochs}", "seed": c.seed,
                     "teacher": c.teacher, "seconds": s.get("seconds"), "data": data_label(c.test_data)})
    return pd.DataFrame(rows)


def same_scale(a: RunConfig, b: RunConfig) -> bool:
    """Whether two runs' accuracies share one axis: the same teacher on the same test data."""
    return (a.teacher, a.test_data) == (b.teacher, b.test_data)


def overlay_default(runs: list[Run]) -> list[str]:
    """The runs "Compare runs" starts with: the newest, and the newest other run on the same scale."""
    if not runs:
        return []
    partner = next((r for r in runs[1:] if same_scale(runs[0].config, r.config)), None)
    return [runs[0].id] + ([partner.id] if partner is not None else [])


# Settings that do not make two runs different methods: what they are measured on, how, and where
SAME_METHOD_FIELDS = {"teacher", "checkpoint", "pretrained", "test_data", "train_data", "download", "wbits", "abits",
                      "seed", "eval_batch_size", "eval_images", "diversity_images", "device", "compile", "num_threads",
                      "log_every"}


def distinct_labels(configs: list[RunConfig]) -> list[str]:
    """Each run's method label (``RunConfig.label``), with the settings where it differs from the most common
    run of that label added, e.g. ``qimera (dm=True, coeff_sampler=fixed)``: runs of different settings never
    share a label, so a chart never averages them together."""
    settings = [{k: v for k, v in c.to_dict().items() if k not in SAME_METHOD_FIELDS} for c in configs]
    keys = [json.dumps(s, sort_keys=True, default=str) for s in settings]
    out = [c.label for c in configs]
    for label in set(out):
        idx = [i for i, c in enumerate(configs) if c.label == label]
        usual = collections.Counter(keys[i] for i in idx).most_common(1)[0][0]
        ref = settings[next(i for i in idx if keys[i] == usual)]
        for i in idx:
            if keys[i] != usual:
                diff = [f"{k}={settings[i][k]}" for k in settings[i] if settings[i][k] != ref.get(k)]
                out[i] = f"{label} ({', '.join(diff)})"
    return out


def labelled_runs(runs: list[Run]) -> list[tuple[Run, str]]:
    """The finished runs (with a final top-1), each with its method label as tables name it
    (``distinct_labels`` over these runs)."""
    done = [r for r in runs if r.summary and r.status.get("status") == "finished"
            and r.summary.get("quant_top1") is not None]
    return list(zip(done, distinct_labels([r.config for r in done])))


BITWIDTH_COLUMNS = ["method", "bits", "W", "A", "budget", "schedule", "seed", "teacher", "data", "top1", "best_top1",
                    "fp_top1", "run"]


def bitwidth_table(runs: list[Run], curves=None, label=data_label) -> pd.DataFrame:
    """Finished runs with W = A, for the bit-width chart: method, bits, seed, top-1 (final and best),
    and the budget (generated images): runs of different budgets are never pooled. ``curves``: a CSV of
    such rows shipped with the app (``shipped_curves``; data specs as the runs recorded them), appended
    after the runs, without the rows of runs already listed; ``label`` turns a data spec into what the
    table shows."""
    rows = []
    for r, method in labelled_runs(runs):
        s, c = r.summary, r.config
        rows.append({"method": method, "bits": s["wbits"] if s["wbits"] == s["abits"] else None,
                     "W": s["wbits"], "A": s["abits"], "budget": budget(c),
                     "schedule": f"{c.epochs} × {c.iters_per_epoch} × {c.batch_size}", "seed": s.get("seed"),
                     "teacher": s.get("teacher"), "data": label(s.get("test_data") or c.test_data),
                     "top1": s["quant_top1"],
                     "best_top1": s.get("best_top1"), "fp_top1": s.get("fp_top1"), "run": r.id})
    df = pd.DataFrame(rows, columns=BITWIDTH_COLUMNS)
    extra = shipped_curves(curves)
    if len(extra):
        extra = extra[~extra["run"].isin(df["run"])].assign(data=lambda t: t["data"].map(label))
        df = pd.concat([df, extra], ignore_index=True) if len(df) else extra
    return df[df["bits"].notna() & df["W"].between(2, 8)].astype({"bits": int}).reset_index(drop=True)


def no_fine_tuning(method: str) -> bool:
    """Whether a table's method label names PTQ (``ptq``, ``ptq+``, ``ptq+ (...)``): a student calibrated only."""
    return method.split(" ")[0].rstrip("+") == "ptq"


BASELINE_NOTE = "no fine-tuning"  # what ``budget_rows`` adds to the label of a row it brings in from another budget


def from_other_budget(method: str) -> bool:
    """Whether a label is one that ``budget_rows`` gave a baseline of another budget."""
    return f"({BASELINE_NOTE}, " in method


def budget_rows(part: pd.DataFrame, chosen: int, baselines: bool = False) -> pd.DataFrame:
    """The rows of ``part`` (``bitwidth_table``, one teacher and data set) at budget ``chosen``. With
    ``baselines``, PTQ's rows of other budgets join them when this budget has no PTQ rows of that label:
    PTQ only calibrates its student, so it has no training budget to match; it is the baseline without
    fine-tuning that papers set beside the fine-tuned methods. Their label says what they used
    (``ptq+ (no fine-tuning, 12,800 images)``), so they are never pooled with rows of this budget."""
    rows = part[part["budget"] == chosen]
    if not baselines:
        return rows
    own = {m for m in rows["method"] if no_fine_tuning(m)}
    other = part[(part["budget"] != chosen) & part["method"].map(no_fine_tuning) & ~part["method"].isin(own)]
    if other.empty:
        return rows
    other = other.assign(method=[f"{m} ({BASELINE_NOTE}, {b:,} images)" for m, b in zip(other["method"], other["budget"])])
    return pd.concat([rows, other], ignore_index=True)


def shipped_curves(path) -> pd.DataFrame:
    """The bit-width rows of a CSV written by ``assets/build_curves.py`` (no rows when ``path`` is None or
    missing); a file without the table's columns is refused."""
    if path is None or not path.is_file():
        return pd.DataFrame(columns=BITWIDTH_COLUMNS)
    table = pd.read_csv(path)
    missing = [c for c in BITWIDTH_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {', '.join(missing)}")
    return table[BITWIDTH_COLUMNS]


def showcase_pair(runs: list[Run]) -> tuple[Run, Run | None]:
    """The Qimera run whose superposed samples Home shows, and the same recipe's other run (with superposed
    batches when the shown one has none, or without): the one whose superposed samples cover most of the real
    features, when the runs measured that (``diversity``), else the one trained on superposed batches."""
    measured = [r for r in runs if "mix_coverage" in (r.summary or {}).get("diversity", {})]
    if measured:
        show = max(measured, key=lambda r: r.summary["diversity"]["mix_coverage"])
    else:
        show = next((r for r in runs if r.config.superposes), runs[0])
    other = next((r for r in runs if r.config.superposes != show.config.superposes), None)
    return show, other


SAME_IMAGE_SPREAD = 0.1  # below this mean pixel distance (0-1 values), a generator's seeds give one image,
SEPARATE_IMAGE_SPREAD = 0.2  # above this, images as different as real ones of a class nearly are (about 0.3)
SAME_LAYOUT_SPREAD = 0.2  # below this mean distance over a 4 x 4 grid of blocks, the seeds share one layout
# (eight real CIFAR-10 cats: 0.27 on the test images, 0.30 on the training images; analysis.image_spread(grid=4))


def seed_sentence(spread: float | None, layout: float | None = None) -> str:
    """What the seeds' images say about the generator's use of its noise: ``spread``, their mean distance in
    pixels, and ``layout`` (when given), the same over a 4 x 4 grid of blocks (``analysis.image_spread``)."""
    if spread is None:
        return ""
    pixels = (f"the mean distance between two of them is {spread:.2f} in pixel values from 0 to 1 (two real CIFAR-10 "
              "images of one class: about 0.3)")
    if spread < SAME_IMAGE_SPREAD:
        return (f"These seeds give nearly the same image (mean distance between two of them {spread:.2f}, in pixel "
                "values from 0 to 1; two real CIFAR-10 images of one class are about 0.3 apart): this generator "
                "ignores most of its noise. docs/results.md (\"Diversity\") measures why, and what helps.")
    if layout is not None and layout < SAME_LAYOUT_SPREAD:
        return (f"The seeds vary the details of one picture: {pixels}, but only {layout:.2f} in their layout (their "
                "means over a 4 × 4 grid of blocks; real images of one class: about 0.3), so the light and dark "
                "parts stay in much the same places.")
    if spread < SEPARATE_IMAGE_SPREAD:
        return f"The seeds vary the details of one picture: {pixels}."
    return (f"Each seed gives its own image: {pixels}"
            + (f"; {layout:.2f} in their layout (their means over a 4 × 4 grid of blocks; real: about 0.3)."
               if layout is not None else "."))


def clean_path(path: dict, a: int, b: int) -> bool:
    """Whether the teacher reads class A at the start of a path and class B at its end."""
    return int(path["teacher_pred"][0]) == a and int(path["teacher_pred"][-1]) == b


def first_clean_seed(path_of, a: int, b: int, start: int, tries: int = 8) -> int | None:
    """The first of ``tries`` seeds from ``start`` whose path A -> B is clean (``path_of(seed)`` gives it), or None."""
    return next((s for s in range(start, start + tries) if clean_path(path_of(s), a, b)), None)


def boundary_sentence(path: dict, names: list[str], a: int, b: int) -> str:
    """What the teacher decides along a path A -> B, in words (the boundary is where its top-1 changes)."""
    bd = path.get("boundary")
    start = int(path["teacher_pred"][0])
    if bd is None:
        return f"The teacher's top-1 class stays {names[start]} along this whole path: no decision boundary is crossed."
    text = f"The teacher's top-1 class changes from {names[bd['from']]} to {names[bd['to']]} at λ_B ≈ {bd['alpha']:.2f}."
    if bd["to"] != b:
        text += (f" That is a third class, not {names[b]}: p({names[b]}) reaches only "
                 f"{float(np.max(path['p_b'])):.2f} on this path.")
    if start != a:
        text += f" (Even at λ_B = 0 the teacher does not say {names[a]}.)"
    return text


FEATURE_NUMBERS = ("**near boundary**: share of samples whose teacher hesitates (its top-1 probability minus its "
                   "top-2 is below the threshold). **coverage**: share of real test images that have a synthetic "
                   "sample among their k nearest neighbours, in the teacher's feature space (higher: the synthetic "
                   "samples reach more of where real data lives); the real row gives other real test images "
                   "against these, the most a generator can hope for. **spread**: how far apart two samples of "
                   "one class lie, against real images of one class (1.0: as varied as real images; near 0: one "
                   "image per class). What Qimera expects: superposed samples near the boundary more often than "
                   "plain ones and than GDFQ's, and a higher coverage.")


def curves_line(table: pd.DataFrame, bits: int, teacher: str, budget: int) -> str | None:
    """One sentence of a bit-width table (``bitwidth_table``: the shipped runs and the precomputed curves) at
    W = A = ``bits`` for ``teacher`` and ``budget`` (PTQ at any: it never fine-tunes): each method's mean top-1
    ± std with its number of seeds, best first, for the methods with two seeds or more there (None if none)."""
    part = table[(table["bits"] == bits) & (table["teacher"] == teacher)
                 & ((table["budget"] == budget) | table["method"].map(no_fine_tuning))]
    g = part.groupby("method")["top1"].agg(["mean", "std", "count"]).sort_values("mean", ascending=False)
    g = g[g["count"] >= 2]  # a single seed is no mean (the page names single runs on their own)
    if g.empty:
        return None
    each = ", ".join(f"{m} **{r['mean']:.2f}** ± {r['std']:.2f} (n = {int(r['count'])})" for m, r in g.iterrows())
    return (f"Over several seeds at W{bits}A{bits} (the shipped and precomputed runs: same teacher and test images; "
            f"± is the std over seeds): {each}. Bit widths shows every bit width.")


def run_curves_line(runs: list[Run], run: Run, curves=None) -> str | None:
    """``curves_line`` at ``run``'s bit width, teacher and budget, over ``runs`` and the precomputed ``curves``
    (``bitwidth_table``); None for a run whose W and A differ (the curves have W = A only)."""
    c = run.config
    if c.wbits != c.abits:
        return None
    return curves_line(bitwidth_table(runs, curves), c.wbits, c.teacher, budget(c))


def diversity_line(summary: dict) -> str | None:
    """How varied a run's generated samples are, beside the reference of real images against real ones (from
    the summary a run writes; None for a run without those figures)."""
    div, ref = summary.get("diversity"), summary.get("diversity_reference")
    if not div or not ref:
        return None
    mix = (f", superposed ones {div['mix_coverage']:.0%}" if "mix_coverage" in div else "")
    return (f"How varied its samples are, in the teacher's features: plain samples reach **{div['coverage']:.0%}** "
            f"of the real test images (coverage, k = 5){mix}; other real images reach {ref['coverage']:.0%}. Two "
            f"samples of one class lie {div['spread_vs_real']:.2f}x as far apart as two real images of one class.")


def feature_table(sources: dict, threshold: float, k: int) -> list[dict]:
    """One row per source: near the boundary, coverage of the real features, within-class spread against
    the real one. The real row: other real test images against these (the reference), when there are some."""
    from qimera_engine import analysis
    real = sources["real"]
    real_spread = analysis.class_spread(real["features"], real["labels"])["spread"]
    rows = []
    for name, s in sources.items():
        if name == "real":
            other, other_labels = s.get("other_features"), s.get("other_labels")
            enough = other is not None and len(other) > k and len(real["features"]) > k
            coverage = analysis.knn_coverage(real["features"], other, k) if enough else None
            spread = (analysis.class_spread(other, other_labels)["spread"] / real_spread if enough else 1.0)
            label = f"real (other {len(other)} test images)" if enough else "real"
        else:
            coverage = analysis.knn_coverage(real["features"], s["features"], k)
            spread = analysis.class_spread(s["features"], analysis.dominant_labels(s["labels"], s["coeffs"]))["spread"]
            spread, label = spread / real_spread, name
        rows.append({"source": label, "near boundary": analysis.boundary_share(s["probs"], threshold),
                     "coverage": coverage, "spread": spread})
    return rows


def feature_verdict(numbers: dict[str, dict]) -> list[str]:
    """What this run's numbers say against what Qimera expects, plainly, including when it is the
    opposite. ``numbers[source]``: {"near": share, "coverage": share or None}."""
    out = []
    sup = numbers.get("superposed")
    if sup is None:
        return out
    for other in ("plain", "gdfq"):
        o = numbers.get(other)
        if o is None:
            continue
        who = "this run's plain samples" if other == "plain" else "the GDFQ run's samples"
        if sup["near"] > o["near"]:
            out.append(f"As expected, superposed samples are near the boundary more often than {who} "
                       f"({sup['near']:.0%} vs {o['near']:.0%}).")
        else:
            out.append(f"Not as expected: {who} are near the boundary at least as often as the superposed ones "
                       f"({o['near']:.0%} vs {sup['near']:.0%}). Short runs, a few samples or a strong teacher can "
                       f"do that; the mixing coefficients matter too.")
        if sup.get("coverage") is not None and o.get("coverage") is not None and sup["coverage"] < o["coverage"]:
            out.append(f"And {who} cover more of the real features ({o['coverage']:.0%} vs {sup['coverage']:.0%}).")
    return out


def generator_runs(runs: list[Run]) -> list[Run]:
    """Runs that have saved a generator (at least one epoch done)."""
    out = []
    for r in runs:
        try:
            if r.has_generator and (r.path / "generator.json").exists():
                out.append(r)
        except OSError:
            continue
    return out


def budget(cfg: RunConfig) -> int:
    """A run's schedule as generated images: epochs x iterations x batch."""
    return cfg.epochs * cfg.iters_per_epoch * cfg.batch_size


def comparable(a: RunConfig, b: RunConfig) -> bool:
    """Whether two runs can be compared fairly: same teacher, data, bit widths and budget."""
    return (a.teacher, a.test_data, a.wbits, a.abits, budget(a)) == (b.teacher, b.test_data, b.wbits, b.abits, budget(b))


def partner_runs(run: Run, runs: list[Run], method: str = "gdfq", same_setting: bool = True) -> list[Run]:
    """Runs of ``method`` with a generator to set beside ``run``, newest first: by default only those
    with the same teacher, data, bit widths and budget; else any with the same teacher and data."""
    c = run.config
    out = []
    for r in generator_runs(runs):
        rc = r.config
        if r.path == run.path or rc.method != method or (rc.teacher, rc.test_data) != (c.teacher, c.test_data):
            continue
        if not same_setting or comparable(c, rc):
            out.append(r)
    return out


def gdfq_partner(run: Run, runs: list[Run]) -> Run | None:
    """The newest GDFQ run comparable with ``run`` (same teacher, data, bits and budget), if any."""
    found = partner_runs(run, runs)
    return found[0] if found else None


def setting_label(cfg: RunConfig) -> str:
    return f"W{cfg.wbits}A{cfg.abits}, {budget(cfg):,} generated images ({cfg.epochs} × {cfg.iters_per_epoch} × {cfg.batch_size})"

# --------------------------------------------------------------------------- boundary samples


def coefficient_formula(coeffs, names: list[str], mapping: bool = False) -> str:
    """LaTeX of the superposed embedding, e.g. z = 0.62 e_{cat} + 0.38 e_{dog}; with the disentanglement
    mapping M when the generator has it. Three terms or more take a line each (a narrow column cuts one
    long line off)."""
    def term(n):
        n = re.sub(r"([_&%$#{}])", r"\\\1", str(n))  # LaTeX's special characters, as text
        e = f"e_{{\\text{{{n}}}}}"
        return f"M({e})" if mapping else e
    terms = [f"{c:.2f}\\,{term(n)}" for c, n in zip(normalise_coefficients(coeffs), names)]
    if len(terms) <= 2:
        return "z = " + " + ".join(terms)
    return "\\begin{aligned} z = {} & " + " \\\\ & + ".join(terms) + " \\end{aligned}"


def hover_coefficients(labels, coeffs, class_names: list[str]) -> list[str]:
    """'0.62 x 3 + 0.38 x 8' per sample, for scatter hovers."""
    labels, coeffs = np.asarray(labels), np.asarray(coeffs)
    if labels.ndim == 1:
        labels, coeffs = labels[:, None], coeffs[:, None]
    return [" + ".join(f"{c:.2f} x {class_names[int(l)]}" for l, c in zip(ls, cs) if c > 0.005)
            for ls, cs in zip(labels, coeffs)]


def dominant_class(labels, coeffs) -> np.ndarray:
    """For colouring superposed samples: the class with the largest coefficient."""
    labels, coeffs = np.asarray(labels), np.asarray(coeffs)
    if labels.ndim == 1:
        return labels.astype(int)
    return labels[np.arange(len(labels)), coeffs.argmax(1)].astype(int)


def default_config(kind: str = "digits") -> RunConfig:
    return preset(preset_for(kind))


def describe_config_changes(cfg: RunConfig, base: RunConfig) -> dict:
    """Fields where ``cfg`` differs from ``base`` (shown before a start)."""
    a, b = cfg.to_dict(), base.to_dict()
    return {k: a[k] for k in a if a[k] != b.get(k)}



def selected_points(points: list[dict], sources: dict, classes: list[str]) -> pd.DataFrame:
    """Rows for points picked on the feature scatter: source, class, coefficients, teacher's view."""
    rows = []
    for p in points:
        cd = p.get("customdata")
        if not cd or len(cd) < 4:
            continue
        source, idx = cd[0], int(cd[3])
        probs = np.asarray(sources[source]["probs"][idx])
        top = np.argsort(probs)[::-1][:3]
        rows.append({"source": source, "index": idx, "class": cd[1], "mix": cd[2],
                     "teacher top-3": ", ".join(f"{classes[c]} {probs[c]:.2f}" for c in top),
                     "margin": float(probs[top[0]] - probs[top[1]]) if len(top) > 1 else 1.0})
    return pd.DataFrame(rows)

# --------------------------------------------------------------------------- Compare page

COMPARE_METHODS = {  # the comparison launcher's methods: settings over the chosen preset
    "Qimera (superposed batches, p = 0.4)": {"method": "qimera", "superpose_p": 0.4},
    "Qimera without superposition (p = 0)": {"method": "qimera", "superpose_p": 0.0},
    "GDFQ": {"method": "gdfq"},
    "PTQ (no fine-tuning)": {"method": "ptq"},
}
_PER_RUN = ("wbits", "abits", "seed")  # the launcher sets these for every run: a variant cannot


def parse_variants(text: str) -> dict[str, dict]:
    """Variants of one's own for the comparison, one per line: ``name: key=value, key=value`` (values as on
    the command line; a list keeps its commas: ``milestones=3,5``). Lines starting with # are skipped.
    Raises ValueError naming the line."""
    out: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"line {n}: write a variant as 'name: key=value, key=value', got {line!r}")
        settings = {}
        for part in re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", rest.strip()):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"line {n} ({name}): {part.strip()!r} is not key=value")
            if key not in FIELDS:
                raise ValueError(f"line {n} ({name}): unknown setting {key!r}")
            if key in _PER_RUN:
                raise ValueError(f"line {n} ({name}): {key} is chosen for every run by the form, not by a variant")
            settings[key] = value.strip()
        if not settings:
            raise ValueError(f"line {n} ({name}): give at least one key=value")
        if name in out or name in COMPARE_METHODS:
            raise ValueError(f"line {n}: the name {name!r} is taken")
        out[name] = settings
    return out


def comparison(runs: list[Run], reference: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished runs of one teacher, data set and budget, by method (labels carry every setting that differs,
    so different settings are never averaged) and bit widths: top-1 as mean ± std with n, and per seed the
    paired difference to the ``reference`` method at the same bit widths (a 95 % paired t interval decides
    the verdict). Returns (summary, pairs)."""
    df = pd.DataFrame([{"method": lab, "W": r.summary["wbits"], "A": r.summary["abits"], "seed": r.summary.get("seed"),
                        "top1": r.summary["quant_top1"], "run": r.id} for r, lab in labelled_runs(runs)],
                      columns=["method", "W", "A", "seed", "top1", "run"])
    summary, pairs = [], []
    for (w, a), part in df.groupby(["W", "A"], sort=True):
        ref = part[part["method"] == reference].groupby("seed")["top1"].mean()
        for method, rows in part.groupby("method", sort=False):
            vals = rows["top1"].to_numpy(float)
            row = {"W": w, "A": a, "method": method, "n": len(vals), "top-1 mean": vals.mean(),
                   "top-1 std": vals.std(ddof=1) if len(vals) > 1 else float("nan")}
            if method != reference:
                mine = rows.groupby("seed")["top1"].mean()
                common = sorted(set(mine.index) & set(ref.index))
                diffs = np.array([mine[s] - ref[s] for s in common], float)
                pairs += [{"W": w, "A": a, "method": method, "seed": s, "top1": mine[s], "reference top1": ref[s],
                           "difference": mine[s] - ref[s]} for s in common]
                row.update(paired_difference(diffs))
            else:
                row.update({"pairs": None, "difference mean": None, "difference std": None, "wins": None,
                            "losses": None, "verdict": "the reference"})
            summary.append(row)
    summary = pd.DataFrame(summary)
    if len(summary):  # counts stay whole numbers (missing for the reference's own row), not floats beside NaN
        summary = summary.astype({c: "Int64" for c in ("n", "pairs", "wins", "losses")})
    return summary, pd.DataFrame(pairs, columns=["W", "A", "method", "seed", "top1", "reference top1", "difference"])


def paired_difference(diffs: np.ndarray) -> dict:
    """Per-seed differences to the reference: their mean and std, wins and losses, and a verdict from a 95 %
    paired t interval (with one pair, or none, nothing can be told)."""
    n = len(diffs)
    out = {"pairs": n, "difference mean": float(diffs.mean()) if n else None,
           "difference std": float(diffs.std(ddof=1)) if n > 1 else None,
           "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum())}
    if n == 0:
        out["verdict"] = "no seed in common with the reference"
    elif n == 1:
        out["verdict"] = "one seed: cannot tell (run more seeds)"
    else:
        from scipy import stats
        half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / np.sqrt(n)
        mean = diffs.mean()
        if abs(mean) > half:
            out["verdict"] = f"{'better' if mean > 0 else 'worse'} than the reference (95 %: {mean - half:+.2f} to {mean + half:+.2f})"
        else:
            out["verdict"] = f"cannot tell apart ({n} seeds; 95 %: {mean - half:+.2f} to {mean + half:+.2f})"
    return out


def comparison_display(summary: pd.DataFrame) -> pd.DataFrame:
    """``comparison``'s summary as text for a table: top-1 as mean ± std, the paired difference as mean ± std
    over n seeds, wins and losses; blank (never "None") where a figure does not apply (the reference's own row,
    one run). The method first: it is the row's name (the page shows the table without an index)."""
    def top1(m, s):
        return f"{m:.2f} ± {s:.2f}" if s == s else f"{m:.2f}"

    def diff(row):
        if pd.isna(row["pairs"]) or not row["pairs"]:
            return ""
        sd = row["difference std"]
        return (f"{row['difference mean']:+.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}")
                + f" ({int(row['pairs'])} seed{'s' if row['pairs'] > 1 else ''})")
    rows = summary.to_dict("records")
    return pd.DataFrame({"method": [r["method"] for r in rows], "bits": [f"W{r['W']}A{r['A']}" for r in rows],
                         "n": [r["n"] for r in rows],
                         "top-1": [top1(r["top-1 mean"], r["top-1 std"]) for r in rows],
                         "difference to the reference": [diff(r) for r in rows],
                         "wins / losses": [f"{int(r['wins'])} / {int(r['losses'])}" if not pd.isna(r["wins"]) else ""
                                           for r in rows],
                         "verdict": [r["verdict"] for r in rows]})


def comparison_defaults(preset_name: str) -> dict:
    """The launcher's starting choice, one that separates the methods: digits at W2A2 (at W4A4 every method is
    within one test image of FP), a CIFAR-10 ResNet-20 at W4A4 (the showcase's setting)."""
    if preset_name == "digits":
        return {"bits": [2], "seeds": 3, "methods": list(COMPARE_METHODS)}
    return {"bits": [4], "seeds": 3, "methods": list(COMPARE_METHODS)[:3]}

# --------------------------------------------------------------------------- Guided tour

TOUR_STEPS = ["The teacher", "What a generator makes", "Real and synthetic, side by side", "Mixing two classes",
              "Where the teacher changes its mind", "What the student learns", "The numbers"]
