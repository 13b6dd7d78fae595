"""One rank of tests/test_distributed.py: the first iterations of a digits run, recorded.

Started once per rank with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or with none
for a one-process reference (``--as-if-distributed``: with the operations of a run over several processes).
``--unsynced``: each process computes the BatchNorm moments of its own share, and the mode-seeking term of its
own pairs (what a run without the synchronised moments would do), which the test expects to differ.
``--adam-eps E``: Adam (here only the generator's) with eps E in place of its default (the same in every run compared).
"""
from __future__ import annotations

import argparse
import json

import torch

from qimera_engine import distributed, train
from qimera_engine.config import RunConfig
from qimera_engine.losses import bn_statistics, class_mode_seeking, mode_seeking
from qimera_engine.quant import act_quantizers
from qimera_engine.train import Parts, Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--unsynced", action="store_true")
    ap.add_argument("--as-if-distributed", action="store_true")
    ap.add_argument("--adam-eps", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.adam_eps is not None:
        adam_init = torch.optim.Adam.__init__
        torch.optim.Adam.__init__ = lambda self, params, **kw: adam_init(self, params, **{**kw, "eps": args.adam_eps})
    cfg = RunConfig.from_dict(json.loads(args.config)).resolved()
    world = distributed.from_env("cpu")
    if args.as_if_distributed:
        world = distributed.World(as_if_distributed=True)
    if args.unsynced:
        distributed.World.moments = lambda self, x, shift: bn_statistics(x)
        distributed.GlobalBatchNorm2d.forward = torch.nn.BatchNorm2d.forward
        train.mode_seeking = lambda a, b, za, zb, eps=1e-5, all_sum=None: mode_seeking(a, b, za, zb, eps)
        distributed.World.all_rows = lambda self, x: x  # class pairs: each process's own share only
        share = world.rows(cfg.batch_size)
        train.class_mode_seeking = lambda out, noise, labels, eps=1e-5: class_mode_seeking(
            out, noise[share], labels[share], eps)
    parts = Parts.build(cfg, world=world)
    trainer = Trainer.from_parts(parts, world)
    losses = []
    with trainer.bn_hooks():
        for epoch in range(cfg.epochs):
            calibrating, train_student = trainer.begin_epoch(epoch)
            for it in range(cfg.iters_per_epoch):
                batch = trainer.next_batch()
                trainer.set_student_lr(epoch, it)
                s_losses = trainer.student_step(batch, train_student, calibrating)
                losses.append(world.mean(torch.stack([*batch.g_losses, *s_losses]).float()).tolist())
            trainer.end_epoch(epoch)
    if world.is_main:
        ranges = [torch.stack(q.range()).tolist() for q in act_quantizers(parts.student)]
        torch.save({"losses": losses, "ranges": ranges, "student": parts.student.state_dict(),
                    "generator": parts.generator.state_dict()}, args.out)


if __name__ == "__main__":
    main()
