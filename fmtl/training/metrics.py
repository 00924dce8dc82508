"""Classification metrics from predictions: top-k accuracy, confusion matrix, per-class report, and how far
the probabilities can be trusted (ECE, NLL, Brier, accuracy against coverage). numpy only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

CALIBRATION_BINS = 15  # equal-width bins of top-1 confidence: the standard ECE (Guo et al., 2017)
COVERAGES = (1.0, 0.95, 0.9, 0.8)  # shares of images answered, the most confident first
PROBABILITY_FLOOR = 1e-12  # NLL counts a probability that underflowed to 0 as this (-log: 27.6), not as infinity


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


# ---------------------------------------------------------------- calibration


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of top-1 confidence, ``((m-1)/M, m/M]``: image count, mean confidence, accuracy.

    Empty bins have count 0 and confidence/accuracy NaN.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    inner_edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    index = np.digitize(confidence, inner_edges, right=True)  # bin m holds (edges[m], edges[m + 1]]
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / count
    return {"count": count.astype(np.int64), "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE: sum over bins of (share of images in the bin) x |accuracy - mean confidence| (0..1)."""
    table = reliability_bins(probs, labels, bins)
    filled = table["count"] > 0
    if not filled.any():
        return 0.0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float((table["count"][filled] * gaps).sum() / table["count"].sum())


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class), with probabilities floored at PROBABILITY_FLOOR."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    true = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(true, PROBABILITY_FLOOR, 1.0)).mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of sum over classes of (p - one-hot)^2 (the multi-class Brier score, 0..2)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return 0.0
    target = np.zeros_like(probs)
    target[np.arange(len(labels)), labels] = 1.0
    return float(((probs - target) ** 2).sum(axis=1).mean())


def calibration_report(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE, NLL, Brier score and the mean top-1 probability (to set against accuracy)."""
    probs = np.asarray(probs, dtype=np.float64)
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "mean_confidence": float(probs.max(axis=1).mean()) if len(probs) else 0.0,
    }


def coverage_table(probs: np.ndarray, labels: np.ndarray, coverages=COVERAGES) -> list[dict]:
    """Accuracy when only the most confident share of images is answered (the rest: "not sure").

    Each row: ``coverage`` (asked), ``answered`` (images), ``accuracy`` on them, and ``min_probability``,
    the lowest top-1 probability answered: a threshold that answers about that share on similar data.
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    confidence = probs.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (probs.argmax(axis=1) == labels)[order]
    rows = []
    for coverage in coverages:
        answered = max(1, int(np.ceil(coverage * len(labels) - 1e-9))) if len(labels) else 0
        rows.append({
            "coverage": coverage,
            "answered": answered,
            "accuracy": float(correct[:answered].mean()) if answered else 0.0,
            "min_probability": float(confidence[order[answered - 1]]) if answered else 0.0,
        })  # fmt: skip
    return rows


def format_calibration(before: dict, after: dict, temperature: float) -> str:
    """One line: ECE, NLL and Brier at temperature 1 and at the fitted one."""
    return (
        f"ECE {100 * before['ece']:.2f} % -> {100 * after['ece']:.2f} %, NLL {before['nll']:.4f} -> "
        f"{after['nll']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f} (temperature {temperature:.3f})"
    )


def format_coverage(rows: list[dict]) -> str:
    """The accuracy-against-coverage table a person reads to pick --min-probability."""
    lines = ["answered  accuracy  min probability"]
    for row in rows:
        lines.append(f"{row['coverage']:7.0%}  {row['accuracy']:8.2%}  {row['min_probability']:15.3f}")
    return "\n".join(lines)
