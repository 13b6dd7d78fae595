"""Evaluation: top-1, features and probabilities of a model over a data set."""
from __future__ import annotations

import torch
import torch.nn as nn

from .data import ImageData
from .models import features_and_logits


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, *, batch_size: int = 500, device="cpu") -> dict:
    """Top-1 (percent) and mean cross-entropy; one host sync at the end."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if len(data) == 0:
        raise ValueError(f"{data.name} holds no images to evaluate on")
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    n = 0
    for x, y in data.batches(batch_size, device):
        logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        n += len(y)
    model.train(was_training)
    return {"top1": 100.0 * float(correct) / max(n, 1), "loss": float(loss) / max(n, 1), "n": n}


@torch.no_grad()
def collect_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, D) and softmax probabilities (N, C) on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f, logits = features_and_logits(model, x[i:i + batch_size].to(device))
        feats.append(f.float().cpu())
        probs.append(logits.float().softmax(1).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(probs)
