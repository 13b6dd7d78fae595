"""Screen the final reconstruction's settings on finished runs, without training them again.

    # once per seed: a run of the preset without its final reconstruction (the same run up to it)
    python -m qimera_engine quantize --preset cifar10-resnet20-fast --wbits 4 --abits 4 --seed 0 \
        --checkpoint resnet20-cifar10.th --test-data folder:cifar10-val --set recon_iters=0 --out norecon-s0
    # then each variant (about a minute on 2 cores): top-1 after reconstructing with these settings
    python bench/screen_recon.py norecon-s0 norecon-s1 --set recon_iters=200 --set recon_images=4096

With ``recon_at=end`` the reconstruction is a run's last step: it takes the fine-tuned student and
the last generated images, and nothing after it trains. So a run saved without it (``recon_iters=0``)
holds exactly the student that the preset's run reconstructs. This script loads that student and the
run's generator, draws images as the run's last epoch draws them (the frozen generator in training
mode, the run's own sampler; ``--set superpose_p=P`` draws superposed ones), reconstructs with the given
settings, and prints one JSON line per run and a mean. The images come from a stream of their own
(``--image-seed``), not the run's, so a screen's result is one more draw of what the run would give.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qimera_engine.config import RunConfig, parse_overrides  # noqa: E402
from qimera_engine.evaluate import evaluate  # noqa: E402
from qimera_engine.models.checkpoint import load_weights  # noqa: E402
from qimera_engine.runs import Run, open_run  # noqa: E402
from qimera_engine.runtime import keep_freed_memory  # noqa: E402
from qimera_engine.train import Parts, Trainer, reconstruct_as_configured  # noqa: E402

# What a screen may change: the reconstruction's settings and what its images are drawn with.
SETTABLE = {"recon_iters", "recon_images", "recon_drop", "recon_lr", "recon_act_lr", "recon_refine",
            "recon_refine_lr", "superpose_p", "superpose_k", "test_data", "num_threads", "eval_batch_size"}


def screen(run: Run, overrides: dict, image_seed: int) -> dict:
    base = run.config
    if base.recon_iters != 0:
        raise SystemExit(f"{run.path}: it reconstructed already (recon_iters={base.recon_iters}); screen a run "
                         "made with --set recon_iters=0")
    if run.status.get("status") != "finished":
        raise SystemExit(f"{run.path}: not finished ({run.status.get('status')})")
    cfg = RunConfig.from_dict({**base.to_dict(), **overrides})
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    keep_freed_memory()
    parts = Parts.build(cfg)
    load_weights(parts.student, run.path / Run.STUDENT)
    load_weights(parts.generator, run.path / Run.GENERATOR)
    trainer = Trainer.from_parts(parts)
    trainer.generator_frozen = True
    trainer.sampler.p = cfg.superpose_p
    torch.manual_seed(image_seed)
    trainer.rng.device.manual_seed(image_seed)
    t0 = time.perf_counter()
    batches = []
    with trainer.bn_hooks():
        for _ in range(math.ceil(cfg.recon_images / cfg.batch_size)):
            batches.append(trainer.generator_step().x)
    images = torch.cat(batches)[-cfg.recon_images:]
    before = evaluate(parts.student, parts.test, batch_size=cfg.eval_batch_size, device=parts.device)["top1"]
    t1 = time.perf_counter()
    flips = reconstruct_as_configured(cfg, parts.student, parts.teacher.model, images) if cfg.recon_iters else {}
    t2 = time.perf_counter()
    after = evaluate(parts.student, parts.test, batch_size=cfg.eval_batch_size, device=parts.device)["top1"]
    return {"run": run.path.name, "seed": cfg.seed, "before": round(before, 2), "after": round(after, 2),
            "run_final": run.summary.get("quant_top1") if run.summary else None,
            "flipped": sum(flips.values()), "seconds_images": round(t1 - t0, 1),
            "seconds_recon": round(t2 - t1, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders made with --set recon_iters=0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"one of {', '.join(sorted(SETTABLE))}")
    ap.add_argument("--image-seed", type=int, default=12345, help="seed of the reconstruction images' stream")
    a = ap.parse_args(argv)
    overrides = parse_overrides(a.set)
    bad = set(overrides) - SETTABLE
    if bad:
        ap.error(f"a screen cannot change {', '.join(sorted(bad))} (only {', '.join(sorted(SETTABLE))})")
    rows = []
    for path in a.runs:
        row = screen(open_run(path), overrides, a.image_seed)
        row["set"] = a.set
        print(json.dumps(row), flush=True)
        rows.append(row)
    after = [r["after"] for r in rows]
    print(json.dumps({"mean_after": round(statistics.mean(after), 3), "n": len(after), "set": a.set}), flush=True)


if __name__ == "__main__":
    main()
