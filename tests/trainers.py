"""A real Trainer for tests, built as ``run()`` builds one: options resolved once (``settings.resolve``),
with the small recipe (the plain defaults) unless a test asks for another, then the plan given, if any."""

from __future__ import annotations

import dataclasses

from fmtl.training.loop import Trainer
from fmtl.training.prepare import make_accelerator
from fmtl.training.run import plan_for_resume
from fmtl.training.settings import resolve


def make_trainer(cfg, run_dir, splits, controller=None, resume: bool = False) -> Trainer:
    """A Trainer for ``cfg`` on ``splits`` in ``run_dir``; ``resume``: under the run folder's saved plan."""
    accelerator = make_accelerator(cfg, run_dir)
    options = dataclasses.replace(cfg, recipe="small") if cfg.recipe == "auto" else cfg
    settings = resolve(options, len(splits.train), accelerator)
    if resume:
        settings = settings.with_plan(plan_for_resume(settings, run_dir))
    return Trainer(settings, accelerator, run_dir, splits, controller)
