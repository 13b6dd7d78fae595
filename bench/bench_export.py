"""Export benchmark: file sizes, ONNX Runtime latency and throughput, and the accuracy after export.

    python bench/bench_export.py RUN [RUN ...] [--threads 2] [--repeat 50] [--out docs/results/export.json]
        [--calib folder:PATH --calib-images 512] [--rounds 2]

For each run (a finished run folder): the FP teacher exported as a float ONNX model, the quantized
student exported as ``int`` (.safetensors) and ``onnx`` (QDQ; with ``scheme=deploy`` the integer-kernel
export); then on the run's test set the top-1 of the fake-quantized student in PyTorch, of the ``int``
export reloaded (and whether its logits are bit-identical), and of the ONNX model in ONNX Runtime (CPU),
with the largest logit difference, and how many convolutions ONNX Runtime runs as integer kernels
(``QLinearConv`` in the graph it optimises).

``--calib DATA``: the anchor a user would pick instead, ONNX Runtime's own
``onnxruntime.quantization.quantize_static`` on the FP model (QDQ, per-channel int8 weights, uint8
activations, MinMax calibration) with ``--calib-images`` real images of DATA (e.g. training images,
never the test set): its top-1 and speed beside ours.

Latency: batch 1, median of ``--repeat`` runs; throughput: batch 256, images/s, median of 5. All models are
timed side by side in one process on one machine, in ``--rounds`` interleaved rounds (FP, ours, the
anchor, then again), so a machine that slows down mid-way slows each of them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qimera_engine import InputSpec, load_data, load_int, load_student, load_teacher, open_run  # noqa: E402
from qimera_engine.export import export_int, export_onnx, export_onnx_model, onnx_session  # noqa: E402
from qimera_engine.models import save_state_dict  # noqa: E402


def mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 3)


def timings(session, shape: tuple, repeat: int) -> dict:
    x1 = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    xb = np.random.default_rng(1).standard_normal((256, *shape)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"images": x1})
    lat = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, {"images": x1})
        lat.append(time.perf_counter() - t)
    session.run(None, {"images": xb})
    thr = []
    for _ in range(5):
        t = time.perf_counter()
        session.run(None, {"images": xb})
        thr.append(256 / (time.perf_counter() - t))
    return {"latency_ms_b1": round(1000 * statistics.median(lat), 3), "images_per_s_b256": round(statistics.median(thr), 1)}


def integer_convs(path: Path, folder: Path) -> dict:
    """How many Conv nodes the model has, and how many of them ONNX Runtime runs as integer kernels."""
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(folder / f"{path.stem}-optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    convs = sum(op in ("Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger") for op in ops)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return {"convs": convs, "integer_convs": sum(op in ("QLinearConv", "ConvInteger") for op in ops),
            "integer_kernels": meta.get("qimera.integer_kernels", "")}


def quantize_static_anchor(fp_onnx: Path, calib: str, images: int, teacher, folder: Path) -> Path:
    """ONNX Runtime's own static quantization of the FP model, calibrated on ``images`` real images."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)
    data = load_data(calib, InputSpec.of(teacher), "test")
    x, _ = data.subset(min(images, len(data)))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": x[i:i + 64].numpy()} for i in range(0, len(x), 64)])

        def get_next(self):
            return next(self.batches, None)
    pre = folder / f"{fp_onnx.stem}-pre.onnx"
    quant_pre_process(str(fp_onnx), str(pre))
    out = folder / f"{fp_onnx.stem}-quantize-static.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def bench_run(path: str, threads: int, repeat: int, folder: Path, calib: str | None = None,
              calib_images: int = 512, rounds: int = 2) -> dict:
    run = open_run(path)
    cfg = run.config
    teacher = load_teacher(run)
    student = load_student(run, teacher)
    data = load_data(cfg.test_data, InputSpec.of(teacher), "test")
    x, y = data.subset(len(data))
    name = f"{run.id}"
    fp_st = folder / f"{name}-fp.safetensors"
    save_state_dict(teacher.model, fp_st)
    fp_onnx = export_onnx_model(teacher.model.cpu().eval(), teacher.example_input(), folder / f"{name}-fp.onnx")
    int_file = export_int(run, folder / f"{name}-int.safetensors")
    q_onnx = export_onnx(run, folder / f"{name}-qdq.onnx")

    with torch.no_grad():
        ours = torch.cat([student(x[i:i + 500]) for i in range(0, len(x), 500)])
        rebuilt = load_int(int_file)
        again = torch.cat([rebuilt(x[i:i + 500]) for i in range(0, len(x), 500)])
    models = {"fp": fp_onnx, "qdq": q_onnx}
    if calib:
        models["quantize_static"] = quantize_static_anchor(fp_onnx, calib, calib_images, teacher, folder)
    sessions = {k: onnx_session(p, threads) for k, p in models.items()}

    def logits(sess):
        return np.concatenate([sess.run(None, {"images": x[i:i + 500].numpy()})[0] for i in range(0, len(x), 500)])
    outputs = {k: logits(sess) for k, sess in sessions.items()}
    theirs = outputs["qdq"]
    yn = y.numpy()
    top1 = lambda logits: round(100.0 * float((np.asarray(logits).argmax(1) == yn).mean()), 4)  # noqa: E731
    shape = tuple(x.shape[1:])
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            times[k].append(timings(sess, shape, repeat))
    speed = {k: {"latency_ms_b1": round(statistics.median(t["latency_ms_b1"] for t in ts), 3),
                 "images_per_s_b256": round(statistics.median(t["images_per_s_b256"] for t in ts), 1),
                 "rounds": ts} for k, ts in times.items()}
    for k in speed:
        speed[k]["throughput_vs_fp"] = round(speed[k]["images_per_s_b256"] / speed["fp"]["images_per_s_b256"], 3)
    return {"run": run.id, "method": cfg.method, "scheme": cfg.scheme, "wbits": cfg.wbits, "abits": cfg.abits,
            "teacher": cfg.teacher, "test_data": cfg.test_data, "n_test": len(yn),
            "size_mb": {"fp_safetensors": mb(fp_st), "fp_onnx": mb(fp_onnx), "int_safetensors": mb(int_file),
                        **{f"{k}_onnx": mb(p) for k, p in models.items() if k != "fp"}},
            "top1": {"pytorch_fake_quant": top1(ours.numpy()), "int_reloaded": top1(again.numpy()),
                     **{f"onnxruntime_{k}": top1(o) for k, o in outputs.items()}},
            "int_bit_identical": bool(torch.equal(ours, again)),
            "max_abs_logit_diff_onnx": float(np.abs(theirs - ours.numpy()).max()),
            "max_abs_logit": float(np.abs(ours.numpy()).max()),
            "argmax_agreement_onnx": round(float((theirs.argmax(1) == ours.numpy().argmax(1)).mean()), 6),
            "integer_kernels": {k: integer_convs(p, folder) for k, p in models.items()},
            **{f"onnxruntime_{k}": v for k, v in speed.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--calib", help="real images for quantize_static's calibration (e.g. folder:PATH of training images)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    args = ap.parse_args()
    import onnxruntime
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
               "date": time.strftime("%Y-%m-%d")}
    try:
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.runs:
            res = bench_run(r, args.threads, args.repeat, Path(tmp), args.calib, args.calib_images, args.rounds)
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(json.dumps(machine))


if __name__ == "__main__":
    main()
