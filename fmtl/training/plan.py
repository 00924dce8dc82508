"""The plan of a run: its phases and steps, and the learning-rate schedule laid over them.

Pure values and arithmetic, no torch state: a ``RunPlan`` says which epochs train the head alone and
which fine-tune, how many optimizer steps the run takes (the last epoch may be cut short) and which
epochs validate. A budget run's re-plan makes a new ``RunPlan``; the schedule's factors read the plan
in force at every step, so its cosine ends where the run does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fmtl.errors import FmtlError


@dataclass(frozen=True)
class Phase:
    """One stretch of epochs with the backbone either frozen (feature extraction) or training."""

    name: str  # "linear" or "finetune"
    first_epoch: int  # 1-based, inclusive
    last_epoch: int

    @property
    def frozen(self) -> bool:
        return self.name == "linear"


def plan_phases(strategy: str, epochs: int, head_epochs: int) -> list[Phase]:
    if strategy == "linear":
        return [Phase("linear", 1, epochs)]
    if strategy == "finetune":
        return [Phase("finetune", 1, epochs)]
    return [Phase("linear", 1, head_epochs), Phase("finetune", head_epochs + 1, epochs)]


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, in epochs and optimizer steps (per process)."""

    strategy: str  # linear, finetune or hybrid (a budget too short to fine-tune falls back to linear)
    epochs: int  # the last one may be cut short by total_steps
    head_epochs: int  # hybrid: the head-only epochs first
    steps_per_epoch: int
    total_steps: int  # the run, and its last phase's schedule, end after this many steps
    eval_every: int = 1  # fine-tuning validates every Nth epoch of its phase and at its end

    @property
    def phases(self) -> list[Phase]:
        return plan_phases(self.strategy, self.epochs, self.head_epochs)

    def phase_of(self, epoch: int) -> Phase:
        return next(p for p in self.phases if p.first_epoch <= epoch <= p.last_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps ``epoch`` takes: a whole epoch's, or fewer in an epoch the plan cuts short."""
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)

    def validates(self, epoch: int) -> bool:
        """Head epochs always validate (on cached features that costs little); fine-tuning every
        ``eval_every``-th epoch of its phase and at its end."""
        phase = self.phase_of(epoch)
        if phase.frozen or epoch == phase.last_epoch:
            return True
        return (epoch - phase.first_epoch + 1) % self.eval_every == 0

    def validations_after(self, epoch: int, total: int) -> int:
        """Validation passes the epochs after ``epoch`` would run if the run ended after ``total`` steps."""
        last, first, every = math.ceil(total / self.steps_per_epoch), self.phases[-1].first_epoch, self.eval_every
        if last <= epoch:
            return 0
        return (last - first + 1) // every - (epoch - first + 1) // every + ((last - first + 1) % every != 0)

    def with_total_steps(self, total: int) -> RunPlan:
        """The same plan ending after ``total`` steps, inside the epoch they reach into."""
        return dataclasses.replace(self, epochs=math.ceil(total / self.steps_per_epoch), total_steps=total)

    @property
    def max_steps(self) -> int:
        """``total_steps`` where it cuts the last epoch short, else 0 (every epoch whole)."""
        return 0 if self.total_steps == self.epochs * self.steps_per_epoch else self.total_steps

    def saved(self) -> dict:
        """What the training state records (steps per epoch follow from the data and the batch)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "steps_per_epoch"}


def make_plan(
    strategy: str, epochs: int, head_epochs: int, steps_per_epoch: int, max_steps: int | None = None, eval_every=1
) -> RunPlan:
    """The plan for ``epochs`` epochs of ``steps_per_epoch`` steps, ``max_steps`` (0 or None: off) cutting
    the last one it reaches into short, so phases and schedule end with it."""
    total = epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
        epochs = math.ceil(total / steps_per_epoch)
        if strategy == "hybrid" and epochs <= head_epochs:
            raise FmtlError(
                f"--max-steps {max_steps} ends within the {head_epochs} head epoch(s) "
                f"({steps_per_epoch} steps each): raise it or lower --head-epochs"
            )
    return RunPlan(strategy, epochs, head_epochs, steps_per_epoch, total, eval_every or 1)


def plan_from_config(cfg, steps_per_epoch: int) -> RunPlan:
    """The plan the options ask for (``--epochs``, ``--max-steps``, ``--eval-every``), without a budget."""
    return make_plan(cfg.strategy, cfg.epochs, cfg.head_epochs, steps_per_epoch, cfg.max_steps, cfg.eval_every)


def steps_per_epoch(n_train: int, batch_size: int, processes: int = 1, accumulation: int = 1) -> int:
    """Optimizer steps per process per epoch: Accelerate gives every process the same number of batches."""
    return math.ceil(math.ceil(math.ceil(n_train / batch_size) / processes) / accumulation)


def head_on_cached_features(cfg) -> bool:
    """Whether head-only epochs train on backbone features computed once: with --head-cache, or when there is
    no augmentation to make each epoch's images differ."""
    return cfg.head_cache or not cfg.augment


class Schedule:
    """The learning-rate schedule over the plan in force, in scheduler steps (per process, times the number
    of processes: Accelerate steps a prepared scheduler once per process at each optimizer step)."""

    def __init__(self, plan: RunPlan, processes: int = 1, warmup_fraction: float = 0.05):
        self.plan, self.processes, self.warmup_fraction = plan, processes, warmup_fraction

    def factors(self) -> dict:
        """Factor functions per parameter part: warmup then cosine within each phase; a frozen backbone rests."""
        return {"head": self.head, "backbone": self.backbone}

    def head(self, step: int) -> float:
        return self._within(self._phase_at(step), step)

    def backbone(self, step: int) -> float:
        phase = self._phase_at(step)
        return 0.0 if phase.frozen else self._within(phase, step)

    def _phase_at(self, step: int) -> Phase:
        epoch = step // (self.plan.steps_per_epoch * self.processes) + 1
        return self.plan.phase_of(min(epoch, self.plan.epochs))

    def _within(self, phase: Phase, step: int) -> float:
        per_epoch = self.plan.steps_per_epoch * self.processes
        start = (phase.first_epoch - 1) * per_epoch
        total = min(phase.last_epoch * per_epoch, self.plan.total_steps * self.processes) - start
        warmup = max(1, int(self.warmup_fraction * total))
        local = step - start
        if local < warmup:
            return (local + 1) / warmup
        progress = (local - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
