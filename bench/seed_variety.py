"""How different are the images of one generator's noise seeds? The question Home's first exhibit raises.

    python bench/seed_variety.py RUN [RUN ...] --classes cat,dog --seeds 8 [--grid seeds.png]

For each run, the images its generator makes for ``--seeds`` noise seeds (0, 1, ...), as Home shows them:
half one class, half the other (``--coeffs``), and plain images of the first class. Reported per set:

- ``pixel``: mean distance between two of the images, root-mean-square over pixels in [0, 1] display
  values (0: the same image; two unrelated photographs are typically 0.2-0.4 apart);
- ``layout``: the same over the images' layouts (their means over a 4 x 4 grid of blocks): how far
  apart they are in where their light, dark and coloured parts lie, whatever their detail;
- ``feature``: mean distance between two images' teacher features (the penultimate layer that
  Feature space and the diversity figures use);
- ``teacher says``: how many different classes the teacher reads among them.

Beside them, the same figures for as many real test images of the first class (the run's own test
data, when it is on this machine): how far apart real images of one class are. One JSON line per run.
``--grid FILE.png`` also writes the seeds' mixes, one row per run, to look at side by side.
``bench/screen_generator.py --variety cat,dog`` adds the same figures for the generator it trains.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qimera_engine import CheckpointError, InputSpec, load_data, load_generator, load_teacher, open_run  # noqa: E402
from qimera_engine.analysis import image_spread, to_display  # noqa: E402
from qimera_engine.evaluate import collect_features  # noqa: E402
from qimera_engine.generator import generate_images  # noqa: E402


def spread(images: torch.Tensor, teacher) -> dict:
    feats, probs = collect_features(teacher.model, images)
    iu = np.triu_indices(len(images), 1)
    return {"pixel": round(image_spread(images, teacher), 4), "layout": round(image_spread(images, teacher, grid=4), 4),
            "feature": round(float(torch.cdist(feats.float(), feats.float()).numpy()[iu].mean()), 3),
            "teacher says": len(set(probs.argmax(1).tolist()))}


def class_names(teacher, test) -> list[str]:
    return list(test.classes) if test is not None else [str(i) for i in range(teacher.num_classes)]


def class_pair(names: list[str], classes: str) -> tuple[int, int]:
    """The indices of ``classes``, two names (or indices) separated by a comma; a clear error otherwise."""
    picked = [c.strip() for c in classes.split(",")]
    found = [names.index(c) if c in names else int(c) if c.isdigit() and int(c) < len(names) else None
             for c in picked]
    if len(picked) != 2 or None in found:
        raise ValueError(f"classes {classes!r}: give two of {', '.join(names)} (or their indices), "
                         "separated by a comma")
    return found[0], found[1]


def refuse_unknown_classes(ap, flag: str, teacher, test, classes: str) -> None:
    """A usage error from ``ap`` (exit status 2) naming the classes there are, unless ``classes`` (the value of
    ``flag``) are two of them. Only the names: no other mistake is reported as one of ``flag``."""
    try:
        class_pair(class_names(teacher, test), classes)
    except ValueError as e:
        ap.error(f"{flag}: {e}")


def variety(gen, teacher, test, classes: str = "cat,dog", coeffs: str = "0.5,0.5", n_seeds: int = 8,
            shown: list | None = None) -> dict:
    """The figures above for one generator: its ``n_seeds`` mixed and plain images, and as many real images
    of the first class from ``test`` (a data set, or None). ``classes``: two names (or indices). ``shown``: a
    list that gets the measured images as ``--grid`` draws them (``grid_row``)."""
    names = class_names(teacher, test)
    a, b = class_pair(names, classes)
    mixed, plain = seed_images(gen, a, b, coeffs, n_seeds)
    if shown is not None:
        shown.append(grid_row(mixed if mixed is not None else plain, teacher))
    row = {"classes": [names[a], names[b]], "seeds": n_seeds}
    if mixed is not None:
        row["mixed"] = spread(mixed, teacher)
    row["plain"] = spread(plain, teacher)
    if test is not None:
        x, y = test.subset(min(len(test), 2000), 0)
        row["real"] = spread(x[y == a][:n_seeds], teacher)
    return row


def seed_images(gen, a: int, b: int, coeffs: str = "0.5,0.5", n_seeds: int = 8):
    """The generator's images for noise seeds 0 .. n_seeds - 1: mixes of classes ``a`` and ``b`` at ``coeffs``
    (None for a GDFQ generator, which takes one class), and plain images of ``a``."""
    seeds = list(range(n_seeds))
    lam = torch.tensor([[float(c) for c in coeffs.split(",")]] * n_seeds)
    mixed = (generate_images(gen, torch.tensor([[a, b]] * n_seeds), lam, seeds) if gen.input_mode != "gdfq"
             else None)
    return mixed, generate_images(gen, torch.full((n_seeds, 1), a), torch.ones(n_seeds, 1), seeds)


def grid_row(images: torch.Tensor, teacher) -> np.ndarray:
    """One row of the picture ``--grid`` writes: the seeds' mixes (plain images for a GDFQ generator) side by
    side, in display values as the app draws them, (H, n_seeds * W, C) uint8."""
    return np.concatenate(list(to_display(images, teacher)), axis=1)


def open_finished(ap, path: str):
    """The run at ``path``, its teacher and its generator; a folder that is not a run, or whose teacher or
    generator cannot be loaded here, ends the script with one line saying which and why."""
    try:
        run = open_run(path)
        return run, load_teacher(run), load_generator(run)
    except (CheckpointError, OSError, ValueError) as e:
        ap.error(f"{path}: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--classes", default="cat,dog", help="two class names (or indices)")
    ap.add_argument("--coeffs", default="0.5,0.5")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--grid", type=Path, default=None,
                    help="also write a PNG with one row per run: its seeds' mixes side by side, as the app draws them")
    args = ap.parse_args()
    if args.grid is not None and args.grid.suffix.lower() != ".png":
        ap.error(f"--grid {args.grid}: give a path ending in .png")
    grid_rows = []
    torch.set_num_threads(1)
    for path in args.runs:
        run, teacher, gen = open_finished(ap, path)
        test = None
        try:
            test = load_data(run.config.test_data, InputSpec.of(teacher), "test")
        except (OSError, ValueError):
            pass
        refuse_unknown_classes(ap, "--classes", teacher, test, args.classes)
        row = {"run": run.id, "method": run.config.method, "superpose_p": run.config.superpose_p,
               **variety(gen, teacher, test, args.classes, args.coeffs, args.seeds,
                         grid_rows if args.grid is not None else None)}
        print(json.dumps(row), flush=True)
    if args.grid is not None:
        from PIL import Image
        if len({r.shape for r in grid_rows}) > 1:
            raise SystemExit("--grid: the runs' images differ in size; give runs of one data set")
        picture = np.concatenate(grid_rows, axis=0)
        Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(args.grid)


if __name__ == "__main__":
    main()
