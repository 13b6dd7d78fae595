"""The Compare page's launcher on the shipped ResNet-20, driven in a real browser: how long it takes and what it shows.

    python bench/app_compare.py [--seeds 3] [--epochs E] [--iters I] [--shot PATH] [--out FILE.json] [--timeout 7200]

A new, empty $QIMERA_HOME (the shipped showcase stays visible: QIMERA_SHOWCASE is unset), one
`streamlit run app.py` server (127.0.0.1, a free port, headless, started as tests/test_browser.py starts it)
and one chromium tab (Playwright, 1280 x 720). In that tab, as a user goes: the Teacher page, "CIFAR-10 with
the shipped ResNet-20 (offline)" loaded; then Compare through the sidebar (the session keeps the teacher
chosen), its form left at its defaults (the first three methods, W4A4, the preset's epochs and iterations)
except for --seeds, --epochs and --iters; "Start the comparison" pressed and the tab kept open until the job
panel says "comparison: ...: finished" (polled every few seconds).
Measured and printed: the machine, the seconds from the click to "finished", each run of the new home (method
label, bits, seed, schedule, final top-1, its own training "seconds"), and the comparison the page computes
from them (qimera_engine.ui.logic.comparison against the "p=0" method, as the page's default reference): its
summary and its per-seed paired differences. The page's Results section (table and paired-difference chart),
its teacher-and-data and budget pickers set to these runs (a note says when they opened on others, such as
the shipped showcase's), is saved as a screenshot; --out writes every figure as JSON.
Exit status 0 whenever it measured, whatever the numbers; non-zero, with a one-line reason, when it could not.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from app_watch import VIEWPORT, machine, open_selectbox, pick_port, start_server  # noqa: E402

SHOT = ROOT / "docs" / "screenshots" / "compare-resnet20.png"
SHIPPED_LABEL = "CIFAR-10 with the shipped ResNet-20 (offline)"  # pages/1_Teacher.py
PAGE_TIMEOUT_MS = 120_000  # one page render on a loaded machine (not the comparison: that has --timeout)
TEACHER_TIMEOUT_MS = 600_000  # loading the shipped teacher and measuring it on its 500 test images
POLL_S = 5.0  # how often the page is read while the comparison trains
DONE = re.compile(r"^comparison: .*: (finished|failed|cancelled)$")


class CannotMeasure(RuntimeError):
    """What stopped the benchmark, in one line."""


# --------------------------------------------------------------------------- the browser side


def choose(page, label: str, option: str | re.Pattern) -> None:
    """Pick ``option`` in the selectbox labelled ``label``, and wait for the rerun it starts."""
    from test_browser import wait_rendered
    _, item = open_selectbox(page, label, option)
    item.click()
    wait_rendered(page)


def load_shipped_teacher(page, base: str) -> None:
    """The Teacher page with the shipped ResNet-20 loaded: the session's teacher from now on."""
    from test_browser import wait_rendered
    page.goto(base + "/")
    page.get_by_role("heading", name="Qimera Explorer", level=1).wait_for()
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Teacher").first.click()
    page.get_by_role("heading", name="Teacher", level=1).wait_for()
    wait_rendered(page)
    choose(page, "Data set", SHIPPED_LABEL)
    page.get_by_role("button", name="Load or train the teacher").click()
    ready = page.get_by_text("The Quantize page starts from this teacher and data set.")
    failed = page.get_by_text(re.compile(r"^Could not prepare the teacher"))
    ready.or_(failed).first.wait_for(timeout=TEACHER_TIMEOUT_MS)
    if failed.count():
        raise CannotMeasure(failed.first.inner_text().splitlines()[0])


def set_number(page, label: str, value: int | None) -> None:
    """Type ``value`` into the form's number input ``label`` (None: leave it). A blur commits it to the
    form; Enter would submit the form."""
    if value is None:
        return
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.evaluate("e => e.blur()")
    if box.input_value() != str(value):
        raise CannotMeasure(f"the form's {label!r} shows {box.input_value()!r}, not {value}")


def start_comparison(page, seeds: int, epochs: int | None, iters: int | None) -> float:
    """Compare opened from the sidebar, its form filled in and submitted; the click's perf_counter time."""
    from test_browser import wait_rendered
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Compare").first.click()
    page.get_by_role("heading", name="Compare methods", level=1).wait_for()
    wait_rendered(page)
    use = page.get_by_role("checkbox", name=re.compile(r"^Use the teacher chosen on the Teacher page \(resnet20 on"))
    if use.count() == 0 or not use.is_checked():
        raise CannotMeasure("the Compare page does not start from the Teacher page's shipped ResNet-20")
    set_number(page, "Seeds", seeds)
    set_number(page, "Epochs per run", epochs)
    set_number(page, "Iterations per epoch", iters)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Start the comparison").click()
    return t0


def wait_finished(page, proc, t0: float, timeout: float) -> float:
    """Reads the job panel every POLL_S seconds until it says the comparison ended; seconds since ``t0``.
    Prints the panel's line at most once a minute, so a long run shows it is alive."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    done = page.get_by_text(DONE).first
    progress = page.locator('[data-testid="stProgress"]').filter(has_text="comparison:").first
    said = 0.0
    while (now := time.perf_counter()) - t0 < timeout:
        if proc.poll() is not None:
            raise CannotMeasure(f"the server ended with status {proc.returncode} while the comparison trained")
        if done.count():
            took = now - t0
            text = done.inner_text()
            if not text.endswith(": finished"):
                errors = page.locator('[data-testid="stAlert"]').all_inner_texts()
                raise CannotMeasure(f"{text} {' '.join(e.splitlines()[0] for e in errors[:1])}".strip())
            return took
        if now - said >= 60 and progress.count():
            said = now
            try:  # the panel may be redrawn between the count and the read
                print(f"  {now - t0:6.0f} s  {progress.inner_text(timeout=5_000).strip().splitlines()[0]}", flush=True)
            except PlaywrightTimeout:
                pass
        time.sleep(POLL_S)
    raise CannotMeasure(f"the comparison had not finished after {timeout:.0f} s")


def show_these_runs(page, group: str, budget: int) -> list[str]:
    """Results on these runs: the page opens on the first teacher and data (the shipped showcase's may sort
    first) and the budget with the most runs. Returns what had to be changed, as "label: shown -> chosen"."""
    from playwright.sync_api import expect
    changed = []
    box = page.get_by_role("combobox", name="Teacher and data", exact=True)
    if (shown := box.input_value()) != group:
        choose(page, "Teacher and data", group)
        changed.append(f"Teacher and data: {shown!r} -> {group!r}")
    box = page.get_by_role("combobox", name="Budget (generated images per run)", exact=True)
    ours = re.compile(rf"^{re.escape(f'{budget:,}')} \(")
    if not ours.match(shown := box.input_value()):
        choose(page, "Budget (generated images per run)", ours)
        changed.append(f"Budget: {shown!r} -> {box.input_value()!r}")
    expect(box).to_have_value(ours)
    return changed


def shoot_results(page, out: Path) -> None:
    """The Results section, from its heading to the CSV button (table and chart between), at the page's
    width: the viewport is made as tall as the page for the shot (the app scrolls inside its main area)."""
    from test_browser import wait_rendered
    page.locator('[data-testid="stTable"]').last.wait_for()
    page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').last.wait_for()
    wait_rendered(page)
    page.mouse.move(0, 0)  # no tooltip, no focus ring on the last widget touched
    page.evaluate("() => document.activeElement?.blur()")
    height = page.evaluate("() => Math.max(...['[data-testid=\"stMain\"]', '[data-testid=\"stAppViewContainer\"]']"
                           ".map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], int(height) + 40)})
    try:
        wait_rendered(page)
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        main = page.locator('[data-testid="stMainBlockContainer"]').bounding_box()  # the sidebar left out
        top = page.get_by_role("heading", name="Results", level=2).bounding_box()
        bottom = page.get_by_role("button", name="Download CSV").bounding_box()
        y = max(0, top["y"] - 16)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), clip={"x": main["x"], "y": y, "width": main["width"],
                                             "height": bottom["y"] + bottom["height"] + 16 - y})
    finally:
        page.set_viewport_size(VIEWPORT)

# --------------------------------------------------------------------------- the runs' figures


def run_rows(runs) -> list[dict]:
    """Each run of the home: its method label, bits, seed, schedule (epochs x iterations x batch), final top-1
    and own training seconds."""
    rows = []
    for r in runs:
        s, c = r.summary or {}, r.config
        rows.append({"run": r.id, "method": c.label, "W": c.wbits, "A": c.abits, "seed": c.seed,
                     "schedule": f"{c.epochs} x {c.iters_per_epoch} x {c.batch_size}", "status": r.status.get("status"), "quant_top1": s.get("quant_top1"), "seconds": s.get("seconds")})
    return sorted(rows, key=lambda row: (row["method"], row["W"], row["seed"]))


def page_comparison(runs):
    """(reference, summary, pairs) as pages/6_Compare.py computes them on these runs."""
    from qimera_engine.ui.logic import comparison, labelled_runs
    labels = sorted({label for _, label in labelled_runs(runs)})
    if not labels:
        raise CannotMeasure("no finished run with a final top-1 in the new home")
    reference = next((lab for lab in labels if lab.endswith("p=0")),
                     next((lab for lab in labels if lab.startswith("gdfq")), labels[0]))
    return (reference, *comparison(runs, reference))


def page_group(runs) -> tuple[str, int]:
    """The "Teacher and data" option and the budget under which the Results section shows these runs."""
    from qimera_engine.ui.logic import bitwidth_table
    table = bitwidth_table(runs)
    if table.empty:
        raise CannotMeasure("the new home's runs are not in the page's results table")
    row = table.iloc[0]
    return f"{row['teacher']} on {row['data']}", int(row["budget"])


def print_figures(rows: list[dict], reference: str, summary, pairs) -> None:
    print(f"\nruns ({len(rows)}):")
    print(f"  {'method':<14} {'W':>2} {'A':>2} {'seed':>4} {'schedule':<12} {'status':<9} {'top-1':>7} {'seconds':>9}  run folder")
    for r in rows:
        top1 = f"{r['quant_top1']:7.2f}" if r["quant_top1"] is not None else f"{'-':>7}"
        secs = f"{r['seconds']:9.1f}" if r["seconds"] is not None else f"{'-':>9}"
        print(f"  {r['method']:<14} {r['W']:>2} {r['A']:>2} {r['seed']:>4} {r['schedule']:<12} {r['status'] or '?':<9} {top1} {secs}  "
              f"{r['run']}")
    print(f"\ncomparison (reference: {reference}), summary:")
    print(summary.to_string(index=False))
    print("\npaired differences:")
    print(pairs.to_string(index=False) if not pairs.empty else "(none)")

# --------------------------------------------------------------------------- the benchmark


def measure(args, home: Path, log: Path) -> dict:
    """One server and one browser, the whole flow, and the figures; both stopped whatever happens."""
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS, stop_server, wait_healthy

    from qimera_engine import list_runs
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc, base = start_server(env, pick_port(None), log)
    try:
        try:
            wait_healthy(proc, base, log)
        except (RuntimeError, TimeoutError) as e:
            raise CannotMeasure(f"the server did not start: {str(e).splitlines()[0]}") from e
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                load_shipped_teacher(page, base)
                t0 = start_comparison(page, args.seeds, args.epochs, args.iters)
                took = wait_finished(page, proc, t0, args.timeout)
                print(f"click to finished: {took:.1f} s (polled every {POLL_S:g} s)", flush=True)
                runs = list_runs(home / "runs")
                # "finished" shows in the live panel's last redraw, which then asks for a whole-page rerun:
                # let that rerun draw Results before reading them
                time.sleep(3)
                from test_browser import wait_rendered
                wait_rendered(page)
                for change in show_these_runs(page, *page_group(runs)):
                    print(f"note: the Results section did not open on these runs; changed {change}")
                shoot_results(page, args.shot)
            finally:
                browser.close()
    finally:
        stop_server(proc)
    reference, summary, pairs = page_comparison(runs)
    rows = run_rows(runs)
    print_figures(rows, reference, summary, pairs)
    return {"click_to_finished_s": round(took, 1), "runs": rows, "reference": reference,
            "summary": json.loads(summary.to_json(orient="records")),
            "pairs": json.loads(pairs.to_json(orient="records")), "screenshot": str(args.shot)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="the form's Seeds (1-10)")
    ap.add_argument("--epochs", type=int, default=None, help="the form's Epochs per run (default: the preset's)")
    ap.add_argument("--iters", type=int, default=None, help="the form's Iterations per epoch (default: the preset's)")
    ap.add_argument("--shot", type=Path, default=SHOT, help="the results' screenshot (PNG)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds the comparison may take")
    args = ap.parse_args()
    if not 1 <= args.seeds <= 10:
        ap.error("--seeds must be in 1..10 (the form's range)")
    from test_browser import CHROMIUM
    if not CHROMIUM.exists():
        print(f"app_compare: cannot measure: no chromium at {CHROMIUM}", file=sys.stderr)
        return 2

    print(f"app_compare: the Compare page's defaults on the shipped ResNet-20, {args.seeds} seed(s), "
          f"epochs {args.epochs or 'as the preset'}, iterations {args.iters or 'as the preset'}")
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qimera-compare-") as tmp:
        home = Path(tmp) / "home"
        # this process reads the runs as the server does: the same home, the shipped showcase visible
        os.environ["QIMERA_HOME"] = str(home)
        os.environ.pop("QIMERA_SHOWCASE", None)
        try:
            figures = measure(args, home, Path(tmp) / "streamlit.log")
        except CannotMeasure as e:
            print(f"app_compare: cannot measure: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # a page that did not render as expected: one line, not a traceback
            print(f"app_compare: cannot measure: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
            return 1
    figures["machine"] = machine()
    print(f"\nscreenshot: {args.shot}")
    print(f"machine: {figures['machine']}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
