"""How long the app makes you wait: first page, a slider on Boundary samples, a UMAP.

    python bench/bench_app.py [--repeats 7] [--skip-browser] [--skip-umap]

1. Server start to first page: seconds from spawning `streamlit run app.py` (empty QIMERA_HOME,
   127.0.0.1, a free port) to Home's title visible in chromium (Playwright; chromium is already
   running when the clock starts), and to the whole of Home (its last element). Target < 3 s.
2. Slider re-render, server side: AppTest on the Boundary samples page with a finished small run;
   the median of `slider.set_value(v).run()` over new values (each a new grid) and over a value seen
   before (cached), and the grid function alone (analysis.mix_samples + figures.image_grid). Target < 0.3 s.
2b. The shipped CIFAR-10 showcase, from an empty $QIMERA_HOME: page opened to its content, then UMAP
   on Feature space: first in the server (cold), with a new seed (new samples), and of the samples on
   screen (warm). Targets < 10 s, and < 2 s warm. Then Feature space opened first on a fresh server
   (UMAP's background compiling has only just begun when UMAP is asked for).
3. UMAP of ~3,000 points, first call in a process and again: bench/bench_umap.py in a fresh
   process (its own output is shown). Targets < 15 s and < 3 s.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = {"first page": 3.0, "slider": 0.3, "umap first": 15.0, "umap again": 3.0, "showcase": 10.0,
           "umap warm": 2.0}


def verdict(value: float, target: float) -> str:
    return f"{'OK' if value < target else 'MISSED'} (target < {target:g} s)"


def bench_first_page() -> float:
    """Server spawn to Home's title visible in the browser."""
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, start_server, stop_server, wait_healthy

    with tempfile.TemporaryDirectory(prefix="qimera-bench-app-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        log = Path(tmp) / "streamlit.log"
        t0 = time.perf_counter()
        proc, base = start_server(Path(tmp) / "home", log)
        try:
            wait_healthy(proc, base, log)
            t_health = time.perf_counter() - t0
            page.goto(base)
            page.get_by_role("heading", name="Qimera Explorer", level=1).wait_for(timeout=60_000)
            t_page = time.perf_counter() - t0
            page.get_by_role("button", name="Run the demo").wait_for(timeout=60_000)
            page.get_by_text("Bit widths: accuracy from 2 to 8 bits").wait_for(timeout=60_000)
            t_full = time.perf_counter() - t0
        finally:
            stop_server(proc)
            browser.close()
    print(f"{'server answers its health check':<52} {t_health:7.2f} s")
    print(f"{'server start to Home title visible':<52} {t_page:7.2f} s  {verdict(t_page, TARGETS['first page'])}")
    print(f"{'server start to all of Home (demo button, links)':<52} {t_full:7.2f} s")
    return t_page


@contextlib.contextmanager
def showcase_server():
    """A fresh server on an empty $QIMERA_HOME (the shipped assets/showcase) and a chromium page: (page, base)."""
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, start_server, stop_server, wait_healthy
    os.environ.pop("QIMERA_SHOWCASE", None)  # the shipped assets/showcase
    with tempfile.TemporaryDirectory(prefix="qimera-bench-app-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        log = Path(tmp) / "streamlit.log"
        proc, base = start_server(Path(tmp) / "home", log)
        try:
            wait_healthy(proc, base, log)
            yield page, base
        finally:
            stop_server(proc)
            browser.close()


def choose_projection(page, method: str) -> None:
    """Click PCA or UMAP in Feature space's segmented control."""
    page.locator("button").filter(has_text=re.compile(rf"^\s*{method}\s*$")).first.click()


def set_seed(page, seed: int) -> None:
    box = page.get_by_label("Seed")
    box.fill(str(seed))
    box.press("Enter")


def time_umap(page, seed: int) -> float:
    """Seconds from pressing "Compute the UMAP projection" to the UMAP chart of ``seed`` on screen."""
    go = page.get_by_role("button", name="Compute the UMAP projection")
    go.wait_for(timeout=120_000)
    t = time.perf_counter()
    go.click()
    wait_title(page, f"UMAP of the teacher's features (seed {seed},")
    return time.perf_counter() - t


def report(what: str, seconds: float, target: str) -> None:
    print(f"{what:<52} {seconds:7.2f} s  {verdict(seconds, TARGETS[target])}")


def bench_showcase() -> None:
    """From an empty $QIMERA_HOME, no network: seconds from opening each page to its CIFAR-10 content
    (the shipped showcase): Home's preview, Boundary samples' images and A->B path, Feature space's chart."""
    with showcase_server() as (page, base):
        for path, what, wait in [
                ("", "Home: the shipped CIFAR-10 samples", lambda: page.get_by_text("CIFAR-10, ready to look at")
                 .wait_for(timeout=120_000) or page.locator('[data-testid="stImage"] img').first.wait_for(timeout=120_000)),
                ("Boundary_samples", "Boundary samples: images and the A->B path",
                 lambda: page.get_by_text("Orange bands").wait_for(timeout=120_000)
                 or page.locator('[data-testid="stImage"] img').first.wait_for(timeout=120_000)
                 # the path's images are drawn inside its chart (plotly layout images)
                 or page.locator('[data-testid="stPlotlyChart"] g.layer-above image').first.wait_for(
                     timeout=120_000)),
                ("Feature_space", "Feature space: the PCA chart",
                 lambda: page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').first.wait_for(timeout=120_000))]:
            t = time.perf_counter()
            page.goto(f"{base}/{path}")
            wait()
            report(what, time.perf_counter() - t, "showcase")
        # UMAP on the same page: the first in this server (its code compiled in the background since Home),
        # then another seed (new samples and a new fit; the compiled code is warm)
        choose_projection(page, "UMAP")
        report("Feature space: UMAP, first in the server", time_umap(page, 0), "showcase")
        set_seed(page, 1)
        report("Feature space: UMAP, seed 1", time_umap(page, 1), "showcase")
        # warm: the samples on screen (a PCA of seed 2 first), then UMAP of them, compiled code warm
        choose_projection(page, "PCA")
        set_seed(page, 2)
        wait_title(page, "PCA of the teacher's features (seed 2,")
        choose_projection(page, "UMAP")
        report("Feature space: UMAP of the samples on screen (seed 2)", time_umap(page, 2), "umap warm")


def bench_umap_direct() -> None:
    """A fresh server and Feature space opened directly (Home never seen, so UMAP's code has not been
    compiled in the background yet): the PCA chart, then UMAP at once."""
    with showcase_server() as (page, base):
        t = time.perf_counter()
        page.goto(f"{base}/Feature_space")
        wait_title(page, "PCA of the teacher's features (seed 0,")
        report("Feature space opened first: the PCA chart", time.perf_counter() - t, "showcase")
        choose_projection(page, "UMAP")
        report("  then UMAP at once (its code still compiling)", time_umap(page, 0), "showcase")


def wait_title(page, start: str) -> None:
    """Until a chart whose title starts with ``start`` is on the page (the projection asked for, not the
    previous one, which stays on screen while a new one is computed)."""
    page.wait_for_function("s => [...document.querySelectorAll('.gtitle')].some(e => e.textContent.startsWith(s))",
                           arg=start, timeout=180_000)


def bench_slider(repeats: int) -> float:
    """Boundary samples: one slider change re-run server side (AppTest), and the grid function alone."""
    with tempfile.TemporaryDirectory(prefix="qimera-bench-app-") as home:
        os.environ["QIMERA_HOME"] = home
        from streamlit.testing.v1 import AppTest
        from qimera_engine import list_runs, load_generator, load_student, load_teacher, preset, run_to_end
        from qimera_engine.teachers import train_and_cache
        from qimera_engine import analysis
        from qimera_engine.ui import figures

        t = time.perf_counter()
        train_and_cache("digits-cnn", "digits", epochs=3)
        small = dict(epochs=2, iters_per_epoch=4, warmup_epochs=1, calib_epochs=1, batch_size=16)
        run_to_end(preset("digits", method="gdfq", **small))
        time.sleep(0.02)  # the Qimera run is the newest: the page picks it
        run_to_end(preset("digits", **small))
        print(f"setup: digits teacher, a small GDFQ and a small Qimera run in {time.perf_counter() - t:.1f} s")

        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.switch_page("pages/3_Boundary_samples.py")
        t = time.perf_counter()
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        print(f"{'Boundary samples, first run (loads the networks)':<52} {time.perf_counter() - t:7.2f} s")

        def change(value: float) -> float:
            t = time.perf_counter()
            at.slider(key="b_coeff_b").set_value(value).run()
            dt = time.perf_counter() - t
            assert not at.exception, [e.message for e in at.exception]
            assert f"{value:.2f}" in at.latex[0].value
            return dt

        values = [round(0.05 + 0.9 * i / max(1, repeats - 1), 2) for i in range(repeats)]
        new = [change(v) for v in values]
        seen = [change(values[i % len(values)]) for i in range(repeats)]
        med = statistics.median(new)
        print(f"{'slider to a new value, page re-run (median of %d)' % len(new):<52} {med:7.3f} s  "
              f"{verdict(med, TARGETS['slider'])}  [min {min(new):.3f}, max {max(new):.3f}]")
        print(f"{'slider to a value seen before (cached grid)':<52} {statistics.median(seen):7.3f} s")

        run = next(r for r in list_runs() if r.config.method == "qimera")
        teacher = load_teacher(run)
        gen, student = load_generator(run), load_student(run, teacher)
        grid = []
        for v in values:
            t = time.perf_counter()
            out = analysis.mix_samples(gen, teacher.model, student, [0, 1], [1 - v, v], list(range(8)))
            figures.image_grid(out["images"], 8, mean=teacher.mean, std=teacher.std)
            grid.append(time.perf_counter() - t)
        print(f"{'grid function alone (mix_samples + image_grid, 8 seeds)':<52} {statistics.median(grid):7.3f} s")
        return med


def bench_umap() -> None:
    """bench/bench_umap.py in a fresh process, so that its first UMAP is the process's first."""
    env = {k: v for k, v in os.environ.items() if k != "QIMERA_HOME"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_umap.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    print(out.rstrip())
    for line in out.splitlines():
        for label, key in [("UMAP, first call in this process", "umap first"),
                           ("UMAP, second call, different features", "umap again")]:
            if line.startswith(label):
                seconds = float(line[len(label):].split()[0])
                print(f"{key:<52} {seconds:7.2f} s  {verdict(seconds, TARGETS[key])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="slider changes to take the median of")
    ap.add_argument("--skip-browser", action="store_true", help="no chromium: skip the first-page figure")
    ap.add_argument("--skip-umap", action="store_true")
    args = ap.parse_args()
    if not args.skip_browser:
        bench_first_page()
        bench_showcase()
        bench_umap_direct()
    bench_slider(args.repeats)
    if not args.skip_umap:
        bench_umap()


if __name__ == "__main__":
    main()
