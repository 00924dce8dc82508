"""Config: defaults, YAML, command line, closest-name errors."""

from __future__ import annotations

import dataclasses

import pytest

from fmtl.errors import FmtlError
from fmtl.training.config import TrainConfig, build_parser, load_config, with_defaults, with_eval_batch


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
    with pytest.raises(FmtlError, match="unknown option --mixup"):  # removed: it lost against no mixing
        load_config(["--mixup", "0.4"])


@pytest.mark.parametrize(
    "flag", ["--max-steps", "--max-train-samples", "--max-test-samples", "--max-val-samples", "--frozen-views"]
)
def test_negative_counts_are_refused_in_one_line(flag):
    with pytest.raises(FmtlError, match=f"^{flag} must be 0"):
        load_config([flag, "-1"])


def test_eval_batch_size_0_is_the_devices_own_and_a_given_size_stays():
    config = load_config(["--epochs", "5"])
    assert config.eval_batch_size == 0  # resolved where the device is known
    on_cpu, on_gpu = with_eval_batch(config, "cpu"), with_eval_batch(config, "cuda")
    assert (on_cpu.eval_batch_size, on_gpu.eval_batch_size) == (64, 256)
    assert on_cpu.epochs == 5 and on_cpu.batch_size is None  # nothing else resolved: unset stays unset
    given = load_config(["--eval-batch-size", "100"])
    assert with_eval_batch(given, "cpu").eval_batch_size == with_eval_batch(given, "cuda").eval_batch_size == 100


def test_unset_options_are_none_until_a_recipe_or_the_plain_defaults_fill_them():
    config = load_config([])
    assert (config.image_size, config.batch_size, config.unfreeze, config.eval_every, config.max_steps) == (None,) * 5
    plain = with_defaults(config)
    assert (plain.image_size, plain.batch_size, plain.unfreeze, plain.frozen_views) == (64, 128, "all", 0)
    assert plain.eval_every is None and plain.max_steps is None  # decided by the plan, not by a default
    assert dataclasses.replace(plain, lr=0.1).batch_size == 128  # an ordinary field: replace() keeps it
    assert with_defaults(load_config(["--batch-size", "16"])).batch_size == 16


def test_help_shows_the_everyday_options_first_and_the_rest_as_advanced():
    text = build_parser().format_help()
    everyday, advanced = text.split("advanced options:")
    for flag in ("--data", "--model", "--budget", "--strategy", "--image-size", "--epochs", "--batch-size", "--lr",
                 "--output", "--resume"):  # fmt: skip
        assert f"  {flag} " in everyday and f"  {flag} " not in advanced, flag
    assert "  --label-smoothing " in advanced and "  --label-smoothing " not in everyday
    assert "--max-eval-samples" not in text  # deprecated: works, but is no longer offered
    assert "--calibrate, --no-calibrate" in advanced and "temperature" in advanced


def test_max_eval_samples_still_works_for_one_release_with_a_notice(capsys, tmp_path):
    config = load_config(["--max-eval-samples", "400", "--max-val-samples", "100"])
    assert (config.max_val_samples, config.max_test_samples) == (100, 400)  # the new name wins where both are set
    assert capsys.readouterr().err.count("--max-eval-samples is deprecated") == 1
    path = tmp_path / "old.yaml"
    path.write_text("max_eval_samples: 300\n")  # a config file written before the rename
    assert TrainConfig(max_eval_samples=50).max_test_samples == 50  # and code that builds a TrainConfig
    assert (
        load_config(["--config", str(path)]).max_test_samples,
        load_config(["--config", str(path)]).max_val_samples,
    ) == (300, 300)


def test_flip_tta_follows_flip_unless_set_and_then_stays_independent():
    from fmtl.training.prepare import build_model

    def tta(*argv: str) -> bool:
        return build_model(
            with_defaults(load_config(["--model", "scratch_cnn", "--weights", "none", *argv])), 10
        ).flip_tta

    assert tta() is True and tta("--no-flip") is False  # unset: on where training flips images
    assert tta("--no-flip", "--flip-tta") is True  # set: --no-flip no longer turns it off
    assert tta("--no-flip-tta") is False


def test_calibrate_is_on_by_default_and_can_be_turned_off():
    assert load_config([]).calibrate is True and load_config(["--no-calibrate"]).calibrate is False
