"""A run's settings, resolved once: ``resolve(options, n_train, accelerator) -> RunSettings``.

The options given, the recipe picked by the data's size (``recipe``), every plain default and the
device's evaluation batch, and the plan the options ask for, worked out in one place at the start of
``run()``. The Trainer, the budget, the caches and the reports read only these; a budget or a resumed
run swaps in its own plan with ``with_plan``, which also makes the options' strategy the plan's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fmtl.training.augment import Augment, augment_for
from fmtl.training.config import TrainConfig, check_head_epochs, with_eval_batch
from fmtl.training.plan import RunPlan, plan_from_config, steps_per_epoch
from fmtl.training.prepare import bf16_is_native, launched_precision
from fmtl.training.recipe import apply_recipe


@dataclass(frozen=True)
class RunSettings:
    """Everything a run was resolved to (frozen: nothing downstream fills a default of its own)."""

    cfg: TrainConfig  # the options with the recipe's values, every plain default and the eval batch filled in
    recipe_line: str  # what the recipe picked, and why
    plan: RunPlan  # the plan in force at the start

    def augment(self, offset: int = 0) -> Augment | None:
        """The run's augmentation with a generator of its own, seeded by --seed + ``offset``."""
        return augment_for(self.cfg, seed=self.cfg.seed + offset)

    def with_plan(self, plan: RunPlan) -> RunSettings:
        """These settings under ``plan`` (a budget's, or a resumed run's): its strategy becomes the options'."""
        return dataclasses.replace(self, plan=plan, cfg=dataclasses.replace(self.cfg, strategy=plan.strategy))


def resolve(options: TrainConfig, n_train: int, accelerator, image_side: int = 0) -> RunSettings:
    """The run's settings from its options, its training images (how many, their larger side) and its
    Accelerator (or the PartialState it will be made from)."""
    cfg, line = apply_recipe(options, n_train, image_side=image_side)
    check_head_epochs(cfg)
    native = launched_precision() is None and bf16_is_native(accelerator.device)
    if cfg.recipe == "scratch" and cfg.mixed_precision is None and native:
        cfg = dataclasses.replace(cfg, mixed_precision="bf16")  # dense convolutions: 2-3x fp32's pace there
        line += " --mixed-precision bf16"
    cfg = with_eval_batch(cfg, accelerator.device.type)
    spe = steps_per_epoch(n_train, cfg.batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps)
    return RunSettings(cfg, line, plan_from_config(cfg, spe))
