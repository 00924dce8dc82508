"""The whole product through its command line: train -> export -> infer -> evaluate, numbers agreeing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtl.training.checkpoint import load_model
from fmtl.training.data import load_dataset

pytestmark = pytest.mark.slow
FMTL = str(Path(sys.executable).parent / "fmtl")


def fmtl(*args, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([FMTL, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_train_export_infer_evaluate(tmp_path):
    fmtl("train", "--image-size", "32", "--max-train-samples", "1500", "--max-val-samples", "600",
         "--max-test-samples", "600", "--epochs", "2", "--strategy", "linear", "--no-augment", "--lr", "0.01",
         "--quiet", "--output", "runs/tiny", cwd=tmp_path)  # fmt: skip
    fmtl("export", "--onnx", "runs/tiny", cwd=tmp_path)
    model = tmp_path / "export" / "tiny.onnx"
    assert model.is_file()

    fmtl("samples", "images", "-n", "20", cwd=tmp_path)
    (tmp_path / "images" / "broken.png").write_text("not an image")
    result = subprocess.run([FMTL, "infer", "images", "--format", "json", "-k", "3"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0 and "tiny.onnx" in result.stderr  # newest model in export/, named
    rows = json.loads(result.stdout)["predictions"]
    assert len(rows) == 21 and sum(1 for r in rows if r["error"]) == 1
    assert "broken.png" in result.stderr

    # infer's top-1 on the PNGs equals PyTorch's on the same dataset images.
    net, info, spec = load_model(tmp_path / "runs" / "tiny")
    from fmtl.training.augment import Preprocess

    test = load_dataset("fashion-mnist", "test")
    for row in (r for r in rows if not r["error"]):
        index = int(re.match(r"(\d+)_", Path(row["path"]).name).group(1))
        with torch.no_grad():
            expected = net(Preprocess(spec)(test.images[index : index + 1])).argmax(1).item()
        assert row["top_k"][0]["index"] == expected and len(row["top_k"]) == 3

    # evaluate through onnxruntime and through PyTorch: the same figures.
    onnx_out = fmtl("evaluate", "export/tiny.onnx", cwd=tmp_path).stdout
    torch_out = fmtl("evaluate", "runs/tiny", cwd=tmp_path).stdout
    accuracy = [re.search(r"accuracy (\d\.\d+)", out).group(1) for out in (onnx_out, torch_out)]
    assert accuracy[0] == accuracy[1]
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["num_images"]
    # evaluate scores exactly the split training reported: its seeded 600-image test subset
    assert metrics["num_images"] == 600
    for out in (onnx_out, torch_out):
        assert "test split, 600 images" in out
    assert abs(float(accuracy[1]) - metrics["accuracy"]) < 1e-4
