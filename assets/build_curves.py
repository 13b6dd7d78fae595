"""Add finished runs' bit-width rows to assets/showcase/bit_widths.csv: the curves Bit widths shows from an
empty $QIMERA_HOME, without shipping the runs' networks (a few hundred bytes per run).

    python bench/results_table.py --preset cifar10-resnet20-fast --bits 2,3,4,5,6,7,8 --methods ptq \
        --seeds 0,1,2 --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-dev \
        --out curves/ptq.csv --runs-dir curves/runs
    python assets/build_curves.py curves/runs/*

Only finished runs with W = A, of the shipped ResNet-20 (the same weights, by their hash), are taken. A
row whose run id (its folder's name) is in the file already is replaced, so the file grows run by run
across sessions and a rerun of a cell replaces it. ``--drop a,b`` (or the option given again) removes the rows
of those run ids: those of a recipe the preset no longer has, which would otherwise be pooled with its
successor's rows of the same budget. Data sets are named, not located (``folder:cifar10-dev``),
as the shipped runs name theirs. The shipped runs themselves (a folder with shipped.json) give no row:
Bit widths lists them already. docs/results.md records each batch of rows: command, machine, date.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # build_showcase, beside this file

import pandas as pd  # noqa: E402

from build_showcase import named  # noqa: E402
from qimera_engine import atomic_path, build_teacher, open_run  # noqa: E402
from qimera_engine.models import state_dict_sha256  # noqa: E402
from qimera_engine.ui.logic import BITWIDTH_COLUMNS, bitwidth_table, shipped_curves  # noqa: E402

SHOWCASE = Path(__file__).resolve().parent / "showcase"
TEACHER = SHOWCASE / "teacher" / "resnet20-cifar10.safetensors"


def rows_of(folders: list[Path], teacher_sha: str) -> pd.DataFrame:
    runs = []
    for folder in folders:
        run = open_run(folder)
        if run.read_only:  # a showcase run (or a copy of one): Bit widths lists it already
            print(f"skipped {folder}: a run shipped with the app, which Bit widths lists already")
            continue
        if run.state != "finished":
            raise SystemExit(f"{folder} is {run.state}; only finished runs give rows")
        if run.teacher_sha256 != teacher_sha:
            raise SystemExit(f"{folder} was trained with another teacher than {TEACHER.name}")
        runs.append(run)
    table = bitwidth_table(runs, label=named)
    skipped = len(runs) - len(table)
    if skipped:
        print(f"skipped {skipped} run(s) whose W and A differ or lie outside 2-8 bits")
    return table


def merge(old: pd.DataFrame, new: pd.DataFrame, drop: Iterable[str] = ()) -> pd.DataFrame:
    """``old``'s rows with ``new``'s added (a row of the same run replaced) and the runs in ``drop`` removed."""
    drop = set(drop)
    missing = drop - set(old["run"])
    if missing:
        raise SystemExit(f"no rows to drop for run(s) {', '.join(sorted(missing))}")
    keep = old[~old["run"].isin(set(new["run"]) | drop)]
    parts = [t for t in (keep, new) if len(t)]
    both = pd.concat(parts, ignore_index=True) if parts else new
    return both.sort_values(["method", "bits", "seed", "run"]).reset_index(drop=True)[BITWIDTH_COLUMNS]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="finished run folders")
    ap.add_argument("--drop", action="append", default=[], metavar="RUN_ID[,RUN_ID...]",
                    help="remove these runs' rows (a run id is its folder's name, the table's run column); "
                         "comma-separated, or the option given again")
    ap.add_argument("--out", type=Path, default=SHOWCASE / "bit_widths.csv")
    a = ap.parse_args(argv)
    if not a.runs and not a.drop:
        ap.error("name finished run folders to add, or --drop RUN_ID to remove rows")
    if not TEACHER.is_file():
        raise SystemExit(f"{TEACHER} is missing: build the showcase first (assets/build_showcase.py)")
    sha = state_dict_sha256(build_teacher("resnet20", checkpoint=str(TEACHER)).model)
    new = rows_of(a.runs, sha) if a.runs else pd.DataFrame(columns=BITWIDTH_COLUMNS)
    table = merge(shipped_curves(a.out), new, drop=[r for arg in a.drop for r in arg.split(",") if r])
    with atomic_path(a.out) as tmp:
        table.to_csv(tmp, index=False)
    counts = table.groupby(["method", "budget"]).size()
    print(f"wrote {a.out}: {len(table)} rows; runs per method and budget:\n{counts.to_string()}")


if __name__ == "__main__":
    main()
