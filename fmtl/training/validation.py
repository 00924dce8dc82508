"""Passes without gradients during training: validation metrics and test probabilities.

Both shard their batches across processes and gather the results in order
(``accelerator.gather_for_metrics``), so every process takes part and the main one sees all images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from fmtl.training.metrics import topk_correct

VAL_KEYS = ("loss", "acc", "top5", "count")


@torch.no_grad()
def validate(
    model: torch.nn.Module, loader: DataLoader, logits_of: Callable, labels: torch.Tensor, accelerator: Accelerator
) -> dict:
    """Mean loss, top-1 and top-5 accuracy and image count over ``loader``'s batches of indices;
    ``logits_of(indices)`` gives the model's logits for them (from images, or from cached features)."""
    model.eval()
    loss_sum, correct, correct5, count = 0.0, 0, 0, 0
    for indices in loader:
        logits, target = accelerator.gather_for_metrics((logits_of(indices).float(), labels[indices.to(labels.device)]))
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
        correct5 += topk_correct(logits, target, 5).sum().item()
        count += len(target)
    return {"loss": loss_sum / count, "acc": correct / count, "top5": correct5 / count, "count": count}


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, loader: DataLoader, inputs_of: Callable, accelerator: Accelerator
) -> np.ndarray:
    """Softmax probabilities for every index ``loader`` hands out, gathered in order (on every process)."""
    model.eval()
    parts = []
    for indices in loader:
        logits = model(inputs_of(indices)).float()
        parts.append(accelerator.gather_for_metrics(logits.softmax(1)).cpu())
    return torch.cat(parts).numpy()
