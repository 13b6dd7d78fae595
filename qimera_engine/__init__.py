"""Qimera Explorer's engine: data-free quantization by the Qimera method (NeurIPS 2021).

One run API serves the app, the command line and the tests::

    from qimera_engine import preset, run
    for event in run(preset("digits", wbits=4, abits=4)):
        print(event)

This package never imports Streamlit.
"""
from .artifacts import load_generator, load_student, load_teacher
from .config import FIELDS, METHODS, PRESETS, SECTIONS, ConfigError, RunConfig, Spec, describe, parse_overrides, preset
from .data import DataError, ImageData, InputSpec, data_stamp, load_data, parse_spec
from .evaluate import collect_features, evaluate
from .export import ExportError, export, load_int, onnx_check
from .events import EpochEnd, Evaluated, Event, Finished, Log, Started, Step
from .generator import Generator, generate_images, sample_coefficients, soft_targets, superpose
from .losses import bn_statistics_loss, kd_loss, soft_cross_entropy
from .models import TEACHERS, CheckpointError, Teacher, build_teacher
from . import analysis  # the public analysis module (qimera_engine.analysis.__all__)
from .jobs import Job, JobRegistry, shared_registry, sweep_configs
from .quant import QuantSpec, quantize_model, set_calibration
from .runs import (Run, RunDamaged, RunLocked, ShippedRun, atomic_path, delete_run, list_runs, open_run, qimera_home,
                   runs_dir)
from .teachers import get_teacher, train_and_cache
from .runtime import pick_device
from .train import run, run_to_end

__version__ = "0.1.0"

__all__ = ["analysis", "FIELDS", "SECTIONS", "Spec", "describe", "Job", "JobRegistry", "RunDamaged", "RunLocked", "ShippedRun", "atomic_path", "data_stamp", "delete_run", "parse_spec",
           "runs_dir", "shared_registry", "sweep_configs",
           "METHODS", "PRESETS", "TEACHERS", "CheckpointError", "ConfigError", "DataError", "EpochEnd",
           "Evaluated", "Event", "ExportError", "Finished", "Generator", "ImageData", "InputSpec", "Log", "Run", "RunConfig",
           "Started", "Step", "Teacher", "bn_statistics_loss", "build_teacher", "collect_features", "evaluate",
           "export", "generate_images", "get_teacher", "kd_loss", "list_runs", "load_data", "load_generator", "load_int",
           "load_student", "load_teacher", "onnx_check", "open_run", "parse_overrides", "pick_device", "preset",
           "qimera_home", "QuantSpec", "quantize_model", "run", "run_to_end", "sample_coefficients", "set_calibration",
           "soft_cross_entropy", "soft_targets", "superpose", "train_and_cache"]
