"""How much watching a run in a browser tab slows it (target: at most 1.2x the run without a browser).

A digits run started from the app's Quantize page, its tab left open on the live job panel, against the
same run started without the app.

    python bench/app_watch.py [--repeats 3] [--bits 3] [--port-base PORT] [--timeout 900]

Setup: a temporary $QIMERA_HOME; the digits teacher trained into its cache first (in a process of its own),
so that neither side trains it; one `streamlit run app.py` server (127.0.0.1, a free port, headless, started
as tests/test_browser.py starts it) and one chromium (Playwright, 1280 x 720) for the whole benchmark.
Both sides run with the same environment (OMP_WAIT_POLICY=PASSIVE, as the server gets it).

Then, --repeats times, in alternating order (no browser first, then tab open first, ...) so that a drift
in the machine's load falls on both sides alike:
  no browser  the digits preset at W{bits}A{bits} started through the engine's JobRegistry in a plain Python
              process (JobRegistry.start_run, the path the app's pages take), with no page open anywhere;
  tab open    the same run started from the Quantize page: W and A chosen in the form, "Start quantizing"
              pressed, and the tab kept on that page, whose live job panel (progress bar, loss and accuracy
              charts) redraws every 2 s, until the run's folder has its summary.json.
Measured per run: "seconds" from the run's summary.json (its own training time, not loading the teacher
and data), the wall time from the start request (process spawned / button clicked) to summary.json on
disk, and the CPU seconds that the server process (the run's own process left out) and chromium used
meanwhile: CPU they take from the run on a small machine.
Reported: a table per repeat, the median over repeats of the ratio tab-open / no-browser of "seconds" (and
of wall time), with the CPU model, core count, load average and date, and a verdict against the target
(tab open <= 1.2x no browser). The two runs' config.json files are compared and any differing setting is
printed (the runs must differ in nothing but how they were started).
Exit status 0 whether the target is met or missed (a benchmark reports); non-zero when it cannot measure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import open_selectbox  # noqa: E402,F401  (bench/app_compare.py takes it from here too)

TARGET = 1.2                              # tab open / no browser, of the run's own "seconds"
VIEWPORT = {"width": 1280, "height": 720}
PAGE_TIMEOUT_MS = 60_000                  # one page render (not the run: that has --timeout)
IGNORED_KEYS = {"download"}               # settings that do not change what a run computes: a digits run
                                          # fetches nothing either way

# The "no browser" side: a plain Python process that starts the run through the JobRegistry and waits for it.
# argv: the preset's overrides (JSON), the timeout in seconds. Prints the job's end as one JSON line.
NO_BROWSER = """
import json, sys
from qimera_engine import preset
from qimera_engine.jobs import JobRegistry
reg = JobRegistry()
job = reg.wait(reg.start_run(preset("digits", **json.loads(sys.argv[1]))), float(sys.argv[2]))
print(json.dumps({"status": job.status, "error": job.error}))
sys.exit(0 if job.status == "finished" else 1)
"""


@dataclass
class Result:
    """One measured run."""
    side: str        # "no browser" | "tab open"
    folder: Path     # its run folder
    seconds: float   # summary.json "seconds": the run's own training time
    wall: float      # start request to summary.json on disk
    top1: float      # the quantized student's final top-1 (the same seed and settings give the same)
    cpu: dict        # CPU seconds the server (without the run's process) and chromium used meanwhile
    note: str = ""   # what the tab showed, for the tab-open side


# --------------------------------------------------------------------------- the machine


def machine() -> str:
    """CPU model, cores (and those this process may use), load average, date."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}; {os.cpu_count()} cores ({usable} usable); load average {load}; "
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")


def pick_port(base: int | None) -> int:
    """The first free port from ``base`` upwards; without a base, one the system picks."""
    for port in ([0] if base is None else range(base, min(base + 200, 65536))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {base}..{base + 199}")

def process_table() -> dict[int, tuple[int, float, str]]:
    """Live processes (Linux /proc): pid -> (parent pid, CPU seconds used, command line); {} elsewhere."""
    table, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: ppid, ..., utime, stime
        table[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return table


def descendants(table: dict, root: int) -> set[int]:
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += [c for c, (parent, _, _) in table.items() if parent == pid and c not in out]
    return out & set(table)


def watchers_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the server process (its runs' worker processes left out: the run is
    measured by its own clock) and by chromium's processes. What the two use while a run trains is CPU
    the run cannot have."""
    t = process_table()
    return {"server": sum(t[p][1] for p in descendants(t, server_pid) if "qimera_engine.worker" not in t[p][2]),
            "chromium": sum(t[p][1] for p in descendants(t, os.getpid()) if "chrom" in t[p][2].lower())}


def cpu_since(server_pid: int, before: dict[str, float]) -> dict[str, float]:
    now = watchers_cpu(server_pid)
    return {k: max(0.0, now[k] - before.get(k, 0.0)) for k in now}


# --------------------------------------------------------------------------- run folders


def run_folders(runs: Path) -> set[str]:
    return {p.name for p in runs.iterdir() if p.is_dir()} if runs.exists() else set()


def wait_for_run(runs: Path, before: set[str], t0: float, timeout: float,
                 proc: subprocess.Popen | None = None) -> tuple[Path, float]:
    """The new run folder (not in ``before``) once it has summary.json, and the wall time since ``t0``.
    Fails when the run's status says failed or cancelled, when ``proc`` ends badly, or after ``timeout``."""
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        for name in sorted(run_folders(runs) - before):
            folder = runs / name
            if (folder / "summary.json").exists():
                return folder, time.perf_counter() - t0
            try:
                status = json.loads((folder / "status.json").read_text())
            except (OSError, ValueError):
                continue  # not written yet, or being replaced
            if status.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"run {name} {status['status']}: {status.get('error') or status.get('reason')}")
        if proc is not None and proc.poll() not in (None, 0):
            raise RuntimeError(f"the no-browser process ended with status {proc.returncode}")
        time.sleep(0.2)  # poll interval: reading a few file names costs the run nothing measurable
    raise TimeoutError(f"no new run with summary.json in {runs} after {timeout:.0f} s")


def measured(side: str, folder: Path, wall: float, cpu: dict, note: str = "") -> Result:
    summary = json.loads((folder / "summary.json").read_text())
    return Result(side, folder, float(summary["seconds"]), wall, float(summary["quant_top1"]), cpu, note)


def config_differences(a: Path, b: Path) -> list[str]:
    """Settings in which two runs' config.json differ, as "key: a -> b" (IGNORED_KEYS left out)."""
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    return [f"{k}: {ca.get(k, '(absent)')!r} -> {cb.get(k, '(absent)')!r}"
            for k in sorted(set(ca) | set(cb)) if k not in IGNORED_KEYS and ca.get(k) != cb.get(k)]

# --------------------------------------------------------------------------- the two sides


def run_no_browser(env: dict, runs: Path, bits: int, timeout: float, server_pid: int) -> Result:
    """The digits run through the JobRegistry in a plain Python process, no page open."""
    before = run_folders(runs)
    overrides = json.dumps({"wbits": bits, "abits": bits})
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: nothing blocks on a full pipe
        cpu0 = watchers_cpu(server_pid)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", NO_BROWSER, overrides, str(timeout)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            folder, wall = wait_for_run(runs, before, t0, timeout, proc)
            cpu = cpu_since(server_pid, cpu0)
            proc.wait(120)  # the registry's own word on how the job ended
            if proc.returncode != 0:
                raise RuntimeError(f"the no-browser process ended with status {proc.returncode}")
        except Exception as e:
            out.seek(0)
            raise RuntimeError(f"{e}; its output:\n{out.read()[-2000:]}") from e
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return measured("no browser", folder, wall, cpu)


def choose(page, label: str, value: int) -> None:
    """Pick ``value`` in the form's selectbox labelled ``label`` (a form: nothing reruns until submitted)."""
    from playwright.sync_api import expect
    box, option = open_selectbox(page, label, str(value))
    option.click()
    expect(box).to_have_value(str(value))
    expect(page.get_by_role("listbox")).to_have_count(0)  # closed again: the next widget is not covered


def run_in_tab(browser, base: str, runs: Path, bits: int, timeout: float, server_pid: int) -> Result:
    """The digits run started from the Quantize page, the tab kept open on it until the run has finished."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from test_browser import wait_rendered
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        page.goto(f"{base}/Quantize")
        page.get_by_role("heading", name="Quantize", level=1).wait_for()
        start = page.get_by_role("button", name="Start quantizing")
        start.wait_for()
        wait_rendered(page)
        shown = page.get_by_role("combobox", name="Start from preset", exact=True).input_value()
        if not shown.startswith("digits:"):
            raise RuntimeError(f"the Quantize form does not start from the digits preset: {shown!r}")
        choose(page, "Weight bits (W)", bits)
        choose(page, "Activation bits (A)", bits)
        before = run_folders(runs)
        cpu0 = watchers_cpu(server_pid)
        t0 = time.perf_counter()
        start.click()
        # the live panel of the new job: its Cancel button is there while it runs (finished jobs have none)
        label = re.compile(rf"W{bits}A{bits} seed \d+ \(digits-cnn\)")
        try:
            page.get_by_role("button", name="Cancel").wait_for()
            panel = page.locator('[data-testid="stProgress"]').filter(has_text=label).first.inner_text()
            note = f"live panel: {panel.strip()[:60]!r}"
        except PlaywrightTimeout:  # the run goes on without a panel: measured, and said so
            note = "NO LIVE PANEL SEEN"
        folder, wall = wait_for_run(runs, before, t0, timeout)
        cpu = cpu_since(server_pid, cpu0)  # before the page closes: its renderer's CPU time goes with it
        charts = page.locator('[data-testid="stPlotlyChart"]').count()
        errors = page.locator('[data-testid="stException"], [data-testid="stAlert"]').filter(
            has_text=re.compile("error|failed|cannot", re.IGNORECASE)).all_inner_texts()
        note += f"; {charts} chart(s) on the page at the end" + (f"; errors on the page: {errors}" if errors else "")
    finally:
        page.close()  # no session left polling while the next no-browser run trains
    return measured("tab open", folder, wall, cpu, note)

# --------------------------------------------------------------------------- the benchmark


def train_teacher(env: dict) -> float:
    """The digits teacher into $QIMERA_HOME's cache, in a process of its own; seconds taken."""
    t = time.perf_counter()
    code = "from qimera_engine import train_and_cache; train_and_cache('digits-cnn', 'digits')"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def start_server(env: dict, port: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` on 127.0.0.1:``port`` in its own process group; returns (process, base URL)."""
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def print_repeat(i: int, pair: list[Result]) -> bool:
    """The repeat's table, ratios and config comparison; whether the two runs' settings are the same."""
    print(f"\nrepeat {i + 1}")
    print(f"  {'side':<11} {'seconds':>8} {'wall s':>8} {'top-1':>7} {'server CPU s':>13} {'chromium CPU s':>15}"
          "  run folder")
    for r in pair:
        print(f"  {r.side:<11} {r.seconds:8.2f} {r.wall:8.2f} {r.top1:7.2f} {r.cpu.get('server', 0):13.1f} "
              f"{r.cpu.get('chromium', 0):15.1f}  {r.folder.name}")
    base, tab = (next(r for r in pair if r.side == s) for s in ("no browser", "tab open"))
    print(f"  ratio tab open / no browser: seconds {tab.seconds / base.seconds:.2f}x, wall {tab.wall / base.wall:.2f}x")
    if tab.note:
        print(f"  tab: {tab.note}")
    diff = config_differences(base.folder, tab.folder)
    print("  config.json: " + ("identical" + (f" (ignoring {', '.join(sorted(IGNORED_KEYS))})" if IGNORED_KEYS else "")
                               if not diff else "DIFFERENT: " + "; ".join(diff)))
    sys.stdout.flush()
    return not diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (no browser, tab open)")
    ap.add_argument("--bits", type=int, default=3, choices=range(2, 9), metavar="{2..8}",
                    help="weight and activation bits of the runs (W = A)")
    ap.add_argument("--port-base", type=int, default=None,
                    help="the server takes the first free port from this one up (default: any free port)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one run may take before the benchmark gives up")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS, stop_server, wait_healthy

    print(f"app_watch: digits W{args.bits}A{args.bits}, {args.repeats} repeat(s); "
          f"target tab open <= {TARGET:g}x no browser")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="qimera-app-watch-") as tmp:
        home = Path(tmp) / "home"
        runs = home / "runs"
        # one environment for the teacher, the server and the no-browser runs (the server's, as
        # tests/test_browser.py starts it: passive OpenMP waiting, the shipped showcase)
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "QIMERA_HOME": str(home)}
        env.pop("QIMERA_SHOWCASE", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        print(f"digits teacher trained into the cache in {train_teacher(env):.1f} s")

        log = Path(tmp) / "streamlit.log"
        proc, base = start_server(env, pick_port(args.port_base), log)
        results: list[list[Result]] = []
        mismatched = 0  # repeats whose two runs' settings differ
        try:
            wait_healthy(proc, base, log)
            print(f"server: {base}")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                try:
                    for i in range(args.repeats):
                        order = ["no browser", "tab open"][:: 1 if i % 2 == 0 else -1]
                        pair = [run_no_browser(env, runs, args.bits, args.timeout, proc.pid) if side == "no browser"
                                else run_in_tab(browser, base, runs, args.bits, args.timeout, proc.pid)
                                for side in order]
                        results.append(pair)
                        mismatched += not print_repeat(i, pair)
                finally:
                    browser.close()
        finally:
            stop_server(proc)
            text = log.read_text(errors="replace") if log.exists() else ""
            trouble = [line for line in text.splitlines() if re.search(r"Traceback|Error|Exception|Warning", line)]
            if proc.returncode not in (0, -15, None) or trouble:
                print(f"note: the server ended with status {proc.returncode}; its log says:\n  "
                      + "\n  ".join(trouble[:10] or text.splitlines()[-15:]))

    def ratios(attr: str) -> list[float]:
        return [getattr(next(r for r in p if r.side == "tab open"), attr) /
                getattr(next(r for r in p if r.side == "no browser"), attr) for p in results]

    sec, wall = ratios("seconds"), ratios("wall")
    med = statistics.median(sec)
    print(f"\nmachine: {machine()}")
    print(f"median ratio tab open / no browser over {len(results)} repeat(s): seconds {med:.2f}x "
          f"[{', '.join(f'{r:.2f}' for r in sec)}], wall {statistics.median(wall):.2f}x "
          f"[{', '.join(f'{r:.2f}' for r in wall)}]")
    print(f"verdict: {'OK' if med <= TARGET else 'MISSED'} (target <= {TARGET:g}x)")
    if mismatched:
        print(f"warning: in {mismatched} repeat(s) the two runs' config.json differ (see above): those ratios "
              "compare different runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
