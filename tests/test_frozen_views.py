"""--frozen-views: fine-tuning on cached outputs of the frozen first blocks, for a few views of each image.

What it must do: the split forward equals the whole one; training never runs the frozen blocks again;
the blocks before the cut stay untouched and those after it train; the views are the same on every build
(so a resumed run is the run that would have happened); the planner prices the cache; and a backbone or
option it cannot work with gets a one-line error (or, from a recipe, is left alone).
"""

from __future__ import annotations

import time

import pytest
import torch
from trainers import make_trainer

from fmtl.errors import ConfigError, ModelConfigError
from fmtl.training import budget, caches
from fmtl.training.budget import SAFETY, Costs, measure_costs, plan_epochs
from fmtl.training.config import TrainConfig, load_config, with_defaults
from fmtl.training.loop import Trainer
from fmtl.training.models import backbone_layout, cached_view_blocks, create_model, feature_blocks
from fmtl.training.plan import Phase
from fmtl.training.prepare import Splits
from fmtl.training.recipe import apply_recipe, few_views
from fmtl.training.recorder import Recorder


def _config(**options) -> TrainConfig:
    defaults = {"image_size": 32, "batch_size": 64, "quiet": True, "save_state": False, "strategy": "finetune",
                "epochs": 1, "unfreeze": "last:3", "frozen_views": 3}  # fmt: skip
    return with_defaults(TrainConfig(**{**defaults, **options}))


def _trainer(run_dir, splits: Splits, **options) -> Trainer:
    cfg = _config(**options)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # as run() does: the new head's initialisation
    return make_trainer(cfg, run_dir, splits)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_split_forward_is_the_whole_forward() -> None:
    model = create_model("efficientnet_lite0", 10).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        for blocks in (1, 6, 8):
            assert torch.allclose(model(model.prefix(x, blocks), from_block=blocks), whole, atol=1e-5)
    assert len(model.backbone.features) == 9  # the cut is undone after each call


def test_training_runs_only_the_blocks_after_the_cached_ones(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path / "run", splits)
    net = trainer.net
    assert trainer.prefix_blocks == len(net.backbone.features) - 3
    phase = Phase("finetune", 1, 1)
    views = trainer.enter(phase, 1).views
    assert views.shape[:2] == (3, len(splits.train))
    plain = net.prefix(trainer.batch(trainer.train_images, torch.arange(8), augment=False), trainer.prefix_blocks)
    # the first view: the images as they are (to float rounding, which oneDNN's kernels differ in by batch and threads)
    assert torch.allclose(views[0, :8], plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())
    assert not torch.allclose(views[1], views[0])  # the others: augmented
    blocks = feature_blocks(net)
    early, late = torch.nn.ModuleList(blocks[:-3]), torch.nn.ModuleList(blocks[-3:])
    early_before, late_before = _snapshot(early), _snapshot(late)
    stem_calls: list[int] = []
    net.backbone.features[0].register_forward_hook(lambda *args: stem_calls.append(1))
    trainer.train_one_epoch(1, phase, trainer.enter(phase, 1))
    assert not stem_calls  # no step ran the frozen blocks
    assert all(torch.equal(early_before[k], v) for k, v in early.state_dict().items())
    assert any(not torch.equal(late_before[k], v) for k, v in late.state_dict().items())


def test_views_are_rebuilt_the_same_and_a_resumed_run_is_the_whole_run(tmp_path, splits, monkeypatch) -> None:
    whole = _trainer(tmp_path / "whole", splits, epochs=2)
    whole.fit(1)
    again = _trainer(tmp_path / "again", splits, epochs=2)
    assert torch.equal(again.enter(Phase("finetune", 1, 2), 1).views, whole.inputs.views)
    # the same run stopped after its first epoch, then resumed in a new Trainer
    first = _trainer(tmp_path / "cut", splits, epochs=2, save_state=True)
    monkeypatch.setattr(Recorder, "should_stop", lambda self, epoch: epoch == 1)
    first.fit(1)
    monkeypatch.undo()
    resumed = _trainer(first.run_dir, splits, epochs=2, save_state=True)  # a new process, the same run
    assert "views" in resumed.recorder.generators  # which view each image shows is part of the saved state
    resumed.fit(resumed.resume())
    expected, got = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_planner_prices_the_views_and_times_the_shorter_step(tmp_path, splits) -> None:
    cfg = _config(budget="60s")
    costs = measure_costs(_trainer(tmp_path, splits, budget="60s"), head_cached=False, n_train=256)
    assert costs.view_image > 0
    counts = {"train": 1000, "val": 100, "test": 100}
    plan = plan_epochs(cfg, costs, counts, available_s=59, budget_s=60)
    assert plan.parts_s["views"] == pytest.approx(3 * 1000 * costs.view_image, abs=0.1)
    off = Costs(costs.finetune_step, costs.head_step, costs.forward_image, costs.save)
    assert "views" not in plan_epochs(_config(budget="60s", frozen_views=0), off, counts, 59, 60).parts_s


def test_passes_without_gradients_are_timed_at_the_eval_batch_size(tmp_path, splits) -> None:
    """Validation, test and caching run in batches of --eval-batch-size, whose cost per image differs from a
    training batch's on a CPU: the warm-up times them at that size (here 48), training steps at --batch-size (16)."""
    options = dict(budget="60s", batch_size=16, eval_batch_size=48, frozen_views=0)  # training steps run the stem
    probe = _trainer(tmp_path, splits, **options)
    model = probe.net
    seen: dict[bool, list[int]] = {True: [], False: []}  # grad enabled -> batch sizes through the stem
    model.backbone.features[0].register_forward_pre_hook(
        lambda module, args: seen[torch.is_grad_enabled()].append(args[0].shape[0])
    )
    measure_costs(probe, head_cached=True, n_train=256)
    assert set(seen[True]) == {16}  # training steps
    assert seen[False].count(48) >= 2  # the feature passes, each timed
    assert set(seen[False]) == {48, 96}  # the forward passes: 48 images and, for flip-TTA, their mirror images


def test_what_frozen_views_cannot_work_with_is_a_one_line_error(tmp_path, splits, monkeypatch) -> None:
    resnet = create_model("resnet18", 10, weights="none")
    with pytest.raises(ModelConfigError, match="features"):
        cached_view_blocks(_config(), resnet)
    with pytest.raises(ModelConfigError, match="last:N"):
        cached_view_blocks(_config(unfreeze="all"), create_model("efficientnet_lite0", 10))
    # a recipe sets it only where the frozen blocks can run apart: not on ResNet (no `features` sequence)
    few, line = apply_recipe(load_config(["--model", "resnet18"]), 100, backbone_layout("resnet18"))
    assert few.frozen_views == 0 and "frozen-views" not in line and cached_view_blocks(few, resnet) == 0
    monkeypatch.setattr(caches, "MAX_VIEW_BYTES", 1000)
    with pytest.raises(ConfigError, match="GiB of activations"):
        _trainer(tmp_path / "big", splits)


def test_few_takes_more_views_the_fewer_the_images() -> None:
    assert [few_views(n) for n in (100, 500, 1000, 1999)] == [16, 8, 4, 4]
    few, line = apply_recipe(load_config([]), 1000)
    assert few.unfreeze == "last:5" and few.frozen_views == 4 and "--frozen-views 4" in line
    assert apply_recipe(load_config(["--frozen-views", "0"]), 1000)[0].frozen_views == 0  # the user's wins


def test_a_re_plan_prices_the_validation_passes_to_come_at_the_measured_one(tmp_path, splits, monkeypatch) -> None:
    calls: list = []
    clock = budget.BudgetController(started=time.perf_counter(), budget_s=60, val_pass_s=0.01)

    def replan(done, pace, left, validations_s):
        calls.append((left, time.perf_counter() - clock.started, validations_s, trainer.val_seconds))
        return 9

    monkeypatch.setattr(budget, "replan_total", replan)
    cfg = _config(epochs=2, frozen_views=0, unfreeze="all")  # 4 steps an epoch
    trainer = make_trainer(cfg, tmp_path, splits, controller=clock)
    import fmtl.training.loop as loop

    validate = loop.validate
    monkeypatch.setattr(loop, "validate", lambda *args: time.sleep(1.0) or validate(*args))
    trainer.fit(1)
    left, elapsed, validations_s, val_seconds = calls[0]
    assert left == pytest.approx(60 * (1 - SAFETY) - elapsed, abs=0.05)
    assert val_seconds >= 1.0  # the pass just timed, not the plan's 0.01 s
    assert validations_s(8) == val_seconds  # ending after epoch 2: its one pass
    assert validations_s(9) == 2 * val_seconds  # a third epoch validates too


def test_before_its_first_validation_a_re_plan_rescales_the_planned_pass_by_the_measured_pace(
    tmp_path, splits, monkeypatch
) -> None:
    calls: list = []
    monkeypatch.setattr(budget, "replan_total", lambda done, pace, left, val_s: calls.append((pace, val_s)) or 8)
    # a warm-up that timed a step at 10 s (a machine busy then) and priced a validation pass at 20 s
    clock = budget.BudgetController(started=time.perf_counter(), budget_s=60, val_pass_s=20.0, planned_step_s=10.0)
    cfg = _config(epochs=2, frozen_views=0, unfreeze="all", eval_every=2)  # epoch 1 does not validate
    trainer = make_trainer(cfg, tmp_path, splits, controller=clock)
    trainer.fit(1)
    pace, validations_s = calls[0]
    assert 0 < pace < 10.0 and validations_s(8) == pytest.approx(20.0 * pace / 10.0)  # epoch 2's one pass
    assert budget.BudgetController(0.0, 60, val_pass_s=20.0).val_pass_at(0.5) == 20.0  # no yardstick: as planned


def test_a_run_that_validates_only_at_its_end_re_plans_too(tmp_path, splits, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(budget, "replan_total", lambda done, pace, left, validations_s: calls.append(done) or 24)
    clock = budget.BudgetController(started=time.perf_counter(), budget_s=60, val_pass_s=2.0)
    cfg = _config(epochs=5, frozen_views=0, unfreeze="all", eval_every=10)
    trainer = make_trainer(cfg, tmp_path, splits, controller=clock)
    trainer.fit(1)
    assert calls == [4, 12, 20]  # after a fifth, half and four fifths of the steps (no validated epoch before the end)
    assert [row.val_acc is not None for row in trainer.recorder.history] == [False] * 5 + [True]
    assert clock.replans[0]["steps"] == 24 and trainer.plan.total_steps == 24
