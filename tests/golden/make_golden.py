"""Record the paper-default behaviour of short, seeded digits runs, for tests/test_recipe.py.

    QIMERA_HOME=$(mktemp -d) python tests/golden/make_golden.py ENGINE_CHECKOUT > tests/golden/paper_defaults.json

ENGINE_CHECKOUT is a checkout of the engine *before* a change that adds switches (the file in
this folder was written from commit a725a8c, before the Qimera+ switches existed). The test then
runs the same configurations with the current engine, every new switch at its default, and
expects the same metrics.

Both use the teacher in this folder (digits-cnn-digits.safetensors, the engine's digits teacher trained
on two threads): put it in $QIMERA_HOME/teachers/ first, and run on two threads (OMP_NUM_THREADS=2).
A teacher trained on the spot differs from CPU to CPU, and the runs with it far more.
"""
from __future__ import annotations

import json
import sys

CASES = {
    "qimera": dict(method="qimera"),
    "gdfq": dict(method="gdfq"),
    "ptq": dict(method="ptq"),
    "real-data": dict(method="real-data"),
}
SCHEDULE = dict(epochs=3, iters_per_epoch=6, warmup_epochs=1, calib_epochs=1, batch_size=16, milestones=[2],
                log_every=3, seed=0)
KEEP = ("epoch", "top1", "loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s", "lr_g", "lr_s")


def record(engine_root: str | None = None) -> dict:
    if engine_root:
        sys.path.insert(0, engine_root)
    import tempfile

    from qimera_engine import preset, run_to_end
    from qimera_engine.runs import open_run
    out = {}
    for name, over in CASES.items():
        cfg = preset("digits", **SCHEDULE, **over)
        folder = tempfile.mkdtemp(prefix="golden-") + "/run"
        run_to_end(cfg, out=folder)
        rows = open_run(folder).metrics
        out[name] = {"config": {**SCHEDULE, **over}, "rows": [{k: r[k] for k in KEEP} for r in rows]}
    return out


if __name__ == "__main__":
    print(json.dumps(record(sys.argv[1] if len(sys.argv) > 1 else None), indent=1))
