"""The training recipe: the time budget, the from-scratch baseline, and the options the recipe added.

Real small runs on the real Fashion-MNIST (a few thousand images at 28-32 px), each option
checked by what it does, not only by what config.yaml says.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fmtl.errors import ConfigError, FmtlError
from fmtl.train import main as train_main
from fmtl.training.budget import SAFETY, VAL_SHARE, Costs, parse_budget, plan_epochs
from fmtl.training.config import check_head_epochs, load_config, with_defaults
from fmtl.training.export import export_onnx
from fmtl.training.models import create_model
from fmtl.training.recipe import LARGE, apply_recipe

REPO = Path(__file__).resolve().parents[1]
# Random weights: BatchNorm must learn its statistics and the backbone trains at the head's rate.
SCRATCH = ["--no-freeze-bn", "--backbone-lr-scale", "1"]
# The scratch recipe in this process: fp32, as Accelerate's precision is process-wide and other tests set it
SCRATCH_RUN = ["--model", "scratch_cnn", "--weights", "none", "--mixed-precision", "no"]
# One thread: on a CPU that other jobs share, two OpenMP threads measured 5-100x slower per step than one.
SMALL = [
    "--max-train-samples",
    "1000",
    "--max-val-samples",
    "500",
    "--max-test-samples",
    "500",
    "--image-size",
    "32",
    "--threads",
    "1",
    "--quiet",
]


def _options(argv: list[str]):
    """The options as a run plans with them (no recipe: the plain defaults)."""
    return with_defaults(load_config(argv))


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- the budget, without training


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("45", 45)])
def test_budget_durations(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0s", "m10"])
def test_budget_rejects_what_is_not_a_duration(text):
    with pytest.raises(ConfigError):
        parse_budget(text)


def test_budget_lets_the_planner_choose_epochs():
    # Without --budget, hybrid needs head epochs < epochs; with it the planner sets --epochs.
    with pytest.raises(FmtlError):
        _options(["--strategy", "hybrid", "--head-epochs", "5", "--epochs", "3"])
    with pytest.raises(FmtlError, match="head-epochs"):  # the recipe's hybrid, checked once it is picked
        check_head_epochs(apply_recipe(load_config(["--head-epochs", "5", "--epochs", "3"]), 100)[0])
    assert _options(["--head-epochs", "5", "--budget", "10m"]).budget == "10m"
    with pytest.raises(FmtlError, match="duration"):
        _options(["--budget", "soon"])


def _plan(budget: float, strategy: str = "hybrid", head_epochs: int = 2):
    cfg = _options(["--strategy", strategy, "--head-epochs", str(head_epochs), "--budget", f"{budget}s"])
    costs = Costs(finetune_step=0.5, head_step=0.002, forward_image=0.001, save=0.2)
    counts = {"train": 54_000, "val": 6_000, "test": 10_000}
    return plan_epochs(cfg, costs, counts, available_s=budget - 5, budget_s=budget)


def test_plan_fits_epochs_into_the_budget():
    plan = _plan(1200)
    assert plan.plan.head_epochs == 2 and plan.plan.epochs > plan.plan.head_epochs
    assert plan.predicted_s <= 1200
    longer = _plan(2400)
    assert longer.plan.epochs > plan.plan.epochs and longer.predicted_s <= 2400
    assert longer.finetune_epochs > plan.finetune_epochs


def test_plan_times_feature_caching_on_one_view():
    """Caching runs the backbone once per image; mirror-averaged val/test passes cost twice that."""
    cfg = _options(["--budget", "1200s"])
    counts = {"train": 54_000, "val": 6_000, "test": 10_000}
    costs = Costs(finetune_step=0.5, head_step=0.002, forward_image=0.002, save=0.2, feature_image=0.001)
    plan = plan_epochs(cfg, costs, counts, available_s=1195, budget_s=1200)
    assert plan.parts_s["caching"] == pytest.approx(60_000 * 0.001, abs=0.1)
    assert plan.after_s["test"] == pytest.approx(10_000 * 0.002, abs=0.1)  # after the budget, predicted too


def test_plan_predicts_the_temperature_pass_only_when_calibrating():
    """Calibration runs the best model over the validation split once after training: priced when on."""
    counts = {"train": 54_000, "val": 6_000, "test": 10_000}
    costs = Costs(finetune_step=0.5, head_step=0.002, forward_image=0.002, save=0.2)
    on = plan_epochs(_options(["--budget", "1200s"]), costs, counts, available_s=1195, budget_s=1200)
    off = plan_epochs(_options(["--budget", "1200s", "--no-calibrate"]), costs, counts, available_s=1195, budget_s=1200)
    assert on.after_s["calibration"] == pytest.approx(6_000 * 0.002, abs=0.1)
    assert off.after_s["calibration"] == 0
    assert on.plan.epochs == off.plan.epochs  # it follows the budget, like the test pass: training time is unchanged


def test_plan_prices_an_epoch_smaller_than_one_batch_by_its_images():
    """100 images at batch 128: one step of 100 images, priced at 100/128 of a timed 128-image step."""
    cfg = _options(["--strategy", "finetune", "--budget", "100s"])
    costs = Costs(finetune_step=1.0, head_step=0.0, forward_image=0.0, save=0.0)
    plan = plan_epochs(cfg, costs, {"train": 100, "val": 0, "test": 0}, available_s=100, budget_s=100)
    assert plan.plan.epochs == int(100 * (1 - SAFETY) // (100 / 128))  # not 94 epochs of a full step's time


def test_plan_cuts_the_last_fine_tuning_epoch_short_to_fill_the_budget():
    plan = _plan(1200)
    steps = plan.plan.steps_per_epoch
    assert plan.plan.max_steps and (plan.plan.epochs - 1) * steps < plan.plan.max_steps < plan.plan.epochs * steps
    assert plan.finetune_epochs % 1 >= 0.25 and "cut short" in plan.describe()
    step = plan.costs["finetune_step"]
    usable = 1200 * (1 - SAFETY)
    assert usable - 2 * step <= plan.predicted_s <= usable  # filled to within a step or so


def test_plan_validates_fine_tuning_less_often_when_validation_costs_more_than_training():
    counts = {"train": 100, "val": 6_000, "test": 10_000}  # ten images a class, thousands to validate on
    costs = Costs(finetune_step=0.6, head_step=0.002, forward_image=0.002, save=0.1)
    cfg, _ = apply_recipe(load_config(["--budget", "120s"]), counts["train"])  # as a run gets it
    plan = plan_epochs(cfg, costs, counts, available_s=115, budget_s=120)
    epoch = 0.6 * 100 / cfg.batch_size  # an epoch of 100 images, priced by its images at the recipe's batch
    assert (
        plan.plan.eval_every == math.ceil(6_000 * 0.002 / (VAL_SHARE * epoch)) and "validated every" in plan.describe()
    )
    assert plan.predicted_s <= 120 * (1 - SAFETY)
    assert plan.plan.epochs - plan.plan.head_epochs > 20  # validating every epoch, 12 s each, would leave ~6 epochs
    given = plan_epochs(_options(["--budget", "120s", "--eval-every", "1"]), costs, counts, 115, 120)
    assert given.plan.eval_every == 1 and given.plan.epochs - given.plan.head_epochs < 10  # the user's choice stands
    large = _plan(1200)
    assert large.plan.eval_every == 1  # all the data: a val pass is a small share of an epoch


def test_warm_up_times_fewer_steps_where_they_would_eat_a_short_budget(monkeypatch):
    from types import SimpleNamespace

    from fmtl.training import budget
    from fmtl.training.budget import timed

    calls: list[int] = []
    clock = [0.0]  # each step takes 0.021 s of the budget module's clock (a loaded machine's real sleeps overshoot)
    monkeypatch.setattr(budget, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step() -> None:
        calls.append(1)
        clock[0] += 0.021

    assert timed(step) >= 0.02 and len(calls) == 9  # six untimed, three timed
    calls.clear()
    timed(step, max_seconds=0.1)  # four more calls fit: three timed, one more untimed
    assert len(calls) == 5
    calls.clear()
    timed(step, max_seconds=0.03)  # one more call fits: the timed one
    assert len(calls) == 2


def test_re_plan_fits_the_measured_pace_into_what_is_left():
    from fmtl.training.budget import replan_total

    # 100 steps done at 0.5 s each, 50 s left
    assert replan_total(100, 0.5, 50) == 200
    assert replan_total(100, 0.5, -3) == 101  # already late: one more step ends the schedule
    # the validation passes the steps bring are paid from the same seconds: 80 steps and a 10 s pass fit in 50 s
    assert replan_total(100, 0.5, 50, lambda total: 10.0 * (total > 100)) == 180
    assert replan_total(100, 0.5, 50, lambda total: 10.0 * ((total - 100) // 40 + 1)) == 160  # 60 steps, 2 passes


def test_plan_refuses_a_budget_shorter_than_one_epoch():
    with pytest.raises(ConfigError, match="too short"):
        _plan(120)  # ~25 s left for fine-tuning: 46 steps of 422, under the quarter epoch worth training


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_budget_run_ends_within_budget_with_a_completed_schedule(tmp_path):
    budget = 60
    run_dir = tmp_path / "budget"
    command = [sys.executable, "-m", "fmtl.train", *SMALL, "--budget", f"{budget}s", "--head-epochs", "2"]
    started = time.perf_counter()
    result = subprocess.run([*command, "--output", str(run_dir)], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert f"budget {budget}s" in result.stdout
    assert plan["finished_s"] <= budget  # training, on fmtl's own clock from the start of the run
    after = sum(plan["after_s"].values())  # then the test pass and the reports, predicted
    assert plan["total_s"] - plan["finished_s"] <= 2 * after + 5
    assert wall <= plan["total_s"] + 15  # plus the interpreter's start and imports
    rows = _rows(run_dir)
    epochs = (plan["replans"] or [plan])[-1]["epochs"]  # re-planned from the measured pace as fine-tuning ran
    assert len(rows) == epochs > plan["head_epochs"] == 2
    # Each phase's cosine ran to its end: the last step's learning rate is near zero, not cut off mid-way.
    assert float(rows[-1]["lr"]) < 0.05 * 1e-3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["budget"] == f"{budget}s" and saved["max_steps"] is None  # the options, not the plan
    trainer_state = json.loads((run_dir / "state" / "trainer.json").read_text())
    assert trainer_state["plan"]["epochs"] == epochs  # the plan in force, where --resume reads it


@pytest.mark.slow
def test_scratch_baseline_trains_exports_and_passes_parity(tmp_path):
    """The scratch recipe (SGD, flips and shifts, six-view TTA) trains it, and the export holds the six views."""
    run_dir = tmp_path / "scratch"
    assert train_main([*SCRATCH_RUN, "--epochs", "3", *SMALL, "--output", str(run_dir)]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == "scratch" and saved["optimizer"] == "sgd" and saved["strategy"] == "finetune"
    info = json.loads((run_dir / "model.json").read_text())
    assert info["architecture"] == "scratch_cnn" and info["input_spec"]["image_size"] == 32  # SMALL's, not 28
    assert info["flip_tta"] and info["shift_tta"]
    assert info["metrics"]["test"]["accuracy"] > 0.5  # chance is 0.1
    lines: list[str] = []
    onnx_file = export_onnx(run_dir, tmp_path / "scratch.onnx", parity_images=256, echo=lines.append)
    assert onnx_file.is_file() and any("parity" in line for line in lines)


def test_shift_tta_averages_the_mirrors_and_one_pixel_shifts_in_eval_only():
    import torch.nn.functional as F

    model = create_model("scratch_cnn", 10, weights="none").eval()
    x = torch.rand(4, 3, 28, 28)
    model.flip_tta = model.shift_tta = True
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[..., :-2, :-2], padded[..., 2:, 2:]]
    expected = sum(model._logits(v) + model._logits(v.flip(-1)) for v in views) / 6
    torch.testing.assert_close(model(x), expected)
    model.shift_tta = False
    assert not torch.allclose(model(x), expected)
    model.train()
    assert not torch.allclose(model(x), expected)


def test_auto_trains_from_scratch_on_small_images_with_enough_of_them_unless_a_model_is_asked_for():
    from fmtl.training.recipe import SCRATCH_FROM, SCRATCH_SHORT, SCRATCH_SIDE

    cfg, line = apply_recipe(load_config([]), 54_000, image_side=28)
    assert cfg.recipe == "scratch" and cfg.model == "scratch_cnn" and cfg.weights == "none"
    assert cfg.optimizer == "sgd" and cfg.strategy == "finetune" and cfg.shift_tta and cfg.batch_size == 512
    assert not cfg.augment_warp and cfg.image_size == 0
    assert "28 px" in line and "from scratch beats" in line and "--model scratch_cnn" in line
    assert apply_recipe(load_config([]), SCRATCH_FROM - 1, image_side=28)[0].recipe == "small"
    short = load_config(["--budget", f"{SCRATCH_SHORT[1]:.0f}s"])
    assert apply_recipe(short, SCRATCH_SHORT[0], image_side=28)[0].recipe == "scratch"  # 100 a class, 2 min
    assert apply_recipe(short, SCRATCH_SHORT[0] - 1, image_side=28)[0].recipe == "few"
    assert apply_recipe(load_config(["--budget", "3m"]), SCRATCH_SHORT[0], image_side=28)[0].recipe == "few"
    assert apply_recipe(load_config([]), 54_000, image_side=SCRATCH_SIDE + 1)[0].recipe == "large"
    asked, _ = apply_recipe(load_config(["--model", "efficientnet_lite0"]), 54_000, image_side=28)
    assert asked.recipe == "large" and asked.weights == "DEFAULT" and asked.optimizer == "adamw"
    mine, _ = apply_recipe(load_config(["--lr", "0.1", "--batch-size", "64"]), 54_000, image_side=28)
    assert mine.lr == 0.1 and mine.batch_size == 64 and mine.optimizer == "sgd"  # what the user sets wins
    assert apply_recipe(short, 1_000, image_side=28)[0].batch_size == 125  # 8 steps an epoch


def test_scratch_baseline_has_no_pretrained_weights():
    with pytest.raises(FmtlError, match="--weights none"):
        create_model("scratch_cnn", 10)


@pytest.mark.slow
def test_head_cache_trains_the_head_on_unaugmented_features(tmp_path):
    """--head-cache: an augmented run's head epochs see exactly what a --no-augment run's do."""

    def run(name: str, *extra: str) -> list[dict]:
        args = ["--strategy", "linear", "--epochs", "2", "--lr", "0.01", "--no-save-state", *SMALL, *extra]
        assert train_main([*args, "--output", str(tmp_path / name)]) == 0
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["head_cache"] == ("--head-cache" in extra)
        return [{k: r[k] for k in ("train_loss", "val_acc")} for r in _rows(tmp_path / name)]

    cached = run("cached", "--augment", "--head-cache")
    plain = run("plain", "--no-augment", "--no-head-cache")
    augmented = run("augmented", "--augment", "--no-head-cache")
    assert cached == plain
    assert augmented != plain


def test_lbfgs_head_fit_solves_a_softmax_regression_on_raw_features():
    from torch import nn

    from fmtl.training.headfit import fit_linear_head

    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(64, 10, generator=generator)
    features = (torch.randn(3000, 64, generator=generator) * 5 + 3).relu()  # raw, unscaled, like ReLU6 features
    labels = (features @ truth).argmax(1)
    head = nn.Linear(64, 10)
    chosen = fit_linear_head(head, features[:2000], labels[:2000], features[2000:], labels[2000:])
    with torch.no_grad():
        accuracy = (head(features[2000:]).argmax(1) == labels[2000:]).float().mean().item()
    assert accuracy == pytest.approx(chosen["val_acc"], abs=1e-3) and accuracy > 0.9


@pytest.mark.slow
def test_head_fit_solves_the_head_before_its_epochs(tmp_path):
    """--head-fit lbfgs: one head epoch at a learning rate too small to matter already scores like a fitted probe."""

    def val_acc(name: str, mode: str) -> float:
        args = ["--strategy", "linear", "--no-augment", "--epochs", "1", "--lr", "1e-6", "--no-save-state", *SMALL]
        assert train_main([*args, "--head-fit", mode, "--output", str(tmp_path / name)]) == 0
        assert yaml.safe_load((tmp_path / name / "config.yaml").read_text())["head_fit"] == mode
        return float(_rows(tmp_path / name)[0]["val_acc"])

    solved, untrained = val_acc("solved", "lbfgs"), val_acc("untrained", "none")
    assert solved > 0.6 and solved > untrained + 0.3


def test_a_budget_too_short_to_fine_tune_falls_back_to_the_head_alone(monkeypatch, splits):
    from fmtl.training import budget
    from fmtl.training.plan import make_plan
    from fmtl.training.prepare import build_model

    costs = Costs(finetune_step=0.5, head_step=0.002, forward_image=0.001, save=0.2)
    monkeypatch.setattr(budget, "measure_costs", lambda *args, **kwargs: costs)
    counts = {"train": 54_000, "val": 6_000, "test": 10_000}
    cfg = _options(["--budget", "120s"])  # one fine-tuning epoch alone would take ~220 s; a quarter of one ~55 s
    plan = budget.plan_run(cfg, None, counts, time.perf_counter())
    assert plan.plan.strategy == "linear" and plan.note and plan.predicted_s <= 120 and 1 <= plan.plan.epochs <= 50
    # what the run makes of it: every epoch trains the head alone, on a model whose backbone is frozen
    run_plan = make_plan(
        plan.plan.strategy, plan.plan.epochs, plan.plan.head_epochs, 422, plan.plan.max_steps, plan.plan.eval_every
    )
    assert all(phase.frozen for phase in run_plan.phases) and run_plan.epochs == plan.plan.epochs
    scratch = _options(["--model", "scratch_cnn", "--weights", "none", "--strategy", run_plan.strategy])
    model = build_model(scratch, 10)  # the options' strategy, as settings.with_plan makes it the plan's
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ConfigError, match="too short"):  # asked for fine-tuning only: no fallback
        budget.plan_run(_options(["--budget", "60s", "--strategy", "finetune"]), None, counts, time.perf_counter())


# ---------------------------------------------------------------- augmentation and flip test-time augmentation


def test_augment_options_change_the_augmentation():
    from fmtl.training.augment import augment_for

    images = torch.rand(64, 1, 28, 28)
    flipped = images.flip(-1)
    assert augment_for(_options(["--no-augment"]), seed=0) is None
    flips_only = augment_for(_options(["--augment-strength", "0"]), seed=0)(images)
    # strength 0: every image is itself or its mirror image, and both occur
    same = (flips_only - images).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (flips_only - flipped).abs().amax((1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    no_flip = augment_for(_options(["--augment-strength", "0", "--no-flip"]), seed=0)(images)
    torch.testing.assert_close(no_flip, images, atol=1e-5, rtol=0)
    gentle = augment_for(_options(["--augment-strength", "0.5", "--no-flip"]), seed=0)(images)
    strong = augment_for(_options(["--augment-strength", "2", "--no-flip"]), seed=0)(images)
    assert (gentle - images).abs().mean() < (strong - images).abs().mean()
    with pytest.raises(FmtlError, match="augment-strength"):
        _options(["--augment-strength", "-1"])


def test_flip_tta_averages_mirror_logits_in_eval_only():
    model = create_model("scratch_cnn", 10, weights="none").eval()
    x = torch.rand(4, 3, 28, 28)
    plain = model(x)
    model.flip_tta = True
    torch.testing.assert_close(model(x), (plain + model._logits(x.flip(-1))) / 2)
    torch.testing.assert_close(model(x.flip(-1)), model(x))  # mirror-invariant by construction
    model.train()
    assert not torch.allclose(model(x.flip(-1)), model(x))  # training sees each image as it is


@pytest.mark.slow
def test_flip_tta_is_recorded_and_travels_into_the_export(tmp_path):
    """config.yaml and model.json say it; the exported graph is mirror-invariant with it and not without."""
    import numpy as np
    import onnxruntime as ort

    outputs = {}
    for tta in ("--flip-tta", "--no-flip-tta"):
        run = tmp_path / tta
        args = [*SCRATCH_RUN, "--strategy", "finetune", "--image-size", "0"]
        args += [*SCRATCH, "--epochs", "1", *SMALL, "--max-train-samples", "300", "--no-save-state", tta]
        args += ["--no-shift-tta"]  # shifted views are not mirror images of each other
        assert train_main([*args, "--output", str(run)]) == 0
        assert yaml.safe_load((run / "config.yaml").read_text())["flip_tta"] is (tta == "--flip-tta")
        assert json.loads((run / "model.json").read_text())["flip_tta"] is (tta == "--flip-tta")
        onnx_path = export_onnx(run, tmp_path / f"{tta}.onnx", parity_images=64)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        images = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
        name = session.get_inputs()[0].name
        outputs[tta] = (session.run(None, {name: images})[0], session.run(None, {name: images[..., ::-1].copy()})[0])
    with_tta, without = (float(np.abs(a - b).max()) for a, b in (outputs["--flip-tta"], outputs["--no-flip-tta"]))
    assert with_tta < 1e-6 and without > 30 * max(with_tta, 1e-7), (with_tta, without)


# ---------------------------------------------------------------- the recipe by data size


def test_recipe_is_picked_by_training_images_and_what_the_user_sets_wins():
    from fmtl.training.recipe import FEW, FEW_BELOW, LARGE_FROM

    small, line = apply_recipe(load_config([]), LARGE_FROM - 1)
    assert small.recipe == "small" and "recipe small" in line
    assert all(getattr(small, key) == getattr(with_defaults(_options([])), key) for key in LARGE)  # plain defaults
    assert apply_recipe(load_config([]), FEW_BELOW)[0].recipe == "small"
    few, line = apply_recipe(load_config([]), FEW_BELOW - 1)
    assert few.recipe == "few" and few.image_size == FEW["image_size"] == 128 and "--image-size 128" in line
    assert few.backbone_lr_scale == 0.3 and "--backbone-lr-scale 0.3" in line
    assert few.batch_size == 32 and "--batch-size 32" in line
    assert apply_recipe(load_config(["--batch-size", "128"]), 100)[0].batch_size == 128
    assert apply_recipe(load_config(["--image-size", "32"]), 100)[0].image_size == 32
    large, line = apply_recipe(load_config([]), LARGE_FROM)
    assert large.recipe == "large" and all(getattr(large, key) == value for key, value in LARGE.items())
    assert "--unfreeze last:5" in line and "--backbone-lr-scale" in line
    mine, line = apply_recipe(load_config(["--image-size", "64", "--augment-strength", "1"]), 54_000)
    assert mine.image_size == 64 and mine.augment_strength == 1 and mine.unfreeze == LARGE["unfreeze"]
    assert "--image-size" not in line
    forced, _ = apply_recipe(load_config(["--recipe", "large"]), 100)
    assert forced.image_size == LARGE["image_size"]
    scratch, line = apply_recipe(load_config(["--model", "scratch_cnn", "--weights", "none"]), 54_000)
    assert scratch.unfreeze == "all" and "scratch" in line
    with pytest.raises(FmtlError, match="recipe"):
        _options(["--recipe", "huge"])


def test_a_recipe_scales_last_n_to_the_backbone_and_keeps_views_where_blocks_run_apart():
    from fmtl.training.models import BackboneLayout

    lite, line = apply_recipe(load_config([]), 100)  # tuned on Lite0's 9 blocks: as written
    assert lite.unfreeze == "last:5" and lite.frozen_views == 16 and "scaled" not in line
    resnet, line = apply_recipe(load_config(["--model", "resnet18"]), 100)  # 4 stages, no `features` sequence
    assert resnet.unfreeze == "last:2" and resnet.frozen_views == 0 and "scaled to resnet18's 4" in line
    mobilenet, _ = apply_recipe(load_config(["--model", "mobilenet_v2"]), 100)  # 19 blocks in a sequence
    assert mobilenet.unfreeze == "last:11" and mobilenet.frozen_views == 16
    unknown, line = apply_recipe(load_config([]), 100, layout=BackboneLayout(blocks=0, sequential=False))
    assert unknown.unfreeze == "all" and unknown.frozen_views == 0 and "stays all" in line
    mine, line = apply_recipe(load_config(["--model", "resnet18", "--unfreeze", "last:3"]), 100)
    assert mine.unfreeze == "last:3" and "scaled" not in line  # the user's N is the user's


@pytest.mark.slow
def test_forced_recipe_is_applied_and_saved(tmp_path):
    """--recipe large on a small run: config.yaml holds the recipe's values, and the first blocks stay frozen."""
    run = tmp_path / "large"
    args = ["--recipe", "large", "--strategy", "finetune", "--epochs", "1", *SMALL, "--max-train-samples", "300"]
    assert train_main([*args, "--image-size", "32", "--no-save-state", "--output", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "large" and saved["unfreeze"] == "last:5"
    assert saved["augment_strength"] == LARGE["augment_strength"]
    assert saved["image_size"] == 32  # given on the command line: the recipe's 48 does not override it
    from safetensors.torch import load_file

    trained = load_file(str(run / "model.safetensors"))
    pretrained = create_model("efficientnet_lite0", 10).state_dict()
    stem = "backbone.features.0.0.weight"
    last = "backbone.features.8.0.weight"
    assert torch.equal(trained[stem], pretrained[stem])  # frozen by last:5
    assert not torch.equal(trained[last], pretrained[last])


def test_max_val_samples_validates_on_fewer_images_and_tests_on_all_asked(tmp_path):
    run = tmp_path / "run"
    args = ["--max-train-samples", "300", "--max-test-samples", "400", "--max-val-samples", "100"]
    args += ["--image-size", "32", "--threads", "1", "--quiet", "--strategy", "linear", "--epochs", "1"]
    assert train_main([*args, "--no-save-state", "--output", str(run)]) == 0
    assert [int(row["val_images"]) for row in _rows(run)] == [100]
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 400
    assert yaml.safe_load((run / "config.yaml").read_text())["max_val_samples"] == 100
    assert (
        json.loads((run / "model.json").read_text())["data_options"]["max_val_samples"] == 100
    )  # export reloads the same


_BUDGET_STEP = """
import json, sys, time
import torch
import fmtl.training.prepare as prepare
from fmtl.training.config import load_config
from fmtl.training.data import load_dataset, seeded_subset
from fmtl.training.loop import Trainer
from fmtl.training.run import BudgetPlanner
from fmtl.training.settings import resolve

prepare.cpu_has_native_bf16 = lambda: False  # forced, so the check runs the same on every CPU
options = load_config(["--budget", "40s", "--strategy", "finetune", "--optimizer", "sgd", "--mixed-precision", "bf16",
                       "--force-bf16", "--label-smoothing", "0.2", "--gradient-accumulation-steps", "2",
                       "--image-size", "32", "--batch-size", "32", "--quiet", "--recipe", "small"])
test = load_dataset("fashion-mnist", "test")
splits = prepare.Splits(seeded_subset(test, 256, 1), seeded_subset(test, 64, 2), seeded_subset(test, 64, 2), "val")
accelerator = prepare.make_accelerator(options, sys.argv[1])
settings = resolve(options, len(splits.train), accelerator)
seen, step = [], Trainer.train_step

def spy(self, indices, inputs, pixels=None):
    dtypes = []
    hook = self.net.head.register_forward_hook(lambda module, args, out: dtypes.append(str(out.dtype)))
    loss = step(self, indices, inputs, pixels)
    hook.remove()
    seen.append({"optimizer": type(self.optimizer.optimizer).__name__, "head_dtype": dtypes[0],
                 "accumulation": accelerator.gradient_accumulation_steps, "smoothing": self.cfg.label_smoothing,
                 "backbone_trains": any(p.grad is not None for p in self.net.backbone.parameters()) or not self.net.backbone_frozen})
    return loss

Trainer.train_step = spy
plan = BudgetPlanner(time.perf_counter()).first_plan(settings, splits, accelerator)
print(json.dumps({"seen": seen, "models_left": len(accelerator._models), "strategy": plan.strategy}))
"""


def test_the_budget_prices_the_runs_own_step_its_optimizer_precision_and_smoothing(tmp_path):
    """--budget times Trainer.train_step itself, on a throwaway Trainer built from the run's settings: an SGD,
    bf16, label-smoothed, accumulating run is priced from such steps (in a process of its own: Accelerate's
    precision is process-wide), and the throwaway leaves nothing behind in the Accelerator."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _BUDGET_STEP, str(tmp_path)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["seen"] and report["models_left"] == 0 and report["strategy"] == "finetune"
    for step in report["seen"]:
        assert step["optimizer"] == "SGD" and step["head_dtype"] == "torch.bfloat16"
        assert step["accumulation"] == 2 and step["smoothing"] == 0.2 and step["backbone_trains"]
