"""The run folder's human side: config.yaml, results.csv, metrics.json, plots and the closing summary.

The test report uses the run's calibrated probabilities (softmax of logits / temperature, the
temperature fitted on val by ``fmtl.training.calibrate``); metrics.json keeps ECE, NLL and Brier
before and after it, and accuracy against coverage; calibration.png draws both.

Only the main process writes; every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fmtl.atomic import atomic_write_text
from fmtl.training import plots
from fmtl.training.calibrate import Calibration, apply_temperature
from fmtl.training.checkpoint import read_model_info, write_model_info
from fmtl.training.metrics import (
    calibration_report,
    classification_report,
    coverage_table,
    format_calibration,
    format_coverage,
    format_report,
)

RESULT_COLUMNS = [
    "epoch", "phase", "train_loss", "val_loss", "val_acc", "val_top5", "val_images", "lr", "seconds", "images_per_s",
]  # fmt: skip


def write_config(run_dir: Path, cfg) -> None:
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())


def write_results(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in RESULT_COLUMNS})
    atomic_write_text(run_dir / "results.csv", buffer.getvalue())


@dataclass
class TestOutcome:
    """The best model's predictions on the test split, as plain data."""

    probs: np.ndarray  # [N, classes] softmax probabilities at temperature 1 (finish applies the run's)
    images: np.ndarray  # [N, C, H, W] uint8, the images predicted
    labels: np.ndarray  # [N] int64
    classes: list[str]
    split: str  # "test", or the stand-in's name
    best_epoch: int
    seed: int  # picks the images shown in predictions.png
    augment: object = None  # a fresh copy of the run's Augment, drawn in augmentations.png (None: not drawn)


def finish(
    run_dir: Path, outcome: TestOutcome, history: list[dict], seconds: float, calibration: Calibration | None = None
) -> dict:
    """Write metrics.json, the temperature and test metrics into model.json, and the plots; returns the report.

    ``calibration``: the temperature fitted on val (None: temperature 1, nothing fitted).
    """
    temperature = calibration.temperature if calibration else 1.0
    calibrated = apply_temperature(outcome.probs, temperature)
    report = classification_report(calibrated, outcome.labels, outcome.classes)
    report.update({"split": outcome.split, "best_epoch": outcome.best_epoch, "train_seconds": round(seconds, 1)})
    report["calibration"] = calibration_section(outcome, calibrated, calibration)
    report["coverage"] = coverage_table(calibrated, outcome.labels)
    atomic_write_text(run_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    info = read_model_info(run_dir)
    info.temperature = temperature
    after = report["calibration"]["test"]["after"]
    test = {k: report[k] for k in ("split", "accuracy", "top5", "macro_f1", "num_images")}
    info.metrics = {**info.metrics, "test": {**test, **{k: after[k] for k in ("ece", "nll", "brier")}}}
    write_model_info(run_dir, info)
    draw_plots(run_dir, replace(outcome, probs=calibrated), history, report)
    plots.plot_reliability(
        outcome.labels,
        {"before (temperature 1)": outcome.probs, f"after (temperature {temperature:.3f})": calibrated},
        run_dir / "calibration.png",
    )
    return report


def calibration_section(outcome: TestOutcome, calibrated: np.ndarray, calibration: Calibration | None) -> dict:
    """metrics.json's ``calibration``: the temperature, how it was chosen, val and test figures before/after."""
    fit = calibration.to_dict() if calibration else {"temperature": 1.0, "fitted": False, "note": "not calibrated"}
    val = {k: fit.pop(k) for k in ("images", "before", "after") if k in fit}
    before, after = (calibration_report(p, outcome.labels) for p in (outcome.probs, calibrated))
    return {**fit, "val": val, "test": {"before": before, "after": after}}


def draw_plots(run_dir: Path, outcome: TestOutcome, history: list[dict], report: dict) -> None:
    plots.plot_curves(history, run_dir / "curves.png")
    plots.plot_confusion_matrix(np.array(report["confusion_matrix"]), outcome.classes, run_dir / "confusion_matrix.png")
    count = len(outcome.labels)
    shown = np.random.default_rng(outcome.seed).choice(count, size=min(16, count), replace=False)
    images = outcome.images[shown]
    plots.plot_predictions(
        images, outcome.labels[shown], outcome.probs[shown], outcome.classes, run_dir / "predictions.png"
    )
    if outcome.augment is None:
        return
    import torch

    original = torch.from_numpy(images[0]).float() / 255
    augmented = outcome.augment(original.unsqueeze(0).repeat(7, 1, 1, 1))
    plots.plot_augmentations(original.numpy(), augmented.numpy(), run_dir / "augmentations.png")


def summary(run_dir: Path, report: dict, classes: list[str], best: dict, epochs: int, seconds: float) -> str:
    topk = next(key for key in report if key.startswith("top"))
    lines = [
        "",
        format_report(report, classes),
        "",
        f"best epoch {best['epoch']} of {epochs}: val accuracy {best['val_acc']:.4f}",
        f"{report['split']} accuracy {report['accuracy']:.4f}, {topk} {report[topk]:.4f} on {report['num_images']} images",
        *calibration_lines(report),
        f"trained in {seconds / 60:.1f} min; run folder {run_dir}/ (model.safetensors, model.json, "
        "metrics.json, results.csv, curves.png, confusion_matrix.png, calibration.png, predictions.png"
        + (", augmentations.png)" if (run_dir / "augmentations.png").exists() else ")"),
        f"next: fmtl export --onnx {run_dir}",
    ]
    return "\n".join(lines)


def calibration_lines(report: dict) -> list[str]:
    """The summary's calibration part: how the temperature was chosen, its effect on test, the coverage table."""
    calibration = report.get("calibration")
    if not calibration:
        return []
    val, test, temperature = calibration["val"], calibration["test"], calibration["temperature"]
    return [
        f"calibration: {calibration['note']}",
        *([f"val {format_calibration(val['before'], val['after'], temperature)}"] if val.get("before") else []),
        f"{report['split']} {format_calibration(test['before'], test['after'], temperature)}",
        f"accuracy against coverage ({report['split']}, the most confident answered first; pick --min-probability):",
        format_coverage(report["coverage"]),
    ]
