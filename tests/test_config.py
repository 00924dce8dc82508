"""Config: defaults, YAML, command line, closest-name errors."""

from __future__ import annotations

import dataclasses

import pytest

from fmtl.errors import FmtlError
from fmtl.training.config import TrainConfig, load_config, with_eval_batch


def test_every_field_has_a_help_comment():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help"), field.name


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nimage-size: 48\n")
    config = load_config(["--config", str(path), "--lr", "0.02", "--no-augment"])
    assert (config.epochs, config.lr, config.image_size, config.augment) == (7, 0.02, 48, False)


def test_unknown_keys_get_the_closest_name(tmp_path):
    with pytest.raises(FmtlError, match="did you mean --epochs"):
        load_config(["--epoch", "3"])
    path = tmp_path / "c.yaml"
    path.write_text("batch_szie: 3\n")
    with pytest.raises(FmtlError, match="unknown key 'batch_szie'; did you mean batch_size"):
        load_config(["--config", str(path)])


def test_invalid_values_are_rejected():
    with pytest.raises(FmtlError, match="strategy"):
        load_config(["--strategy", "magic"])
    with pytest.raises(FmtlError, match="head-epochs"):
        load_config(["--strategy", "hybrid", "--epochs", "1", "--head-epochs", "1"])
    with pytest.raises(FmtlError, match="not found"):
        load_config(["--config", "/no/such.yaml"])
    with pytest.raises(FmtlError, match=r"^--eval-batch-size must be 0 \(the device's default\) or positive"):
        load_config(["--eval-batch-size", "-1"])
    for mixup in ("-0.1", "11"):
        with pytest.raises(FmtlError, match=r"^--mixup must be between 0 \(off\) and 10"):
            load_config(["--mixup", mixup])


@pytest.mark.parametrize(
    "flag", ["--max-steps", "--max-train-samples", "--max-eval-samples", "--max-val-samples", "--frozen-views"]
)
def test_negative_counts_are_refused_in_one_line(flag):
    with pytest.raises(FmtlError, match=f"^{flag} must be 0"):
        load_config([flag, "-1"])


def test_eval_batch_size_0_is_the_devices_own_and_a_given_size_stays():
    config = load_config(["--epochs", "5"])
    assert config.eval_batch_size == 0  # resolved where the device is known
    on_cpu, on_gpu = with_eval_batch(config, "cpu"), with_eval_batch(config, "cuda")
    assert (on_cpu.eval_batch_size, on_gpu.eval_batch_size) == (64, 256)
    assert on_cpu.given == config.given  # what the user set is kept (the planner reads it)
    given = load_config(["--eval-batch-size", "100"])
    assert with_eval_batch(given, "cpu").eval_batch_size == with_eval_batch(given, "cuda").eval_batch_size == 100
