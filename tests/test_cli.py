"""The `fmtl` command as a user meets it: help, version, and one-line errors for mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FMTL = str(Path(sys.executable).parent / "fmtl")


def fmtl(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([FMTL, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


COMMANDS = {"evaluate", "export", "infer", "models", "samples", "serve", "train"}


def test_version_and_help():
    """--help lists fmtl's commands, each with its description, in the Commands section (not merely the
    words somewhere, as the group's own description has some of them)."""
    assert fmtl("--version").stdout.startswith("fmtl, version ")
    result = fmtl("--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: fmtl [OPTIONS] COMMAND"), result.stdout
    listed = result.stdout.split("\nCommands:\n", 1)[1].splitlines()
    rows = dict(line.split(maxsplit=1) for line in listed if line.startswith("  ") and line.strip())
    assert COMMANDS <= rows.keys() and all(len(description) > 10 for description in rows.values()), rows
    train = fmtl("train", "--help")
    assert train.returncode == 0 and any(
        line.split()[:1] == ["--max-train-samples"] for line in train.stdout.splitlines()
    )


def test_models_lists_torchvision_and_lite0():
    names = fmtl("models").stdout.split()
    assert {"resnet18", "mobilenet_v2", "vgg16", "efficientnet_b0", "efficientnet_lite0"} <= set(names)


def test_samples_writes_named_pngs(tmp_path):
    result = fmtl("samples", str(tmp_path / "s"), "-n", "5")
    assert result.returncode == 0
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 5 and all("_" in f.stem for f in files)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epoch", "3"], "did you mean --epochs"),
        (["train", "--model", "resnet81", "--output", "{tmp}/r"], "did you mean"),
        (["train", "--data", "/no/such/folder", "--output", "{tmp}/r"], "data source not found"),
        (["export", "--onnx", "{tmp}"], "not a run folder"),
        (["infer", "{tmp}", "--model", "{tmp}/missing.onnx"], "model not found"),
        (["samples", "{tmp}/s", "--data", "/no/such.csv"], "not found"),
    ],
)
def test_user_mistakes_get_one_line_and_a_nonzero_exit(tmp_path, args, message):
    result = fmtl(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "rror" in line]) == 1
    assert not (tmp_path / "r").exists()  # a failed run leaves no folder behind
