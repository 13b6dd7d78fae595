"""Command line: python -m qimera_engine {quantize, evaluate, train-teacher, sweep, export, runs}."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from .config import METHODS, PRESETS, ConfigError, RunConfig, describe, parse_overrides, preset
from .data import DataError, InputSpec, load_data
from .evaluate import evaluate
from .events import Evaluated, Finished, Log, Started, Step
from .jobs import sweep_configs
from .models import TEACHERS, CheckpointError
from .runs import RunLocked, check_file_out, list_runs, runs_dir, write_csv
from .runtime import pick_device
from .train import run

# Errors that are the user's input or the machine's state: one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, ValueError, RunLocked, OSError, FloatingPointError)


def _progress(events, quiet: bool = False):
    """Consume a run's events with a progress bar on stderr; return the Finished event."""
    from tqdm import tqdm
    bar, finished, last_top1 = None, None, None
    for ev in events:
        if isinstance(ev, Log) and not quiet:
            tqdm.write(ev.text, file=sys.stderr)
        elif isinstance(ev, Started):
            bar = tqdm(total=ev.total_steps, initial=ev.start_epoch * ev.config["iters_per_epoch"], unit="it",
                       file=sys.stderr, disable=quiet, dynamic_ncols=True,
                       desc=f"{ev.config['method']} W{ev.config['wbits']}A{ev.config['abits']}")
            if not quiet:
                tqdm.write(f"run folder: {ev.run_dir}   device: {ev.device}   FP top-1: {ev.fp_top1:.2f}%",
                           file=sys.stderr)
        elif isinstance(ev, Step) and bar is not None:
            bar.update(ev.step - bar.n)
            post = {"L_G": f"{ev.losses['loss_g']:.3f}", "L_S": f"{ev.losses['loss_s']:.3f}",
                    "img/s": f"{ev.images_per_s:.0f}"}
            if last_top1 is not None:
                post["top1"] = f"{last_top1:.2f}"
            bar.set_postfix(post, refresh=False)
        elif isinstance(ev, Evaluated):
            last_top1 = ev.top1
        elif isinstance(ev, Finished):
            finished = ev
    if bar is not None:
        bar.close()
    return finished


def _config_from(args):
    over = parse_overrides(args.set)
    for key in ("method", "wbits", "abits", "seed", "teacher", "checkpoint", "test_data"):
        value = getattr(args, key, None)
        if value is not None:
            if key in over:  # one setting, two values: neither may silently win
                raise ConfigError(f"--{key.replace('_', '-')} and --set {key}=... both set {key}; give it once")
            over[key] = value
    return preset(args.preset or "digits", **over)


_RUN_OPTIONS = ("preset", "method", "wbits", "abits", "seed", "teacher", "checkpoint", "test_data", "set", "out")


def cmd_quantize(args) -> int:
    if args.restart and args.resume is None:
        raise ConfigError("--restart goes with --resume RUN (it starts that run again from epoch 0)")
    if args.resume is not None:
        if not args.resume.strip():
            raise ConfigError("--resume is empty: name the run folder or run id to continue "
                              "(python -m qimera_engine runs lists them)")
        given = [f"--{k.replace('_', '-')}" for k in _RUN_OPTIONS if getattr(args, k) not in (None, [])]
        if given:
            raise ConfigError(f"--resume continues a run with the settings and folder it was started with; "
                              f"{', '.join(given)} cannot change them (start a new run instead)")
        events = run(None, resume=args.resume, restart=args.restart)
    else:
        events = run(_config_from(args), out=args.out)
    try:
        fin = _progress(events, args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted: the run keeps its last completed epoch; continue it with "
              "python -m qimera_engine quantize --resume RUN_FOLDER", file=sys.stderr)
        return 130
    if fin is None:  # a rank other than 0 of a torchrun run: rank 0 reports
        return 0
    s = fin.summary
    print(json.dumps(s))
    if not args.quiet:
        print(f"{s['method']} W{s['wbits']}A{s['abits']}: FP {s['fp_top1']:.2f}%  ->  quantized "
              f"{s['quant_top1']:.2f}% (final epoch), best {s['best_top1']:.2f}% (epoch {s['best_epoch']}); "
              f"{s['seconds']:.1f} s; folder {fin.run_dir}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .teachers import get_teacher
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    # as a run finds its teacher (and refuses pretrained=true for a teacher without zoo weights)
    teacher_data = RunConfig(teacher=args.teacher, test_data=args.test_data, pretrained=args.pretrained).teacher_data
    teacher = get_teacher(args.teacher, teacher_data, args.checkpoint, args.pretrained, device=device)
    # a folder with another number of classes is refused before it is decoded or cached
    data = load_data(args.test_data, InputSpec.of(teacher), "test", args.download, num_classes=teacher.num_classes)
    t0 = time.perf_counter()
    res = evaluate(teacher.model.to(device), data, batch_size=args.batch_size, device=device)
    print(json.dumps({"teacher": args.teacher, "test_data": args.test_data, "top1": round(res["top1"], 4),
                      "n": res["n"], "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


def cmd_train_teacher(args) -> int:
    from .teachers import train_and_cache
    teacher = train_and_cache(args.teacher, args.data, epochs=args.epochs, device=pick_device(args.device),
                              seed=args.seed, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(teacher.info))
    return 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, e.g. 4,3; got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} needs at least one value")
    return values


def cmd_sweep(args) -> int:
    bits = _int_list(args.bits, "--bits")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = _int_list(args.seeds, "--seeds")
    if not methods:
        raise ConfigError("--methods needs at least one method")
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {METHODS}")
    base = preset(args.preset, **parse_overrides(args.set))
    configs = sweep_configs(base, bits, methods, seeds)  # every setting checked before the first run
    out = check_file_out(args.out, args.force, "table")  # and where the table goes
    keys = ("method", "wbits", "abits", "seed", "fp_top1", "quant_top1", "best_top1", "seconds", "run")
    if args.gpus_per_cell != 1.0 and args.ray is None:
        raise ConfigError("--gpus-per-cell goes with --ray (without it the cells run one after another)")
    if args.ray is not None:
        from .sweeps import ray_sweep
        root = args.runs_dir or str(out.with_suffix("")) + "-runs"
        done = {}

        def on_done(i, summary):  # the table after every cell: a crash keeps what is done
            cfg = configs[i]
            print(f"[{len(done) + 1}/{len(configs)}] {cfg.method} W{cfg.wbits}A{cfg.abits} seed {cfg.seed}: "
                  f"{summary.get('quant_top1')}", file=sys.stderr)
            done[i] = {k: summary.get(k) for k in keys}
            write_csv(out, [done[j] for j in sorted(done)])
        summaries = ray_sweep(configs, root, None if args.ray == "local" else args.ray, on_done=on_done,
                              gpus_per_cell=args.gpus_per_cell)
        rows = [{k: s.get(k) for k in keys} for s in summaries]
    else:
        rows = []
        for i, cfg in enumerate(configs):
            print(f"[{i + 1}/{len(configs)}] {cfg.method} W{cfg.wbits}A{cfg.abits} seed {cfg.seed}", file=sys.stderr)
            fin = _progress(run(cfg), quiet=args.quiet)
            rows.append({k: fin.summary[k] for k in keys})
            write_csv(out, rows)  # after every run: a crash keeps what is done
    print(f"wrote {out}", file=sys.stderr)
    for b in bits:
        for m in methods:
            vals = [r["quant_top1"] for r in rows if r["wbits"] == b and r["method"] == m]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"W{b}A{b} {m:10s} {statistics.mean(vals):6.2f} +- {sd:.2f}  (n={len(vals)})")
    return 0


def cmd_settings(args) -> int:
    from textwrap import fill
    rows = describe()
    if args.json:
        print(json.dumps(rows))
        return 0
    print("Settings of a run: give any with --set KEY=VALUE to quantize or sweep. Defaults are RunConfig's; "
          "a --preset changes some of them.\n")
    for r in rows:
        print(f"{r['name']}  ({r['type']}; {r['accepts']}; default {r['default']})")
        app = f" In the app: {r['app']}." if r["app"] else ""
        print(fill(r["help"] + app, width=100, initial_indent="    ", subsequent_indent="    "))
    return 0


def cmd_runs(args) -> int:
    runs = list_runs()
    if args.json:
        out = []
        for r in runs:
            problem = r.problem
            out.append({"run": r.id, "path": str(r.path), "status": "damaged", "problem": problem} if problem else
                       {"run": r.id, "path": str(r.path), **r.status, "status": r.state, "summary": r.summary})
        print(json.dumps(out))
        return 0
    if not runs:
        print("no runs yet: try python -m qimera_engine quantize --preset digits")
    for r in runs:
        problem = r.problem
        if problem:
            print(f"{r.id:40s} damaged: {problem}")
            continue
        s, cfg = r.summary or {}, r.config
        top = s.get("quant_top1")
        top = f"{top:.2f}%" if isinstance(top, (int, float)) else "-"
        where = "" if r.path.parent == runs_dir() else f"  ({r.path})"
        print(f"{r.id:40s} {r.state:11s} {cfg.method:9s} W{cfg.wbits}A{cfg.abits} seed {cfg.seed}  top-1 {top}{where}")
    return 0


def cmd_export(args) -> int:
    from .export import export
    t0 = time.perf_counter()
    path = export(args.run, args.format, args.out, force=args.force)
    print(json.dumps({"run": str(args.run), "format": args.format, "file": str(path),
                      "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qimera_engine", description="Data-free quantization by Qimera.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="run one quantization; writes DIR/summary.json")
    q.add_argument("--preset", choices=sorted(PRESETS), help="settings to start from (default: digits)")
    q.add_argument("--method", choices=METHODS)
    q.add_argument("--wbits", type=int)
    q.add_argument("--abits", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--teacher", choices=sorted(TEACHERS))
    q.add_argument("--checkpoint", help="teacher weights (state dict or .safetensors)")
    q.add_argument("--test-data", dest="test_data", help="digits | cifar10[:ROOT] | cifar100[:ROOT] | folder:PATH | imagenet:PATH")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of the run, each once (python -m qimera_engine settings lists them all: "
                        "type, accepted values, default)")
    q.add_argument("--out", help="run folder, new or empty (default: $QIMERA_HOME/runs/<time>-<method>-w<b>a<b>)")
    q.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last completed epoch, with "
                                                  "the settings it was started with (given alone)")
    q.add_argument("--restart", action="store_true",
                   help="with --resume: start the run again from epoch 0 (replaces its results)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("evaluate", help="top-1 of a teacher on a data set (one JSON line)")
    e.add_argument("--teacher", required=True, choices=sorted(TEACHERS))
    e.add_argument("--checkpoint")
    e.add_argument("--pretrained", action="store_true", help="download the zoo's weights")
    e.add_argument("--test-data", dest="test_data", required=True)
    e.add_argument("--download", action="store_true")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=cmd_evaluate)

    t = sub.add_parser("train-teacher", help="train a teacher (digits; CIFAR on a GPU) into the cache")
    t.add_argument("--teacher", default="digits-cnn", choices=sorted(TEACHERS))
    t.add_argument("--data", default="digits")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.set_defaults(fn=cmd_train_teacher)

    s = sub.add_parser("sweep", help="bit widths x methods x seeds into a CSV table")
    s.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    s.add_argument("--bits", default="4,3")
    s.add_argument("--methods", default="ptq,gdfq,qimera,real-data")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, for every run (python -m qimera_engine settings lists them)")
    s.add_argument("--out", default="sweep.csv", help="CSV table to write (an existing file only with --force)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run each cell as a Ray task in a process of its own (pip install ray): on a local Ray "
                        "instance on this machine's CPUs, or on the cluster at ADDRESS (auto: the one this "
                        "machine belongs to); a worker that dies is retried and continues its cell")
    s.add_argument("--gpus-per-cell", type=float, default=1.0, metavar="X",
                   help="with --ray on GPUs: each cell's share of a GPU (default 1; 0.25 runs four cells on one "
                        "GPU, which a small model's runs leave mostly idle)")
    s.add_argument("--runs-dir", help="with --ray: where each cell's run folder goes, on storage every worker "
                                      "reads (default: beside --out, OUT-runs/)")
    s.set_defaults(fn=cmd_sweep)

    x = sub.add_parser("export", help="the quantized student as integer weights or an ONNX model")
    x.add_argument("run", help="run folder or id")
    x.add_argument("--format", required=True, choices=("int", "onnx"),
                   help="int: .safetensors with integer codes, scales, zero points; onnx: QDQ graph for ONNX Runtime")
    x.add_argument("--out", help="file to write (default: RUN/student-int.safetensors or RUN/student.onnx); "
                                 "never a run's own file, nor into a shipped run")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(fn=cmd_export)

    g = sub.add_parser("settings", help="every setting --set takes: type, accepted values, default, help")
    g.add_argument("--json", action="store_true", help="one JSON list instead of text")
    g.set_defaults(fn=cmd_settings)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_runs)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # the reader went away (e.g. `settings | head`): not an error worth a line
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch reports running out of memory as a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); lower batch_size or eval_batch_size",
              file=sys.stderr)
        return 2
