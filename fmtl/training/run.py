"""A run, put together: ``run(options)`` loads the splits, resolves the settings once, asks the planner for
the plan (the options', a resumed run's saved one, or ``--budget``'s), trains, calibrates, tests and reports.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed

from fmtl.atomic import atomic_write_text
from fmtl.errors import FmtlError
from fmtl.training import budget, calibrate, reports
from fmtl.training.config import TrainConfig, read_yaml
from fmtl.training.data.imageset import LazyImages
from fmtl.training.loop import Trainer
from fmtl.training.models import check_model_name, parameter_summary
from fmtl.training.prepare import (
    Splits,
    check_trackers,
    load_splits,
    make_accelerator,
    resolve_run_dir,
    several_processes_without_gpu,
)
from fmtl.training.recorder import saved_plan
from fmtl.training.settings import RunSettings, resolve


def check_run_dir(cfg: TrainConfig) -> None:
    """A new run's folder must not hold a finished run (its model.json)."""
    run_dir = resolve_run_dir(cfg) if cfg.model or cfg.output or cfg.resume else None
    if run_dir is not None and not cfg.resume and (run_dir / "model.json").exists():
        raise FmtlError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --output")


PROBE_IMAGES = 128  # the budget's throwaway Trainer is built on this many of the run's train and val images


def run(options: TrainConfig) -> dict | None:
    """Train as configured; returns the test metrics (on the main process)."""
    clock = time.perf_counter()  # --budget counts from here
    if options.model is not None:
        check_model_name(options.model)  # before anything is loaded or written
    check_run_dir(options)
    check_trackers(options.log_with)
    state = PartialState(cpu=several_processes_without_gpu())  # the Accelerator, made once the precision is known
    set_seed(options.seed)
    if options.threads:
        torch.set_num_threads(options.threads)
    with state.local_main_process_first():  # one process a machine builds a folder's store
        splits = load_splits(options)
    settings = resolve(options, len(splits.train), state, image_side=max(splits.train.size))
    run_dir = resolve_run_dir(settings.cfg)
    check_run_dir(settings.cfg)
    accelerator = make_accelerator(settings.cfg, run_dir)
    accelerator.print(settings.recipe_line)
    planner = planner_for(settings, run_dir, clock)
    settings = settings.with_plan(planner.first_plan(settings, splits, accelerator))
    cfg = settings.cfg
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        reports.write_config(run_dir, cfg)
        planner.write(run_dir)
    accelerator.init_trackers("fmtl", config={k: v for k, v in asdict(cfg).items() if v is not None})
    trainer = Trainer(settings, accelerator, run_dir, splits, planner.controller)
    accelerator.print(f"{cfg.model} on {splits.train.source}: {len(splits.train)} train / {len(splits.val)} val / "
                      f"{len(splits.test)} test images, {len(trainer.classes)} classes, {trainer.spec.image_size}px, "
                      f"{settings.plan.strategy}; {parameter_summary(trainer.net)}; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")  # fmt: skip
    started = time.perf_counter()
    trainer.fit(trainer.resume() if cfg.resume else 1)
    seconds = time.perf_counter() - started
    planner.training_ended()
    trainer.restore_best()  # the end of training: the best epoch's weights are back in the model
    # the temperature, from the best model's validation probabilities (flip-TTA included, as exported)
    calibration = calibrate.for_run(lambda: trainer.predict(splits.val), splits.val.labels.numpy(), cfg.calibrate)
    probs = trainer.predict(splits.test)
    metrics = None
    if accelerator.is_main_process:
        outcome = reports.TestOutcome(probs, LazyImages(splits.test), splits.test.labels.numpy(), trainer.classes,
                                      splits.test_name, trainer.best["epoch"], cfg.seed, settings.augment())  # fmt: skip
        metrics = reports.finish(run_dir, outcome, trainer.recorder.rows(), seconds, calibration)
        accelerator.print(
            reports.summary(run_dir, metrics, trainer.classes, trainer.best, len(trainer.recorder.history), seconds)
        )
        planner.finish(run_dir, accelerator)
    accelerator.end_training()
    return metrics


class FixedPlan:
    """The plan the options ask for, or a resumed run's saved one: nothing to measure, re-plan or write."""

    controller = None

    def __init__(self, resume_from=None) -> None:
        self.resume_from = resume_from  # a run folder to go on with

    def first_plan(self, settings: RunSettings, splits: Splits, accelerator: Accelerator):
        if self.resume_from is None:
            return settings.plan
        return plan_for_resume(settings, self.resume_from)

    def training_ended(self) -> None:
        pass

    def write(self, run_dir) -> None:
        pass

    def finish(self, run_dir, accelerator) -> None:
        pass


class BudgetPlanner:
    """--budget: time the run's own steps on a throwaway Trainer, plan the epochs (every process takes the
    main's plan), hand the run a controller that re-plans it, and keep ``plan.json`` on the budget's clock."""

    def __init__(self, clock: float) -> None:
        self.clock, self.report, self.controller = clock, None, None

    def first_plan(self, settings: RunSettings, splits: Splits, accelerator: Accelerator):
        probe = Trainer(_probe_settings(settings), accelerator, None, _probe_splits(splits))
        counts = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
        report = budget.plan_run(settings.cfg, probe, counts, self.clock, accelerator.num_processes)
        del probe
        accelerator.free_memory()  # the throwaway's model, optimizer and loaders leave the Accelerator
        self.report = broadcast_object_list([report])[0]
        accelerator.print(self.report.describe())
        val_pass = len(splits.val) * self.report.costs["forward_image"] / accelerator.num_processes
        self.controller = budget.BudgetController(self.clock, self.report.budget_s, val_pass,
                                                  self.report.costs["finetune_step"])  # fmt: skip
        return self.report.plan

    def training_ended(self) -> None:  # --budget covers training; the test pass and the reports follow it
        self.report.finished_s = round(time.perf_counter() - self.clock, 1)

    def write(self, run_dir) -> None:
        """plan.json: the plan and what it predicted (rewritten by ``finish`` with how it came out)."""
        atomic_write_text(run_dir / "plan.json", self.report.to_json())

    def finish(self, run_dir, accelerator) -> None:
        """plan.json with the re-plans and the budget's clock at the end, and a line saying how it came out."""
        self.report.replans = self.controller.replans
        self.report.total_s = round(time.perf_counter() - self.clock, 1)
        accelerator.print(
            f"budget {self.report.budget_s:.0f}s: training finished at {self.report.finished_s:.0f}s, "
            f"the test pass and reports at {self.report.total_s:.0f}s"
        )
        self.write(run_dir)


def planner_for(settings: RunSettings, run_dir, clock: float):
    if settings.cfg.resume:
        return FixedPlan(run_dir)
    return BudgetPlanner(clock) if settings.cfg.budget else FixedPlan()


def _probe_settings(settings: RunSettings) -> RunSettings:
    """The run's settings for its throwaway: one view to cache, no head to solve, nothing saved or shown."""
    cfg = dataclasses.replace(settings.cfg, frozen_views=min(1, settings.cfg.frozen_views or 0), head_fit="none",
                              save_state=False, quiet=True, workers=0)  # fmt: skip
    return dataclasses.replace(settings, cfg=cfg)


def _probe_splits(splits: Splits) -> Splits:
    def first(data):
        return data.subset(torch.arange(min(PROBE_IMAGES, len(data))))

    return Splits(first(splits.train), first(splits.val), first(splits.test), splits.test_name)


def plan_for_resume(settings: RunSettings, run_dir):
    """A resumed run goes on with the plan its state was saved under (a budget run's re-plans included), unless
    the command line changes its length against its config.yaml (``--resume RUN --epochs 5`` extends it)."""
    cfg, planned = settings.cfg, settings.plan
    saved = read_yaml(run_dir / "config.yaml")
    if (saved.get("epochs"), saved.get("max_steps")) != (cfg.epochs, cfg.max_steps):
        return planned
    return saved_plan(run_dir, planned.steps_per_epoch, planned)
