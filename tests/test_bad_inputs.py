"""Bad input, as a careless or a hostile user gives it: one clear line, exit status 2, nothing changed.

Every case runs the command line in this process (``cli.main``, as ``python -m qimera_engine`` does)
or calls the engine's API, and checks the message, the exit status and that the run store and the
teacher cache are exactly as they were.
"""
from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qimera_engine import cli
from qimera_engine.cli import USER_ERRORS

TINY = ["--set=epochs=1", "--set=iters_per_epoch=1", "--set=warmup_epochs=0", "--set=calib_epochs=1",
        "--set=batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits_teacher):
    """Bad files of every kind, made once."""
    d = tmp_path_factory.mktemp("bad")

    def folder(name, write):  # ten classes, as the digits teacher has: the bad file is what is refused
        from PIL import Image
        for c in "abcdefghij":
            (d / name / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / name / c / "ok.png")
        write(d / name / "a")
        return d / name

    folder("text_jpg", lambda p: (p / "x.jpg").write_text("this is not a picture"))
    folder("empty_png", lambda p: (p / "x.png").write_bytes(b""))
    folder("bomb_png", lambda p: (p / "x.png").write_bytes(_bomb_png(30000, 30000)))
    folder("three_classes", lambda p: None)
    for c in "defghij":  # three classes left
        __import__("shutil").rmtree(d / "three_classes" / c)
    state = digits_teacher.model.state_dict()
    torch.save({k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}, d / "nan.pt")
    torch.save({k: v[:1] if v.dim() else v for k, v in state.items()}, d / "wrong_shapes.pt")
    (d / "text.pt").write_text("not a checkpoint")
    (d / "empty.pt").write_bytes(b"")
    (d / "payload.pt").write_bytes(pickle.dumps(_Payload()))
    torch.save({"x": 1}, d / "not_tensors.pt")
    (d / "run_exists").mkdir()
    (d / "run_exists" / "config.json").write_text("{}")
    return d


class _Payload:
    def __reduce__(self):  # would create a file if the loader ever ran it
        return (os.system, ("touch /tmp/qimera-pwned",))


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG that claims w x h pixels of one grey channel (decompresses to w*h bytes)."""
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * (w + 1) * 64)  # only a few rows: the header is what counts
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


LONG = "x" * 300  # a path component longer than any file system allows

# (id, command line with {d} for the bad-files folder, words the message must contain)
CLI_CASES = [
    ("epochs-0", ["quantize", "--set=epochs=0"], "epochs must be an integer >= 1"),
    ("epochs-negative", ["quantize", "--set=epochs=-3"], "epochs must be an integer >= 1"),
    ("epochs-text", ["quantize", "--set=epochs=abc"], "epochs: cannot read 'abc' as int"),
    ("epochs-float", ["quantize", "--set=epochs=2.5"], "cannot read '2.5' as int"),
    ("batch-1", ["quantize", "--set=batch_size=1"], "batch_size must be an integer >= 2"),
    ("batch-0", ["quantize", "--set=batch_size=0"], "batch_size must be an integer >= 2"),
    ("iters-0", ["quantize", "--set=iters_per_epoch=0"], "iters_per_epoch must be an integer >= 1"),
    ("eval-batch-negative", ["quantize", "--set=eval_batch_size=-5"], "eval_batch_size must be an integer >= 1"),
    ("lr-gamma-negative", ["quantize", "--set=lr_gamma=-1"], "lr_gamma must be > 0"),
    ("lr-gamma-0", ["quantize", "--set=lr_gamma=0"], "lr_gamma must be > 0"),
    ("calib-0-low-bits", ["quantize", "--set=calib_epochs=0"], "calib_epochs must be >= 1 when abits < 32"),
    ("warmup-past-epochs", ["quantize", "--set=warmup_epochs=99"], "warmup_epochs must be in [0, epochs=12]"),
    ("p-above-1", ["quantize", "--set=superpose_p=1.5"], "superpose_p must be in [0, 1]"),
    ("p-nan", ["quantize", "--set=superpose_p=nan"], "superpose_p must be in [0, 1], got nan"),
    ("lr-s-inf", ["quantize", "--set=lr_s=inf"], "lr_s must be >= 0 and <= 10"),
    ("lr-g-0", ["quantize", "--set=lr_g=0"], "lr_g must be > 0 and <= 10"),
    ("tau-0", ["quantize", "--set=kd_tau=0"], "kd_tau must be >= 0.01 and <= 1000"),
    ("k-0", ["quantize", "--set=superpose_k=0"], "superpose_k must be an integer >= 1"),
    ("sampler-unknown", ["quantize", "--set=coeff_sampler=gauss"], "coeff_sampler must be one of"),
    ("fixed-without-coeffs", ["quantize", "--set=coeff_sampler=fixed"], "needs fixed_coeffs"),
    ("fixed-not-summing", ["quantize", "--set=coeff_sampler=fixed", "--set=fixed_coeffs=0.5,0.6"],
     "fixed_coeffs must be >= 0 and sum to 1"),
    ("dirichlet-0", ["quantize", "--set=dirichlet_alpha=0"], "dirichlet_alpha must be > 0"),
    ("ema-beta-1", ["quantize", "--set=ema_beta=1"], "ema_beta must be in (0, 1)"),
    ("g-betas-one", ["quantize", "--set=g_betas=0.5"], "g_betas must be two values"),
    ("unknown-key", ["quantize", "--set=nosuch=1"], "unknown setting(s): 'nosuch'"),
    ("typo-key", ["quantize", "--set=epochz=3"], "did you mean 'epochs'?"),
    ("set-without-equals", ["quantize", "--set=epochs"], "--set expects key=value"),
    ("device-unknown", ["quantize", "--set=device=foo"], "device must be auto, cpu or cuda"),
    ("threads-0", ["quantize", "--set=num_threads=0"], "num_threads must be an integer >= 1"),
    ("embed-dim-0", ["quantize", "--set=embed_dim=0"], "embed_dim must be an integer >= 1"),
    ("gen-width-2", ["quantize", "--set=gen_width=2"], "gen_width must be an integer >= 4"),
    ("kd-reduction", ["quantize", "--set=kd_reduction=sum"], "kd_reduction must be one of"),
    ("milestones-text", ["quantize", "--set=milestones=a,b"], "milestones: cannot read"),
    ("milestones-0", ["quantize", "--set=milestones=0"], "milestones must be epochs >= 1"),
    ("seed-negative", ["quantize", "--seed=-1"], "seed must be in [0, 2**63)"),
    ("seed-huge", ["quantize", "--seed=99999999999999999999999"], "seed must be in [0, 2**63)"),
    ("wbits-1", ["quantize", "--wbits=1"], "wbits must be 2..8 or 32"),
    ("abits-9", ["quantize", "--abits=9"], "abits must be 2..8 or 32"),
    ("wbits-16", ["quantize", "--wbits=16"], "wbits must be 2..8 or 32"),
    ("method-unknown", ["quantize", "--method=foo"], "invalid choice: 'foo'"),
    ("preset-unknown", ["quantize", "--preset=nope"], "invalid choice: 'nope'"),
    ("teacher-unknown", ["quantize", "--teacher=nope"], "invalid choice: 'nope'"),
    ("wbits-text", ["quantize", "--wbits=four"], "invalid int value: 'four'"),
    ("data-spec-unknown", ["quantize", "--test-data=nowhere:x", *TINY], "unknown data spec 'nowhere:x'"),
    ("data-spec-empty", ["quantize", "--set=test_data=", *TINY], "empty data spec"),
    ("folder-missing", ["quantize", "--test-data=folder:/no/such/place", *TINY], "image folder not found"),
    ("checkpoint-missing", ["quantize", "--checkpoint=/no/such.pt", *TINY], "checkpoint not found: /no/such.pt"),
    ("checkpoint-text", ["quantize", "--checkpoint={d}/text.pt", *TINY], "is not a valid checkpoint"),
    ("checkpoint-empty", ["quantize", "--checkpoint={d}/empty.pt", *TINY], "is not a valid checkpoint"),
    ("checkpoint-payload", ["quantize", "--checkpoint={d}/payload.pt", *TINY], "is not a valid checkpoint"),
    ("checkpoint-not-tensors", ["quantize", "--checkpoint={d}/not_tensors.pt", *TINY], "holds no state dict"),
    ("checkpoint-nan", ["quantize", "--checkpoint={d}/nan.pt", *TINY], "holds NaN or infinite values"),
    ("checkpoint-wrong-shapes", ["quantize", "--checkpoint={d}/wrong_shapes.pt", *TINY], "does not fit DigitsCNN"),
    ("checkpoint-folder", ["quantize", "--checkpoint={d}", *TINY], "checkpoint not found"),
    ("resume-missing", ["quantize", "--resume=/no/such/run"], "no run at /no/such/run"),
    ("restart-alone", ["quantize", "--restart"], "--restart goes with --resume"),
    ("out-holds-a-run", ["quantize", "--out={d}/run_exists", *TINY], "already holds a run"),
    ("out-name-too-long", ["quantize", f"--out={{d}}/{LONG}", *TINY], "File name too long"),
    ("quantize-text-as-jpg", ["quantize", "--test-data=folder:{d}/text_jpg", *TINY],
     "text_jpg/a/x.jpg: not an image file"),
    ("folder-text-as-jpg", ["evaluate", "--teacher=digits-cnn", "--test-data=folder:{d}/text_jpg"],
     "text_jpg/a/x.jpg: not an image file"),
    ("folder-empty-png", ["evaluate", "--teacher=digits-cnn", "--test-data=folder:{d}/empty_png"],
     "empty_png/a/x.png"),
    ("folder-bomb-png", ["evaluate", "--teacher=digits-cnn", "--test-data=folder:{d}/bomb_png"],
     "bomb_png/a/x.png: it is too large"),
    ("classes-mismatch", ["quantize", "--test-data=folder:{d}/three_classes", *TINY],
     "the data has 3 classes but the teacher 10"),
    ("no-cached-teacher", ["quantize", "--teacher=resnet20", "--test-data=folder:{d}/three_classes", *TINY],
     "no weights for teacher 'resnet20' on folder data in the cache"),
    ("evaluate-device", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--device=foo"],
     "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    ("evaluate-no-gpu", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--device=cuda:7"],
     "device"),
    ("evaluate-batch-negative", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--batch-size=-5"],
     "--batch-size must be >= 1, got -5"),
    ("evaluate-batch-0", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--batch-size=0"],
     "--batch-size must be >= 1, got 0"),
    ("evaluate-nan-teacher", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--checkpoint={d}/nan.pt"],
     "holds NaN or infinite values"),
    ("train-epochs-0", ["train-teacher", "--epochs=0"], "epochs must be an integer >= 1, got 0"),
    ("train-epochs-negative", ["train-teacher", "--epochs=-1"], "epochs must be an integer >= 1, got -1"),
    ("train-seed-negative", ["train-teacher", "--seed=-1"], "seed must be in [0, 2**63)"),
    ("train-cifar-on-cpu", ["train-teacher", "--teacher=resnet20", "--data=cifar10", "--device=cpu"],
     "training a CIFAR teacher needs a GPU"),
    ("train-folder", ["train-teacher", "--data=folder:{d}/three_classes", "--device=cpu"],
     "teachers are trained on digits, cifar10 or cifar100"),
    ("train-device", ["train-teacher", "--device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
    ("sweep-bits-text", ["sweep", "--bits=x"], "--bits takes comma-separated integers"),
    ("sweep-bits-9", ["sweep", "--bits=4,9", "--out={d}/sweep.csv"], "wbits must be 2..8 or 32, got 9"),
    ("sweep-methods", ["sweep", "--methods=foo"], "unknown method 'foo'"),
    ("sweep-seeds-empty", ["sweep", "--seeds=,"], "--seeds needs at least one value"),
    ("sweep-seed-negative", ["sweep", "--seeds=-1", "--out={d}/sweep.csv"], "seed must be in [0, 2**63)"),
    ("flag-and-set-wbits", ["quantize", "--wbits=4", "--set=wbits=2"], "--wbits and --set wbits=... both set wbits"),
    ("flag-and-set-seed", ["quantize", "--seed=1", "--set=seed=2"], "--seed and --set seed=... both set seed"),
    ("flag-and-set-test-data", ["quantize", "--test-data=digits", "--set=test-data=digits"],
     "--test-data and --set test_data=... both set test_data"),
    ("set-twice", ["quantize", "--set=epochs=2", "--set=epochs=3"], "epochs"),
    ("evaluate-pretrained-digits", ["evaluate", "--teacher=digits-cnn", "--test-data=digits", "--pretrained"],
     "pretrained"),
]


def snapshot(*roots: Path) -> dict:
    """Every file and folder under the roots, with size and modification time."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(case, files, capsys):
    _, argv, words = case
    argv = [a.replace("{d}", str(files)) for a in argv]
    home = Path(os.environ["QIMERA_HOME"])
    before = snapshot(home / "runs", home / "teachers", files)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors (unknown choice, not an integer)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "python -m qimera_engine")), err
    assert snapshot(home / "runs", home / "teachers", files) == before
    assert not Path("/tmp/qimera-pwned").exists()


def _api_cases():
    from qimera_engine import (RunConfig, evaluate, get_teacher, load_data, open_run, preset, quantize_model,
                               run_to_end)
    from qimera_engine.data import InputSpec
    from qimera_engine.models import DigitsCNN
    spec = InputSpec(8, 1, (0.3,), (0.4,))
    return [
        ("api-preset-epochs-0", lambda: preset("digits", epochs=0), "epochs must be an integer >= 1"),
        ("api-config-float-bits", lambda: RunConfig(wbits=3.5), "wbits must be 2..8 or 32"),
        ("api-config-unknown-key", lambda: RunConfig.from_dict({"epoch": 3}), "did you mean 'epochs'?"),
        ("api-run-nothing", lambda: run_to_end(None), "run needs a config"),
        ("api-quantize-1-bit", lambda: quantize_model(DigitsCNN(), 1, 4), "bit width must be 2..8"),
        ("api-evaluate-batch-0", lambda: evaluate(DigitsCNN(), load_data("digits", spec), batch_size=0),
         "batch size must be an integer >= 1"),
        ("api-data-spec", lambda: load_data("bogus", spec), "unknown data spec 'bogus'"),
        ("api-split", lambda: load_data("digits", spec, "validation"), "split must be train or test"),
        ("api-teacher-unknown", lambda: get_teacher("nope", "digits"), "unknown teacher 'nope'"),
        ("api-open-run", lambda: open_run("/no/such/run"), "no run at /no/such/run"),
    ]


API_IDS = ["api-preset-epochs-0", "api-config-float-bits", "api-config-unknown-key", "api-run-nothing",
           "api-quantize-1-bit", "api-evaluate-batch-0", "api-data-spec", "api-split", "api-teacher-unknown",
           "api-open-run"]


@pytest.mark.parametrize("index", range(len(API_IDS)), ids=API_IDS)
def test_bad_engine_call(index, digits_teacher):
    name, call, words = _api_cases()[index]
    assert name == API_IDS[index]
    home = Path(os.environ["QIMERA_HOME"])
    before = snapshot(home / "runs", home / "teachers")
    with pytest.raises(USER_ERRORS) as e:  # what the command line reports as one line, exit status 2
        call()
    assert words in str(e.value) and "\n" not in str(e.value)
    assert snapshot(home / "runs", home / "teachers") == before


def test_the_table_is_large_enough():
    """The bad-input tables together: this file's, the run store's (tests/test_run_store.py) and the settings'
    (tests/test_schema.py); each case asserts its message, its exit status and an unchanged store."""
    import test_run_store
    import test_schema
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES)
    assert len({c[0] for c in test_run_store.CASES}) == len(test_run_store.CASES)
    total = len(CLI_CASES) + len(API_IDS) + len(test_run_store.CASES) + len(test_schema.CASES)
    assert total >= 150, total
