"""What a student is quantized to: one ``QuantSpec`` that ``quantize_model`` builds the student from, and
that the trainer, the rounding reconstruction and the exports read back from the student's layers.

Two schemes:

- ``paper`` (METHOD.md section 2, the default): per-channel affine weights (min/max), per-tensor affine
  activations after every ReLU call site, everything else in floating point.
- ``deploy``: what an integer runtime (ONNX Runtime's ``QLinearConv``) runs without a float step between
  layers: symmetric per-channel weights (zero point 0, codes in [-(2^(b-1) - 1), 2^(b-1) - 1], so folding
  BatchNorm into the weights keeps the codes), activation ranges that hold 0 (unsigned codes after a ReLU,
  zero point 0), and ``io_bits`` quantizers where the paper keeps floats: the input of a weight layer that
  no quantizer feeds (the model's input, the pooled features before the classifier) and the output of a
  convolution (after its BatchNorm) that no activation quantizer follows (each residual add's inputs).
  Every convolution's input is then the same ``abits`` codes as in the paper's scheme, except the stem's
  (the image, at ``io_bits``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .functional import FULL_PRECISION

SCHEMES = ("paper", "deploy")
WEIGHT_CLIPS = ("minmax", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """Bits per weight and activation (2..8, 32 = full precision) and how they are quantized.

    ``weight_clip="mse"`` gives every weight layer a per-channel clipping ratio (fitted by the trainer);
    ``io_bits`` is the width of the deployable scheme's added quantizers (8: what an integer runtime's
    uint8 tensors hold)."""
    wbits: int = 4
    abits: int = 4
    scheme: str = "paper"
    keep_first_last_8bit: bool = False
    weight_clip: str = "minmax"
    beta: float = 0.9
    io_bits: int = 8

    def __post_init__(self):
        for name in ("wbits", "abits", "io_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == FULL_PRECISION):
                raise ValueError(f"{name}: a bit width must be 2..8 or {FULL_PRECISION} (full precision), got {bits!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.weight_clip not in WEIGHT_CLIPS:
            raise ValueError(f"weight_clip must be one of {', '.join(WEIGHT_CLIPS)}, got {self.weight_clip!r}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")

    @property
    def symmetric_weights(self) -> bool:
        return self.scheme == "deploy"

    @property
    def zero_in_range(self) -> bool:
        """Activation ranges always hold 0 (the deployable scheme)."""
        return self.scheme == "deploy"

    @property
    def adds_io_quantizers(self) -> bool:
        """The deployable scheme quantizes the inputs and outputs the paper leaves in float, unless the
        activations stay in full precision."""
        return self.scheme == "deploy" and self.abits < FULL_PRECISION

    @classmethod
    def from_config(cls, cfg) -> "QuantSpec":
        """The spec of a run's ``RunConfig``."""
        return cls(wbits=cfg.wbits, abits=cfg.abits, scheme=cfg.scheme, keep_first_last_8bit=cfg.keep_first_last_8bit,
                   weight_clip=cfg.weight_clip, beta=cfg.ema_beta)
