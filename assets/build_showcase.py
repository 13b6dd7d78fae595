"""Build assets/showcase/: what the app shows of CIFAR-10 from an empty $QIMERA_HOME, offline.

    python assets/build_showcase.py --qimera RUN --superposed RUN --gdfq RUN \
        --checkpoint resnet20-cifar10.th --data cifar10-dev [--per-class 50]
    # one run replaced, the rest of the showcase kept as shipped (same teacher):
    python assets/build_showcase.py --qimera RUN --checkpoint resnet20-cifar10.th

Copies the ResNet-20 teacher (as .safetensors, with its licence), the three finished runs (Qimera+ as
its preset has it, without superposed batches; the same recipe with them, whose generator the pages
mix embeddings with; GDFQ+ at the same budget: config,
metrics, summary, generator, student; not the resume state) and a sample of real CIFAR-10 test
images (``--per-class`` per class, PNG) into assets/showcase/. The runs' configs point to the
shipped teacher and images by paths relative to their own folder, so the folder works wherever the
project is cloned. The app lists these runs as shipped and read-only (``qimera_engine.ShippedRun``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qimera_engine import open_run  # noqa: E402
from qimera_engine.models import load_state_dict_file, save_state_dict, state_dict_sha256  # noqa: E402

OUT = Path(__file__).resolve().parent / "showcase"
RUN_FILES = ("config.json", "metrics.csv", "summary.json", "status.json", "teacher.json", "generator.json",
             "generator.safetensors", "student.safetensors")
TEACHER = "teacher/resnet20-cifar10.safetensors"
SAMPLE = "data/cifar10-sample"
LICENCE = """The ResNet-20 weights in this folder (resnet20-cifar10.safetensors) are the file
pretrained_models/resnet20-12fca82f.th of https://github.com/akamaster/pytorch_resnet_cifar10,
converted to safetensors (the same tensors). They are distributed under that project's licence:

Copyright (c) 2018, Yerlan Idelbayev

Redistribution and use in source and binary forms, with or without modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the following disclaimer in the documentation and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def named(spec: str) -> str:
    """A data spec by its folder's name, not its location (``folder:/x/cifar10-dev`` -> ``folder:cifar10-dev``)."""
    kind, _, path = str(spec).partition(":")
    return f"{kind}:{Path(path).name}" if path else kind


def copy_run(src: Path, name: str, teacher_sha: str, superposed: bool | None = None) -> None:
    run = open_run(src)
    if run.state != "finished":
        raise SystemExit(f"{src} is {run.state}; ship finished runs only")
    if superposed is not None and run.config.superposes != superposed:
        raise SystemExit(f"{src} has superpose_p={run.config.superpose_p}; {name} needs "
                         + ("superposed batches (p > 0)" if superposed else "a run without them (p = 0)"))
    dest = OUT / "runs" / name
    dest.mkdir(parents=True)
    for f in RUN_FILES:
        shutil.copy2(src / f, dest / f)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["checkpoint"] = os.path.relpath(OUT / TEACHER, dest)
    cfg["test_data"] = f"folder:{os.path.relpath(OUT / SAMPLE, dest)}"
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    summary = json.loads((dest / "summary.json").read_text())  # measured on the whole split: named, not located
    summary["test_data"] = named(summary["test_data"])
    summary["run"] = name
    (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if json.loads((dest / "teacher.json").read_text())["sha256"] != teacher_sha:
        raise SystemExit(f"{src} was trained with another teacher than {TEACHER}")
    (dest / "teacher.json").write_text(json.dumps({"sha256": teacher_sha, "weights": cfg["checkpoint"]}) + "\n")
    (dest / "shipped.json").write_text(json.dumps({"source": "assets/build_showcase.py", "from": run.id}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qimera", help="a finished Qimera+ run (the preset: no superposed batches)")
    ap.add_argument("--superposed", help="the same recipe with superposed batches (p > 0)")
    ap.add_argument("--gdfq", help="a finished GDFQ run of the same budget")
    ap.add_argument("--checkpoint", required=True, help="the ResNet-20 checkpoint the runs used")
    ap.add_argument("--data", help="an ImageFolder of CIFAR-10 test images (needed unless runs are replaced "
                                   "in a showcase that is already built)")
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    given = {"cifar10-resnet20-qimera-w4a4": (args.qimera, False),
             "cifar10-resnet20-qimera-superposed-w4a4": (args.superposed, True),
             "cifar10-resnet20-gdfq-w4a4": (args.gdfq, None)}
    given = {name: (src, sup) for name, (src, sup) in given.items() if src}
    if not given:
        ap.error("name at least one run (--qimera, --superposed, --gdfq)")
    sha = teacher_sha256(args.checkpoint)
    if len(given) < 3:  # replace these runs only; the teacher, the sample and the other runs stay
        if args.data:
            ap.error("--data rebuilds the whole showcase: name all three runs with it")
        if not (OUT / TEACHER).is_file() or teacher_sha256(OUT / TEACHER) != sha:
            raise SystemExit(f"{OUT} holds no showcase of this teacher: build it whole (all three runs and --data)")
        for name, (src, superposed) in given.items():
            replace_run(Path(src), name, sha, superposed)
        print(f"replaced {', '.join(given)} in {OUT}")
        return
    if not args.data:
        ap.error("a whole rebuild needs --data")
    curves = OUT / "bit_widths.csv"  # assets/build_curves.py's rows outlive a rebuild of the runs
    kept = curves.read_bytes() if curves.is_file() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "teacher").mkdir(parents=True)
    if kept is not None:
        curves.write_bytes(kept)
    save_state_dict(load_state_dict_file(args.checkpoint), OUT / TEACHER)
    (OUT / "teacher" / "LICENSE-resnet20.txt").write_text(LICENCE)
    for name, (src, superposed) in given.items():
        copy_run(Path(src), name, sha, superposed=superposed)
    for cls in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
        (OUT / SAMPLE / cls.name).mkdir(parents=True)
        for img in sorted(cls.iterdir())[: args.per_class]:
            from PIL import Image
            Image.open(img).convert("RGB").save(OUT / SAMPLE / cls.name / f"{img.stem}.png", optimize=True)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 2**20:.1f} MB)")


def teacher_sha256(checkpoint) -> str:
    """The sha256 of the ResNet-20 teacher built from a checkpoint (what a run's teacher.json records)."""
    from qimera_engine import build_teacher
    return state_dict_sha256(build_teacher("resnet20", checkpoint=str(checkpoint)).model)


def replace_run(src: Path, name: str, teacher_sha: str, superposed: bool | None) -> None:
    """``copy_run`` over a shipped run: the shipped one is set aside first and put back if the copy fails
    (an unfinished run, the wrong kind, another teacher), so a refused run never costs the shipped one."""
    dest = OUT / "runs" / name
    aside = dest.with_name(name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if dest.exists():
        dest.rename(aside)
    try:
        copy_run(src, name, teacher_sha, superposed=superposed)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        if aside.exists():
            aside.rename(dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


if __name__ == "__main__":
    main()
