"""The time budget: ``fmtl train --budget 10m`` measures, plans epochs that end in time, and re-plans.

A short warm-up times a few real steps of each kind the run will take (a fine-tuning step, a head
step, an evaluation forward pass, a checkpoint save) on the run's own model, input size and batch
size. The budget covers training: the warm-up, feature caching, the epochs and their validation
passes; the temperature's validation pass, the test pass and the reports follow it (the plan
predicts them too). The planner fits epochs into what is left after the parts every run pays once and a safety margin, the last
fine-tuning epoch cut short where a whole one would not fit, so the learning-rate schedule ends
completed rather than cut off mid-cosine. As the run goes, ``BudgetController`` returns a new plan
fitted to the measured pace; the training state records the plan in force, so --resume continues it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmtl.errors import ConfigError
from fmtl.training.config import parse_budget
from fmtl.training.headfit import CHOICE_ROWS, MAX_ITERATIONS, WEIGHT_DECAYS
from fmtl.training.plan import Phase, RunPlan, head_on_cached_features, make_plan, steps_per_epoch

SAFETY = 0.06  # share of the budget kept free: a shared machine's pace drifts between re-plans
FIXED_SECONDS = 4.0  # run folder, plots and the summary at the end
MAX_LINEAR_EPOCHS = 50  # a frozen-backbone run on cached features converges long before this
# The last fine-tuning epoch may be cut short (its cosine ends with it); a piece under this share of an
# epoch is not worth its validation pass.
MIN_PARTIAL_EPOCH = 0.25
# Fine-tuning validates every Nth epoch when one pass costs more than this share of an epoch's training
# (a few hundred images against thousands of val images); each phase's last epoch always validates.
VAL_SHARE = 0.1
TIMED_STEPS = 3  # timed steps per kind: their median
WARMUP_CALLS = 6  # untimed calls before them: the allocator and caches warm up over the first few
# Fewer calls, down to one of each, where the first shows they would take more than this share of the
# budget: the run re-plans from its real pace, so the warm-up need not be exact, only short.
TIMING_SHARE = 0.01
# Images per timed step: per-image cost falls with the batch up to about this size, so runs are timed at
# their own batch, up to this, and scaled above it.
PROBE_BATCH = 128
# As these shares of the planned fine-tuning steps have run, and at every validated epoch after the first,
# the run re-plans the rest from its measured pace (a warm-up of a few steps misjudges a whole epoch, and
# a run's pace drifts over its epochs).
REPLAN_AT = (0.2, 0.5, 0.8)


@dataclass
class BudgetController:
    """Re-plans a --budget run from inside its epochs: ``after_epoch`` returns the new plan (or None), and
    the loop decides what to do with it; nothing here writes a file."""

    started: float  # time.perf_counter() when the budget's clock started
    budget_s: float
    val_pass_s: float = 0.0  # the plan's estimate of one validation pass, until the run has timed one
    planned_step_s: float = 0.0  # the warm-up's fine-tuning step, that estimate's yardstick (0: none)
    finetune_s: float = 0.0  # wall seconds of the fine-tuning epochs since the last re-plan, validation excluded
    finetune_steps: int = 0  # and their steps
    replans: list = dataclasses.field(default_factory=list)  # one entry each time it re-planned
    shares_passed: int = 0  # how many of REPLAN_AT the fine-tuning has passed

    def val_pass_at(self, pace: float) -> float:
        """The plan's validation pass, rescaled as the measured fine-tuning ``pace`` rescaled the warm-up's
        step: a warm-up slowed by another job prices both too high."""
        return self.val_pass_s * pace / self.planned_step_s if self.planned_step_s else self.val_pass_s

    def after_epoch(self, plan: RunPlan, epoch: int, train_s: float, last_val_s: float = 0.0) -> RunPlan | None:
        """As each of REPLAN_AT's shares of the fine-tuning steps has run, and at every validated epoch after
        the first share, the plan fitted to the pace measured since the last re-plan; else None.

        ``train_s``: the epoch's training alone (its steps and the last checkpoint save). The validation passes
        still to come are priced at ``last_val_s``, the last fine-tuning pass's measured time (until there is
        one, the plan's estimate rescaled by the pace), so the phase's last epoch, which always validates,
        keeps its pass.
        """
        phase, spe = plan.phase_of(epoch), plan.steps_per_epoch
        if phase.frozen or epoch >= plan.epochs:
            return None
        self.finetune_s += train_s
        self.finetune_steps += spe
        done = (epoch - phase.first_epoch + 1) * spe
        shares = sum(done >= share * (plan.total_steps - (phase.first_epoch - 1) * spe) for share in REPLAN_AT)
        if not shares or (shares <= self.shares_passed and not plan.validates(epoch)):
            return None
        self.shares_passed = max(self.shares_passed, shares)
        pace = self.finetune_s / self.finetune_steps
        self.finetune_s, self.finetune_steps = 0.0, 0
        left = self.budget_s * (1 - SAFETY) - (time.perf_counter() - self.started)
        val_s = last_val_s or self.val_pass_at(pace)
        total = replan_total(epoch * spe, pace, left, lambda total: val_s * plan.validations_after(epoch, total))
        new = plan.with_total_steps(total)
        self.replans.append({"after_epoch": epoch, "seconds_per_step": round(pace, 4), "val_pass_s": round(val_s, 2),
                             "steps_before": plan.total_steps, "steps": total, "epochs": new.epochs})  # fmt: skip
        return new


def replan_total(done_steps: int, seconds_per_step: float, left_s: float, validations_s=lambda total: 0.0) -> int:
    """Total steps for the run: those done, plus the most that fit into the ``left_s`` seconds left with the
    validation passes they bring (``validations_s(total)`` seconds, for a run ending after ``total`` steps);
    at least one more, so the schedule ends."""
    more = max(1, int(left_s // seconds_per_step))
    while more > 1 and more * seconds_per_step + validations_s(done_steps + more) > left_s:
        more -= 1
    return done_steps + more


@dataclass
class Costs:
    """Measured seconds for each kind of work a run does, on this machine, now."""

    finetune_step: float  # one training batch with the backbone training
    head_step: float  # one training batch of a frozen phase (cached features, or augmented images)
    forward_image: float  # one image through the network without gradients (val, test; both views under --flip-tta)
    save: float  # one epoch's checkpoint (model and training state)
    head_fit: float = 0.0  # solving the linear head by L-BFGS on the cached features (--head-fit lbfgs), once
    feature_image: float = 0.0  # one image through the backbone alone, one view (feature caching); 0: forward_image
    view_image: float = 0.0  # --frozen-views: one augmented image through the frozen first blocks (view caching)


@dataclass
class BudgetReport:
    """What the planner decided (``plan``, the run's one ``RunPlan``) and why: the predicted seconds of each
    part and the measured costs; ``plan.json`` as the run goes on."""

    budget_s: float
    plan: RunPlan
    predicted_s: float  # warm-up included, margin excluded
    parts_s: dict
    costs: dict
    after_s: dict = dataclasses.field(default_factory=dict)  # predicted: calibration, the test pass, the reports
    replans: list = dataclasses.field(default_factory=list)  # how the run re-planned itself from its pace
    finished_s: float | None = None  # filled in at the end of training: the budget's clock then
    total_s: float | None = None  # and after the test pass and reports
    note: str = ""  # why the plan differs from what was asked

    @property
    def finetune_epochs(self) -> float:
        """Fine-tuning epochs, the last one's fraction included (e.g. 3.6)."""
        plan = self.plan
        whole = plan.epochs - (plan.head_epochs if plan.strategy == "hybrid" else 0)
        if not plan.max_steps or plan.strategy == "linear":
            return float(whole)
        return whole - 1 + (plan.max_steps - (plan.epochs - 1) * plan.steps_per_epoch) / plan.steps_per_epoch

    def describe(self) -> str:
        plan = self.plan
        finetune = f"{self.finetune_epochs:.3g} fine-tuning epoch(s)"
        if plan.max_steps:
            finetune += f" (the last cut short: {plan.max_steps} steps in all)"
        if plan.eval_every > 1 and plan.strategy != "linear":
            finetune += f", validated every {plan.eval_every} and at the end"
        phases = {
            "linear": f"{plan.epochs} head epoch(s)",
            "finetune": finetune,
            "hybrid": f"{plan.head_epochs} head epoch(s) + {finetune}",
        }[plan.strategy]
        parts = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in self.parts_s.items())
        note = f" [{self.note}]" if self.note else ""
        after = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in self.after_s.items())
        return (
            f"budget {self.budget_s:.0f}s: {phases}, each phase's schedule complete; "
            f"predicted {self.predicted_s:.0f}s ({parts}), then {after}{note}"
        )

    def to_json(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "plan"}
        plan = {**dataclasses.asdict(self.plan), "max_steps": self.plan.max_steps}
        return json.dumps({**plan, **fields}, indent=2) + "\n"


# ---------------------------------------------------------------- measuring


def _synchronized(step):
    """``step``, returning once the GPU work it queued has run: a CUDA call returns when its kernels are
    queued, so an unsynchronized timing measures the launch, not the step."""

    def run() -> None:
        step()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    return run


def timed(step, steps: int = TIMED_STEPS, max_seconds: float = math.inf, warmup: int = WARMUP_CALLS) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` untimed ones (set-up and warming are not throughput);
    fewer of both, at least one of each, where the first call says they would take over ``max_seconds``."""
    step = _synchronized(step)
    started = time.perf_counter()
    step()
    fit = int(min(max_seconds / max(time.perf_counter() - started, 1e-9), 1000))  # calls that fit after the first
    steps = max(1, min(steps, fit))
    for _ in range(max(0, min(warmup - 1, fit - steps))):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def measure_costs(probe, head_cached: bool, n_train: int, budget_s: float = math.inf) -> Costs:
    """Time the run's own steps: ``Trainer.train_step`` of ``probe``, a throwaway Trainer built from the run's
    settings on a few of its images (its optimizer, precision, label smoothing and accumulation, its inputs).

    Steps run on at most ``PROBE_BATCH`` images and are scaled to the run's batch size; on one process each
    kind takes fewer timed calls where they would cost more than ``TIMING_SHARE`` of ``budget_s`` (several
    processes take the same number of calls, so their collectives pair up).
    """
    cfg, accelerator = probe.cfg, probe.accelerator
    limit = TIMING_SHARE * budget_s if accelerator.num_processes == 1 else math.inf
    size = min(cfg.batch_size, PROBE_BATCH, len(probe.train_set))
    scale, batch = cfg.batch_size / size, torch.arange(size)
    # Passes without gradients (validation, test, feature and view caching) run in batches of --eval-batch-size,
    # and on a CPU their cost per image depends on it: timed at a training batch of 32 (few's), a 128 px
    # validation pass in batches of 256 took 1.2 to 2.3 times the estimate and pushed runs to or past their budget.
    eval_batch = torch.arange(min(cfg.eval_batch_size, PROBE_BATCH, len(probe.val_set)))

    def step(inputs) -> None:
        with accelerator.accumulate(probe.model):
            probe.train_step(batch, inputs)

    def timed_step(phase: Phase) -> float:
        inputs = probe.enter(phase, phase.first_epoch)
        probe.train_mode(phase)
        return timed(lambda: step(inputs), max_seconds=limit)

    phases = probe.plan.phases
    finetune = view_image = 0.0
    if cfg.strategy != "linear":
        finetune = timed_step(phases[-1]) * scale
        if probe.prefix_blocks:  # --frozen-views: one augmented image through the frozen first blocks
            with torch.no_grad():
                first = lambda: probe.net.prefix(probe.batch(probe.train_images, eval_batch, True), probe.prefix_blocks)  # noqa: E731
                view_image = timed(first, max_seconds=limit) / len(eval_batch)
    head = timed_step(phases[0]) * (1.0 if head_cached else scale) if phases[0].frozen else 0.0
    net = probe.net.eval()
    with torch.no_grad():
        images = lambda: probe.batch(probe.val_images, eval_batch, False)  # noqa: E731
        forward_image = timed(lambda: probe.model(images()), max_seconds=limit) / len(eval_batch)
        feature_image = (
            timed(lambda: net.features(images()), max_seconds=limit) / len(eval_batch) if head_cached else 0.0
        )
    save = timed(lambda: torch.save(net.state_dict(), io.BytesIO()), steps=1, warmup=1) * 3  # + AdamW's two moments
    fit = 0.0
    if head_cached and cfg.head_fit == "lbfgs" and isinstance(net.head, torch.nn.Linear):
        fit = _lbfgs_cost(n_train, net.head.in_features, net.head.out_features)
    return Costs(finetune, head, forward_image, save, fit, feature_image, view_image)


def _lbfgs_cost(n: int, num_features: int, classes: int) -> float:
    """Upper estimate of fmtl.training.headfit: its loss evaluations times one measured evaluation."""
    x = torch.randn(n, num_features)
    weight = torch.zeros(num_features, classes, requires_grad=True)
    labels = torch.randint(0, classes, (n,))

    def evaluation() -> None:
        F.cross_entropy(x @ weight, labels).backward()

    evaluations = MAX_ITERATIONS * 1.25 * (1 + len(WEIGHT_DECAYS) * min(1.0, CHOICE_ROWS / n))  # ~1.25 per iteration
    return timed(evaluation, steps=1, warmup=1) * evaluations


# ---------------------------------------------------------------- planning


def plan_epochs(
    cfg, costs: Costs, counts: dict[str, int], available_s: float, budget_s: float, num_processes: int = 1
) -> BudgetReport:
    """Epochs that fit ``available_s`` (the budget less what was already spent), phases completed.

    ``counts`` holds the number of train, val and test images. Hybrid keeps ``cfg.head_epochs`` head
    epochs and gives the rest to fine-tuning; linear takes as many head epochs as fit (at most 50).
    Fine-tuning fills what is left with a last epoch cut short (``max_steps``), when that is at least
    ``MIN_PARTIAL_EPOCH`` of an epoch.
    """
    steps = steps_per_epoch(counts["train"], cfg.batch_size, num_processes, cfg.gradient_accumulation_steps)
    forward = costs.forward_image / num_processes
    head_cached = cfg.strategy != "finetune" and head_on_cached_features(cfg)
    val_pass = counts["val"] * forward
    # An epoch's batches are not all full: 100 images at batch 128 are one step of 100, and a step's cost is
    # about proportional to its images, so epochs are priced by their images, not by whole steps.
    batches = counts["train"] / num_processes / cfg.batch_size
    head_epoch = batches * costs.head_step + (0.0 if head_cached else val_pass) + costs.save
    every = _eval_every(cfg, val_pass, batches * costs.finetune_step)
    finetune_epoch = batches * costs.finetune_step + val_pass / every + costs.save
    once = {
        "last validation": val_pass * (1 - 1 / every),  # the fine-tuning phase's end always validates
        "caching": (counts["train"] + counts["val"]) * (costs.feature_image or costs.forward_image) / num_processes
        if head_cached
        else 0.0,
        "head fit": costs.head_fit,
        "views": cfg.frozen_views * counts["train"] * costs.view_image if cfg.strategy != "linear" else 0.0,
    }
    after = {  # once training has ended: the temperature's validation pass, the test pass, the reports
        "calibration": counts["val"] * forward if cfg.calibrate else 0.0,
        "test": counts["test"] * forward,
        "reports": FIXED_SECONDS,
    }
    spare = available_s - budget_s * SAFETY - sum(once.values())
    head_epochs, epochs = _fit(cfg, spare, head_epoch, finetune_epoch)
    partial = 0  # steps of one more, shortened, fine-tuning epoch
    if cfg.strategy != "linear":
        n_head = head_epochs if cfg.strategy == "hybrid" else 0
        left = spare - n_head * head_epoch - (epochs - n_head) * finetune_epoch
        partial = min(steps - 1, int((left - val_pass / every - costs.save) // costs.finetune_step))
        if partial >= MIN_PARTIAL_EPOCH * steps:
            epochs += 1
        else:
            partial = 0
    if epochs < 1 or (cfg.strategy == "hybrid" and epochs <= head_epochs):
        first = head_epoch * max(head_epochs, 1) + (finetune_epoch if cfg.strategy == "hybrid" else 0.0)
        one = first if cfg.strategy != "finetune" else finetune_epoch
        need = (budget_s - available_s) + sum(once.values()) + one
        raise ConfigError(
            f"--budget {budget_s:.0f}s is too short for one {cfg.strategy} epoch of {counts['train']} images here "
            f"(about {one:.0f}s, {need / (1 - SAFETY):.0f}s in all): give a longer --budget, fewer images "
            "(--max-train-samples) or a smaller --image-size"
        )
    n_head = head_epochs if cfg.strategy == "hybrid" else (epochs if cfg.strategy == "linear" else 0)
    short = (steps - partial) * costs.finetune_step if partial else 0.0  # the last epoch's steps not taken
    parts = {
        **({"head": n_head * head_epoch} if n_head else {}),
        **({"finetune": (epochs - n_head) * finetune_epoch - short} if epochs > n_head else {}),
        **{name: seconds for name, seconds in once.items() if seconds},
        "warm-up": budget_s - available_s,
    }
    max_steps = (epochs - 1) * steps + partial if partial else 0
    return BudgetReport(
        budget_s=budget_s,
        plan=make_plan(cfg.strategy, epochs, head_epochs, steps, max_steps, every),
        predicted_s=round(sum(parts.values()), 1),
        parts_s={name: round(seconds, 1) for name, seconds in parts.items()},
        costs={name: round(value, 5) for name, value in dataclasses.asdict(costs).items()},
        after_s={name: round(seconds, 1) for name, seconds in after.items()},
    )


def _eval_every(cfg, val_pass: float, finetune_train: float) -> int:
    """The user's --eval-every if set, else the least N that keeps validation within VAL_SHARE of fine-tuning."""
    if cfg.eval_every is not None:
        return cfg.eval_every
    if cfg.strategy == "linear":
        return 1
    return max(1, math.ceil(val_pass / (VAL_SHARE * finetune_train)))


def _fit(cfg, spare: float, head_epoch: float, finetune_epoch: float) -> tuple[int, int]:
    """(head epochs, total epochs) within ``spare`` seconds."""
    if cfg.strategy == "linear":
        return cfg.head_epochs, min(MAX_LINEAR_EPOCHS, int(spare // head_epoch))
    if cfg.strategy == "finetune":
        return cfg.head_epochs, int(spare // finetune_epoch)
    head_epochs = cfg.head_epochs
    return head_epochs, head_epochs + int(max(0.0, spare - head_epochs * head_epoch) // finetune_epoch)


def plan_run(cfg, probe, counts: dict[str, int], started: float, num_processes: int = 1) -> BudgetReport:
    """Time ``probe``'s steps (a throwaway Trainer, built like the run's) and plan: the report holds the plan.

    ``started`` is the ``time.perf_counter()`` at which the budget's clock started.
    """
    budget_s = parse_budget(cfg.budget)
    head_cached = cfg.strategy != "finetune" and head_on_cached_features(cfg)
    costs = measure_costs(probe, head_cached, counts["train"], budget_s)
    available = budget_s - (time.perf_counter() - started)
    try:
        return plan_epochs(cfg, costs, counts, available, budget_s, num_processes)
    except ConfigError:
        if cfg.strategy != "hybrid" or not head_cached:
            raise
    # Too short for one fine-tuning epoch: the recipe's first half (cached features, solved head) still fits.
    report = plan_epochs(dataclasses.replace(cfg, strategy="linear"), costs, counts, available, budget_s, num_processes)
    report.note = "too short for one fine-tuning epoch here: frozen backbone, head only"
    return report
