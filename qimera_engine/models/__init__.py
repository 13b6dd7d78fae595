"""Teacher models: the registry, their input conventions, and their penultimate features."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..seeding import isolated_init
from .checkpoint import (CheckpointError, fit_state_dict, load_state_dict_file, load_weights, save_state_dict,
                         state_dict_sha256)
from .cifar_resnet import CifarResNet
from .digits_cnn import DigitsCNN

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DIGITS_MEAN, DIGITS_STD = (0.3051,), (0.3756,)  # of sklearn's digits / 16


@dataclass
class Teacher:
    """A frozen FP classifier and the input convention it was trained with."""
    name: str
    model: nn.Module
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)  # e.g. where the weights came from

    @property
    def classifier(self) -> nn.Linear:
        return classifier_layer(self.model)

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros in the teacher's input shape, (B, channels, size, size)."""
        return torch.zeros(batch, self.channels, self.image_size, self.image_size)


TEACHERS = {
    # name: (builder(num_classes), image size, channels, mean, std, default classes)
    "digits-cnn": (lambda c: DigitsCNN(c), 8, 1, DIGITS_MEAN, DIGITS_STD, 10),
    **{f"resnet{d}": ((lambda c, d=d: CifarResNet(d, c)), 32, 3, IMAGENET_MEAN, IMAGENET_STD, 10)
       for d in (20, 32, 44, 56)},
    "resnet20_cifar10": (lambda c: _pytorchcv("resnet20_cifar10"), 32, 3, CIFAR_MEAN, CIFAR_STD, 10),
    "resnet20_cifar100": (lambda c: _pytorchcv("resnet20_cifar100"), 32, 3, CIFAR_MEAN, CIFAR_STD, 100),
    "resnet18": (lambda c: _torchvision("resnet18", c), 224, 3, IMAGENET_MEAN, IMAGENET_STD, 1000),
    "resnet50": (lambda c: _torchvision("resnet50", c), 224, 3, IMAGENET_MEAN, IMAGENET_STD, 1000),
    "mobilenet_v2": (lambda c: _torchvision("mobilenet_v2", c), 224, 3, IMAGENET_MEAN, IMAGENET_STD, 1000),
}


def _torchvision(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    import torchvision
    weights = "DEFAULT" if pretrained else None
    return getattr(torchvision.models, name)(weights=weights, num_classes=num_classes)


def _pytorchcv(name: str, pretrained: bool = False) -> nn.Module:
    try:
        from pytorchcv.model_provider import get_model
    except ImportError:
        raise ValueError(f"teacher {name!r} needs the optional package pytorchcv (pip install pytorchcv)") from None
    return get_model(name, pretrained=pretrained)


def check_teacher_name(name: str) -> None:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")


def build_teacher(name: str, num_classes: int | None = None, checkpoint: str | None = None,
                  pretrained: bool = False) -> Teacher:
    """Build a teacher by name; load ``checkpoint`` (weights_only) or the zoo's weights if asked.

    ``pretrained`` downloads the public weights of torchvision / pytorchcv models (needs
    internet); a checkpoint file is the offline way.
    """
    check_teacher_name(name)
    builder, size, channels, mean, std, default_classes = TEACHERS[name]
    classes = int(num_classes or default_classes)
    try:
        with isolated_init():  # the random initial values never land in another thread's seeded init
            if pretrained and name in ("resnet18", "resnet50", "mobilenet_v2"):
                model = _torchvision(name, 1000, pretrained=True)
            elif pretrained and name.startswith("resnet20_cifar"):
                model = _pytorchcv(name, pretrained=True)
            else:
                model = builder(classes)
    except OSError as e:  # the download of zoo weights failed
        raise CheckpointError(f"could not download the pretrained weights of {name} ({e}); are you offline? "
                              f"Give a local checkpoint instead (--checkpoint PATH)") from None
    if checkpoint:
        state = load_state_dict_file(checkpoint)
        if num_classes is None:  # a checkpoint with another number of classes: follow its final layer
            head = next(n for n, m in model.named_modules() if m is classifier_layer(model))
            weight = state.get(f"{head}.weight")
            if weight is not None and weight.dim() == 2 and weight.shape[0] != classes:
                with isolated_init():
                    model = builder(int(weight.shape[0]))
        fit_state_dict(model, state, checkpoint)
    model.eval().requires_grad_(False)
    classes = classifier_layer(model).out_features
    source = checkpoint or ("pretrained" if pretrained else "random init")
    return Teacher(name, model, classes, size, channels, tuple(mean), tuple(std), {"weights": str(source)})


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final linear layer: its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no final nn.Linear layer")
    return linears[-1]


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (B, D) and logits (B, C) in one forward pass (works for students too)."""
    captured = []
    handle = classifier_layer(model).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1), logits


__all__ = ["TEACHERS", "CheckpointError", "check_teacher_name", "CifarResNet", "DigitsCNN", "Teacher", "build_teacher",
           "classifier_layer", "features_and_logits", "load_state_dict_file", "load_weights",
           "save_state_dict", "state_dict_sha256"]
