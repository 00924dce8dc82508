"""The run folder's human side: config.yaml, results.csv, metrics.json, plots and the closing summary.

Only the main process writes; every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from fmtl.atomic import atomic_write_text
from fmtl.training import plots
from fmtl.training.checkpoint import MODEL_WEIGHTS, read_model_info, write_model_info
from fmtl.training.metrics import classification_report, format_report

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


def finish(trainer, seconds: float) -> dict | None:
    """Evaluate the best model on the test split, write metrics.json and the plots, print the summary."""
    accelerator, run_dir = trainer.accelerator, trainer.run_dir
    accelerator.wait_for_everyone()
    trainer.net.load_state_dict(load_file(str(run_dir / MODEL_WEIGHTS)))  # copied onto the model's device
    trainer.net.backbone_frozen = False
    probs = trainer.predict_probs(trainer.test_set.images)
    if not accelerator.is_main_process:
        return None
    labels = trainer.test_set.labels.numpy()
    report = classification_report(probs, labels, trainer.classes)
    report.update({"split": trainer.test_name, "best_epoch": trainer.best["epoch"], "train_seconds": round(seconds, 1)})
    atomic_write_text(run_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    info = read_model_info(run_dir)
    info["metrics"] = {
        **info["metrics"],
        "test": {k: report[k] for k in ("split", "accuracy", "top5", "macro_f1", "num_images")},
    }
    write_model_info(run_dir, info)
    draw_plots(trainer, probs, report)
    accelerator.print(summary(trainer, report, seconds))
    return report


def draw_plots(trainer, probs: np.ndarray, report: dict) -> None:
    run_dir, test = trainer.run_dir, trainer.test_set
    plots.plot_curves(trainer.history, run_dir / "curves.png")
    plots.plot_confusion_matrix(np.array(report["confusion_matrix"]), trainer.classes, run_dir / "confusion_matrix.png")
    shown = np.random.default_rng(trainer.cfg.seed).choice(len(test), size=min(16, len(test)), replace=False)
    plots.plot_predictions(
        test.images[shown].numpy(),
        test.labels[shown].numpy(),
        probs[shown],
        trainer.classes,
        run_dir / "predictions.png",
    )
    original = test.images[int(shown[0])].float() / 255
    from fmtl.training.augment import Augment

    augmented = Augment(seed=trainer.cfg.seed)(original.unsqueeze(0).repeat(7, 1, 1, 1))
    plots.plot_augmentations(original.numpy(), augmented.numpy(), run_dir / "augmentations.png")


def summary(trainer, report: dict, seconds: float) -> str:
    best = trainer.best
    topk = next(key for key in report if key.startswith("top"))
    lines = [
        "",
        format_report(report, trainer.classes),
        "",
        f"best epoch {best['epoch']} of {len(trainer.history)}: val accuracy {best['val_acc']:.4f}",
        f"{report['split']} accuracy {report['accuracy']:.4f}, {topk} {report[topk]:.4f} on {report['num_images']} images",
        f"trained in {seconds / 60:.1f} min; run folder {trainer.run_dir}/ (model.safetensors, model.json, "
        "metrics.json, results.csv, curves.png, confusion_matrix.png, predictions.png, augmentations.png)",
        f"next: fmtl export --onnx {trainer.run_dir}",
    ]
    return "\n".join(lines)
