"""Temperature scaling: one number T, fitted on the validation split, so that softmax(logits / T) means what it says.

A network trained with label smoothing (or simply for many epochs) is systematically over- or
under-confident; dividing its logits by one scalar T fixes most of it (Guo et al., 2017, "On
Calibration of Modern Neural Networks") and leaves every argmax, hence the accuracy, unchanged.
T minimises the negative log-likelihood of the validation labels. That NLL is convex in 1/T, so
it has one minimum over the bounded range, which a golden-section search on log T finds to
float precision with no library beyond numpy.

The fit uses the best model's validation logits exactly as the exported graph computes them
(flip-TTA averaged), never the test split. Too little validation data gives a noisy T, so below
MIN_VAL_IMAGES images (or MIN_VAL_PER_CLASS images of some class) T stays 1, and the run says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from fmtl.training.metrics import calibration_report

TEMPERATURE_BOUNDS = (0.05, 20.0)  # a T outside this is a broken model or a broken split, not miscalibration
# ECE over 15 bins on n images has a sampling error of roughly sqrt(0.1 / n) (about 2 points at 200 images,
# with most images in the top bins): below that the fit chases noise as large as the 5-7 point miscalibration
# label smoothing causes. Guo et al. fitted on 5,000 to 25,000 validation images.
MIN_VAL_IMAGES = 200
MIN_VAL_PER_CLASS = 5  # a class with fewer has no say in T: the fit would describe the other classes
SEARCH_STEPS = 60  # golden-section steps: the bracket shrinks by 0.618 each, to ~1e-12 of log(400)


@dataclass(frozen=True)
class Calibration:
    """The temperature a run uses, how it was chosen, and what it did on the validation split."""

    temperature: float  # probabilities are softmax(logits / temperature)
    fitted: bool  # False: T = 1 (calibration off, or validation too small to trust)
    note: str  # one line saying how T was chosen (printed by the run, kept in metrics.json)
    images: int  # validation images the decision was made on
    before: dict  # calibration_report of the validation probabilities at T = 1
    after: dict  # ... at T

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def scaled_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log softmax(logits / temperature)[label]."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in ``bounds`` minimising the NLL of softmax(logits / T): golden-section search on log T.

    Args:
        logits: [N, classes]; log-probabilities work as well (they differ from the logits by a constant
            per row, which the softmax ignores).
        labels: [N] true class indices.
        bounds: the smallest and largest temperature allowed.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return scaled_nll(logits, labels, math.exp(log_t))

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(SEARCH_STEPS):
        if loss_a <= loss_b:  # the minimum lies in [low, b]
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:  # in [a, high]
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log p is the logits up to a per-row constant (float64)."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs
    return softmax(np.log(np.clip(probs, np.finfo(np.float64).tiny, 1.0)) / temperature)


def too_small(labels: np.ndarray, num_classes: int) -> str:
    """Why this validation split is too small to fit a temperature on ("" when it is not)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if len(labels) < MIN_VAL_IMAGES:
        return f"only {len(labels)} validation images (fewer than {MIN_VAL_IMAGES})"
    if counts.min() < MIN_VAL_PER_CLASS:
        return f"a class has only {counts.min()} validation images (fewer than {MIN_VAL_PER_CLASS})"
    return ""


def calibrate(logits: np.ndarray, labels: np.ndarray, enabled: bool = True) -> Calibration:
    """The temperature for a model from its validation logits (or log-probabilities) and labels.

    Args:
        logits: [N, classes] of the best model on the validation split, as the exported graph computes them.
        labels: [N] true class indices.
        enabled: False (``--no-calibrate``): T = 1, the figures are still reported.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    before = calibration_report(softmax(logits), labels)
    reason = "" if enabled else "calibration off (--no-calibrate)"
    reason = reason or too_small(labels, logits.shape[1])
    if reason:
        return Calibration(1.0, False, f"temperature 1: {reason}", len(labels), before, before)
    temperature = fit_temperature(logits, labels)
    after = calibration_report(softmax(logits / temperature), labels)
    at_bound = min(abs(temperature - b) / b for b in TEMPERATURE_BOUNDS) < 1e-3
    note = f"temperature {temperature:.4f} fitted on {len(labels)} validation images" + (
        " (at the edge of its range: the model or the split is unusual)" if at_bound else ""
    )
    return Calibration(temperature, True, note, len(labels), before, after)


def calibrate_probabilities(probs: np.ndarray, labels: np.ndarray, enabled: bool = True) -> Calibration:
    """``calibrate`` from softmax probabilities (their logarithm stands in for the logits)."""
    log_probs = np.log(np.clip(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny, 1.0))
    return calibrate(log_probs, labels, enabled)


def for_run(predict_val: Callable[[], np.ndarray], labels: np.ndarray, enabled: bool = True) -> Calibration:
    """A training run's temperature: the step after training, before the test report.

    Args:
        predict_val: gives the best model's softmax probabilities on the validation split, computed as the
            exported graph computes them (flip-TTA included); not called when calibration is off.
        labels: the validation labels.
        enabled: ``cfg.calibrate`` (False: ``--no-calibrate``, T = 1 and no validation pass).
    """
    if not enabled:
        return Calibration(1.0, False, "temperature 1: calibration off (--no-calibrate)", 0, {}, {})
    return calibrate_probabilities(predict_val(), labels)
