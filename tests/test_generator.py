import copy

import pytest
import torch

from qimera_engine.generator import (BatchSampler, Generator, generate_images, sample_coefficients,
                                     sample_latents, soft_targets, standardise, superpose, upsample_conv)


def test_superpose_is_the_coefficient_weighted_sum():
    v = torch.randn(5, 3, 7)
    c = torch.rand(5, 3).softmax(1)
    expected = sum(c[:, k:k + 1] * v[:, k] for k in range(3))
    torch.testing.assert_close(superpose(v, c), expected)


def test_soft_targets_add_up_repeated_labels():
    labels = torch.tensor([[1, 1], [0, 2]])
    coeffs = torch.tensor([[0.3, 0.7], [0.25, 0.75]])
    t = soft_targets(labels, coeffs, 3)
    torch.testing.assert_close(t, torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]]))
    assert torch.allclose(t.sum(1), torch.ones(2))


@pytest.mark.parametrize("sampler", ["softmax", "dirichlet", "fixed"])
def test_coefficients_lie_on_the_simplex(sampler):
    torch.manual_seed(0)
    c = sample_coefficients(500, 4, sampler, alpha=0.5, fixed=[0.1, 0.2, 0.3, 0.4])
    assert c.shape == (500, 4) and (c >= 0).all()
    torch.testing.assert_close(c.sum(1), torch.ones(500))
    if sampler == "fixed":
        assert torch.equal(c[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    else:  # random, not constant; each coefficient 1/K on average (the K classes are exchangeable)
        assert c.std(0).min() > 0.05
        assert (c.mean(0) - 0.25).abs().max() < 0.03
    if sampler == "dirichlet":  # Dirichlet(0.5, ..., 0.5): var = (1/K)(1 - 1/K) / (K alpha + 1) = 0.0625
        assert (c.var(0) - 0.0625).abs().max() < 0.01


def test_softmax_coefficients_follow_the_paper():
    # softmax of K standard normals: for K=2 the mean coefficient is 1/2 and both extremes occur
    torch.manual_seed(1)
    c = sample_coefficients(20000, 2, "softmax")
    assert abs(float(c[:, 0].mean()) - 0.5) < 0.01
    assert float(c.max()) > 0.9


def test_standardise_has_zero_mean_unit_variance():
    v = standardise(torch.randn(6, 4, 32) * 5 + 3)
    assert v.mean(-1).abs().max() < 1e-5
    assert (v.var(-1, unbiased=False) - 1).abs().max() < 1e-3


def test_batch_sampler_superposes_with_probability_p():
    s = BatchSampler(10, 8, p=0.4, k=3, seed=0)
    batches = [s(4) for _ in range(2000)]
    share = sum(b.superposed for b in batches) / len(batches)
    assert 0.36 < share < 0.44
    plain = next(b for b in batches if not b.superposed)
    assert plain.coeffs.eq(1).all() and plain.targets.sum(1).eq(1).all()
    sup = next(b for b in batches if b.superposed)
    assert sup.labels.shape == (4, 3) and sup.noise.shape == (4, 3, 8)


@pytest.mark.parametrize("size,channels,cond", [(8, 1, False), (32, 3, False), (224, 3, True)])
@pytest.mark.parametrize("dm", [False, True])
def test_generator_at_all_image_sizes(size, channels, cond, dm):
    torch.manual_seed(0)
    g = Generator(10, size, channels, 16, dm=dm, dm_width=12, width=16).double()
    assert g.conditional_bn is cond
    b = sample_latents(3, 10, 16, k=2)
    coeffs, noise = b.coeffs.double(), b.noise.double()
    x = g(b.labels, coeffs, noise)
    assert x.shape == (3, channels, size, size) and torch.isfinite(x).all()
    # a weighted sum: the plain sum of the output (BatchNorm without affine) is 0 whatever the input
    w = torch.randn(x.shape, dtype=torch.float64)

    def objective():
        return float((g(b.labels, coeffs, noise) * w).sum())
    (x * w).sum().backward()
    used = b.labels.unique()
    unused = [c for c in range(10) if c not in used]
    assert g.embedding.weight.grad[unused].eq(0).all()  # classes not drawn get no gradient
    params = [(g.embedding.weight, (int(used[0]), 3))]
    if dm:
        params.append((g.disentanglement_mapping.weight, (2, 5)))
    for param, index in params:
        assert abs(float(param.grad[index])) > 1e-6
        assert float(param.grad[index]) == pytest.approx(_finite_difference(objective, param, index), rel=1e-4)


def _finite_difference(f, param, index, eps=1e-8):
    """The central difference of ``f()`` in one entry of ``param`` (float64). A small step: a 224-pixel
    image has so many LeakyReLU kinks that a step of 1e-6 crosses enough of them to move the slope by 0.5%."""
    with torch.no_grad():
        old = float(param[index])
        param[index] = old + eps
        up = f()
        param[index] = old - eps
        down = f()
        param[index] = old
    return (up - down) / (2 * eps)


def test_dm_is_applied_before_superposition():
    g = Generator(4, 8, 1, 6, dm=True, dm_width=5, width=8)
    labels, coeffs = torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.7]])
    noise = torch.randn(1, 2, 6)
    e = standardise(g.embedding(labels) + noise)
    expected = 0.3 * g.disentanglement_mapping(e[:, 0]) + 0.7 * g.disentanglement_mapping(e[:, 1])
    torch.testing.assert_close(g.latent(labels, coeffs, noise), expected)


def test_gdfq_input_is_embedding_times_noise():
    g = Generator(4, 8, 1, 6, input_mode="gdfq", width=8)
    labels, noise = torch.tensor([[2]]), torch.randn(1, 1, 6)
    torch.testing.assert_close(g.latent(labels, torch.ones(1, 1), noise), (g.embedding.weight[2] * noise[0, 0])[None])


def test_embedding_init_from_teacher_and_freeze():
    g = Generator(10, 8, 1, 64, width=8)
    w = torch.randn(10, 64)
    g.init_embeddings_from(w, freeze=True)
    assert torch.equal(g.embedding.weight, w) and not g.embedding.weight.requires_grad
    with pytest.raises(ValueError, match="embed_dim"):
        g.init_embeddings_from(torch.randn(10, 32))


def test_generate_images_is_deterministic_and_touches_no_state():
    g = Generator(10, 8, 1, 16, width=8).train()
    b = sample_latents(8, 10, 16, k=2)
    g(b.labels, b.coeffs, b.noise)  # some running statistics
    before = {k: v.clone() for k, v in g.state_dict().items()}
    a = generate_images(g, [[1, 2], [1, 2]], [[0.5, 0.5], [0.5, 0.5]], [7, 7])
    c = generate_images(g, [[1, 2]], [[0.5, 0.5]], [7])
    torch.testing.assert_close(a[0], a[1])
    torch.testing.assert_close(a[0], c[0])  # independent of the rest of the batch
    assert g.training
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())
    # the image is the eval-mode generator's on seed 7's noise, with the coefficients given
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))[None]
    reference = copy.deepcopy(g).eval()
    with torch.no_grad():
        for w in ([0.5, 0.5], [0.2, 0.8]):
            expected = reference(torch.tensor([[1, 2]]), torch.tensor([w]), noise)
            torch.testing.assert_close(generate_images(g, [[1, 2]], [w], [7]), expected)
        assert (reference(torch.tensor([[1, 2]]), torch.tensor([[0.2, 0.8]]), noise) - c).abs().max() > 1e-3


def test_generate_images_rejects_bad_input():
    g = Generator(10, 8, 1, 16, width=8)
    with pytest.raises(ValueError, match="labels"):
        generate_images(g, [[10, 1]], [[0.5, 0.5]], [0])
    with pytest.raises(ValueError, match="seed"):
        generate_images(g, [[1, 2]], [[0.5, 0.5]], [0, 1])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_is_upsampling_then_the_convolution(layout):
    """The CPU path without the upsampled copy: the same outputs and gradients (input, weights, bias) as
    nearest x2 upsampling followed by the 3x3 convolution, in float64 to rounding; non-square input."""
    import torch.nn as nn
    import torch.nn.functional as F
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    x0 = torch.randn(3, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=layout)
    g = torch.randn(3, 5, 8, 10, dtype=torch.float64)
    results = []
    for f in (lambda x: conv(F.interpolate(x, scale_factor=2)), lambda x: upsample_conv(x, conv)):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        y = f(x)
        y.backward(g)
        results.append((y.detach(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for new, ref in zip(results[1], results[0]):
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
