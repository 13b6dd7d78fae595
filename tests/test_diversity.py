"""Diversity of generated samples: the metrics against brute force, and the generator-side switches
(each off by default, each exercised by a short digits run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qimera_engine import preset, run_to_end
from qimera_engine.analysis import (boundary_share, class_spread, diversity, dominant_labels, generator_diversity,
                                    knn_coverage, prdc, synthetic_features)
from qimera_engine.config import ConfigError
from qimera_engine.generator import Generator, generate_images, sample_latents, seeded_pixel_noise
from qimera_engine.losses import (BNStatisticsLoss, class_mode_seeking, generator_ce, mode_seeking, slack_gap,
                                  soft_cross_entropy)
from qimera_engine.runs import open_run

SHORT = dict(epochs=2, iters_per_epoch=6, warmup_epochs=1, calib_epochs=1, batch_size=16, milestones=[],
             log_every=3, seed=0, diversity_images=200)

# --------------------------------------------------------------------------- the metrics, by brute force


def brute_prdc(real, fake, k):
    def radii(x):
        return np.array([sorted(np.linalg.norm(x - p, axis=1))[k] for p in x])  # [0] is the point itself
    rr, rf = radii(real), radii(fake)
    d = np.array([[np.linalg.norm(r - f) for f in fake] for r in real])
    precision = np.mean([any(d[i, j] <= rr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[i, j] <= rf[j] for j in range(len(fake))) for i in range(len(real))])
    density = np.mean([sum(d[i, j] <= rr[i] for i in range(len(real))) for j in range(len(fake))]) / k
    coverage = np.mean([d[i].min() <= rr[i] for i in range(len(real))])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


@pytest.mark.parametrize("seed,k,shift", [(0, 3, 0.0), (1, 5, 0.5), (2, 1, 2.0), (3, 4, -1.0)])
def test_prdc_matches_brute_force(seed, k, shift):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(40, 3))
    fake = rng.normal(scale=0.6, size=(35, 3)) + shift
    want = brute_prdc(real, fake, k)
    got = prdc(real, fake, k, chunk=7)  # chunks that do not divide the 40 rows
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["coverage"] == knn_coverage(real, fake, k)


def test_prdc_extremes_and_bad_input():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    same = prdc(real, rng.normal(size=(300, 4)), 5)
    assert same["coverage"] > 0.9 and same["precision"] > 0.85 and same["recall"] > 0.85
    assert 0.7 < same["density"] < 1.3
    collapsed = prdc(real, rng.normal(scale=0.01, size=(300, 4)), 5)  # every sample at one point
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] < 0.1 and collapsed["recall"] < 0.1
    with pytest.raises(ValueError, match="more than 5"):
        prdc(real[:5], real, 5)
    with pytest.raises(ValueError, match="width"):
        prdc(real, real[:, :3], 5)
    with pytest.raises(ValueError, match="k must be"):
        prdc(real, real, 0)


def test_class_spread_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    y = rng.integers(0, 3, size=30)
    spreads, centres = [], []
    for c in range(3):
        m = x[y == c]
        centres.append(m.mean(0))
        spreads.append(np.mean([np.linalg.norm(a - b) for i, a in enumerate(m) for j, b in enumerate(m) if i != j]))
    cd = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centres) for j, b in enumerate(centres) if i != j])
    got = class_spread(x, y)
    assert got["spread"] == pytest.approx(np.mean(spreads), rel=1e-5)
    assert got["centres"] == pytest.approx(cd, rel=1e-5)
    assert got["ratio"] == pytest.approx(np.mean(spreads) / cd, rel=1e-5)
    with pytest.raises(ValueError, match="two samples"):
        class_spread(x[:3], [0, 1, 2])


def test_diversity_uses_the_dominant_class():
    labels = np.array([[0, 1], [2, 1]])
    coeffs = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert dominant_labels(labels, coeffs).tolist() == [1, 2]
    rng = np.random.default_rng(0)
    real = {"features": rng.normal(size=(60, 4)), "labels": rng.integers(0, 3, 60)}
    syn = {"features": rng.normal(size=(60, 4)), "labels": rng.integers(0, 3, (60, 1)), "coeffs": np.ones((60, 1))}
    d = diversity(syn, real, k=3)
    assert set(d) == {"spread", "spread_ratio", "precision", "recall", "density", "coverage", "spread_vs_real"}
    assert 0.7 < d["spread_vs_real"] < 1.3
    assert set(diversity(syn)) == {"spread", "spread_ratio"}  # data-free


def test_generator_diversity_is_diversity_of_each_kind_of_sample():
    """One function measures a generator for runs and for bench/screen_generator.py: plain samples, and
    superposed ones (K = max(2, superpose_k)) only where the generator can mix classes."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    teacher = SimpleNamespace(model=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6),
                                                        torch.nn.ReLU(), torch.nn.Linear(6, 5)))
    rng = np.random.default_rng(0)
    real = {"features": rng.normal(size=(40, 6)).astype(np.float32), "labels": rng.integers(0, 5, 40)}
    g = Generator(5, 8, 3, 16).eval()
    got = generator_diversity(g, teacher, real, 30, superpose_k=3, seed=4)
    assert got["plain"] == diversity(synthetic_features(g, teacher, 30, False, seed=4), real)
    assert got["superposed"] == diversity(synthetic_features(g, teacher, 30, True, seed=4, k=3), real)
    k2 = generator_diversity(g, teacher, real, 30, superpose_k=0, seed=4)["superposed"]
    assert k2 == diversity(synthetic_features(g, teacher, 30, True, seed=4, k=2), real)
    gdfq = Generator(5, 8, 3, 16, input_mode="gdfq").eval()
    assert set(generator_diversity(gdfq, teacher, real, 30)) == {"plain"}
    # with a boundary threshold: the same figures, and the share of the same samples near the boundary
    near = generator_diversity(g, teacher, real, 30, superpose_k=3, seed=4, boundary=0.3)
    for name, superposed, k in (("plain", False, 1), ("superposed", True, 3)):
        probs = synthetic_features(g, teacher, 30, superposed, seed=4, k=k)["probs"]
        assert near[name] == {**got[name], "near_boundary": boundary_share(probs, 0.3)}, name


# --------------------------------------------------------------------------- the pieces of the switches


def test_generator_defaults_have_no_new_parameters_and_old_configs_load():
    g = Generator(10, 32, 3, 16)
    assert g.noise_shapes() == [] and not hasattr(g, "noise_gain1")
    cfg = g.config()
    for key in ("embed_norm", "block_noise"):
        cfg.pop(key)  # a generator.json written before the switches
    assert Generator(**cfg).config() == g.config()


def test_block_noise_depends_on_the_seed_alone():
    torch.manual_seed(0)
    g = Generator(10, 8, 1, 16, block_noise=True)
    assert g.noise_shapes() == [(1, 4, 4), (1, 8, 8)]
    with torch.no_grad():
        g.noise_gain1.fill_(1.0)
        g.noise_gain2.fill_(1.0)
    for _ in range(2):  # warm the BN running statistics up so eval mode has something to use
        lb = sample_latents(32, 10, 16, pixel_shapes=g.noise_shapes())
        g(lb.labels, lb.coeffs, lb.noise, lb.pixel)
    # a sample depends on its own seed alone, whatever the batch beside it
    one = generate_images(g, [3], [1.0], [7])
    again = generate_images(g, [3, 3], [[1.0], [1.0]], [7, 8])
    assert torch.allclose(one[0], again[0], atol=1e-5)
    # two samples with one label and one input noise differ through their per-pixel noise
    g.eval()
    labels, coeffs, noise = torch.full((2, 1), 3), torch.ones(2, 1), torch.randn(1, 1, 16).expand(2, 1, 16)
    with torch.no_grad():
        x = g(labels, coeffs, noise, seeded_pixel_noise([1, 2], g.noise_shapes()))
        flat = g(labels, coeffs, noise)  # no maps given: none added
    assert not torch.allclose(x[0], x[1], atol=1e-3)
    assert torch.allclose(flat[0], flat[1])
    a, b = seeded_pixel_noise([5, 6], g.noise_shapes())
    assert a.shape == (2, 1, 4, 4) and b.shape == (2, 1, 8, 8)
    assert torch.equal(seeded_pixel_noise([5], g.noise_shapes())[0][0], a[0])


def test_embed_norm_keeps_the_noise_share_when_embeddings_grow():
    torch.manual_seed(0)
    g = Generator(4, 8, 1, 32, embed_norm=True)
    plain = Generator(4, 8, 1, 32)
    plain.load_state_dict(g.state_dict())
    with torch.no_grad():
        for m in (g, plain):
            m.embedding.weight.mul_(100.0)  # an embedding that outgrew the noise
    labels, noise = torch.zeros(2, 1, dtype=torch.long), torch.randn(2, 1, 32)
    coeffs = torch.ones(2, 1)
    spread_norm = (g.latent(labels, coeffs, noise)[0] - g.latent(labels, coeffs, noise)[1]).norm()
    spread_plain = (plain.latent(labels, coeffs, noise)[0] - plain.latent(labels, coeffs, noise)[1]).norm()
    assert spread_plain < 0.1 < spread_norm  # without it the two noise vectors give nearly one input


def test_paired_batches_share_conditions_not_noise():
    lb = sample_latents(8, 10, 4, k=2, paired=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lb.labels[:4], lb.labels[4:]) and torch.equal(lb.coeffs[:4], lb.coeffs[4:])
    assert not torch.allclose(lb.noise[:4], lb.noise[4:])
    with pytest.raises(ValueError, match="even"):
        sample_latents(7, 10, 4, paired=True)
    # unpaired draws are the engine's draws before the switch: the same stream, the same tensors
    a = sample_latents(8, 10, 4, k=2, generator=torch.Generator().manual_seed(3))
    b = sample_latents(8, 10, 4, k=2, generator=torch.Generator().manual_seed(3), pixel_shapes=[])
    assert torch.equal(a.noise, b.noise) and a.pixel is None


def test_slack_gap_and_loss():
    v, t = torch.tensor([0.0, 1.0, 3.0]), torch.zeros(3)
    assert slack_gap(v, t, torch.full((3,), 1.5)).item() == pytest.approx((1.5 ** 2) / 3)
    assert slack_gap(v, t, torch.full((3,), 5.0)).item() == 0.0
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    x = torch.randn(4, 1, 5, 5)
    with BNStatisticsLoss(model) as exact, BNStatisticsLoss(model, slack=0.0) as zero:
        exact.active = zero.active = True
        model(x)
        assert torch.equal(exact.pop(), zero.pop())
    with BNStatisticsLoss(model, slack=1e6) as loose:
        loose.active = True
        model(x)
        assert loose.pop().item() == 0.0


def test_generator_ce_margin():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert torch.equal(generator_ce(logits, targets, 0.0), soft_cross_entropy(logits, targets))
    loss = generator_ce(logits, targets, 0.1)
    loss.backward()
    # row 0 is sure of its class (KL 0.0067 < 0.1), row 1 matches its soft target (KL 0): neither is pushed
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    far = torch.tensor([[0.0, 5.0]], requires_grad=True)
    assert generator_ce(far, targets[:1], 0.1).item() > 4.8


def test_mode_seeking_rewards_different_outputs():
    z1, z2 = torch.zeros(4, 3), torch.ones(4, 3)
    same = mode_seeking(torch.ones(4, 5), torch.ones(4, 5), z1, z2)
    apart = mode_seeking(torch.zeros(4, 5), torch.full((4, 5), 2.0), z1, z2)
    assert same.item() == pytest.approx(1e5) and apart.item() == pytest.approx(1 / (2 + 1e-5))


def test_mode_seeking_needs_an_even_batch():
    with pytest.raises(ConfigError, match="even"):
        preset("digits", ms_weight=1.0, batch_size=15)
    preset("digits", ms_weight=1.0, ms_pairs="class", batch_size=15)  # class pairs build no pairs


def test_class_mode_seeking_is_the_term_over_every_same_class_pair():
    """Against the pairs enumerated one by one; on a batch whose halves share their labels (and no other
    two samples do) it is ``mode_seeking`` of the halves."""
    g = torch.Generator().manual_seed(0)
    out, z = torch.randn(12, 7, generator=g, requires_grad=True), torch.randn(12, 1, 3, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 2, 5, 6, 0])[:, None]
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12) if labels[i, 0] == labels[j, 0]]
    d = sum((out[i] - out[j]).abs().mean() for i, j in pairs) / len(pairs)
    dz = sum((z[i] - z[j]).abs().mean() for i, j in pairs) / len(pairs)
    got = class_mode_seeking(out, z, labels)
    assert got.item() == pytest.approx((1 / (d / dz + 1e-5)).item(), rel=1e-5)
    got.backward()
    assert out.grad[[6, 7, 9, 10]].abs().sum() == 0 and out.grad[0].abs().sum() > 0  # only paired rows learn
    halves = torch.arange(6).repeat(2)[:, None]
    a, za = torch.randn(12, 7, generator=g), torch.randn(12, 1, 3, generator=g)
    assert class_mode_seeking(a, za, halves).item() == pytest.approx(
        mode_seeking(a[:6], a[6:], za[:6], za[6:]).item(), rel=1e-6)
    two = torch.tensor([[0, 1], [0, 1], [1, 0]])  # superposed labels: a pair shares every slot
    b = torch.randn(3, 7, generator=g)
    assert class_mode_seeking(b, za[:3], two).item() == pytest.approx(
        mode_seeking(b[:1], b[1:2], za[:1], za[1:2]).item(), rel=1e-6)


def test_class_mode_seeking_without_a_pair_is_zero_and_learns_nothing():
    out = torch.randn(3, 5, requires_grad=True)
    term = class_mode_seeking(out, torch.randn(3, 1, 2), torch.tensor([[0], [1], [2]]))
    term.backward()
    assert term.item() == 0 and torch.equal(out.grad, torch.zeros_like(out))


def test_class_pairs_keep_the_batch_of_a_run_without_mode_seeking():
    """ms_pairs=class draws the very latents the run without mode seeking draws (one condition per sample),
    so the first images are the same; only the generator's loss has the term added."""
    plain, ms = first_generator_step(False), first_generator_step(False, ms_weight=1.0, ms_pairs="class")
    assert torch.equal(plain.x, ms.x) and torch.equal(plain.targets, ms.targets) and not ms.paired
    (loss_a, ce_a, bns_a), (loss_b, ce_b, bns_b) = plain.g_losses, ms.g_losses
    assert torch.equal(ce_a, ce_b) and torch.equal(bns_a, bns_b) and loss_b > loss_a


def test_layout_mode_seeking_compares_the_block_means():
    """ms_space=layout: the same batch and term, with the image distance taken over losses.layout's block
    means. The two terms' ratio, 1 / term - eps, is the mean image distance over the mean noise distance, so
    their quotient is the pixel distance over the layout distance of the batch's same-class pairs."""
    from qimera_engine.losses import layout
    plain = first_generator_step(False)
    img = first_generator_step(False, ms_weight=1.0, ms_pairs="class")
    lay = first_generator_step(False, ms_weight=1.0, ms_pairs="class", ms_space="layout")
    assert torch.equal(img.x, lay.x)
    t_img, t_lay = (r.g_losses[0].double() - plain.g_losses[0].double() for r in (img, lay))
    labels = img.targets.argmax(1)
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    i, j = i[labels[i] == labels[j]], j[labels[i] == labels[j]]
    d_img = (img.x[i] - img.x[j]).abs().mean().item()
    d_lay = (layout(img.x)[i] - layout(img.x)[j]).abs().mean().item()
    assert 0 < d_lay < d_img  # block means differ less than pixels do
    assert ((1 / t_img - 1e-5) / (1 / t_lay - 1e-5)).item() == pytest.approx(d_img / d_lay, rel=1e-3)


# --------------------------------------------------------------------------- short digits runs


@pytest.fixture(scope="module")
def default_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("div") / "default"
    run_to_end(preset("digits", **SHORT), out=out)
    return open_run(out).metrics


def test_measuring_diversity_leaves_the_run_unchanged(default_rows, tmp_path):
    run_to_end(preset("digits", **{**SHORT, "diversity_images": 0}), out=tmp_path / "r")
    rows = open_run(tmp_path / "r").metrics
    assert "coverage" not in rows[0]
    for got, want in zip(rows, default_rows):
        for key in ("top1", "loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s"):
            assert got[key] == want[key], key
    # the default run recorded the figures every epoch, and its summary the last ones
    for row in default_rows:
        assert 0 <= row["coverage"] <= 1 and 0 <= row["mix_coverage"] <= 1 and row["spread_vs_real"] > 0


def test_summary_holds_the_figures_and_the_real_reference(tmp_path):
    from qimera_engine.ui.logic import diversity_line
    summary = run_to_end(preset("digits", **{**SHORT, "epochs": 1, "warmup_epochs": 1, "calib_epochs": 1}),
                         out=tmp_path / "r")
    rows = open_run(tmp_path / "r").metrics
    assert summary["diversity"] == {k: v for k, v in rows[-1].items() if k.removeprefix("mix_") in
                                    ("coverage", "precision", "recall", "density", "spread_vs_real", "spread_ratio")}
    ref = summary["diversity_reference"]  # 200 other digits test images against the 200 measured against
    assert ref["images"] == 200 and ref["coverage"] > 0.8 and 0.8 < ref["spread_vs_real"] < 1.2
    line = diversity_line(summary)
    assert f"{summary['diversity']['coverage']:.0%}" in line and f"{ref['coverage']:.0%}" in line
    assert diversity_line({"quant_top1": 1.0}) is None


@pytest.mark.parametrize("switch", [dict(embed_norm=True), dict(block_noise=True), dict(ms_weight=1.0),
                                    dict(ms_weight=1.0, ms_space="feature"), dict(ms_weight=1.0, ms_pairs="class"),
                                    dict(ms_weight=1.0, ms_pairs="class", ms_space="layout"),
                                    dict(bns_slack=0.5),
                                    dict(ce_g_margin=0.1), dict(gen_augment="flip"), dict(gen_augment="flip-shift"),
                                    dict(bns_superposed=0.0), dict(ce_g_margin_superposed=0.5)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_switch_changes_the_generator(switch, default_rows, tmp_path):
    summary = run_to_end(preset("digits", **SHORT, **switch), out=tmp_path / "r")
    rows = open_run(tmp_path / "r").metrics
    assert summary["epochs_done"] == 2 and "coverage" in summary["diversity"]
    assert rows[0]["loss_g"] != default_rows[0]["loss_g"]
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert all(cfg[k] == v for k, v in switch.items())
    assert preset("digits", **switch).label == "qimera+"
    gen = json.loads((tmp_path / "r" / "generator.json").read_text())
    assert gen["block_noise"] == switch.get("block_noise", False)
    assert gen["embed_norm"] == switch.get("embed_norm", False)


def first_generator_step(superposed: bool, **overrides):
    """The first generator step of a short digits run whose batches are all superposed, or all plain."""
    from qimera_engine.train import Parts, Trainer
    cfg = preset("digits", **SHORT, superpose_p=1.0 if superposed else 0.0, **overrides)
    trainer = Trainer.from_parts(Parts.build(cfg))
    with trainer.bn_hooks():
        return trainer.generator_step()


@pytest.mark.parametrize("superposed", [False, True])
def test_bns_superposed_weighs_the_bn_statistics_of_superposed_batches_only(superposed):
    """bns_superposed=w: a superposed batch's generator loss is CE + w * bns_weight * L_BNS, a plain batch's
    keeps the full weight; the images, the teacher's logits and both loss terms are those of the default."""
    a, b = (first_generator_step(superposed, bns_superposed=w) for w in (1.0, 0.25))
    weight = preset("digits").bns_weight
    assert torch.equal(a.x, b.x) and torch.equal(a.t_logits, b.t_logits)
    (loss_a, ce_a, bns_a), (loss_b, ce_b, bns_b) = a.g_losses, b.g_losses
    assert torch.equal(ce_a, ce_b) and torch.equal(bns_a, bns_b) and bns_a > 0
    assert torch.allclose(loss_a, ce_a + weight * bns_a)
    assert torch.allclose(loss_b, ce_b + (0.25 if superposed else 1.0) * weight * bns_b)


@pytest.mark.parametrize("superposed", [False, True])
def test_ce_g_margin_superposed_adds_to_the_margin_of_superposed_batches_only(superposed):
    """ce_g_margin_superposed=m: a superposed batch's generator CE is taken with the margin ce_g_margin + m, a
    plain batch's with ce_g_margin; the images and the teacher's logits are those of the default."""
    a, b = (first_generator_step(superposed, ce_g_margin=0.2, ce_g_margin_superposed=m) for m in (0.0, 0.3))
    assert torch.equal(a.x, b.x) and torch.equal(a.t_logits, b.t_logits)
    want = generator_ce(b.t_logits.float(), b.targets, 0.5 if superposed else 0.2)
    assert torch.allclose(b.g_losses[1], want)
    assert torch.allclose(a.g_losses[1], generator_ce(a.t_logits.float(), a.targets, 0.2))
    if superposed:
        assert b.g_losses[1] < a.g_losses[1]


@pytest.mark.parametrize("paired", [False, True])
def test_gen_augment_mirrors_rows_and_rolls_the_batch(paired):
    """Each row comes back as it was or mirrored, about half of them mirrored; flip-shift also rolls the whole
    batch by one shift of at most 1/8 of the image size; a paired batch's halves are mirrored alike."""
    from types import SimpleNamespace
    from qimera_engine.distributed import SINGLE
    from qimera_engine.train import Trainer
    x = torch.randn(400, 3, 16, 16)

    def trainer(mode):
        rng = SimpleNamespace(cpu=torch.Generator().manual_seed(0))
        return SimpleNamespace(cfg=SimpleNamespace(batch_size=400, gen_augment=mode), rng=rng, world=SINGLE)

    out = Trainer._augment(trainer("flip"), x, paired)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 120 < int(mirrored.sum()) < 280
    if paired:
        assert torch.equal(mirrored[:200], mirrored[200:])
    shifted = Trainer._augment(trainer("flip-shift"), x, paired)
    rolls = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if torch.equal(shifted, torch.roll(out, shifts=(dy, dx), dims=(2, 3)))]
    assert len(rolls) == 1  # the same mirrors (the same draws come first), then one roll of at most 2 = 16 / 8 pixels


def test_a_frozen_generator_learns_nothing_more(default_rows, tmp_path, monkeypatch):
    """gen_epochs=1: the generator trains in epoch 0 exactly as by default, then stays as it is, down to
    its BN running statistics; its losses are still measured, the run still trains the student (exactly as
    it would with the statistics moving: its batches normalise by their own), and the diversity measured
    after epoch 0 stands for the frozen epochs without being measured again."""
    from safetensors.torch import load_file
    from qimera_engine import analysis
    calls, measure = [], analysis.synthetic_features
    monkeypatch.setattr(analysis, "synthetic_features", lambda *a, **k: calls.append(1) or measure(*a, **k))
    epochs = {**SHORT, "epochs": 3}
    summary = run_to_end(preset("digits", **epochs, gen_epochs=1), out=tmp_path / "frozen")
    assert len(calls) == 2  # plain and superposed samples, once: after epoch 0
    run_to_end(preset("digits", **{**SHORT, "epochs": 1}), out=tmp_path / "one")  # the generator after epoch 0
    rows = open_run(tmp_path / "frozen").metrics
    assert rows[0]["loss_g"] == default_rows[0]["loss_g"]  # epoch 0: as a run without the switch
    assert rows[1]["loss_g"] > 0 and summary["epochs_done"] == 3 and rows[1]["student_trained"]
    frozen, one = load_file(tmp_path / "frozen" / "generator.safetensors"), load_file(tmp_path / "one" / "generator.safetensors")
    kept = [k for k in frozen if "num_batches" not in k]
    assert any("running" in k for k in kept) and all(torch.equal(frozen[k], one[k]) for k in kept)
    measured = {k: v for k, v in rows[0].items() if "coverage" in k or "spread" in k or "precision" in k}
    assert measured and all(row[k] == v for row in rows[1:] for k, v in measured.items())
    assert summary["diversity"]["coverage"] == rows[0]["coverage"]
    # the statistics' momentum changes nothing the student sees: the run with them moving, as before
    from qimera_engine.train import Trainer
    begin = Trainer.begin_epoch

    def moving(self, epoch):
        out = begin(self, epoch)
        for m, momentum in self._gen_bn_momenta:
            m.momentum = momentum
        return out
    monkeypatch.setattr(Trainer, "begin_epoch", moving)
    run_to_end(preset("digits", **epochs, gen_epochs=1), out=tmp_path / "moving")
    again = open_run(tmp_path / "moving").metrics
    moved = load_file(tmp_path / "moving" / "generator.safetensors")
    assert any(not torch.equal(moved[k], one[k]) for k in kept if "running" in k)  # they did move there
    for got, want in zip(again, rows):
        for key in ("top1", "loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s"):
            assert got[key] == want[key], key
    assert preset("digits", gen_epochs=1).label == "qimera+"


def test_generator_average_is_the_mean_of_the_states_after_each_step():
    """GeneratorAverage against the mean by hand: every floating-point tensor (weights and BN running
    statistics) averaged over the states after each update, integer buffers the last; apply writes it into
    the very tensors of the module."""
    from qimera_engine.train import GeneratorAverage
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    avg, seen = GeneratorAverage(m), []
    for _ in range(30):
        m(torch.randn(8, 3))  # moves the running statistics
        with torch.no_grad():
            m[0].weight.add_(torch.randn_like(m[0].weight))
        avg.update()
        seen.append({k: v.clone().double() for k, v in m.state_dict().items()})
    weight = m[0].weight
    avg.apply()
    assert m[0].weight is weight
    for k, v in m.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v.double(), torch.stack([s[k] for s in seen]).mean(0), atol=1e-6), k
    assert int(m[1].num_batches_tracked) == 30
    d = torch.nn.Linear(2, 2).double()
    kept = GeneratorAverage(d)
    kept.update()
    with torch.no_grad():
        d.weight.add_(1.0)
    assert not torch.equal(kept.state["weight"], d.weight)  # a copy, float64 tensors too


def test_gen_average_freezes_the_mean_and_resumes_to_the_same_generator(default_rows, tmp_path):
    """gen_average=2 with gen_epochs=2 of three: the generator trains exactly as without it (epoch 0's losses
    and figures, epoch 1's losses), the generator it freezes and saves is the mean of its states, not its last
    step; the diversity is measured again on it after epoch 1 and stands for the frozen epoch; a run stopped
    after epoch 0 (its state holds the mean so far) resumes to the same generator. More epochs to average than
    the generator trains are refused."""
    import threading
    from safetensors.torch import load_file
    from qimera_engine import run
    from qimera_engine.events import EpochEnd
    settings = {**SHORT, "epochs": 3, "gen_epochs": 2}
    run_to_end(preset("digits", **settings), out=tmp_path / "last")
    summary = run_to_end(preset("digits", **settings, gen_average=2), out=tmp_path / "avg")
    last, avg = open_run(tmp_path / "last").metrics, open_run(tmp_path / "avg").metrics
    assert last[0]["loss_g"] == avg[0]["loss_g"] == default_rows[0]["loss_g"]
    assert last[0]["coverage"] == avg[0]["coverage"] and last[1]["loss_g"] == avg[1]["loss_g"]
    g_last, g_avg = (load_file(tmp_path / f / "generator.safetensors") for f in ("last", "avg"))
    assert all(not torch.equal(g_last[k], g_avg[k]) for k in g_avg if "weight" in k or "running" in k)
    figures = ("coverage", "precision", "spread_vs_real", "mix_coverage")
    assert [avg[1][k] for k in figures] != [last[1][k] for k in figures]
    assert all(avg[2][k] == avg[1][k] for k in figures) and summary["diversity"]["coverage"] == avg[1]["coverage"]
    stop = threading.Event()
    for ev in run(preset("digits", **settings, gen_average=2), out=tmp_path / "cut", stop=stop):
        if isinstance(ev, EpochEnd) and ev.epoch == 0:
            stop.set()
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["generator_avg"]["steps"] == SHORT["iters_per_epoch"]
    resumed = run_to_end(None, resume=tmp_path / "cut")
    g_cut = load_file(tmp_path / "cut" / "generator.safetensors")
    assert all(torch.equal(g_cut[k], g_avg[k]) for k in g_avg)
    assert resumed["quant_top1"] == summary["quant_top1"]
    for bad in (dict(gen_average=1), dict(gen_average=3, gen_epochs=2)):
        with pytest.raises(ConfigError, match="gen_epochs"):
            preset("digits", **bad)
    assert preset("digits", gen_epochs=2, gen_average=1).label == "qimera+"


def test_image_spread_is_the_mean_pixel_distance_between_two_images():
    from types import SimpleNamespace
    from qimera_engine.analysis import image_spread
    plain = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # normalised = display values
    black, white = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert image_spread(torch.cat([black, black]), plain) == 0.0
    assert image_spread(torch.cat([black, black, white]), plain) == pytest.approx(2 / 3)  # pairs: 0, 1, 1
    half = torch.cat([torch.zeros(1, 3, 4, 2), torch.ones(1, 3, 4, 2)], dim=3)  # half the pixels differ by 1
    assert image_spread(torch.cat([black, half]), plain) == pytest.approx(0.5 ** 0.5)
    with pytest.raises(ValueError, match="two images"):
        image_spread(black, plain)


def test_layout_is_each_images_block_means_and_its_spread_ignores_detail():
    from types import SimpleNamespace
    from qimera_engine.analysis import image_spread
    from qimera_engine.losses import layout
    x = torch.rand(3, 2, 8, 8)
    want = torch.stack([torch.stack([x[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean() for c in range(2)
                                     for i in range(4) for j in range(4)]) for n in range(3)])
    assert torch.allclose(layout(x), want, atol=1e-6)
    plain = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2  # detail only: every 2 x 2 block is half lit
    fine = torch.stack([checker, 1 - checker]).float()[:, None].expand(2, 3, 8, 8)
    assert image_spread(fine, plain) == pytest.approx(1.0) and image_spread(fine, plain, grid=4) == 0.0
    left = torch.zeros(1, 3, 8, 8)
    left[..., :4] = 1.0  # the light half on the left, then on the right: another layout
    assert image_spread(torch.cat([left, left.flip(3)]), plain, grid=4) == pytest.approx(1.0)


def test_screen_generator_measures_a_saved_run_as_the_run_did(tmp_path):
    """bench/screen_generator.py --run: the saved generator's figures, measured again without training,
    are the ones the run recorded after its last epoch."""
    import subprocess
    import sys
    from pathlib import Path
    summary = run_to_end(preset("digits", **{**SHORT, "epochs": 1}), out=tmp_path / "r")
    script = Path(__file__).resolve().parents[1] / "bench" / "screen_generator.py"
    p = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "r"), "--images", "200",
                        "--threads", "1", "--variety", "3,8"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    # --variety: bench/seed_variety.py's figures for the same generator, eight seeds of classes 3 and 8
    seeds = subprocess.run([sys.executable, str(script.with_name("seed_variety.py")), str(tmp_path / "r"),
                            "--classes", "3,8", "--grid", str(tmp_path / "seeds.png")],
                           capture_output=True, text=True, timeout=300)
    assert seeds.returncode == 0, seeds.stderr
    expected = json.loads(seeds.stdout)
    # --grid: the eight mixes side by side, in display values, as the figures measured them
    from PIL import Image
    from qimera_engine.analysis import to_display
    from qimera_engine.artifacts import load_generator, load_teacher
    from qimera_engine.generator import generate_images
    generator, teacher = load_generator(tmp_path / "r"), load_teacher(tmp_path / "r")
    mixes = generate_images(generator, torch.tensor([[3, 8]] * 8), torch.full((8, 2), 0.5), list(range(8)))
    want = np.concatenate(list(to_display(mixes, teacher)), axis=1)
    got_grid = np.asarray(Image.open(tmp_path / "seeds.png"))
    assert got_grid.shape[:2] == want.shape[:2] and np.array_equal(got_grid.reshape(want.shape), want)
    assert got["variety"] == {k: expected[k] for k in ("classes", "seeds", "mixed", "plain", "real")}
    # a folder that is not a run, and a run whose teacher's weights (a relative path) are not found from here:
    # one line each, with the reason, not a traceback
    import shutil
    shutil.copytree(tmp_path / "r", tmp_path / "moved")
    config = json.loads((tmp_path / "moved" / "config.json").read_text())
    (tmp_path / "moved" / "config.json").write_text(json.dumps({**config, "checkpoint": "weights-elsewhere.th"}))
    for folder, says in ((tmp_path, "no run at"), (tmp_path / "moved", "relative to the folder it was started in: open it from there")):
        bad = subprocess.run([sys.executable, str(script.with_name("seed_variety.py")), str(folder)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert got["variety"]["classes"] == ["3", "8"] and got["variety"]["plain"]["pixel"] > 0
    bad = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "r"), "--variety", "cat,dog"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--variety: classes 'cat,dog': give two of 0, 1," in bad.stderr, bad.stderr
    bad = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "r"), "--save", str(tmp_path / "g.pt")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give a path ending in .safetensors" in bad.stderr, bad.stderr
    assert got["run"] == str(tmp_path / "r") and got["train_seconds"] == 0.0
    for key in ("coverage", "precision", "recall", "spread_vs_real"):
        assert got["plain"][key] == summary["diversity"][key], key
        assert got["superposed"][key] == summary["diversity"]["mix_" + key], key
    # and the share near the teacher's decision boundary, of the very samples measured
    for name, superposed in (("plain", False), ("superposed", True)):
        probs = synthetic_features(generator, teacher, 200, superposed, k=2 if superposed else 1)["probs"]
        assert got[name]["near_boundary"] == round(boundary_share(probs, 0.2), 4), name


def test_screen_averages_measures_the_setting_and_the_last_step_as_screen_generator_does(tmp_path):
    """bench/screen_averages.py: from one generator training, its last step and its gen_average=2 figures are
    those of bench/screen_generator.py without and with the setting; the other averages are other generators;
    a config that averages already is refused with a message."""
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "bench"
    sets = [a for k, v in {"epochs": 3, "gen_epochs": 2, "iters_per_epoch": 6, "batch_size": 16,
                           "num_threads": 1}.items() for a in ("--set", f"{k}={v}")]

    def screen(script, *extra):
        p = subprocess.run([sys.executable, str(bench / script), "--preset", "digits", "--images", "100",
                            *sets, *extra], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    got = screen("screen_averages.py")
    assert got["last"] == {k: v for k, v in screen("screen_generator.py").items() if k in ("plain", "superposed")}
    one = screen("screen_generator.py", "--set", "gen_average=2")
    assert got["gen_average=2"] == {k: v for k, v in one.items() if k in ("plain", "superposed")}
    names = ("last", "gen_average=1", "gen_average=2", "ema_warmup_0.99", "ema_0.995_last2")
    assert len({json.dumps(got[n], sort_keys=True) for n in names}) == len(names)
    assert got["ema_warmup_0.95"] == got["ema_warmup_0.99"]  # 12 steps: the warm-up's decay stays under 0.6
    bad = subprocess.run([sys.executable, str(bench / "screen_averages.py"), "--preset", "digits", *sets,
                          "--set", "gen_average=1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "gen_average=0" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_coverage_draws_measures_the_saved_generator_again_on_other_sample_draws(tmp_path):
    """bench/coverage_draws.py: draw 0 is the coverage the run recorded after its last epoch (plain and
    superposed), the other draws are other samples, and the mean and deviation are those of the draws."""
    import statistics
    import subprocess
    import sys
    from pathlib import Path
    summary = run_to_end(preset("digits", **{**SHORT, "epochs": 3, "diversity_images": 120}), out=tmp_path / "r")
    script = Path(__file__).resolve().parents[1] / "bench" / "coverage_draws.py"
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "r"), "--draws", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    recorded = summary["diversity"]
    assert got["images"] == 120 and got["recorded"] == {"plain": recorded["coverage"],
                                                        "superposed": recorded["mix_coverage"]}
    for name, key in (("plain", "coverage"), ("superposed", "mix_coverage")):
        draws = got[name]["draws"]
        assert len(draws) == 3 and draws[0] == round(recorded[key], 4), (name, draws, recorded[key])
        assert got[name]["mean"] == round(statistics.mean(draws), 4)
        assert got[name]["std"] == round(statistics.stdev(draws), 4)
    # draw 1: the saved generator's samples of seed 1 against the same real images
    from qimera_engine import InputSpec, load_data, load_generator, load_teacher
    from qimera_engine.analysis import real_and_others
    teacher, generator = load_teacher(tmp_path / "r"), load_generator(tmp_path / "r")
    real, _ = real_and_others(teacher, load_data("digits", InputSpec.of(teacher), "test"), 120, seed=0)
    again = generator_diversity(generator, teacher, real, 120, 2, seed=1)
    assert [got[name]["draws"][1] for name in ("plain", "superposed")] == [
        round(again[name]["coverage"], 4) for name in ("plain", "superposed")]
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no run at" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_screen_recipe_replays_a_run_with_a_frozen_generator_to_its_end(tmp_path):
    """bench/screen_recipe.py: the batches recorded (exactly, --float32) with the run's generator epochs, the
    generator frozen after one of three (gen_epochs) and a reconstruction after the last, replayed to the
    student, end where the run ends; and the batches recorded without the freeze are other batches."""
    import subprocess
    import sys
    from pathlib import Path
    settings = {**SHORT, "epochs": 3, "gen_epochs": 1, "recon_iters": 5, "num_threads": 1}
    summary = run_to_end(preset("digits", **settings), out=tmp_path / "r")
    script = Path(__file__).resolve().parents[1] / "bench" / "screen_recipe.py"

    def record(out, **changes):
        sets = [a for k, v in {**settings, **changes}.items() if k != "seed"
                for a in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]
        p = subprocess.run([sys.executable, str(script), "record", "--preset", "digits", "--seed", "0", *sets,
                            "--float32", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr

    record(tmp_path / "rec.pt")
    p = subprocess.run([sys.executable, str(script), "replay", str(tmp_path / "rec.pt")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["top1"] == round(summary["quant_top1"], 2)
    record(tmp_path / "moving.pt", gen_epochs=0)
    frozen, moving = (torch.load(tmp_path / f, weights_only=True)["x"] for f in ("rec.pt", "moving.pt"))
    per_epoch = SHORT["iters_per_epoch"]
    assert torch.equal(frozen[:per_epoch], moving[:per_epoch])  # epoch 0: the same generator steps
    assert not torch.equal(frozen[per_epoch:], moving[per_epoch:])
