"""Fake quantization: pure functions, modules, and the model converter."""
from .convert import (act_quantizers, count_quantized, enable_weight_clip, fit_ranges_mse, make_ranges_learnable,
                      quantize_model,
                      reset_calibration, set_calibration, start_range_sampling, weight_layers)
from .functional import FULL_PRECISION, affine_qparams, fake_quantize, fake_quantize_weight
from .modules import ActQuantizer, QuantAct, QuantBatchNorm2d, QuantConv2d, QuantLinear
from .reconstruct import reconstruct, refine_images
from .spec import SCHEMES, QuantSpec

__all__ = ["FULL_PRECISION", "SCHEMES", "ActQuantizer", "QuantAct", "QuantBatchNorm2d", "QuantConv2d", "QuantLinear",
           "QuantSpec", "act_quantizers", "affine_qparams", "count_quantized", "fake_quantize", "fake_quantize_weight",
           "quantize_model", "reconstruct", "refine_images", "reset_calibration", "set_calibration",
           "enable_weight_clip", "fit_ranges_mse", "make_ranges_learnable", "start_range_sampling", "weight_layers"]
