"""Integrity of what is written and loaded: exports that never overwrite what they must not, an int
export whose SHA-256 and values are checked on load, and checkpoints of unusual tensors refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY
from qimera_engine import cli, preset, run_to_end
from qimera_engine.export import ExportError, _parts, _seal, export, load_int, read_int
from qimera_engine.models import CheckpointError, fit_state_dict, load_state_dict_file, load_weights
from qimera_engine.models.digits_cnn import DigitsCNN
from qimera_engine.runs import Run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_teacher):
    """One finished tiny digits run (W4A4)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    run_to_end(preset("digits", **TINY), out=out)
    return out


@pytest.fixture(scope="module")
def good(run_dir, tmp_path_factory):
    return export(run_dir, "int", tmp_path_factory.mktemp("good") / "s.safetensors")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

# --------------------------------------------------------------------------- never overwrite


def test_export_never_writes_a_runs_own_files(run_dir, tmp_path):
    other = tmp_path / "other"  # any folder holding config.json is a run folder
    other.mkdir()
    (other / Run.CONFIG).write_text("{}")
    before, before_other = _files(run_dir), _files(other)
    own = [Run.CONFIG, Run.METRICS, Run.SUMMARY, Run.STATUS, Run.STATE, Run.GENERATOR, Run.STUDENT, Run.TEACHER,
           Run.LOCK, Run.SHIPPED]
    for name in own:
        for folder in (run_dir, other):
            with pytest.raises(ExportError, match="an export never replaces it"):
                export(run_dir, "int", folder / name, force=True)
    # the same through a link to the folder and a detour through ".."
    (tmp_path / "link").symlink_to(run_dir)
    for out in (tmp_path / "link" / Run.STUDENT, run_dir / "sub" / ".." / Run.SUMMARY):
        with pytest.raises(ExportError, match="an export never replaces it"):
            export(run_dir, "onnx", out, force=True)
    assert _files(run_dir) == before and _files(other) == before_other and not (run_dir / "sub").exists()


def test_export_never_writes_into_a_shipped_run(run_dir, tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(run_dir, shipped)
    (shipped / Run.SHIPPED).write_text("{}")
    (tmp_path / "link").symlink_to(shipped)
    before = sorted(p.relative_to(shipped) for p in shipped.rglob("*"))
    for out in ("", "   ", shipped / "x.safetensors", shipped / "new" / "x.safetensors", tmp_path / "link" / "x.onnx",
                tmp_path / "elsewhere" / ".." / "shipped" / "x.onnx"):
        with pytest.raises(ExportError, match="read-only|empty"):
            export(shipped, "int", out, force=True)
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*")) == before


def test_export_replaces_only_its_default_file_without_force(run_dir, tmp_path, capsys):
    default = export(run_dir, "int")
    first = default.stat().st_mtime_ns
    assert export(run_dir, "int") == default.resolve()  # re-derived from the same student: replaced freely
    assert default.stat().st_mtime_ns >= first and read_int(default)[1]["run"] == run_dir.name
    thesis = tmp_path / "thesis.pdf"
    thesis.write_bytes(b"%PDF my thesis")
    with pytest.raises(ExportError, match="exists; --force replaces it"):
        export(run_dir, "int", thesis)
    assert thesis.read_bytes() == b"%PDF my thesis"
    other_default = tmp_path / "student-int.safetensors"  # another folder's file of that name: not ours
    other_default.write_bytes(b"keep")
    with pytest.raises(ExportError, match="exists"):
        export(run_dir, "int", other_default)
    with pytest.raises(ExportError, match="is a folder"):
        export(run_dir, "onnx", tmp_path)
    with pytest.raises(ExportError, match="never named config.json"):  # it would make the folder a run's
        export(run_dir, "onnx", tmp_path / "config.json")
    with pytest.raises(ExportError, match="is a folder"):
        export(run_dir, "onnx", f"{tmp_path / 'new'}/")
    assert export(run_dir, "int", thesis, force=True) == thesis
    assert read_int(thesis)[1]["run"] == run_dir.name
    # the command line: one line, status 2, nothing written
    for argv, message in ((["--out", ""], "file name is empty"), (["--out", str(other_default)], "--force replaces")):
        capsys.readouterr()
        assert cli.main(["export", str(run_dir), "--format", "int", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert other_default.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student-int.safetensors", "thesis.pdf"]  # no temporary file
    assert cli.main(["export", str(run_dir), "--format", "int", "--out", str(other_default), "--force"]) == 0
    assert read_int(other_default)[1]["format"] == "qimera-int/2"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_an_interrupted_export_leaves_nothing(run_dir, tmp_path, monkeypatch, interrupt):
    import safetensors.torch

    def half_written(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise interrupt("stopped mid-write")
    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(interrupt):
        export(run_dir, "int", tmp_path / "a" / "b" / "s.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary file, and the folders made for it are gone
    existing = tmp_path / "s.safetensors"
    existing.write_bytes(b"old")
    with pytest.raises(interrupt):
        export(run_dir, "int", existing, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"] and existing.read_bytes() == b"old"

# --------------------------------------------------------------------------- the int export's integrity


def _rewrite(src, dst, edit, reseal=True):
    """Copy an export through ``edit(tensors, meta)``; ``reseal``: record new hashes, as an attacker would."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors, meta)
    if reseal:
        meta.pop("sha256", None), meta.pop("sha256_parts", None)
        parts = _parts(tensors, meta)
        meta.update(sha256=_seal(parts), sha256_parts=json.dumps(parts, sort_keys=True))
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _layer(path):
    return next(iter(json.loads(read_int(path)[1]["layer_bits"])))


def _site(path):
    return next(iter(json.loads(read_int(path)[1]["activation_sites"])))


def test_resealing_an_unchanged_export_still_loads(good, tmp_path):
    x = torch.randn(4, 1, 8, 8)
    copy = _rewrite(good, tmp_path / "same.safetensors", lambda t, m: None)
    assert torch.equal(load_int(copy)(x), load_int(good)(x))
    meta = read_int(good)[1]
    assert len(meta["sha256"]) == 64 and set(json.loads(meta["sha256_parts"])) == {"tensors", "metadata"}


def test_an_edited_export_is_refused_naming_what_changed(good, tmp_path):
    layer = _layer(good)

    def scale(t, m):
        t[f"{layer}.weight_scale"] = t[f"{layer}.weight_scale"] * 2
    for edit, what in ((lambda t, m: m.update(wbits="2"), "metadata wbits"),
                       (lambda t, m: m.update(quant_top1="99.9"), "metadata quant_top1"),
                       (scale, f"tensor {layer}.weight_scale"),
                       (lambda t, m: t.update(extra=torch.zeros(1)), "tensor extra")):
        with pytest.raises(ExportError, match=f"changed after export \\({what}"):
            load_int(_rewrite(good, tmp_path / "e.safetensors", edit, reseal=False))
    with pytest.raises(ExportError, match="SHA-256 record is missing or damaged"):
        load_int(_rewrite(good, tmp_path / "e.safetensors", lambda t, m: m.update(sha256_parts="[" * 100_000),
                          reseal=False))
    with pytest.raises(ExportError, match="SHA-256 does not match"):
        load_int(_rewrite(good, tmp_path / "e.safetensors", lambda t, m: m.update(sha256="0" * 64), reseal=False))
    old = _rewrite(good, tmp_path / "old.safetensors", lambda t, m: [m.pop("sha256"), m.pop("sha256_parts"),
                                                                      m.update(format="qimera-int/1")], reseal=False)
    with pytest.raises(ExportError, match="earlier version, without a SHA-256.*export the run again"):
        read_int(old)


def _bn_var(t):
    return next(k for k in t if k.endswith("running_var"))


def _set(key, fn):
    def edit(t, m):
        t[key(t) if callable(key) else key] = fn(t[key(t) if callable(key) else key])
    return edit


def test_a_resealed_export_with_harmful_values_is_refused(good, tmp_path):
    """An attacker who records new hashes still cannot load NaNs, out-of-range codes or other dtypes."""
    layer, site = _layer(good), _site(good)
    codes, scale, zp = f"{layer}.weight_int8", f"{layer}.weight_scale", f"{layer}.weight_zero_point"
    cases = [
        (_set(codes, lambda v: v.clone().fill_(100)), "codes 100..100 lie outside its 4-bit range -8..7"),
        (_set(codes, lambda v: v.to(torch.int16)), f"{codes} is torch.int16 .* expected torch.int8"),
        (_set(codes, lambda v: v.float()), f"{codes} is torch.float32"),
        (_set(scale, lambda v: v.clone().fill_(float("nan"))), "weight scale is not a finite number > 0"),
        (_set(scale, lambda v: v.clone().fill_(0.0)), "weight scale is not a finite number > 0"),
        (_set(scale, lambda v: v.clone().fill_(3e38)), "scales make infinite weights"),
        (_set(scale, lambda v: v.double()), f"{scale} is torch.float64"),
        (_set(zp, lambda v: v.float()), f"{zp} is torch.float32"),
        (_set(zp, lambda v: v[:1]), "channels but"),
        (_set(_bn_var, lambda v: -v), "negative variance"),
        (_set(f"{site}.ema_hi", lambda v: v * 3), f"activation site {site}: its calibrated range"),
        (_set(f"{site}.ema_hi", lambda v: v.double()), f"{site}.ema_hi is torch.float64, the model's is torch.float32"),
        (_set(f"{site}.ema_lo", lambda v: v.clone().fill_(float("inf"))), "holds NaN or infinite values"),
        (_set(f"{site}.scale", lambda v: v * 2), "differ from the metadata's"),
        (lambda t, m: t.pop(_bn_var(t)), "does not hold a complete student"),
        (lambda t, m: m.update(layer_bits=json.dumps({k: 8 for k in json.loads(m["layer_bits"])})),
         "bits in the file"),
    ]
    for key, bad, want in (("wbits", "four", "wbits must be 2..8 or 32"), ("wbits", "9", "wbits must be"),
                           ("ema_beta", "1.0", r"ema_beta must be a number in \[0, 1\)"),
                           ("ema_beta", "nan", "ema_beta must be"), ("num_classes", "10.5", "num_classes must be"),
                           ("num_classes", "1000000000", "num_classes must be"), ("teacher", "nope", "a known teacher"),
                           ("keep_first_last_8bit", "yes", "True or False"), ("layer_bits", "{", "layer_bits must be"),
                           ("layer_bits", '{"x": 1}', "layer_bits must be"), ("activation_sites", "[]", "activation_sites"),
                           ("mean", "[NaN]", "mean must be"), ("std", "[0]", "std must be"), ("config", "null", "config")):
        cases.append((lambda t, m, key=key, bad=bad: m.update({key: bad}), want))
    cases.append((lambda t, m: m.pop("abits"), r"abits must be .*found missing"))
    cases.append((lambda t, m: m.update(activation_sites="[" * 100_000), "activation_sites must be"))  # too deep
    cases.append((lambda t, m: t.update(extra=torch.zeros(2).to(torch.float8_e4m3fn)), "never holds"))
    for i, (edit, want) in enumerate(cases):
        with pytest.raises(ExportError, match=want):
            load_int(_rewrite(good, tmp_path / f"bad{i}.safetensors", edit))


def test_a_damaged_export_only_ever_gives_an_export_error(good, tmp_path):
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    header = int.from_bytes(data[:8], "little") + 8
    positions = [0, 3, 7, 8, 9, header // 2, header - 1, header, header + 1, len(data) // 2, len(data) - 1]
    positions += list(range(header + 7, len(data), max(1, (len(data) - header) // 25)))
    variants = [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] for i in positions]
    variants += [data[:n] for n in (0, 4, 8, header - 10, header, len(data) - 1)]
    variants += [data[:8] + data[8:header].replace(b'"format"', b'"formaT"') + data[header:]]
    for blob in variants:
        bad.write_bytes(blob)
        with pytest.raises(ExportError):
            load_int(bad)

# --------------------------------------------------------------------------- checkpoints


def _unusual():
    k = "features.0.weight"
    return k, [
        (lambda v: v.half(), f"{k} is torch.float16, but the model's is torch.float32"),
        (lambda v: v.double(), f"{k} is torch.float64"),
        (lambda v: v.to_sparse(), f"{k} has layout torch.sparse_coo"),
        (lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8), f"{k} has quantized dtype torch.qint8"),
        (lambda v: v.to("meta"), f"{k} has device meta"),
        (lambda v: torch.nested.nested_tensor([v]), f"{k} has a nested tensor"),
        (lambda v: v.to(torch.complex64), f"{k} has complex dtype torch.complex64"),
        (lambda v: v.int(), f"{k} is torch.int32, but the model's is torch.float32"),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notices on quantized and nested tensors
def test_fit_state_dict_refuses_unusual_tensors_naming_the_key():
    model = DigitsCNN()
    k, cases = _unusual()
    assert k in model.state_dict()
    for change, want in cases:
        state = model.state_dict()
        before = state[k].clone()
        state[k] = change(state[k])
        with pytest.raises(CheckpointError, match=want):
            fit_state_dict(model, state, "ckpt.pt")
        assert torch.equal(model.state_dict()[k], before)  # nothing loaded
    fit_state_dict(model, model.state_dict(), "ckpt.pt")  # the ordinary state still loads


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch checks the sparse tensor's invariants
def test_checkpoint_files_with_unusual_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file
    model = DigitsCNN()
    k = "features.0.weight"
    half = {n: v.half() if v.is_floating_point() else v for n, v in model.state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    torch.save(half, tmp_path / "half.pt")
    for name in ("half.safetensors", "half.pt"):
        with pytest.raises(CheckpointError, match=f"{k} is torch.float16, but the model's is torch.float32"):
            load_weights(model, tmp_path / name)
    sparse = {**model.state_dict(), k: model.state_dict()[k].to_sparse()}
    torch.save({"state_dict": sparse}, tmp_path / "sparse.pt")
    with pytest.raises(CheckpointError, match=f"tensor {k} has layout torch.sparse_coo"):
        load_state_dict_file(tmp_path / "sparse.pt")  # refused, whether by the reader or by the layout check
