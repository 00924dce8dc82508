"""What the trainer's options do, tested on a Trainer built around given images (no data loading),
and the schedule's arithmetic as fast unit tests."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import yaml

from fmtl.errors import FmtlError
from fmtl.training import reports
from fmtl.training.config import TrainConfig, load_config
from fmtl.training.loop import Phase, Schedule, Splits, Trainer, lr_factors, make_accelerator, plan_phases
from fmtl.training.models import feature_blocks

# --- the schedule ------------------------------------------------------------------------------


def test_plan_phases_per_strategy() -> None:
    assert plan_phases(TrainConfig(strategy="linear", epochs=4)) == [Phase("linear", 1, 4)]
    assert plan_phases(TrainConfig(strategy="finetune", epochs=4)) == [Phase("finetune", 1, 4)]
    hybrid = plan_phases(TrainConfig(strategy="hybrid", epochs=5, head_epochs=2))
    assert hybrid == [Phase("linear", 1, 2), Phase("finetune", 3, 5)]
    assert [p.frozen for p in hybrid] == [True, False]


def test_lr_factors_warm_up_then_cosine_within_each_phase() -> None:
    cfg = TrainConfig(strategy="hybrid", epochs=3, head_epochs=1, warmup_fraction=0.1)
    steps = 10
    factors = lr_factors(cfg, Schedule(plan_phases(cfg), steps, 3 * steps))
    head, backbone = [factors["head"](s) for s in range(30)], [factors["backbone"](s) for s in range(30)]
    assert head[0] == pytest.approx(1.0)  # warmup of 1 step in the 10-step head phase
    assert head[9] < 0.05  # the head phase's cosine ends near zero...
    assert head[10] == pytest.approx(0.5)  # ...and the fine-tuning phase warms up again (2 steps)
    assert head[11] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(head[11:29], head[12:30], strict=True))  # then only decays
    assert head[29] < 0.01
    assert backbone[:10] == [0.0] * 10  # the backbone rests while frozen
    assert backbone[10:] == head[10:]


# --- what options change, on a real small Trainer ------------------------------------------------


def _config(**options) -> TrainConfig:
    return TrainConfig(**{"image_size": 32, "batch_size": 64, "quiet": True, "save_state": False, "augment": False,
                          **options})  # fmt: skip


def _parts(tmp_path, splits: Splits, **options) -> tuple:
    cfg = _config(**options)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    return make_accelerator(cfg, run_dir), run_dir, splits


def _trainer(tmp_path, splits: Splits, **options) -> Trainer:
    return Trainer(_config(**options), *_parts(tmp_path, splits, **options))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _one_finetune_epoch(trainer: Trainer) -> None:
    trainer.train_one_epoch(1, Phase("finetune", 1, trainer.cfg.epochs))


@pytest.mark.parametrize(("name", "expected"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_option_picks_the_optimizer(tmp_path, splits, name, expected) -> None:
    trainer = _trainer(tmp_path, splits, optimizer=name, strategy="finetune", epochs=1)
    assert type(trainer.optimizer.optimizer) is expected
    if name == "sgd":
        assert (
            trainer.optimizer.optimizer.defaults["nesterov"] and trainer.optimizer.optimizer.defaults["momentum"] == 0.9
        )


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_decides_whether_batchnorm_statistics_move(tmp_path, splits, freeze_bn) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1, freeze_bn=freeze_bn)
    backbone = trainer.net.backbone
    before = _snapshot(backbone)
    _one_finetune_epoch(trainer)
    moved_stats = {k for k in _changed(before, backbone) if k.endswith(("running_mean", "running_var"))}
    moved_weights = {k for k in _changed(before, backbone) if k.endswith("weight")}
    assert moved_weights  # the backbone trains either way
    assert bool(moved_stats) is not freeze_bn


def test_unfreeze_last_n_trains_only_those_blocks(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1, unfreeze="last:2")
    blocks = feature_blocks(trainer.net)
    early, late = torch.nn.ModuleList(blocks[:-2]), torch.nn.ModuleList(blocks[-2:])
    early_before, late_before, head_before = _snapshot(early), _snapshot(late), _snapshot(trainer.net.head)
    _one_finetune_epoch(trainer)
    assert not _changed(early_before, early)  # weights and BatchNorm statistics untouched
    assert any(k.endswith("weight") for k in _changed(late_before, late))
    assert _changed(head_before, trainer.net.head)


def test_mixup_blends_pairs_by_a_reproducible_share_and_weighs_both_labels(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1, mixup=0.4)
    x = torch.randn(16, 3, 8, 8)
    mixed, pair, share = trainer.mix(x)
    assert sorted(pair.tolist()) == list(range(16)) and pair.tolist() != list(range(16))
    assert 0 < share < 1 and torch.allclose(mixed, share * x + (1 - share) * x[pair])
    again = _trainer(tmp_path / "again", splits, strategy="finetune", epochs=1, mixup=0.4)
    assert torch.equal(again.mix(x)[0], mixed)  # drawn from the run's own generator, seeded by --seed
    assert "mixup" in trainer.generators()  # saved with the training state: a resumed run draws on
    # the step's inputs are the mixture, and its loss weighs both labels by the share
    seen: list[torch.Tensor] = []
    trainer.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    trainer.model.eval()  # BatchNorm and dropout deterministic, so the loss can be recomputed
    indices, state = torch.arange(8), trainer.mixup_generator.get_state()
    expected, pair, share = trainer.mix(trainer.batch(trainer.train_images, indices, augment=True))
    labels, smoothing = trainer.train_labels[indices], trainer.cfg.label_smoothing
    with torch.no_grad():
        logits = trainer.model(expected).float()
    weighed = share * F.cross_entropy(logits, labels, label_smoothing=smoothing) + (1 - share) * F.cross_entropy(
        logits, labels[pair], label_smoothing=smoothing
    )
    trainer.mixup_generator.set_state(state)
    seen.clear()
    loss = trainer.train_step(indices, use_cache=False)
    assert torch.allclose(seen[0], expected) and labels[pair].ne(labels).any()
    assert torch.isclose(loss.detach(), weighed, atol=1e-5)


def test_without_mixup_the_inputs_are_the_batch(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1)
    x = torch.randn(4, 3, 8, 8)
    mixed, pair, share = trainer.mix(x)
    assert mixed is x and pair is None and share == 1.0 and "mixup" not in trainer.generators()


def test_max_steps_ends_inside_the_last_epoch_with_the_schedule_complete(tmp_path, splits) -> None:
    # 256 images at batch 64: 4 steps an epoch; 6 steps is one epoch and a half
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=5, max_steps=6)
    assert trainer.cfg.epochs == 2 and trainer.total_steps == 6
    trainer.fit(1)
    assert [row.epoch for row in trainer.history] == [1, 2]
    assert trainer.scheduler.scheduler.last_epoch == 6  # optimizer steps taken: 4 + 2
    assert trainer.scheduler.get_last_lr()[-1] == pytest.approx(0.0)  # the cosine ended with them
    with pytest.raises(FmtlError, match="max-steps"):  # a hybrid run cut short inside its head phase
        _trainer(tmp_path / "hybrid", splits, strategy="hybrid", epochs=3, head_epochs=2, max_steps=7)


def test_eval_every_validates_every_nth_fine_tuning_epoch_and_the_last(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path, splits, strategy="hybrid", epochs=5, head_epochs=1, eval_every=3)
    calls: list[int] = []
    evaluate = trainer.evaluate_val
    trainer.evaluate_val = lambda phase: calls.append(len(trainer.history) + 1) or evaluate(phase)
    trainer.fit(1)
    assert calls == [1, 4, 5]  # the head epoch, the 3rd fine-tuning epoch, the run's last
    assert [row.val_acc is not None for row in trainer.history] == [True, False, False, True, True]
    assert trainer.best["epoch"] in (1, 4, 5)


def test_a_budget_run_re_plans_its_end_once_from_its_measured_pace(tmp_path, splits, monkeypatch) -> None:
    from fmtl.training import budget

    paces: list[float] = []
    monkeypatch.setattr(budget, "replan_total", lambda done, pace, left, validations_s: paces.append(pace) or 9)
    clock = budget.BudgetClock(started=time.perf_counter(), budget_s=60)
    cfg = dict(strategy="finetune", epochs=2)  # 256 images at batch 64: 4 steps an epoch, 8 planned
    trainer = Trainer(_config(**cfg), *_parts(tmp_path, splits, **cfg), clock=clock)
    trainer.fit(1)
    # after epoch 1 (a fifth of the planned steps), then at every later epoch but the last
    assert len(paces) == 2 and all(pace > 0 for pace in paces)
    assert [r["steps_before"] for r in clock.replans] == [8, 9] and clock.replans[-1]["steps"] == 9
    assert [row.epoch for row in trainer.history] == [1, 2, 3]  # 4 + 4 + 1 steps
    assert trainer.scheduler.scheduler.last_epoch == 9
    assert trainer.scheduler.get_last_lr()[-1] == pytest.approx(0.0)  # the moved schedule still completes
    saved = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["max_steps"] == 9


def test_a_resumed_run_continues_the_re_planned_schedule(tmp_path, splits, monkeypatch) -> None:
    from fmtl.training import budget

    monkeypatch.setattr(budget, "replan_total", lambda *args: 9)
    cfg = dict(strategy="finetune", epochs=2, save_state=True)
    first = Trainer(_config(**cfg), *_parts(tmp_path, splits, **cfg), clock=budget.BudgetClock(time.perf_counter(), 60))
    first.fit(1)
    # a new process on the same run folder: config.yaml holds the new end
    saved = load_config(["--resume", str(first.run_dir)])
    resumed = Trainer(saved, make_accelerator(saved, first.run_dir), first.run_dir, splits)
    assert resumed.resume() == 4 and resumed.total_steps == 9 and resumed.cfg.epochs == 3
    assert resumed.schedule.total_steps == 9 and resumed.phases[-1].last_epoch == 3


def test_a_run_stopped_between_a_re_plan_and_its_state_save_resumes_with_the_saved_plan(tmp_path, splits) -> None:
    cfg = dict(strategy="finetune", epochs=2, save_state=True)
    torch.manual_seed(0)  # as run() does: the new head's initialisation
    whole = Trainer(_config(**cfg), *_parts(tmp_path / "whole", splits, **cfg))
    whole.fit(1)
    torch.manual_seed(0)
    first = Trainer(_config(**cfg), *_parts(tmp_path / "cut", splits, **cfg))
    train_one_epoch = first.train_one_epoch

    def stopped_in_epoch_2(epoch, phase):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(epoch, phase)

    first.train_one_epoch = stopped_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        first.fit(1)
    # as a re-plan after epoch 2 would have left it, had the process died before epoch 2's state was saved
    reports.write_config(first.run_dir, replace(first.cfg, epochs=3, max_steps=9))
    saved = load_config(["--resume", str(first.run_dir)])
    resumed = Trainer(saved, make_accelerator(saved, first.run_dir), first.run_dir, splits)
    assert resumed.resume() == 2 and resumed.total_steps == 8 and resumed.cfg.epochs == 2
    assert yaml.safe_load((first.run_dir / "config.yaml").read_text())["epochs"] == 2  # the file says so too
    resumed.fit(2)
    expected, got = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # the run that would have happened


# --- process-wide settings belong to the entry point ---------------------------------------------


def test_allocator_setting_is_made_by_the_entry_point_only(monkeypatch) -> None:
    import inspect

    import fmtl.train as entry
    import fmtl.training.loop as loop

    calls: list[int] = []
    monkeypatch.setattr(entry, "keep_freed_memory", lambda: calls.append(1) or True)
    entry._process_settings(TrainConfig(keep_freed_memory=False))
    assert calls == []
    entry._process_settings(TrainConfig())
    assert calls == [1]
    assert "mallopt" not in inspect.getsource(loop)  # library code (and tests calling main()) never sets it


def test_lr_factors_end_the_cosine_where_max_steps_cuts_the_last_epoch() -> None:
    cfg = TrainConfig(strategy="finetune", epochs=3, warmup_fraction=0.1)
    schedule = Schedule(plan_phases(cfg), 10, 25)
    factors = lr_factors(cfg, schedule)["head"]
    assert factors(24) > 0.0 and factors(25) == pytest.approx(0.0)  # 25 steps: 2.5 epochs, schedule complete
    schedule.total_steps = 30  # moved (a re-plan): the same factors follow
    assert factors(25) > 0.05 and factors(30) == pytest.approx(0.0)
