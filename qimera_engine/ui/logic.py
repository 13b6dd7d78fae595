"""What the pages compute, without Streamlit: settings, tables of runs, samples to look at.

The pages only lay these out; tests call them directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import METHODS, TEACHERS, Run, RunConfig, preset
from ..analysis import normalise_coefficients
from .paths import data_label

# --------------------------------------------------------------------------- Quantize settings


@dataclass(frozen=True)
class Setting:
    """One widget on the Quantize page: a RunConfig field, its label and a one-line explanation."""
    name: str
    label: str
    help: str
    kind: str                 # int | float | bool | select | floatlog
    options: tuple = ()
    lo: float | None = None
    hi: float | None = None
    section: str = "Method"


SETTINGS: tuple[Setting, ...] = (
    Setting("wbits", "Weight bits (W)", "Bits per weight, every layer incl. first and last; 32 = full precision.",
            "select", (2, 3, 4, 5, 6, 7, 8, 32)),
    Setting("abits", "Activation bits (A)", "Bits per activation, after every ReLU; 32 = full precision.",
            "select", (2, 3, 4, 5, 6, 7, 8, 32)),
    Setting("method", "Method", "qimera: superposed embeddings; gdfq: plain generator baseline; "
            "ptq: calibrate only, no fine-tuning; real-data: QAT on real images (upper bound).", "select", METHODS),
    Setting("superpose_p", "Superposition probability p", "Share of batches whose samples mix K class embeddings "
            "(paper: 0.4).", "float", lo=0.0, hi=1.0),
    Setting("superpose_k", "Classes mixed K", "How many class embeddings each superposed sample mixes "
            "(paper: 2 on CIFAR-10).", "int", lo=1, hi=1000),
    Setting("coeff_sampler", "Coefficient sampler", "softmax of Gaussian logits (paper), Dirichlet(alpha), "
            "or fixed coefficients.", "select", ("softmax", "dirichlet", "fixed")),
    Setting("dirichlet_alpha", "Dirichlet alpha", "Concentration of the Dirichlet sampler (1 = uniform on the "
            "simplex).", "float", lo=0.01, hi=100.0),
    Setting("dm", "Disentanglement mapping", "A learnable linear layer applied before mixing (off in the "
            "released scripts).", "bool", section="Generator"),
    Setting("dm_width", "Mapping width", "Output width of the disentanglement mapping (paper: 100).", "int",
            lo=1, hi=4096, section="Generator"),
    Setting("embed_init", "Embedding init", "random, or the teacher's final linear layer (rows point to the "
            "class regions).", "select", ("random", "teacher"), section="Generator"),
    Setting("embed_freeze", "Freeze embeddings", "Keep the class embeddings fixed while the generator trains.",
            "bool", section="Generator"),
    Setting("noise_scale", "Noise scale sigma", "Gaussian noise added to each class embedding (paper: 1).",
            "float", lo=0.0, hi=10.0, section="Generator"),
    Setting("epochs", "Epochs", "Passes of iterations; the student is evaluated after each (paper: 400).", "int",
            lo=1, hi=10000, section="Schedule"),
    Setting("iters_per_epoch", "Iterations per epoch", "Generated batches per epoch (paper: 200).", "int",
            lo=1, hi=100000, section="Schedule"),
    Setting("batch_size", "Batch size", "Generated images per iteration (paper: 200 on CIFAR).", "int",
            lo=2, hi=4096, section="Schedule"),
    Setting("warmup_epochs", "Warm-up epochs", "Epochs where only the generator trains (paper: 4).", "int",
            lo=0, hi=10000, section="Schedule"),
    Setting("calib_epochs", "Calibration epochs", "Epochs where activation ranges are calibrated, then frozen "
            "(paper: 4).", "int", lo=0, hi=10000, section="Schedule"),
    Setting("lr_g", "Generator learning rate", "Adam, betas (0.5, 0.999) (paper: 1e-3).", "floatlog",
            lo=1e-7, hi=1.0, section="Schedule"),
    Setting("lr_s", "Student learning rate", "SGD with Nesterov momentum 0.9 (paper: 1e-4 on CIFAR).",
            "floatlog", lo=0.0, hi=1.0, section="Schedule"),
    Setting("seed", "Seed", "Random seed of the whole run (same seed, same result on the CPU).", "int",
            lo=0, hi=2**31 - 1, section="Schedule"),
    # Qimera+: the project's own recipe (not in the paper); each first option is the paper's behaviour
    Setting("weight_clip", "Weight ranges", "minmax: each channel's min/max (paper); mse: clip each channel where "
            "the 4-bit rounding error is smallest.", "select", ("minmax", "mse"), section="Qimera+"),
    Setting("act_calib", "Activation ranges", "ema: moving average of batch min/max (paper); mse: then clip where "
            "the rounding error on the last calibration batches is smallest.", "select", ("ema", "mse"),
            section="Qimera+"),
    Setting("lr_schedule", "Student lr schedule", "step: x0.1 at the milestones (paper); cosine: smooth decay to 0 "
            "over the student's steps.", "select", ("step", "cosine"), section="Qimera+"),
    Setting("ce_rows", "Cross-entropy on", "all rows (paper); plain: only unmixed samples; agree: only where the "
            "teacher's top-1 is the target class (distillation stays on every row).", "select",
            ("all", "plain", "agree"), section="Qimera+"),
    Setting("kd_reduction", "Distillation average", "mean over batch x classes (reference code, C times weaker); "
            "batchmean: per sample.", "select", ("mean", "batchmean"), section="Qimera+"),
    Setting("kd_tau", "Distillation temperature", "Softens both models' outputs (paper: 20).", "float",
            lo=0.1, hi=100.0, section="Qimera+"),
    Setting("lowpass_d0", "Low-pass cut-off D0", "0: off (paper); > 0: blur the student's images (Gaussian, in "
            "frequency bins; 32 px images: 4-16 filters).", "float", lo=0.0, hi=1000.0, section="Qimera+"),
    Setting("student_steps", "Student steps per batch", "1 (paper); more reuses each generated batch (cheaper "
            "than generating one).", "int", lo=1, hi=16, section="Qimera+"),
    Setting("act_learn", "Learn activation ranges", "off (paper); on: after calibration, train each activation "
            "range's upper end with the student (measured: worse on CIFAR-10 at this budget).", "bool",
            section="Qimera+"),
    Setting("student_ema", "Student weight average", "0: the weights themselves (paper); e.g. 0.998: evaluate "
            "and save a moving average of the student's weights over its steps (smooths the last steps' noise).",
            "float", lo=0.0, hi=0.9999, section="Qimera+"),
    Setting("recon_iters", "Rounding reconstruction steps", "0: off (paper); > 0: learn each "
            "weight's rounding (up or down) block by block so the student's blocks reproduce the teacher's on "
            "generated images (AdaRound/BRECQ, as Genie does); steps per block.", "int", lo=0, hi=100000,
            section="Qimera+"),
    Setting("recon_at", "Reconstruct when", "calib: after calibration, then fine-tune; end: after the last "
            "epoch, from the fine-tuned weights (measured: better on CIFAR-10).", "select", ("calib", "end"),
            section="Qimera+"),
    Setting("recon_images", "Reconstruction images", "Generated images the roundings are learned on (the last "
            "ones of the epoch it follows).", "int", lo=1, hi=100000, section="Qimera+"),
    Setting("superpose_ramp", "Superposition ramp (epochs)", "0: p from the start (paper); R > 0: no superposed "
            "batches in epoch 0, then p rises linearly to its value in epoch R.", "int", lo=0, hi=10000,
            section="Qimera+"),
    Setting("eval_images", "Images evaluated per epoch", "0: the whole test set every epoch (paper); > 0: a fixed "
            "sample, the whole set after the last epoch.", "int", lo=0, hi=10**7, section="Qimera+"),
)


def settings_by_section() -> dict[str, list[Setting]]:
    out: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        out.setdefault(s.section, []).append(s)
    return out


def config_from_values(base: RunConfig, values: dict) -> RunConfig:
    """``base`` with the widget values applied (raises ConfigError with a clear message)."""
    return base.with_overrides(**values)


def start_presets() -> dict[str, str]:
    """Presets to start the Quantize form from, with a description."""
    return {"digits": "Fast demo: 8x8 digits, small CNN trained on the spot (seconds on a CPU)",
            "cifar10-resnet20-cpu": "CIFAR-10 ResNet-20 at a CPU budget, the paper's settings (needs the data and "
                                    "teacher weights)",
            "cifar10-resnet20-fast": "Qimera+: the CPU budget with our recipe (clipped ranges, roundings "
                                     "reconstructed at the end, no superposed batches: at this budget they cost "
                                     "accuracy; see Qimera+ below): more accurate, in ~6 minutes",
            "cifar10-resnet20": "The paper's CIFAR-10 setting (400 x 200 iterations; a GPU job)",
            "cifar100-resnet20": "The paper's CIFAR-100 setting",
            "imagenet-resnet18": "ImageNet ResNet-18 (zoo weights, an ImageNet folder)"}

# --------------------------------------------------------------------------- Teacher page


DATASETS = {"digits": "Digits (8x8, embedded, offline)", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
            "folder": "An image folder (ROOT/<class>/<image>)", "imagenet": "ImageNet validation folder"}


def teachers_for(kind: str) -> list[str]:
    """Teacher names that fit a data set (by image size and classes)."""
    if kind == "digits":
        return ["digits-cnn"]
    if kind == "cifar10":
        return [n for n in TEACHERS if n.startswith("resnet") and TEACHERS[n][1] == 32 and TEACHERS[n][5] == 10]
    if kind == "cifar100":
        return [n for n in TEACHERS if TEACHERS[n][1] == 32 and n != "resnet20_cifar10"]
    return [n for n in TEACHERS if n != "digits-cnn"]


_PAGE_HINTS = [
    (r"Pass download=True \(--set download=true\) to fetch it", "Tick **Download if missing** above to fetch it"),
    (r"give a checkpoint \(--checkpoint PATH\), pretrained=True for zoo weights, or train one first "
     r"\(python -m qimera_engine train-teacher [^)]*\)",
     "choose **Checkpoint file path** or **Upload a checkpoint** under Weights, or **Model zoo (download)**"),
    (r"Give a local checkpoint instead \(--checkpoint PATH\)", "Choose **Checkpoint file path** under Weights instead"),
    (r"on a CPU use a checkpoint \(--checkpoint PATH\)", "on a CPU choose **Checkpoint file path** under Weights"),
]


def page_hint(message: str) -> str:
    """An engine error as the Teacher page says it: the page's own controls instead of command-line flags."""
    import re
    for pattern, text in _PAGE_HINTS:
        message = re.sub(pattern, text, message)
    return message


def preset_for(kind: str) -> str:
    return {"digits": "digits", "cifar10": "cifar10-resnet20-cpu", "cifar100": "cifar100-resnet20",
            "imagenet": "imagenet-resnet18"}.get(kind, "cifar10-resnet20-cpu")

# --------------------------------------------------------------------------- runs


def run_label(run: Run) -> str:
    try:
        c = run.config
        shipped = ", shipped with the app" if run.read_only else ""
        return f"{run.id}  ({c.label} W{c.wbits}A{c.abits}, {c.teacher}, seed {c.seed}{shipped})"
    except Exception:
        return run.id


def split_damaged(runs: list[Run]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Readable runs, and (run id, what is wrong) for each damaged folder."""
    ok, damaged = [], []
    for r in runs:
        problem = r.problem
        if problem is None:
            ok.append(r)
        else:
            damaged.append((r.id, problem))
    return ok, damaged


def runs_table(runs: list[Run], active_dirs: set[str] | frozenset = frozenset()) -> pd.DataFrame:
    """One row per run folder: settings, status and results (the newest first)."""
    rows = []
    for r in runs:
        try:
            c = r.config
        except Exception as e:  # a damaged folder is listed, not fatal
            rows.append({"run": r.id, "status": f"unreadable: {e}"})
            continue
        s = r.summary or {}
        status = "shipped" if r.read_only else r.state
        if status == "running" and str(r.path) not in active_dirs:
            status = "running elsewhere"  # another process (e.g. the command line) holds its lock
        metrics = r.metrics if not s else []
        rows.append({"run": r.id, "method": c.label, "W": c.wbits, "A": c.abits, "teacher": c.teacher,
                     "data": data_label(c.test_data), "seed": c.seed, "status": status,
                     "epochs": f"{s.get('epochs_done', len(metrics))}/{c.epochs}",
                     "FP top-1": s.get("fp_top1"),
                     "final top-1": s.get("quant_top1", metrics[-1]["top1"] if metrics else None),
                     "best top-1": s.get("best_top1", max((m["top1"] for m in metrics), default=None)),
                     "seconds": s.get("seconds")})
    return pd.DataFrame(rows)


def bitwidth_table(runs: list[Run]) -> pd.DataFrame:
    """Finished runs with W = A, for the bit-width chart: method, bits, seed, top-1 (final and best),
    and the budget (generated images): runs of different budgets are never pooled."""
    rows = []
    for r in runs:
        s = r.summary
        if not s or r.status.get("status") != "finished" or s.get("quant_top1") is None:
            continue
        c = r.config
        rows.append({"method": c.label, "bits": s["wbits"] if s["wbits"] == s["abits"] else None,
                     "W": s["wbits"], "A": s["abits"], "budget": budget(c),
                     "schedule": f"{c.epochs} × {c.iters_per_epoch} × {c.batch_size}", "seed": s.get("seed"),
                     "teacher": s.get("teacher"), "data": data_label(s.get("test_data") or c.test_data),
                     "top1": s["quant_top1"],
                     "best_top1": s.get("best_top1"), "fp_top1": s.get("fp_top1"), "run": r.id})
    cols = ["method", "bits", "W", "A", "budget", "schedule", "seed", "teacher", "data", "top1", "best_top1",
            "fp_top1", "run"]
    df = pd.DataFrame(rows, columns=cols)
    return df[df["bits"].notna() & df["W"].between(2, 8)].astype({"bits": int}).reset_index(drop=True)


def boundary_sentence(path: dict, names: list[str], a: int, b: int) -> str:
    """What the teacher decides along a path A -> B, in words (the boundary is where its top-1 changes)."""
    bd = path.get("boundary")
    start = int(path["teacher_pred"][0])
    if bd is None:
        return f"The teacher's top-1 class stays {names[start]} along this whole path: no decision boundary is crossed."
    text = f"The teacher's top-1 class changes from {names[bd['from']]} to {names[bd['to']]} at λ_B ≈ {bd['alpha']:.2f}."
    if bd["to"] != b:
        text += (f" That is a third class, not {names[b]}: p({names[b]}) reaches only "
                 f"{float(np.max(path['p_b'])):.2f} on this path.")
    if start != a:
        text += f" (Even at λ_B = 0 the teacher does not say {names[a]}.)"
    return text


FEATURE_NUMBERS = ("**near boundary**: share of samples whose teacher hesitates (its top-1 probability minus its "
                   "top-2 is below the threshold). **coverage**: share of real test images that have a synthetic "
                   "sample among their k nearest neighbours, in the teacher's feature space (higher: the synthetic "
                   "samples reach more of where real data lives). What Qimera expects: superposed samples near the "
                   "boundary more often than plain ones and than GDFQ's, and a higher coverage.")


def feature_verdict(numbers: dict[str, dict]) -> list[str]:
    """What this run's numbers say against what Qimera expects, plainly, including when it is the
    opposite. ``numbers[source]``: {"near": share, "coverage": share or None}."""
    out = []
    sup = numbers.get("superposed")
    if sup is None:
        return out
    for other in ("plain", "gdfq"):
        o = numbers.get(other)
        if o is None:
            continue
        who = "this run's plain samples" if other == "plain" else "the GDFQ run's samples"
        if sup["near"] > o["near"]:
            out.append(f"As expected, superposed samples are near the boundary more often than {who} "
                       f"({sup['near']:.0%} vs {o['near']:.0%}).")
        else:
            out.append(f"Not as expected: {who} are near the boundary at least as often as the superposed ones "
                       f"({o['near']:.0%} vs {sup['near']:.0%}). Short runs, a few samples or a strong teacher can "
                       f"do that; the mixing coefficients matter too.")
        if sup.get("coverage") is not None and o.get("coverage") is not None and sup["coverage"] < o["coverage"]:
            out.append(f"And {who} cover more of the real features ({o['coverage']:.0%} vs {sup['coverage']:.0%}).")
    return out


def generator_runs(runs: list[Run]) -> list[Run]:
    """Runs that have saved a generator (at least one epoch done)."""
    out = []
    for r in runs:
        try:
            if r.has_generator and (r.path / "generator.json").exists():
                out.append(r)
        except OSError:
            continue
    return out


def budget(cfg: RunConfig) -> int:
    """A run's schedule as generated images: epochs x iterations x batch."""
    return cfg.epochs * cfg.iters_per_epoch * cfg.batch_size


def comparable(a: RunConfig, b: RunConfig) -> bool:
    """Whether two runs can be compared fairly: same teacher, data, bit widths and budget."""
    return (a.teacher, a.test_data, a.wbits, a.abits, budget(a)) == (b.teacher, b.test_data, b.wbits, b.abits, budget(b))


def partner_runs(run: Run, runs: list[Run], method: str = "gdfq", same_setting: bool = True) -> list[Run]:
    """Runs of ``method`` with a generator to set beside ``run``, newest first: by default only those
    with the same teacher, data, bit widths and budget; else any with the same teacher and data."""
    c = run.config
    out = []
    for r in generator_runs(runs):
        rc = r.config
        if r.path == run.path or rc.method != method or (rc.teacher, rc.test_data) != (c.teacher, c.test_data):
            continue
        if not same_setting or comparable(c, rc):
            out.append(r)
    return out


def gdfq_partner(run: Run, runs: list[Run]) -> Run | None:
    """The newest GDFQ run comparable with ``run`` (same teacher, data, bits and budget), if any."""
    found = partner_runs(run, runs)
    return found[0] if found else None


def setting_label(cfg: RunConfig) -> str:
    return f"W{cfg.wbits}A{cfg.abits}, {budget(cfg):,} generated images ({cfg.epochs} × {cfg.iters_per_epoch} × {cfg.batch_size})"

# --------------------------------------------------------------------------- boundary samples


def coefficient_formula(coeffs, names: list[str]) -> str:
    """LaTeX of the superposed embedding, e.g. z = 0.62 e_{3} + 0.38 e_{8}."""
    terms = [f"{c:.2f}\\,M(e_{{{n}}})" for c, n in zip(normalise_coefficients(coeffs), names)]
    return "z = " + " + ".join(terms)


def hover_coefficients(labels, coeffs, class_names: list[str]) -> list[str]:
    """'0.62 x 3 + 0.38 x 8' per sample, for scatter hovers."""
    labels, coeffs = np.asarray(labels), np.asarray(coeffs)
    if labels.ndim == 1:
        labels, coeffs = labels[:, None], coeffs[:, None]
    return [" + ".join(f"{c:.2f} x {class_names[int(l)]}" for l, c in zip(ls, cs) if c > 0.005)
            for ls, cs in zip(labels, coeffs)]


def dominant_class(labels, coeffs) -> np.ndarray:
    """For colouring superposed samples: the class with the largest coefficient."""
    labels, coeffs = np.asarray(labels), np.asarray(coeffs)
    if labels.ndim == 1:
        return labels.astype(int)
    return labels[np.arange(len(labels)), coeffs.argmax(1)].astype(int)


def default_config(kind: str = "digits") -> RunConfig:
    return preset(preset_for(kind))


def describe_config_changes(cfg: RunConfig, base: RunConfig) -> dict:
    """Fields where ``cfg`` differs from ``base`` (shown before a start)."""
    a, b = cfg.to_dict(), base.to_dict()
    return {k: a[k] for k in a if a[k] != b.get(k)}



def selected_points(points: list[dict], sources: dict, classes: list[str]) -> pd.DataFrame:
    """Rows for points picked on the feature scatter: source, class, coefficients, teacher's view."""
    rows = []
    for p in points:
        cd = p.get("customdata")
        if not cd or len(cd) < 4:
            continue
        source, idx = cd[0], int(cd[3])
        probs = np.asarray(sources[source]["probs"][idx])
        top = np.argsort(probs)[::-1][:3]
        rows.append({"source": source, "index": idx, "class": cd[1], "mix": cd[2],
                     "teacher top-3": ", ".join(f"{classes[c]} {probs[c]:.2f}" for c in top),
                     "margin": float(probs[top[0]] - probs[top[1]]) if len(top) > 1 else 1.0})
    return pd.DataFrame(rows)
