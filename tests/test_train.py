"""Real, small trainings on real Fashion-MNIST (Lite0, 32 px, a thousand or two images)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from fmtl.train import main
from fmtl.training.data import load_dataset, seeded_subset
from fmtl.training.models import create_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--image-size", "32", "--max-train-samples", "1500", "--val-fraction", "0.05", "--quiet", "--batch-size", "64"]


def train(*args: str) -> int:
    return main([*SMALL, *args])


def read_results(run: Path) -> list[dict]:
    with open(run / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "linear"
    assert train("--strategy", "linear", "--no-augment", "--epochs", "3", "--lr", "0.01", "--output", str(run)) == 0
    return run


def test_linear_run_writes_every_file(linear_run):
    for name in ("config.yaml", "results.csv", "metrics.json", "model.safetensors", "model.json", "curves.png",
                 "confusion_matrix.png", "predictions.png", "state/trainer.json"):  # fmt: skip
        assert (linear_run / name).is_file(), name
    assert not (linear_run / "augmentations.png").exists()  # --no-augment: there is nothing to show
    rows = read_results(linear_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # the loss falls
    assert all(int(r["val_images"]) == 3000 for r in rows)
    assert "eval_batch_size: 64" in (linear_run / "config.yaml").read_text()  # 0 resolved for the CPU, recorded


def test_metrics_are_consistent(linear_run):
    metrics = json.loads((linear_run / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == metrics["num_images"] == 10000 and metrics["split"] == "test"
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])
    assert metrics["accuracy"] > 0.5 and metrics["top5"] >= metrics["accuracy"]
    info = json.loads((linear_run / "model.json").read_text())
    assert info["classes"][0] == "T-shirt/top" and info["num_classes"] == 10
    assert info["input_spec"]["source_size"] == [28, 28] and info["input_spec"]["image_size"] == 32
    assert info["metrics"]["test"]["accuracy"] == metrics["accuracy"]
    best = max(read_results(linear_run), key=lambda r: float(r["val_acc"]))
    assert info["best_epoch"] == int(best["epoch"])


def test_linear_leaves_the_backbone_bit_for_bit_unchanged(linear_run):
    trained = load_file(str(linear_run / "model.safetensors"))
    fresh = create_model("efficientnet_lite0", num_classes=10).state_dict()
    backbone_keys = [k for k in fresh if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)
    for key in backbone_keys:
        assert torch.equal(trained[key], fresh[key]), key
    assert not torch.equal(trained["head.weight"], fresh["head.weight"])


def test_resume_continues_and_extends(tmp_path):
    run = tmp_path / "hybrid"
    args = ["--epochs", "2", "--head-epochs", "1", "--max-val-samples", "500", "--max-test-samples", "500"]
    assert train(*args, "--output", str(run)) == 0
    before = read_results(run)
    assert [r["phase"] for r in before] == ["linear", "finetune"]
    assert train("--resume", str(run), "--epochs", "3") == 0
    after = read_results(run)
    assert [int(r["epoch"]) for r in after] == [1, 2, 3] and after[:2] == before
    assert json.loads((run / "state" / "trainer.json").read_text())["epoch"] == 3


def test_resume_goes_on_with_the_plan_its_state_was_saved_under(tmp_path):
    run = tmp_path / "replanned"
    args = ["--epochs", "2", "--head-epochs", "1", "--max-val-samples", "200", "--max-test-samples", "200"]
    assert train(*args, "--output", str(run)) == 0
    before = read_results(run)
    saved_plan = json.loads((run / "state" / "trainer.json").read_text())["plan"]
    assert (saved_plan["strategy"], saved_plan["epochs"], saved_plan["head_epochs"]) == ("hybrid", 2, 1)
    # config.yaml holds the options, the state the plan (a budget run's re-plans go there): the state decides
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": 3}))
    assert train("--resume", str(run)) == 0
    assert read_results(run) == before  # no third epoch: the state was saved under a 2-epoch plan
    assert json.loads((run / "state" / "trainer.json").read_text())["plan"] == saved_plan


def test_existing_run_folder_is_not_overwritten(linear_run, capsys):
    before = (linear_run / "model.safetensors").read_bytes()
    assert train("--output", str(linear_run), "--epochs", "2") == 2
    assert "--resume" in capsys.readouterr().err
    assert (linear_run / "model.safetensors").read_bytes() == before


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tmp_path, capsys, monkeypatch):
    import fmtl.training.prepare

    # Machines here differ (some EPYCs lack AVX512-BF16/AMX): test the refusal itself, never run bf16.
    monkeypatch.setattr(fmtl.training.prepare, "cpu_has_native_bf16", lambda: False)
    assert train("--mixed-precision", "bf16", "--output", str(tmp_path / "r")) == 2
    assert "no native bf16" in capsys.readouterr().err


def test_two_processes_count_each_validation_image_once(tmp_path):
    run = tmp_path / "ddp"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ROOT / "launch/cpu-multiprocess.yaml"),
        str(ROOT / "fmtl/train.py"), *SMALL, "--val-fraction", "0.0507", "--eval-batch-size", "101", "--epochs", "2",
        "--output", str(run), "--max-val-samples", "1918", "--max-test-samples", "1918",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    val = seeded_subset(load_dataset("fashion-mnist", "val", val_fraction=0.0507), 1918, seed=0)
    expected = len(val)
    assert expected % 101  # the last batch is short: Accelerate pads it, gather_for_metrics must drop the padding
    rows = read_results(run)
    assert all(int(r["val_images"]) == expected for r in rows)
    # The schedule counts Accelerate's scheduler steps (one per process per optimizer step): epoch 1 ends its
    # head phase with fine-tuning's warm-up next, not with the whole run's schedule already spent.
    assert float(rows[0]["lr"]) > 0 and float(rows[1]["lr"]) == pytest.approx(0.0, abs=1e-9)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        np.array(metrics["confusion_matrix"]).sum()
        == metrics["num_images"]
        == len(seeded_subset(load_dataset("fashion-mnist", "test"), 1918, seed=0))
    )


def test_image_folder_and_csv_sources_train(tmp_path):
    test = load_dataset("fashion-mnist", "test")
    keep = (test.labels < 3).nonzero().flatten()[:300]
    for i in keep.tolist():
        folder = tmp_path / "folder" / test.classes[int(test.labels[i])].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"{i}.png")
    assert train("--data", str(tmp_path / "folder"), "--strategy", "linear", "--epochs", "1", "--val-fraction", "0.2",
                 "--output", str(tmp_path / "run-folder")) == 0  # fmt: skip
    info = json.loads((tmp_path / "run-folder" / "model.json").read_text())
    assert info["classes"] == ["Pullover", "T-shirt-top", "Trouser"]
    metrics = json.loads((tmp_path / "run-folder" / "metrics.json").read_text())
    assert metrics["split"].startswith("val")  # no test split: validation stands in, and says so

    rows = np.concatenate([test.labels[:400, None].numpy(), test.images[:400].reshape(400, -1).numpy()], axis=1)
    np.savetxt(tmp_path / "train.csv", rows, fmt="%d", delimiter=",")
    assert train("--data", str(tmp_path / "train.csv"), "--test-data", str(tmp_path / "train.csv"), "--strategy",
                 "finetune", "--epochs", "1", "--output", str(tmp_path / "run-csv")) == 0  # fmt: skip
    assert json.loads((tmp_path / "run-csv" / "metrics.json").read_text())["num_images"] == 400


def test_other_recipes_train_and_are_recorded(tmp_path):
    run = tmp_path / "recipe"
    assert train("--strategy", "finetune", "--optimizer", "sgd", "--head", "mlp", "--no-freeze-bn", "--unfreeze",
                 "last:2", "--patience", "1", "--epochs", "3", "--max-train-samples", "500", "--max-val-samples", "300",
                 "--max-test-samples", "300", "--output", str(run)) == 0  # fmt: skip
    config = (run / "config.yaml").read_text()
    for line in ("optimizer: sgd", "head: mlp", "freeze_bn: false", "unfreeze: last:2", "patience: 1"):
        assert line in config
    rows = read_results(run)
    best = max(range(len(rows)), key=lambda i: float(rows[i]["val_acc"]))
    assert len(rows) <= best + 2  # patience 1: at most one epoch after the best
    info = json.loads((run / "model.json").read_text())
    assert info["head"] == "mlp"
    assert "head.0.weight" in load_file(str(run / "model.safetensors"))
