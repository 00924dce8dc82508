"""The transfer-learning loop, driven by Hugging Face Accelerate.

    accelerate launch fmtl/train.py --model efficientnet_lite0 --data fashion-mnist
    python -m fmtl.train [OPTIONS]          # the same, one process
    fmtl train [OPTIONS]                    # the same, through the CLI

Data stays uint8 at its source size; the loaders hand out index batches (sharded by
``accelerator.prepare``) and each batch is preprocessed and augmented on the device. A
frozen backbone without augmentation has its features computed once; every epoch after
that trains the head alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fmtl.atomic import atomic_write_text, write_errors
from fmtl.errors import ERROR_PREFIX, EXIT_USER_ERROR, ConfigError, DivergenceError, FmtlError, MissingSplitError
from fmtl.spec import DataOptions, InputSpec, RunInfo
from fmtl.training import budget, reports
from fmtl.training.augment import Preprocess, augment_for
from fmtl.training.budget import BudgetClock
from fmtl.training.checkpoint import MODEL_WEIGHTS, load_training_state, save_model, save_training_state
from fmtl.training.config import TrainConfig, load_config, read_yaml, with_eval_batch
from fmtl.training.data import ImageSet, load_run_split, seeded_subset
from fmtl.training.headfit import fit_linear_head
from fmtl.training.metrics import topk_correct
from fmtl.training.models import (
    FmtlModel,
    apply_freeze,
    cached_view_blocks,
    check_model_name,
    create_model,
    parameter_groups,
    parameter_summary,
)
from fmtl.training.recipe import apply_recipe


@dataclass
class Phase:
    """One stretch of epochs with the backbone either frozen (feature extraction) or training."""

    name: str  # "linear" or "finetune"
    first_epoch: int  # 1-based, inclusive
    last_epoch: int

    @property
    def frozen(self) -> bool:
        return self.name == "linear"


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    if cfg.strategy == "linear":
        return [Phase("linear", 1, cfg.epochs)]
    if cfg.strategy == "finetune":
        return [Phase("finetune", 1, cfg.epochs)]
    return [Phase("linear", 1, cfg.head_epochs), Phase("finetune", cfg.head_epochs + 1, cfg.epochs)]


def phase_of(phases: list[Phase], epoch: int) -> Phase:
    return next(p for p in phases if p.first_epoch <= epoch <= p.last_epoch)


VAL_KEYS = ("loss", "acc", "top5", "count")
MAX_VIEW_BYTES = 8 * 2**30  # --frozen-views: the most activation memory its cache may hold


@dataclass
class EpochRow:
    """One epoch's record: a row of results.csv, a point of the curves, an entry of the saved state.

    The val fields are None for an epoch that did not validate (``--eval-every``)."""

    epoch: int
    phase: str
    train_loss: float
    val_loss: float | None
    val_acc: float | None
    val_top5: float | None
    val_images: int | None
    lr: float
    seconds: float
    images_per_s: float


@dataclass
class Splits:
    """The data one run trains, validates and tests on (a Trainer is built around these)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    test_name: str  # "test", or the stand-in's name when the data has no test split


# ---------------------------------------------------------------- set-up


def check_precision(cfg: TrainConfig) -> None:
    """bf16 on a CPU without native support is emulated (~0.3 GFLOP/s against 140 in fp32 on one machine here)."""
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if torch.cuda.is_available() or precision == "no":
        return
    if precision == "fp16":
        raise FmtlError("--mixed-precision fp16 needs a GPU; on a CPU use no (or bf16 where the CPU supports it)")
    if not cpu_has_native_bf16() and not cfg.force_bf16:
        raise FmtlError(
            "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated and far slower than fp32; "
            "use --mixed-precision no, or --force-bf16 to insist"
        )


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    # A hybrid run's backbone gets no gradients in its head-only epochs: DDP must expect that.
    check_precision(cfg)  # before Accelerate fixes the process-wide precision
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.strategy == "hybrid")
    accelerator = Accelerator(
        cpu=several_processes_without_gpu(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with,
        project_dir=str(run_dir),
        kwargs_handlers=[ddp],
    )
    return accelerator


def several_processes_without_gpu() -> bool:
    """Launched as several processes on a machine with no GPU (launch/cpu-multiprocess.yaml).

    Accelerate only picks its gloo MULTI_CPU mode when told the run is on the CPU; without
    this each process would train alone, unaware of the others.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        return Path(cfg.resume)
    if cfg.output:
        return Path(cfg.output)
    data_name = Path(cfg.data).stem if cfg.data != "fashion-mnist" else "fashion-mnist"
    return Path("runs") / f"{cfg.model}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def data_options(cfg: TrainConfig) -> DataOptions:
    """How this run's splits are made: recorded in model.json, so export and evaluate reload the same images."""
    return DataOptions(
        source=cfg.data, test_source=cfg.test_data, data_dir=cfg.data_dir, val_fraction=cfg.val_fraction,
        seed=cfg.seed, source_size=cfg.source_size, max_eval_samples=cfg.max_eval_samples,
        max_val_samples=cfg.max_val_samples,
    )  # fmt: skip


def load_splits(cfg: TrainConfig) -> Splits:
    """Train (optionally subset), val and test sets; the val split stands in when there is no test split."""
    options = data_options(cfg)
    train = seeded_subset(load_run_split(options, "train"), cfg.max_train_samples, cfg.seed)
    val = load_run_split(options, "val")
    try:
        test, test_name = load_run_split(options, "test"), "test"
    except MissingSplitError:
        test, test_name = val, "val (the data has no test split)"
    if len(val) == 0:
        raise FmtlError("the validation split is empty: raise --val-fraction or add more images")
    if test.classes != train.classes or test.size != train.size or test.channels != train.channels:
        raise FmtlError(f"the test data ({test.source}) does not match the training data's classes, size or channels")
    return Splits(train, val, test, test_name)


def input_spec(model: FmtlModel, data: ImageSet, cfg: TrainConfig) -> InputSpec:
    defaults = model.input_defaults
    return InputSpec(
        channels=data.channels,
        source_size=data.size,
        image_size=cfg.image_size or defaults.image_size,
        mean=defaults.mean,
        std=defaults.std,
        interpolation=defaults.interpolation,
    )


def build_model(cfg: TrainConfig, num_classes: int) -> FmtlModel:
    model = create_model(cfg.model, num_classes, weights=cfg.weights, head=cfg.head)
    if cfg.strategy == "linear":
        apply_freeze(model, "frozen")
    else:
        apply_freeze(model, cfg.unfreeze)
    model.flip_tta = cfg.flip_tta and cfg.flip
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def index_loader(n: int, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of indices into the uint8 image tensor (no per-sample Python beyond the sampler)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(range(n), batch_size=batch_size, shuffle=shuffle, generator=generator)


@dataclass
class Schedule:
    """Where the learning-rate schedule's phases lie, in scheduler steps. A --budget run moves its end each
    time it re-plans from its measured pace; the factors read it at every step."""

    phases: list[Phase]
    steps_per_epoch: int
    total_steps: int  # the last phase, and its cosine, ends here (inside its last epoch under --max-steps)


def lr_factors(cfg: TrainConfig, schedule: Schedule) -> dict:
    """Schedule factors per part: warmup then cosine within each phase; a backbone rests (0) while frozen."""

    def within(phase: Phase, step: int) -> float:
        start = (phase.first_epoch - 1) * schedule.steps_per_epoch
        total = min(phase.last_epoch * schedule.steps_per_epoch, schedule.total_steps) - start
        warmup = max(1, int(cfg.warmup_fraction * total))
        local = step - start
        if local < warmup:
            return (local + 1) / warmup
        progress = (local - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def phase_at(step: int) -> Phase:
        last = schedule.phases[-1].last_epoch
        return phase_of(schedule.phases, min(step // schedule.steps_per_epoch + 1, last))

    def head(step: int) -> float:
        return within(phase_at(step), step)

    def backbone(step: int) -> float:
        return 0.0 if phase_at(step).frozen else within(phase_at(step), step)

    return {"head": head, "backbone": backbone}


def make_optimizer(cfg: TrainConfig, model: FmtlModel, schedule: Schedule):
    """One optimizer and one scheduler for the whole run (all phases), so a resumed state always fits.

    ``schedule`` counts the scheduler's steps: Accelerate steps a prepared scheduler once per process at
    each optimizer step (it lays schedules out as if one process took every batch).
    """
    groups = parameter_groups(model, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    factors = lr_factors(cfg, schedule)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [factors[g["part"]] for g in groups])


# ---------------------------------------------------------------- the loop


class Trainer:
    """Holds what one run needs; ``fit`` is the epoch loop, the rest are its steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        run_dir: Path,
        splits: Splits,
        clock: BudgetClock | None = None,
    ):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.clock = clock  # --budget: the run re-plans itself from its measured pace
        self.train_set, self.val_set, self.test_set, self.test_name = (
            splits.train,
            splits.val,
            splits.test,
            splits.test_name,
        )
        self.classes = self.train_set.classes
        train_loader = index_loader(len(self.train_set), cfg.batch_size, shuffle=True, seed=cfg.seed)
        # Optimizer steps per process per epoch (Accelerate gives every process the same number of batches).
        self.steps_per_epoch = math.ceil(
            math.ceil(len(train_loader) / accelerator.num_processes) / cfg.gradient_accumulation_steps
        )
        self.cfg = cfg = with_eval_batch(self.cut_short(cfg), accelerator.device.type)
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        model = build_model(cfg, len(self.classes))
        self.spec = input_spec(model, self.train_set, cfg)
        self.phases = plan_phases(cfg)
        device = accelerator.device
        self.preprocess = Preprocess(self.spec).to(device)
        self.augment = augment_for(cfg, seed=cfg.seed + accelerator.process_index)
        self.train_images = self._on_device(self.train_set.images)
        self.train_labels = self.train_set.labels.to(device)
        self.val_images = self._on_device(self.val_set.images)
        self.shuffle_generator = train_loader.generator  # the sampler's, drawn from each epoch: part of the state
        val_loader = index_loader(len(self.val_set), cfg.eval_batch_size, shuffle=False, seed=0)
        processes = accelerator.num_processes
        self.schedule = Schedule(self.phases, self.steps_per_epoch * processes, self.total_steps * processes)
        optimizer, scheduler = make_optimizer(cfg, model, self.schedule)
        self.model, self.optimizer, self.train_loader, self.val_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        # Clip only what the optimizer updates: walking a frozen backbone every step is wasted time.
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.history: list[EpochRow] = []
        self.val_seconds = 0.0  # the last fine-tuning validation pass
        self.epoch_mark = time.perf_counter()  # when the last epoch (or the views' caching) ended
        self.best = {"val_acc": -1.0, "epoch": 0}
        self.cached: dict | None = None  # backbone features, when a frozen phase has no augmentation
        # --frozen-views: the frozen first blocks' outputs for a few views of each training image ([V, N, ...])
        self.prefix_blocks = cached_view_blocks(cfg, self.net)
        self.views: torch.Tensor | None = None
        self.view_generator = torch.Generator().manual_seed(cfg.seed)  # which view each image shows, per epoch
        self.mixup_generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)  # --mixup's pairs
        if self.prefix_blocks:
            self.check_views_fit()

    def check_views_fit(self) -> None:
        """--frozen-views: refuse, before training, a cache that would not fit in MAX_VIEW_BYTES."""
        one = self.batch(self.train_images, torch.arange(1), augment=False)
        with torch.no_grad():
            per_view = self.net.eval().prefix(one, self.prefix_blocks).numel() * 4 * len(self.train_set)
        need = per_view * self.cfg.frozen_views
        if need > MAX_VIEW_BYTES:
            raise ConfigError(
                f"--frozen-views {self.cfg.frozen_views} on {len(self.train_set):,} images would hold "
                f"{need / 2**30:.1f} GiB of activations (at most {MAX_VIEW_BYTES / 2**30:.0f}): fewer views, "
                "fewer images or a smaller --image-size, or --frozen-views 0"
            )

    def cut_short(self, cfg: TrainConfig) -> TrainConfig:
        """--max-steps: the epochs it reaches into, the last one cut short (so phases and schedule end with it)."""
        if not cfg.max_steps:
            return cfg
        epochs = min(cfg.epochs, math.ceil(cfg.max_steps / self.steps_per_epoch))
        if cfg.strategy == "hybrid" and epochs <= cfg.head_epochs:
            raise FmtlError(
                f"--max-steps {cfg.max_steps} ends within the {cfg.head_epochs} head epoch(s) "
                f"({self.steps_per_epoch} steps each): raise it or lower --head-epochs"
            )
        return replace(cfg, epochs=epochs)

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        # A few hundred MB of uint8 is cheap to keep on a GPU; a huge folder dataset stays in host memory.
        return images.to(self.accelerator.device) if images.nbytes < 2**31 else images

    def generators(self) -> dict[str, torch.Generator]:
        """fmtl's own random generators, saved and restored with the training state."""
        mine = {"shuffle": self.shuffle_generator}
        if self.prefix_blocks:
            mine["views"] = self.view_generator
        if self.cfg.mixup:
            mine["mixup"] = self.mixup_generator
        return {**mine, "augment": self.augment.generator} if self.augment is not None else mine

    @property
    def net(self) -> FmtlModel:
        return self.accelerator.unwrap_model(self.model)

    def batch(self, images: torch.Tensor, indices: torch.Tensor, augment: bool) -> torch.Tensor:
        x = images[indices.to(images.device)].to(self.accelerator.device, non_blocking=True)
        x = self.preprocess(x, self.augment if augment else None)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def fit(self, start_epoch: int) -> None:
        epoch, self.epoch_mark = start_epoch - 1, time.perf_counter()
        while epoch < self.cfg.epochs:  # a re-plan may move the end
            epoch += 1
            phase = phase_of(self.phases, epoch)
            if self.prefix_blocks and not phase.frozen and self.views is None:
                started = time.perf_counter()
                self.views = self.cache_views()  # once, outside the epoch's time: it is not the pace of a step
                self.accelerator.print(
                    f"cached {self.cfg.frozen_views} view(s) of {len(self.train_set):,} images through the first "
                    f"{self.prefix_blocks} blocks in {time.perf_counter() - started:.1f}s "
                    f"({self.views.nbytes / 2**20:,.0f} MiB)"
                )
                self.epoch_mark = time.perf_counter()
            started = time.perf_counter()
            train_loss, seen = self.train_one_epoch(epoch, phase)
            self.check_weights(epoch)
            val, val_s = dict.fromkeys(VAL_KEYS), 0.0
            if self.validates(epoch, phase):
                val_started = time.perf_counter()
                val = self.evaluate_val(phase)
                val_s = time.perf_counter() - val_started
                if not phase.frozen:  # a head epoch's pass runs on cached features: not what fine-tuning pays
                    self.val_seconds = val_s
            seconds = time.perf_counter() - started
            row = EpochRow(
                epoch, phase.name, train_loss, val["loss"], val["acc"], val["top5"], val["count"],
                lr=self.scheduler.get_last_lr()[-1], seconds=round(seconds, 2), images_per_s=round(seen / seconds, 1),
            )  # fmt: skip
            # the pace of training alone: this epoch's steps and the last epoch's save, not its validation
            self.maybe_replan(epoch, phase, time.perf_counter() - self.epoch_mark - val_s)
            self.end_epoch(row)
            self.epoch_mark = time.perf_counter()
            if self.should_stop(epoch):
                self.accelerator.print(f"early stop: no better val accuracy for {self.cfg.patience} epochs")
                break

    def maybe_replan(self, epoch: int, phase: Phase, train_s: float) -> None:
        """--budget: as each of REPLAN_AT's shares of the fine-tuning steps has run, and at every validated
        epoch after the first share, fit the rest to the pace measured since the last re-plan.

        The pace is of training alone (``train_s``: the epoch's steps and a checkpoint save); the validation
        passes the rest would bring are priced at the last one's measured time (until fine-tuning has
        validated once, the plan's estimate, rescaled as the measured pace rescaled the warm-up's step), so
        the phase's last epoch, which always validates, has its pass, and a run that validates only at its
        end re-plans too (a 100-image run here had otherwise ended at 88 s of 120). The schedule's end moves
        (its cosine stretches or shrinks from here on); config.yaml gets the new end before the epoch's state
        is saved, and the state records the plan it was saved under, so --resume continues the plan its
        weights were trained under, even when the run stopped between the two (a resumed run does not
        re-plan again). A run's pace drifts: on the 2-core machine here its first fine-tuning epoch of all
        the data took 171 s, its fourth 134 s."""
        clock, spe = self.clock, self.steps_per_epoch
        if clock is None or phase.frozen or epoch >= self.cfg.epochs:
            return
        clock.finetune_s += train_s
        clock.finetune_steps += spe
        done = (epoch - phase.first_epoch + 1) * spe
        shares = sum(done >= share * (self.total_steps - (phase.first_epoch - 1) * spe) for share in budget.REPLAN_AT)
        if not shares or (shares <= clock.shares_passed and not self.validates(epoch, phase)):
            return
        clock.shares_passed = max(clock.shares_passed, shares)
        pace = clock.finetune_s / clock.finetune_steps
        clock.finetune_s, clock.finetune_steps = 0.0, 0
        left = clock.budget_s * (1 - budget.SAFETY) - (time.perf_counter() - clock.started)
        val_s = self.val_seconds or clock.val_pass_at(pace)
        total = budget.replan_total(epoch * spe, pace, left, lambda total: val_s * self.validations_after(epoch, total))
        total = broadcast_object_list([total])[0]  # every process takes the main's
        before = self.total_steps
        self.set_total_steps(total)
        clock.replans.append({"after_epoch": epoch, "seconds_per_step": round(pace, 4), "steps_before": before,
                              "steps": total, "epochs": self.cfg.epochs})  # fmt: skip
        self.accelerator.print(
            f"re-planned after epoch {epoch} at {pace:.3f}s a fine-tuning step, {val_s:.1f}s a validation pass: "
            f"{total} steps in all, was {before}; {self.cfg.epochs} epochs"
        )
        if self.accelerator.is_main_process:
            reports.write_config(self.run_dir, self.cfg)

    def validations_after(self, epoch: int, total: int) -> int:
        """Validation passes the epochs after ``epoch`` would run if fine-tuning ended after ``total`` steps."""
        last, first, every = math.ceil(total / self.steps_per_epoch), self.phases[-1].first_epoch, self.cfg.eval_every
        if last <= epoch:
            return 0
        return (last - first + 1) // every - (epoch - first + 1) // every + ((last - first + 1) % every != 0)

    def set_total_steps(self, total: int) -> None:
        """End the run, and its last phase's schedule, after ``total`` optimizer steps (per process)."""
        epochs = math.ceil(total / self.steps_per_epoch)
        max_steps = 0 if total == epochs * self.steps_per_epoch else total
        self.cfg = replace(self.cfg, epochs=epochs, max_steps=max_steps)
        self.total_steps = total
        self.phases[:] = plan_phases(self.cfg)  # the schedule's own list: its factors see the new phases
        self.schedule.total_steps = total * self.accelerator.num_processes

    def validates(self, epoch: int, phase: Phase) -> bool:
        """--eval-every N: fine-tuning validates every Nth epoch of its phase and at its end; head epochs always
        (on cached features that costs little). With a few hundred images, a validation pass can cost more
        than the epoch it checks."""
        if phase.frozen or epoch == phase.last_epoch:
            return True
        return (epoch - phase.first_epoch + 1) % self.cfg.eval_every == 0

    def train_one_epoch(self, epoch: int, phase: Phase) -> tuple[float, int]:
        net, accelerator = self.net, self.accelerator
        net.backbone_frozen = phase.frozen
        self.model.train()
        if phase.frozen:
            net.backbone.eval()  # feature extraction: BatchNorm statistics must not move
        elif self.cfg.freeze_bn:
            # Keras' transfer-learning advice: keep BatchNorm in inference mode while fine-tuning. Batch
            # statistics of a new domain would shift every feature the head was trained on.
            for module in net.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        # --head-cache: head-only epochs learn from un-augmented features computed once (augmenting is for fine-tuning)
        use_cache = phase.frozen and (self.augment is None or self.cfg.head_cache)
        if use_cache and self.cached is None:
            self.cached = self.extract_features()
            if epoch == phase.first_epoch:
                self.fit_head()
        self.train_loader.set_epoch(epoch)
        total_loss, seen = torch.zeros((), device=accelerator.device), 0
        # --max-steps may end the last epoch early: its batches, not the loader's
        batches = min(
            len(self.train_loader),
            (self.total_steps - (epoch - 1) * self.steps_per_epoch) * self.cfg.gradient_accumulation_steps,
        )
        bar = tqdm(self.train_loader, total=batches, desc=f"epoch {epoch}/{self.cfg.epochs} {phase.name}",
                   leave=False, disable=self.cfg.quiet or not accelerator.is_local_main_process)  # fmt: skip
        started = time.perf_counter()
        for step, indices in enumerate(bar, 1):
            with accelerator.accumulate(self.model):
                loss = self.train_step(indices, use_cache, use_views=not phase.frozen and self.views is not None)
            self.check_loss(loss, epoch, step)
            total_loss += loss.detach() * len(indices)
            seen += len(indices)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - started):.0f}")
            if step >= batches:
                break
        total = accelerator.reduce(torch.stack([total_loss, torch.tensor(float(seen), device=total_loss.device)]))
        return (total[0] / total[1]).item(), int(total[1].item())

    def fit_head(self) -> None:
        """--head-fit lbfgs: solve the linear head on the cached features before its epochs (``headfit``)."""
        if self.cfg.head_fit != "lbfgs" or not isinstance(self.net.head, torch.nn.Linear):
            return
        train, val = self.cached["train"], self.cached["val"]
        chosen = fit_linear_head(self.net.head, train, self.train_set.labels, val, self.val_set.labels)
        self.accelerator.print(
            f"head solved by L-BFGS on cached features: val acc {chosen['val_acc']:.4f} "
            f"(weight decay {chosen['weight_decay']:g}, chosen on val)"
        )

    def train_step(self, indices: torch.Tensor, use_cache: bool, use_views: bool = False) -> torch.Tensor:
        labels = self.train_labels[indices.to(self.train_labels.device)]
        if use_cache:
            x, where = self.cached["train"][indices.to(self.cached["train"].device)], {"from_features": True}
        elif use_views:  # one of the cached views of each image, drawn afresh every time it comes up
            view = torch.randint(len(self.views), (len(indices),), generator=self.view_generator)
            x, where = (
                self.views[view.to(self.views.device), indices.to(self.views.device)],
                {"from_block": self.prefix_blocks},
            )
        else:
            x, where = self.batch(self.train_images, indices, augment=True), {}
        x, pair, share = self.mix(x)
        logits = self.model(x, **where).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        if pair is not None:
            loss = share * loss + (1 - share) * F.cross_entropy(
                logits, labels[pair.to(labels.device)], label_smoothing=self.cfg.label_smoothing
            )
        self.accelerator.backward(loss)
        if self.cfg.grad_clip and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """--mixup a: ``x`` blended with a shuffled copy of itself, by a share drawn from Beta(a, a) (Zhang et
        al., 2018); with cached views this mixes the frozen blocks' outputs (manifold mixup). Returns the
        inputs, the partner of each example (None: no mixing) and the first example's share."""
        if not self.cfg.mixup or len(x) < 2:
            return x, None, 1.0
        pair = torch.randperm(len(x), generator=self.mixup_generator)
        seed = int(torch.randint(2**62, (), generator=self.mixup_generator))
        with torch.random.fork_rng(devices=[]):  # Beta samples from the global generator: seed it from ours
            torch.manual_seed(seed)
            share = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
        return share * x + (1 - share) * x[pair.to(x.device)], pair, share

    def check_loss(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Divergence is an error, not a result: every process stops at the same step once any loss is
        NaN or infinite. Under fp16, a step whose gradients overflowed was skipped by the scaler: not divergence."""
        if self.accelerator.scaler is not None and self.optimizer.step_was_skipped:
            return
        value = loss.detach().float()
        bad = (~torch.isfinite(value)).float()
        if self.accelerator.num_processes > 1:  # one rank's NaN stops them all here, not at a hung collective
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():
            what = "infinite" if torch.isinf(value) else "NaN"
            raise DivergenceError(f"loss became {what} at epoch {epoch} step {step}; {self.divergence_advice()}")

    @torch.no_grad()
    def check_weights(self, epoch: int) -> None:
        """No non-finite weights get past an epoch (so none is ever saved); weights agree across processes."""
        for name, parameter in self.net.named_parameters():
            if not torch.isfinite(parameter).all():
                raise DivergenceError(f"weights became NaN or infinite in epoch {epoch} ({name}); "
                                      f"{self.divergence_advice()}")  # fmt: skip

    def divergence_advice(self) -> str:
        cfg = self.cfg
        clip = "" if cfg.grad_clip else " or clip gradients (--grad-clip 1)"
        kept = f"epoch {self.best['epoch']}'s model stays in {self.run_dir}" if self.best["epoch"] else "nothing saved"
        return f"lower --lr (now {cfg.lr:g}, backbone x{cfg.backbone_lr_scale:g}){clip}; {kept}"

    @torch.no_grad()
    def extract_features(self) -> dict:
        """Backbone features of every train and val image, computed once (each process its shard, then gathered)."""
        net = self.net.eval()
        full_train = self.accelerator.prepare(index_loader(len(self.train_set), self.cfg.eval_batch_size, False, 0))
        features = {}
        for name, images, loader in (
            ("train", self.train_images, full_train),
            ("val", self.val_images, self.val_loader),
        ):
            parts, order = [], []
            for indices in tqdm(loader, desc=f"caching {name} features", leave=False,
                                disable=self.cfg.quiet or not self.accelerator.is_local_main_process):  # fmt: skip
                feats, idx = self.accelerator.gather_for_metrics(
                    (net.features(self.batch(images, indices, False)), indices)
                )
                parts.append(feats.float())
                order.append(idx)
            stacked, order = torch.cat(parts), torch.cat(order)
            features[name] = torch.empty_like(stacked).index_copy_(0, order.to(stacked.device), stacked)
        return features

    @torch.no_grad()
    def cache_views(self) -> torch.Tensor:
        """--frozen-views V: the frozen blocks' output for V views of every training image, ``[V, N, ...]``.

        The first view is the plain image, the others augmented with their own generator, seeded by --seed
        alone, so a resumed run rebuilds the same views. Fine-tuning then runs only the blocks after them:
        on the 2-core machine here a 128 px Lite0 step on 100 images took ~0.5 s with the first 6 of its
        9 blocks cached, against ~2.5 s through all of them.
        """
        net, cfg = self.net.eval(), self.cfg
        augment = augment_for(cfg, seed=cfg.seed)
        chunks = torch.arange(len(self.train_set)).split(cfg.eval_batch_size)
        views = []
        for view in tqdm(range(cfg.frozen_views), desc="caching views", leave=False,
                         disable=cfg.quiet or not self.accelerator.is_local_main_process):  # fmt: skip
            with_augment = augment if view else None
            parts = []
            for indices in chunks:
                x = self.preprocess(self.train_images[indices.to(self.train_images.device)], with_augment)
                x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
                parts.append(net.prefix(x, self.prefix_blocks).float())
            views.append(torch.cat(parts))
        return torch.stack(views)

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> np.ndarray:
        """Softmax probabilities for uint8 images, sharded across processes and gathered in order."""
        loader = self.accelerator.prepare(index_loader(len(images), self.cfg.eval_batch_size, False, 0))
        model, device_images, parts = self.model.eval(), self._on_device(images), []
        for indices in loader:
            logits = model(self.batch(device_images, indices, augment=False)).float()
            parts.append(self.accelerator.gather_for_metrics(logits.softmax(1)).cpu())
        return torch.cat(parts).numpy()

    def test(self) -> np.ndarray:
        """Softmax probabilities of the best saved model on the test split (every process takes part)."""
        self.accelerator.wait_for_everyone()
        self.net.load_state_dict(load_file(str(self.run_dir / MODEL_WEIGHTS)))  # copied onto the model's device
        self.net.backbone_frozen = False
        return self.predict_probs(self.test_set.images)

    @torch.no_grad()
    def evaluate_val(self, phase: Phase) -> dict:
        self.model.eval()
        labels = self.val_set.labels.to(self.accelerator.device)
        use_cache = phase.frozen and self.cached is not None
        loss_sum, correct, correct5, count = 0.0, 0, 0, 0
        for indices in self.val_loader:
            if use_cache:
                logits = self.model(self.cached["val"][indices.to(self.cached["val"].device)], from_features=True)
            else:
                logits = self.model(self.batch(self.val_images, indices, augment=False))
            logits, target = self.accelerator.gather_for_metrics((logits.float(), labels[indices.to(labels.device)]))
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
            correct5 += topk_correct(logits, target, 5).sum().item()
            count += len(target)
        return {"loss": loss_sum / count, "acc": correct / count, "top5": correct5 / count, "count": count}

    def end_epoch(self, row: EpochRow) -> None:
        """Record the epoch, keep the best model, save the resumable state."""
        self.history.append(row)
        improved = row.val_acc is not None and row.val_acc > self.best["val_acc"]
        if improved:
            self.best = {"val_acc": row.val_acc, "val_top5": row.val_top5, "epoch": row.epoch}
        if self.accelerator.is_main_process:
            reports.write_results(self.run_dir, [asdict(r) for r in self.history])
            if improved:
                with write_errors(self.run_dir / MODEL_WEIGHTS):
                    save_model(self.run_dir, self.net, self.model_info({"val": self.best}))
        self.accelerator.log({k: v for k, v in asdict(row).items() if k != "phase" and v is not None}, step=row.epoch)
        val = (
            f"val loss {row.val_loss:.4f}  val acc {row.val_acc:.4f}  top-5 {row.val_top5:.4f}"
            if row.val_acc is not None
            else "(not validated: --eval-every)"
        )
        self.accelerator.print(
            f"epoch {row.epoch:>3} {row.phase:<8} train loss {row.train_loss:.4f}  {val}  "
            f"{row.seconds:.1f}s ({row.images_per_s:.0f} img/s){'  *' if improved else ''}"
        )
        if self.cfg.save_state:
            history = [asdict(r) for r in self.history]
            save_training_state(
                self.accelerator,
                self.run_dir,
                # the plan in force: a re-plan writes config.yaml before this save, so a run stopped in
                # between must resume with the plan its weights were trained under
                {"epoch": row.epoch, "history": history, "best": self.best, "total_steps": self.total_steps},
                self.generators(),
            )

    def should_stop(self, epoch: int) -> bool:
        return bool(self.cfg.patience) and epoch - self.best["epoch"] >= self.cfg.patience

    def model_info(self, metrics: dict) -> RunInfo:
        cfg = self.cfg
        return RunInfo(
            architecture=cfg.model, classes=self.classes, input_spec=self.spec, head=cfg.head, strategy=cfg.strategy,
            weights=str(cfg.weights), data=self.train_set.source, best_epoch=self.best["epoch"], flip_tta=self.net.flip_tta,
            data_options=data_options(cfg), metrics=metrics,
        )  # fmt: skip

    def resume(self, saved_plan: bool = True) -> int:
        """Restore the last saved state; returns the epoch to go on from. ``saved_plan``: continue the plan the
        state was saved under (False: the command line changed the epochs, and its plan wins)."""
        state = load_training_state(self.accelerator, self.run_dir, self.generators())
        self.history, self.best = [EpochRow(**row) for row in state["history"]], state["best"]
        planned = state.get("total_steps")  # absent from states saved before fmtl recorded it
        if saved_plan and planned is not None and planned != self.total_steps:
            self.set_total_steps(planned)
            if self.accelerator.is_main_process:
                reports.write_config(self.run_dir, self.cfg)
            self.accelerator.print(f"the saved state's plan: {planned} steps, {self.cfg.epochs} epochs")
        self.accelerator.print(
            f"resuming {self.run_dir} after epoch {state['epoch']} (best val acc {self.best['val_acc']:.4f})"
        )
        return state["epoch"] + 1


# ---------------------------------------------------------------- main


def run(cfg: TrainConfig) -> dict | None:
    """Train as configured; returns the test metrics (on the main process)."""
    clock = time.perf_counter()  # --budget counts from here
    check_model_name(cfg.model)  # before anything is loaded or written
    run_dir = resolve_run_dir(cfg)
    if not cfg.resume and (run_dir / "model.json").exists():
        raise FmtlError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, or pick another --output")
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = load_splits(cfg)
    cfg, picked = apply_recipe(cfg, len(splits.train))
    cfg = with_eval_batch(cfg, accelerator.device.type)  # before planning: the warm-up times passes at it
    accelerator.print(picked)
    plan = budget_clock = None
    if cfg.budget and not cfg.resume:  # a resumed run keeps the epochs its config.yaml was planned with
        cfg, plan = plan_budget(cfg, splits, accelerator, clock)
        val_pass = len(splits.val) * plan.costs["forward_image"] / accelerator.num_processes
        budget_clock = budget.BudgetClock(clock, plan.budget_s, val_pass, plan.costs["finetune_step"])
    saved_plan = bool(cfg.resume) and not plan_changed_on_resume(cfg, run_dir)  # before config.yaml is rewritten
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        reports.write_config(run_dir, cfg)
        if plan is not None:
            atomic_write_text(run_dir / "plan.json", plan.to_json())
    accelerator.init_trackers("fmtl", config={k: v for k, v in asdict(cfg).items() if v is not None})
    trainer = Trainer(cfg, accelerator, run_dir, splits, budget_clock)
    accelerator.print(f"{cfg.model} on {trainer.train_set.source}: {len(trainer.train_set)} train / "
                      f"{len(trainer.val_set)} val / {len(trainer.test_set)} test images, {len(trainer.classes)} classes, "
                      f"{trainer.spec.image_size}px, {cfg.strategy}; {parameter_summary(trainer.net)}; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")  # fmt: skip
    start = trainer.resume(saved_plan) if cfg.resume else 1
    started = time.perf_counter()
    trainer.fit(start)
    seconds = time.perf_counter() - started
    if plan is not None:  # --budget covers training; the test pass and the reports follow it
        plan.finished_s = round(time.perf_counter() - clock, 1)
    probs = trainer.test()
    metrics = None
    if accelerator.is_main_process:
        metrics = reports.finish(run_dir, outcome_of(trainer, probs), [asdict(r) for r in trainer.history], seconds)
        accelerator.print(
            reports.summary(run_dir, metrics, trainer.classes, trainer.best, len(trainer.history), seconds)
        )
        if plan is not None:  # how the plan came out, on the budget's clock
            plan.replans = budget_clock.replans
            plan.total_s = round(time.perf_counter() - clock, 1)
            atomic_write_text(run_dir / "plan.json", plan.to_json())
            accelerator.print(
                f"budget {plan.budget_s:.0f}s: training finished at {plan.finished_s:.0f}s, "
                f"the test pass and reports at {plan.total_s:.0f}s"
            )
    accelerator.end_training()
    return metrics


def plan_changed_on_resume(cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether the command line changes a resumed run's epochs (``--resume RUN --epochs 5`` extends it), judged
    against its config.yaml. If not, the run goes on with the plan its state was saved under, which differs
    from config.yaml's only when the run stopped between a re-plan's config.yaml and that epoch's state."""
    saved = read_yaml(run_dir / "config.yaml")
    return (saved.get("epochs"), saved.get("max_steps")) != (cfg.epochs, cfg.max_steps)


def plan_budget(cfg: TrainConfig, splits: Splits, accelerator: Accelerator, clock: float):
    """--budget: time this run's steps on a throwaway model, fit the epochs; every process takes the main's plan."""
    model = build_model(cfg, len(splits.train.classes))
    counts = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    spec = input_spec(model, splits.train, cfg)
    _, plan = budget.plan_run(cfg, model, spec, counts, accelerator.device, clock, accelerator.num_processes)
    plan = broadcast_object_list([plan])[0]
    accelerator.print(plan.describe())
    planned = {"strategy": plan.strategy, "epochs": plan.epochs, "head_epochs": plan.head_epochs}
    return replace(cfg, **planned, max_steps=plan.max_steps, eval_every=plan.eval_every), plan


def outcome_of(trainer: Trainer, probs: np.ndarray) -> reports.TestOutcome:
    test = trainer.test_set
    return reports.TestOutcome(
        probs, test.images.numpy(), test.labels.numpy(), trainer.classes, trainer.test_name, trainer.best["epoch"],
        trainer.cfg.seed, augment_for(trainer.cfg, seed=trainer.cfg.seed),
    )  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "fmtl/train.py", before_run=None) -> int:
    """Parse, run, and turn user mistakes into one line; ``before_run(cfg)`` is the entry point's hook."""
    cfg = None
    try:
        cfg = load_config(argv, prog=prog)
        if before_run is not None:
            before_run(cfg)
        run(cfg)
    except FmtlError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if cfg is not None and not cfg.save_state:
            print("fmtl: interrupted (run with --no-save-state: nothing to resume from)", file=sys.stderr)
        else:
            print("fmtl: interrupted (continue from the last saved epoch with --resume RUN_DIR)", file=sys.stderr)
        return 130
    return 0
