"""Classification metrics from predictions: top-k accuracy, confusion matrix, per-class report."""

from __future__ import annotations

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample bool: is the label among the k highest scores (k clamped to the number of classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: list[str], k: int = 5) -> dict:
    """Accuracy, top-k, per-class precision/recall/F1/support and the confusion matrix, as plain JSON types."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    predictions = probs.argmax(axis=1)
    matrix = confusion_matrix(predictions, labels, len(classes))
    topk = np.argsort(-probs, axis=1)[:, : min(k, len(classes))]  # named top{k} even when clamped
    true_positive = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(classes)
    }
    return {
        "num_images": int(len(labels)),
        "accuracy": float((predictions == labels).mean()) if len(labels) else 0.0,
        f"top{k}": float((topk == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def format_report(report: dict, classes: list[str]) -> str:
    """The per-class table a person reads."""
    width = max(len(c) for c in classes) + 2
    lines = [f"{'class':<{width}}precision  recall     f1  support"]
    for name in classes:
        row = report["per_class"][name]
        lines.append(f"{name:<{width}}{row['precision']:9.3f}{row['recall']:8.3f}{row['f1']:7.3f}{row['support']:9d}")
    topk = next(key for key in report if key.startswith("top"))
    lines.append(
        f"accuracy {report['accuracy']:.4f}  {topk} {report[topk]:.4f}  macro F1 {report['macro_f1']:.4f}  "
        f"({report['num_images']} images)"
    )
    return "\n".join(lines)
