"""The Qimera generator: superposed class embeddings, the disentanglement mapping, soft targets.

METHOD.md sections 3-6. The superposition itself is ``superpose``; its targets ``soft_targets``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- pure functions


def sample_coefficients(batch: int, k: int, sampler: str = "softmax", *, alpha: float = 1.0,
                        fixed: list[float] | None = None, device=None, generator=None) -> torch.Tensor:
    """Mixing coefficients lambda, (B, K), each row on the simplex.

    softmax: softmax(g), g ~ N(0, I_K) (the paper); dirichlet: Dirichlet(alpha);
    fixed: the same given coefficients for every sample.
    """
    if sampler == "softmax":
        return torch.randn(batch, k, device=device, generator=generator).softmax(dim=1)
    if sampler == "dirichlet":
        return torch._sample_dirichlet(torch.full((batch, k), float(alpha), device=device), generator=generator)
    if sampler == "fixed":
        c = torch.as_tensor(fixed, dtype=torch.float32, device=device)
        if c.numel() != k:
            raise ValueError(f"fixed coefficients need {k} values, got {c.numel()}")
        return c.expand(batch, k).clone()
    raise ValueError(f"unknown coefficient sampler {sampler!r}")


def standardise(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over the last dimension, no learnable parameters."""
    mean = v.mean(dim=-1, keepdim=True)
    var = v.var(dim=-1, unbiased=False, keepdim=True)
    return (v - mean) * torch.rsqrt(var + eps)


def superpose(vectors: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """sum_k lambda_k * v_k: (B, K, D) x (B, K) -> (B, D)."""
    return torch.einsum("bkd,bk->bd", vectors, coeffs)


def soft_targets(labels: torch.Tensor, coeffs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """t = sum_k lambda_k * onehot(y_k), (B, C); repeated labels add up."""
    t = torch.zeros(labels.shape[0], num_classes, device=coeffs.device, dtype=coeffs.dtype)
    return t.scatter_add_(1, labels, coeffs)


@dataclass
class LatentBatch:
    labels: torch.Tensor   # (B, K) class indices
    coeffs: torch.Tensor   # (B, K) mixing coefficients, rows sum to 1
    noise: torch.Tensor    # (B, K, D) z ~ N(0, I)
    targets: torch.Tensor  # (B, C) soft labels
    pixel: list[torch.Tensor] | None = None  # the generator's per-pixel noise maps (block_noise)
    paired: bool = False   # the second half repeats the first half's labels and coefficients (mode seeking)

    @property
    def superposed(self) -> bool:
        return self.labels.shape[1] > 1

    def take(self, rows: slice) -> "LatentBatch":
        """The batch's ``rows`` (one process's share of a global batch)."""
        return LatentBatch(self.labels[rows], self.coeffs[rows], self.noise[rows], self.targets[rows],
                           [p[rows] for p in self.pixel] if self.pixel is not None else None, self.paired)


def sample_latents(batch: int, num_classes: int, embed_dim: int, *, k: int = 1, sampler: str = "softmax",
                   alpha: float = 1.0, fixed: list[float] | None = None, device=None,
                   generator: torch.Generator | None = None, paired: bool = False,
                   pixel_shapes: list[tuple[int, int, int]] | None = None) -> LatentBatch:
    """Labels uniform with replacement, K per sample; K = 1 gives a plain batch.

    ``generator`` (on ``device``) makes the draws; None draws from torch's global generator.
    ``paired`` (an even batch): the second half has the first half's labels and coefficients, with noise
    of its own. ``pixel_shapes``: per-pixel noise maps of these shapes are drawn after the rest.
    """
    if paired and batch % 2:
        raise ValueError(f"a paired batch needs an even size, got {batch}")
    rows = batch // 2 if paired else batch
    labels = torch.randint(num_classes, (rows, k), device=device, generator=generator)
    if k == 1:
        coeffs = torch.ones(rows, 1, device=device)
    else:
        coeffs = sample_coefficients(rows, k, sampler, alpha=alpha, fixed=fixed, device=device, generator=generator)
    if paired:
        labels, coeffs = labels.repeat(2, 1), coeffs.repeat(2, 1)
    noise = torch.randn(batch, k, embed_dim, device=device, generator=generator)
    pixel = [torch.randn(batch, *shape, device=device, generator=generator) for shape in pixel_shapes or ()]
    return LatentBatch(labels, coeffs, noise, soft_targets(labels, coeffs, num_classes), pixel or None, paired)


class BatchSampler:
    """Draws each training batch: superposed with probability p (METHOD 4), else plain.

    The coin is host-side (``seed``), so no device sync per batch; the tensors come from
    ``generator`` (a run's own, on the batch's device), or torch's global generator when None.
    """

    def __init__(self, num_classes: int, embed_dim: int, p: float, k: int, sampler: str = "softmax",
                 alpha: float = 1.0, fixed: list[float] | None = None, seed: int = 0,
                 generator: torch.Generator | None = None, paired: bool = False,
                 pixel_shapes: list[tuple[int, int, int]] | None = None):
        self.num_classes, self.embed_dim, self.p, self.k = num_classes, embed_dim, p, k
        self.sampler, self.alpha, self.fixed = sampler, alpha, fixed
        self.rng = random.Random(seed)
        self.generator = generator
        self.paired, self.pixel_shapes = paired, pixel_shapes

    def __call__(self, batch: int, device=None) -> LatentBatch:
        k = self.k if self.k > 1 and self.rng.random() < self.p else 1
        return sample_latents(batch, self.num_classes, self.embed_dim, k=k, sampler=self.sampler,
                              alpha=self.alpha, fixed=self.fixed, device=device, generator=self.generator,
                              paired=self.paired, pixel_shapes=self.pixel_shapes)

def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2))`` for a 3x3 convolution with padding 1, computed on ``x``
    itself: each of the four output pixels of a 2x2 block sees a 2x2 window of ``x`` through a 2x2 kernel
    made of sums of the 3x3 kernel's taps (the nearest-neighbour copies share their weights). The same
    function to float rounding, with 4 x 4 instead of 9 x 4 multiply-adds per output pixel; the
    gradients reach ``conv``'s 3x3 weights through the sums. The result is channels-last."""
    w, out_ch = conv.weight, conv.out_channels
    b, _, h, wd = x.shape

    def pair(k, dim):  # even outputs: taps (k0, k1 + k2) at offsets (-1, 0); odd: (k0 + k1, k2) at (0, +1)
        k0, k1, k2 = k.unbind(dim)
        return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)

    rows = pair(w, 2)
    kernels = [c for r in rows for c in pair(r, 3)]  # (even, even), (even, odd), (odd, even), (odd, odd)
    weight = torch.cat(kernels).contiguous(memory_format=torch.channels_last)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.conv2d(x, weight, bias, padding=1).permute(0, 2, 3, 1)  # (B, H+1, W+1, 4 out), a view
    return _Interleave.apply(y, out_ch).reshape(b, 2 * h, 2 * wd, out_ch).permute(0, 3, 1, 2)


# the (rows, columns) of upsample_conv's (H+1, W+1) output that each of the four output blocks reads
_BLOCKS = ((0, 0), (0, 1), (1, 0), (1, 1))


class _Interleave(torch.autograd.Function):
    """(B, H+1, W+1, 4 out) -> (B, H, 2, W, 2, out): block k = (r, c) gives the output pixels (2i+r, 2j+c)
    from rows r..r+H-1 and columns c..c+W-1. Its own backward writes the gradient once (autograd's
    slicing would allocate and zero a full-size gradient per block, then add the four up)."""

    @staticmethod
    def forward(ctx, y, out_ch):
        b, h1, w1, _ = y.shape
        h, w = h1 - 1, w1 - 1
        out = y.new_empty(b, h, 2, w, 2, out_ch)
        for k, (r, c) in enumerate(_BLOCKS):
            out[:, :, r, :, c] = y[:, r:r + h, c:c + w, k * out_ch:(k + 1) * out_ch]
        ctx.out_ch = out_ch
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        b, h, _, w, _, o = g.shape
        gy = g.new_empty(b, h + 1, w + 1, 4 * o)
        for k, (r, c) in enumerate(_BLOCKS):
            block = gy[..., k * o:(k + 1) * o]
            block[:, r:r + h, c:c + w] = g[:, :, r, :, c]
            block[:, h if r == 0 else 0] = 0  # the row and the column this block does not read
            block[:, :, w if c == 0 else 0] = 0
        return gy, None


# --------------------------------------------------------------------------- modules


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm with per-class affine parameters, mixed with the embeddings' coefficients."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.weight = nn.Parameter(torch.ones(num_classes, num_features))
        self.bias = nn.Parameter(torch.zeros(num_classes, num_features))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        gamma = torch.einsum("bkf,bk->bf", self.weight[labels], coeffs)  # (B, F)
        beta = torch.einsum("bkf,bk->bf", self.bias[labels], coeffs)
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class Generator(nn.Module):
    """Class-conditional generator for (channels, size, size) images in the teacher's input space.

    Body (METHOD 3): Linear -> (W, s/4, s/4), BN; up x2, conv W->W, BN, LeakyReLU(0.2);
    up x2, conv W->W/2, BN, LeakyReLU(0.2); conv W/2->channels; tanh; BN without affine.
    ``input_mode`` "qimera": sum_k lambda_k M(standardise(E[y_k] + sigma z_k));
    "gdfq": E[y] * z (GDFQ's input, no mixing).
    ``embed_norm``: standardise E[y_k] before the noise is added, so a growing embedding cannot drown
    the noise out. ``block_noise``: per-pixel noise maps, with a learned per-channel scale (zero at first),
    added after each upsampling convolution (as StyleGAN does); ``forward`` takes them as
    ``pixel_noise`` (``noise_shapes`` lists their shapes), zero maps when none are given.
    """

    def __init__(self, num_classes: int, image_size: int, channels: int, embed_dim: int, *,
                 input_mode: str = "qimera", noise_scale: float = 1.0, dm: bool = False, dm_width: int = 100,
                 width: int = 128, bn_eps: float = 0.8, conditional_bn: bool | None = None,
                 embed_norm: bool = False, block_noise: bool = False):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image size must be a multiple of 4, got {image_size}")
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.embed_dim, self.input_mode, self.noise_scale = embed_dim, input_mode, noise_scale
        self.init_size = image_size // 4
        self.conditional_bn = image_size >= 128 if conditional_bn is None else conditional_bn
        self.embedding = nn.Embedding(num_classes, embed_dim)
        # The disentanglement mapping M: one linear layer before superposition (METHOD 5).
        self.disentanglement_mapping = nn.Linear(embed_dim, dm_width) if dm else nn.Identity()
        in_dim = dm_width if dm else embed_dim
        self.fc = nn.Linear(in_dim, width * self.init_size ** 2)
        half = width // 2

        def bn(n, eps=1e-5):
            return ConditionalBatchNorm2d(n, num_classes, eps) if self.conditional_bn else nn.BatchNorm2d(n, eps=eps)
        self.bn0, self.bn1, self.bn2 = bn(width), bn(width, bn_eps), bn(half, bn_eps)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, half, 3, padding=1)
        self.conv3 = nn.Conv2d(half, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)
        self.width = width
        self.embed_norm, self.block_noise = embed_norm, block_noise
        if block_noise:
            self.noise_gain1 = nn.Parameter(torch.zeros(width))
            self.noise_gain2 = nn.Parameter(torch.zeros(half))

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """The (channels, height, width) of each per-pixel noise map (``block_noise``; else none)."""
        if not self.block_noise:
            return []
        half = self.image_size // 2
        return [(1, half, half), (1, self.image_size, self.image_size)]

    def init_embeddings_from(self, classifier_weight: torch.Tensor, freeze: bool = False) -> None:
        """Initialise E from the teacher's final linear layer, (C, D) (METHOD 6)."""
        if tuple(classifier_weight.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(f"teacher classifier is {tuple(classifier_weight.shape)}, embeddings are "
                             f"{tuple(self.embedding.weight.shape)}: embed_dim must be the teacher's feature width")
        with torch.no_grad():
            self.embedding.weight.copy_(classifier_weight)
        self.embedding.weight.requires_grad_(not freeze)

    def latent(self, labels: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The generator's input vector, (B, D_in)."""
        if self.input_mode == "gdfq":
            return self.embedding(labels[:, 0]) * noise[:, 0]
        emb = self.embedding(labels)
        if self.embed_norm:
            emb = standardise(emb)
        e = standardise(emb + self.noise_scale * noise)  # (B, K, D)
        return superpose(self.disentanglement_mapping(e), coeffs)           # (B, D_in)

    def _bn(self, layer, x, labels, coeffs):
        return layer(x, labels, coeffs) if self.conditional_bn else layer(x)

    @staticmethod
    def _up_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """Upsample x2 (nearest), then ``conv``; on the CPU without the upsampled copy (``upsample_conv``)."""
        if x.device.type == "cpu":
            return upsample_conv(x, conv)
        return conv(F.interpolate(x, scale_factor=2))

    def forward(self, labels: torch.Tensor, coeffs: torch.Tensor, noise: torch.Tensor,
                pixel_noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        z = self.latent(labels, coeffs, noise)
        x = self.fc(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        x = self._bn(self.bn0, x, labels, coeffs)
        x = self._up_conv(x, self.conv1)
        if self.block_noise and pixel_noise is not None:
            x = x + self.noise_gain1.view(1, -1, 1, 1) * pixel_noise[0]
        x = F.leaky_relu(self._bn(self.bn1, x, labels, coeffs), 0.2)
        x = self._up_conv(x, self.conv2)
        if self.block_noise and pixel_noise is not None:
            x = x + self.noise_gain2.view(1, -1, 1, 1) * pixel_noise[1]
        x = F.leaky_relu(self._bn(self.bn2, x, labels, coeffs), 0.2)
        # (B, channels, size, size), in the default memory format whatever the generator's own
        return self.bn_out(torch.tanh(self.conv3(x))).contiguous()

    def config(self) -> dict:
        """What rebuilds this generator (stored beside its weights)."""
        return dict(num_classes=self.num_classes, image_size=self.image_size, channels=self.channels,
                    embed_dim=self.embed_dim, input_mode=self.input_mode, noise_scale=self.noise_scale,
                    dm=not isinstance(self.disentanglement_mapping, nn.Identity),
                    dm_width=getattr(self.disentanglement_mapping, "out_features", 100), width=self.width,
                    bn_eps=self.bn1.eps if not self.conditional_bn else self.bn1.bn.eps,
                    conditional_bn=self.conditional_bn, embed_norm=self.embed_norm, block_noise=self.block_noise)


def seeded_noise(seeds, k: int, embed_dim: int, device=None) -> torch.Tensor:
    """(B, K, D) noise where sample i depends on seeds[i] alone."""
    rows = [torch.randn(k, embed_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def seeded_pixel_noise(seeds, shapes, device=None) -> list[torch.Tensor]:
    """One (B, *shape) per-pixel noise map per shape, where sample i depends on seeds[i] alone (a stream
    of its own: the seed mixed with a constant, so it never repeats what ``seeded_noise`` draws)."""
    if not shapes:
        return []
    per_sample = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) ^ 0x5EED_0F_B10C)
        per_sample.append([torch.randn(*shape, generator=g) for shape in shapes])
    return [torch.stack([maps[i] for maps in per_sample]).to(device) for i in range(len(shapes))]


@torch.no_grad()
def generate_images(generator: Generator, labels, coeffs, seeds) -> torch.Tensor:
    """Images for explicit labels (B, K), coefficients (B, K) and seeds (B,).

    The generator runs in eval mode (BatchNorm running statistics), so each image depends
    only on its own labels, coefficients and seed; no training state is touched.
    """
    device = next(generator.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32, device=device)
    if labels.dim() == 1:
        labels = labels[:, None]
    if coeffs.dim() == 1:
        coeffs = coeffs.expand(labels.shape[0], -1) if coeffs.numel() == labels.shape[1] else coeffs[:, None]
    if labels.shape != coeffs.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and coefficients {tuple(coeffs.shape)} must match")
    if labels.min() < 0 or labels.max() >= generator.num_classes:
        raise ValueError(f"labels must be in [0, {generator.num_classes})")
    seeds = list(seeds)
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"need one seed per sample ({labels.shape[0]}), got {len(seeds)}")
    if generator.input_mode == "gdfq" and labels.shape[1] > 1:
        raise ValueError("a GDFQ generator takes one class per sample (no superposition)")
    noise = seeded_noise(seeds, labels.shape[1], generator.embed_dim, device)
    pixel = seeded_pixel_noise(seeds, generator.noise_shapes(), device) or None
    was_training = generator.training
    generator.eval()
    try:
        return generator(labels, coeffs, noise, pixel)
    finally:
        generator.train(was_training)
