"""What the trainer's options do, tested on a Trainer built around given images (no data loading),
and the schedule's arithmetic as fast unit tests."""

from __future__ import annotations

import json
import time

import pytest
import torch
from trainers import make_trainer

from fmtl.errors import FmtlError
from fmtl.training import reports
from fmtl.training.config import TrainConfig, load_config
from fmtl.training.loop import Trainer
from fmtl.training.models import feature_blocks
from fmtl.training.plan import Phase, RunPlan, Schedule, make_plan, plan_phases
from fmtl.training.prepare import Splits

# --- the schedule ------------------------------------------------------------------------------


def test_plan_phases_per_strategy() -> None:
    assert plan_phases("linear", 4, 1) == [Phase("linear", 1, 4)]
    assert plan_phases("finetune", 4, 1) == [Phase("finetune", 1, 4)]
    hybrid = plan_phases("hybrid", 5, 2)
    assert hybrid == [Phase("linear", 1, 2), Phase("finetune", 3, 5)]
    assert [p.frozen for p in hybrid] == [True, False]


def test_a_plan_cut_short_by_max_steps_ends_inside_its_last_epoch() -> None:
    plan = make_plan("hybrid", 5, 1, steps_per_epoch=10, max_steps=25)
    assert (plan.epochs, plan.total_steps, plan.max_steps) == (3, 25, 25)
    assert [plan.steps_in(epoch) for epoch in (1, 2, 3)] == [10, 10, 5]
    assert plan.with_total_steps(40) == RunPlan("hybrid", 4, 1, 10, 40) and plan.with_total_steps(40).max_steps == 0
    with pytest.raises(FmtlError, match="ends within the 1 head epoch"):
        make_plan("hybrid", 5, 1, steps_per_epoch=10, max_steps=10)


def test_lr_factors_warm_up_then_cosine_within_each_phase() -> None:
    steps = 10
    factors = Schedule(RunPlan("hybrid", 3, 1, steps, 3 * steps), warmup_fraction=0.1).factors()
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


def _trainer(tmp_path, splits: Splits, controller=None, **options) -> Trainer:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return make_trainer(_config(**options), run_dir, splits, controller)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _one_finetune_epoch(trainer: Trainer) -> None:
    phase = Phase("finetune", 1, trainer.cfg.epochs)
    trainer.train_one_epoch(1, phase, trainer.enter(phase, 1))


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


def test_max_steps_ends_inside_the_last_epoch_with_the_schedule_complete(tmp_path, splits) -> None:
    # 256 images at batch 64: 4 steps an epoch; 6 steps is one epoch and a half
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=5, max_steps=6)
    assert trainer.plan.epochs == 2 and trainer.plan.total_steps == 6
    assert (trainer.cfg.epochs, trainer.cfg.max_steps) == (5, 6)  # the options stay as the user gave them
    trainer.fit(1)
    assert [row.epoch for row in trainer.recorder.history] == [1, 2]
    assert trainer.scheduler.scheduler.last_epoch == 6  # optimizer steps taken: 4 + 2
    assert trainer.scheduler.get_last_lr()[-1] == pytest.approx(0.0)  # the cosine ended with them
    with pytest.raises(FmtlError, match="max-steps"):  # a hybrid run cut short inside its head phase
        _trainer(tmp_path / "hybrid", splits, strategy="hybrid", epochs=3, head_epochs=2, max_steps=7)


def test_eval_every_validates_every_nth_fine_tuning_epoch_and_the_last(tmp_path, splits) -> None:
    trainer = _trainer(tmp_path, splits, strategy="hybrid", epochs=5, head_epochs=1, eval_every=3)
    calls: list[int] = []
    import fmtl.training.loop as loop

    validate = loop.validate
    loop.validate = lambda *args: calls.append(len(trainer.recorder.history) + 1) or validate(*args)
    try:
        trainer.fit(1)
    finally:
        loop.validate = validate
    assert calls == [1, 4, 5]  # the head epoch, the 3rd fine-tuning epoch, the run's last
    assert [row.val_acc is not None for row in trainer.recorder.history] == [True, False, False, True, True]
    validated = [row for row in trainer.recorder.history if row.val_acc is not None]
    best = max(validated, key=lambda row: row.val_acc)  # the first of equals: only a better accuracy moves it
    assert trainer.best == {"val_acc": best.val_acc, "val_top5": best.val_top5, "epoch": best.epoch}


def test_a_budget_run_re_plans_its_end_once_from_its_measured_pace(tmp_path, splits, monkeypatch) -> None:
    from fmtl.training import budget

    paces: list[float] = []
    monkeypatch.setattr(budget, "replan_total", lambda done, pace, left, validations_s: paces.append(pace) or 9)
    controller = budget.BudgetController(started=time.perf_counter(), budget_s=60)
    cfg = dict(strategy="finetune", epochs=2, save_state=True)  # 256 images at batch 64: 4 steps an epoch, 8 planned
    trainer = _trainer(tmp_path, splits, controller=controller, **cfg)
    trainer.fit(1)
    # after epoch 1 (a fifth of the planned steps), then at every later epoch but the last
    assert len(paces) == 2 and all(pace > 0 for pace in paces)
    assert [r["steps_before"] for r in controller.replans] == [8, 9] and controller.replans[-1]["steps"] == 9
    assert [row.epoch for row in trainer.recorder.history] == [1, 2, 3]  # 4 + 4 + 1 steps
    assert trainer.scheduler.scheduler.last_epoch == 9
    assert trainer.scheduler.get_last_lr()[-1] == pytest.approx(0.0)  # the moved schedule still completes
    assert trainer.cfg.epochs == 2 and trainer.cfg.max_steps is None  # the options are not rewritten
    assert not (trainer.run_dir / "config.yaml").exists()  # and no config file is written mid-run
    saved = json.loads((trainer.run_dir / "state" / "trainer.json").read_text())["plan"]
    assert (saved["epochs"], saved["total_steps"]) == (3, 9)  # the state records the plan in force


def test_a_resumed_run_continues_the_re_planned_schedule(tmp_path, splits, monkeypatch) -> None:
    from fmtl.training import budget

    monkeypatch.setattr(budget, "replan_total", lambda *args: 9)
    cfg = dict(strategy="finetune", epochs=2, save_state=True)
    controller = budget.BudgetController(time.perf_counter(), 60)
    first = _trainer(tmp_path, splits, controller=controller, **cfg)
    reports.write_config(first.run_dir, first.cfg)  # as run() does before training
    first.fit(1)
    # a new process on the same run folder: the saved state holds the new end
    saved = load_config(["--resume", str(first.run_dir)])
    resumed = make_trainer(saved, first.run_dir, splits, resume=True)
    assert resumed.resume() == 4 and resumed.plan.total_steps == 9 and resumed.plan.epochs == 3
    assert resumed.schedule.plan.phases[-1].last_epoch == 3
    # the command line changing the epochs wins over the saved plan
    longer = load_config(["--resume", str(first.run_dir), "--epochs", "5"])
    assert make_trainer(longer, first.run_dir, splits, resume=True).plan.total_steps == 20


def test_a_run_stopped_inside_an_epoch_resumes_as_the_whole_run(tmp_path, splits) -> None:
    cfg = dict(strategy="finetune", epochs=2, save_state=True)
    torch.manual_seed(0)  # as run() does: the new head's initialisation
    whole = _trainer(tmp_path / "whole", splits, **cfg)
    whole.fit(1)
    torch.manual_seed(0)
    first = _trainer(tmp_path / "cut", splits, **cfg)
    reports.write_config(first.run_dir, first.cfg)
    train_one_epoch = first.train_one_epoch

    def stopped_in_epoch_2(epoch, phase, inputs):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_one_epoch(epoch, phase, inputs)

    first.train_one_epoch = stopped_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        first.fit(1)
    saved = load_config(["--resume", str(first.run_dir)])
    resumed = make_trainer(saved, first.run_dir, splits, resume=True)
    assert resumed.resume() == 2 and resumed.plan.total_steps == 8
    resumed.fit(2)
    expected, got = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # the run that would have happened


# --- process-wide settings belong to the entry point ---------------------------------------------


def test_allocator_setting_is_made_by_the_entry_point_only(monkeypatch) -> None:
    import fmtl.train as entry

    calls: list[int] = []
    monkeypatch.setattr(entry, "keep_freed_memory", lambda: calls.append(1) or True)
    entry._process_settings(TrainConfig(keep_freed_memory=False))
    assert calls == []
    entry._process_settings(TrainConfig())
    assert calls == [1]


# Resident memory gained by allocating, touching and freeing 256 MiB, in a fresh process after ``setup``:
# glibc hands large blocks back at once unless told to keep them.
_FREED = """
import ctypes, os
import fmtl.training.loop
{setup}
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = resident()
block = libc.malloc(256 << 20)
ctypes.memset(block, 1, 256 << 20)
libc.free(ctypes.c_void_p(block))
print(resident() - before)
"""


def _resident_mib_after_free(setup: str) -> int:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _FREED.format(setup=setup)], capture_output=True, text=True,
                            check=True)  # fmt: skip
    return int(result.stdout)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux and glibc")
def test_keep_freed_memory_keeps_freed_blocks_and_library_code_does_not_set_it() -> None:
    library = _resident_mib_after_free("")  # the training library imported: it changes nothing
    kept = _resident_mib_after_free("import fmtl.train; assert fmtl.train.keep_freed_memory()")
    assert library < 50 and kept > 200  # the freed 256 MiB stay in the process only when the entry point asks


def test_lr_factors_end_the_cosine_where_max_steps_cuts_the_last_epoch() -> None:
    schedule = Schedule(make_plan("finetune", 3, 1, 10, max_steps=25), warmup_fraction=0.1)
    factors = schedule.factors()["head"]
    assert factors(24) > 0.0 and factors(25) == pytest.approx(0.0)  # 25 steps: 2.5 epochs, schedule complete
    schedule.plan = schedule.plan.with_total_steps(30)  # a re-plan: the same factors follow
    assert factors(25) > 0.05 and factors(30) == pytest.approx(0.0)


# --- what the hardware and logging options do -----------------------------------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradient_accumulation_steps_takes_one_optimizer_step_every_n_batches(tmp_path, splits, accumulation) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1, gradient_accumulation_steps=accumulation)
    steps: list[int] = []
    trainer.optimizer.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    head = _snapshot(trainer.net.head)
    _one_finetune_epoch(trainer)  # 256 images at batch 64: 4 batches
    assert len(steps) == trainer.plan.steps_per_epoch == 4 // accumulation
    assert _changed(head, trainer.net.head)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_lays_out_the_weights_and_the_batches(tmp_path, splits, channels_last) -> None:
    trainer = _trainer(tmp_path, splits, strategy="finetune", epochs=1, channels_last=channels_last)
    stem = next(m.weight for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d))  # [32, 3, 3, 3]
    batch = trainer.batch(trainer.train_images, torch.arange(4), augment=True)  # [4, 3, 32, 32]
    assert stem.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert batch.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert stem.is_contiguous() is not channels_last and batch.is_contiguous() is not channels_last


_BF16 = """
import sys, torch
import fmtl.training.prepare as prepare
from fmtl.training.config import TrainConfig
prepare.cpu_has_native_bf16 = lambda: False  # as on a CPU without AVX512-BF16/AMX
accelerator = prepare.make_accelerator(TrainConfig(mixed_precision="bf16", force_bf16=True), sys.argv[1])
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
inside = []  # the layer's output dtype inside the prepared model (Accelerate hands the model's out as fp32)
model[0].register_forward_hook(lambda module, args, out: inside.append(out.dtype))
model = accelerator.prepare(model)
model(torch.randn(2, 4))
print(accelerator.mixed_precision, inside[0])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU bf16 needs no forcing")
def test_force_bf16_runs_bf16_autocast_where_it_would_be_refused(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    import fmtl.training.prepare as prepare

    monkeypatch.setattr(prepare, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(FmtlError, match="no native bf16.*--force-bf16"):
        prepare.check_precision(TrainConfig(mixed_precision="bf16"))
    # forced, in a process of its own (the precision is process-wide in Accelerate): the model runs in bf16
    result = subprocess.run([sys.executable, "-c", _BF16, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.stdout.split() == ["bf16", "torch.bfloat16"], result.stderr[-2000:]


@pytest.mark.slow
def test_log_with_writes_the_trackers_files_or_refuses_a_missing_tracker(tmp_path, capsys) -> None:
    from accelerate.utils import is_tensorboard_available

    from fmtl.train import main as train_main

    run = tmp_path / "run"
    args = ["--strategy", "linear", "--epochs", "2", "--max-train-samples", "200", "--max-val-samples", "100",
            "--max-test-samples", "100", "--image-size", "32", "--threads", "1", "--quiet", "--no-save-state",
            "--log-with", "tensorboard", "--output", str(run)]  # fmt: skip
    if not is_tensorboard_available():
        assert train_main(args) == 2
        assert "tensorboard package is not installed" in capsys.readouterr().err and not run.exists()
        return
    assert train_main(args) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = {path.parent for path in run.rglob("events.out.tfevents.*")}  # the run's, and its config's
    logs = [EventAccumulator(str(folder)).Reload() for folder in folders]
    (scalars,) = [log for log in logs if "val_acc" in log.Tags()["scalars"]]
    assert [event.step for event in scalars.Scalars("val_acc")] == [1, 2]  # one point per epoch
    assert {"train_loss", "lr", "images_per_s"} <= set(scalars.Tags()["scalars"])
