"""The transfer-learning loop, driven by Hugging Face Accelerate: ``Trainer`` runs the epochs and the steps,
``run`` puts a run together and ``main`` is the command line.

    accelerate launch fmtl/train.py --model efficientnet_lite0 --data fashion-mnist
    python -m fmtl.train [OPTIONS]          # the same, one process
    fmtl train [OPTIONS]                    # the same, through the CLI

Data stays uint8 at its source size; the loaders hand out index batches (sharded by
``accelerator.prepare``) and each batch is preprocessed and augmented on the device. What a run is built
from lives in ``prepare``, its plan in ``plan`` (re-planned by ``budget``), what it computes once in
``caches``, its passes without gradients in ``validation`` and what it keeps in ``recorder``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from fmtl.atomic import atomic_write_text
from fmtl.errors import ERROR_PREFIX, EXIT_USER_ERROR, FmtlError
from fmtl.spec import RunInfo
from fmtl.training import budget, caches, calibrate, divergence, reports
from fmtl.training.augment import Preprocess, augment_for
from fmtl.training.budget import BudgetController
from fmtl.training.checkpoint import MODEL_WEIGHTS
from fmtl.training.config import TrainConfig, load_config, read_yaml, with_defaults, with_eval_batch
from fmtl.training.data import ImageSet, feeder
from fmtl.training.data.feeder import EpochSampler, Resident, ranks_on_device, worker_count
from fmtl.training.data.imageset import LazyImages
from fmtl.training.models import (
    FmtlModel,
    backbone_layout,
    cached_view_blocks,
    check_model_name,
    freeze_batchnorm,
    parameter_summary,
)
from fmtl.training.plan import (
    Phase,
    RunPlan,
    Schedule,
    head_on_cached_features,
    make_plan,
    plan_from_config,
    steps_per_epoch,
)
from fmtl.training.prepare import (
    Splits,
    build_model,
    data_options,
    index_loader,
    input_spec,
    load_splits,
    make_accelerator,
    make_optimizer,
    resolve_run_dir,
)
from fmtl.training.recipe import apply_recipe
from fmtl.training.recorder import EpochRow, Recorder, saved_plan
from fmtl.training.validation import VAL_KEYS, predict_probs, validate

__all__ = ["Splits", "Trainer", "load_splits", "main", "make_accelerator", "run"]


class Trainer:
    """One run's epochs (``fit``) and steps (``train_step``), around the splits it was given."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, run_dir, splits: Splits,
                 plan: RunPlan | None = None, controller: BudgetController | None = None):  # fmt: skip
        self.cfg = cfg = with_eval_batch(with_defaults(cfg), accelerator.device.type)
        self.accelerator, self.run_dir, self.controller = accelerator, run_dir, controller  # controller: --budget
        self.train_set, self.val_set, self.test_set, self.test_name = (
            splits.train,
            splits.val,
            splits.test,
            splits.test_name,
        )
        self.classes = self.train_set.classes
        spe = steps_per_epoch(len(self.train_set), cfg.batch_size, accelerator.num_processes,
                              cfg.gradient_accumulation_steps)  # fmt: skip
        self.plan = plan or plan_from_config(cfg, spe)
        model = build_model(cfg, len(self.classes), self.plan.strategy)
        self.spec = input_spec(model, self.train_set, cfg)
        self.preprocess = Preprocess(self.spec).to(accelerator.device)
        self.augment = augment_for(cfg, seed=cfg.seed + accelerator.process_index)
        ranks_here = ranks_on_device(accelerator)
        self.train_images = Resident(self.train_set, accelerator.device, ranks_here)
        self.train_labels = self.train_set.labels.to(accelerator.device)
        self.val_images = Resident(self.val_set, accelerator.device, ranks_here)
        self.sampler = EpochSampler(len(self.train_set), cfg.batch_size, cfg.seed, processes=accelerator.num_processes)
        workers = worker_count(cfg.workers, accelerator.device, ranks_here)
        train_loader = feeder.train_loader(self.train_images, self.sampler, workers)
        val_loader = index_loader(len(self.val_set), cfg.eval_batch_size, shuffle=False, seed=0)
        self.schedule = Schedule(self.plan, accelerator.num_processes, cfg.warmup_fraction)
        optimizer, scheduler = make_optimizer(cfg, model, self.schedule)
        self.model, self.optimizer, self.train_loader, self.val_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        # Clip only what the optimizer updates: walking a frozen backbone every step is wasted time.
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.val_seconds = 0.0  # the last fine-tuning validation pass
        self.epoch_mark = time.perf_counter()  # when the last epoch (or the views' caching) ended
        self.cached: dict | None = None  # backbone features, when head epochs train on cached features
        self.prefix_blocks = cached_view_blocks(cfg, self.net) if self.plan.strategy != "linear" else 0
        self.views: torch.Tensor | None = None  # --frozen-views: [V, N, ...] outputs of the frozen first blocks
        self.view_generator = torch.Generator().manual_seed(cfg.seed)  # which view each image shows, per epoch
        generators = {"views": self.view_generator} if self.prefix_blocks else {}
        generators.update({"augment": self.augment.generator} if self.augment is not None else {})
        self.recorder = Recorder(accelerator, run_dir, generators, cfg.save_state, cfg.patience)
        self.position: dict | None = None  # a mid-epoch resume: where in its epoch the run goes on
        if self.prefix_blocks:
            one = self.batch(self.train_images, torch.arange(1), augment=False)
            caches.check_views_fit(self.net, one, self.prefix_blocks, cfg.frozen_views, len(self.train_set))

    @property
    def net(self) -> FmtlModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def history(self) -> list[EpochRow]:
        return self.recorder.history

    @property
    def best(self) -> dict:
        return self.recorder.best

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def phases(self) -> list[Phase]:
        return self.plan.phases

    def batch(self, images: Resident, indices: torch.Tensor, augment: bool, pixels=None) -> torch.Tensor:
        """Model input for ``indices`` of ``images`` (``pixels``: their uint8 batch, when a worker read it)."""
        x = images.take(indices) if pixels is None else pixels.to(self.accelerator.device, non_blocking=True)
        x = self.preprocess(x, self.augment if augment else None)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def fit(self, start_epoch: int) -> None:
        epoch, self.epoch_mark = start_epoch - 1, time.perf_counter()
        while epoch < self.plan.epochs:  # a re-plan may move the end
            epoch += 1
            phase = self.plan.phase_of(epoch)
            if self.prefix_blocks and not phase.frozen and self.views is None:
                self.cache_views()
            started = time.perf_counter()
            train_loss, seen = self.train_one_epoch(epoch, phase)
            self.check_weights(epoch)
            val, val_s = dict.fromkeys(VAL_KEYS), 0.0
            if self.plan.validates(epoch):
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
            self.replan(epoch, time.perf_counter() - self.epoch_mark - val_s)
            self.recorder.record(row, self.net, self.model_info, self.plan)
            self.epoch_mark = time.perf_counter()
            if self.recorder.should_stop(epoch):
                self.accelerator.print(f"early stop: no better val accuracy for {self.cfg.patience} epochs")
                break

    def train_one_epoch(self, epoch: int, phase: Phase) -> tuple[float, int]:
        net, accelerator = self.net, self.accelerator
        net.backbone_frozen = phase.frozen
        self.model.train()
        if phase.frozen:
            net.backbone.eval()  # feature extraction: BatchNorm statistics must not move
        elif self.cfg.freeze_bn:
            freeze_batchnorm(net.backbone)
        use_cache = self.on_cached_features(phase)
        if use_cache and self.cached is None:
            self.cache_features(fit_head=epoch == phase.first_epoch and self.cfg.head_fit == "lbfgs")
        done, loss_sum, seen = self.resume_position(epoch)
        self.sampler.seek(epoch, start=done * accelerator.num_processes)
        total_loss = torch.full((), loss_sum, device=accelerator.device)
        batches = min(len(self.train_loader) + done, self.plan.steps_in(epoch) * self.cfg.gradient_accumulation_steps)
        bar = tqdm(self.train_loader, total=batches, initial=done, desc=f"epoch {epoch}/{self.plan.epochs} {phase.name}",
                   leave=False, disable=self.cfg.quiet or not accelerator.is_local_main_process)  # fmt: skip
        started, counted = time.perf_counter(), seen
        for step, item in enumerate(bar, done + 1):
            indices, pixels = item if isinstance(item, (tuple, list)) else (item, None)
            with accelerator.accumulate(self.model):
                loss = self.train_step(indices, use_cache, not phase.frozen and self.views is not None, pixels)
            self.check_loss(loss, epoch, step)
            total_loss += loss.detach() * len(indices)
            seen += len(indices)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", img_s=f"{(seen - counted) / (time.perf_counter() - started):.0f}"
            )
            if step >= batches:
                break
            if self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0:
                self.recorder.save_position(self.plan, {"epoch": epoch, "step": step,
                                                        "loss_sum": total_loss.item(), "seen": seen})  # fmt: skip
        total = accelerator.reduce(torch.stack([total_loss, torch.tensor(float(seen), device=total_loss.device)]))
        return (total[0] / total[1]).item(), int(total[1].item())

    def resume_position(self, epoch: int) -> tuple[int, float, int]:
        """Steps already taken in ``epoch``, their loss sum and images, when resuming inside it (else zeros)."""
        position, self.position = self.position, None
        if position is None or position["epoch"] != epoch:
            return 0, 0.0, 0
        return position["step"], position["loss_sum"], position["seen"]

    def train_step(self, indices: torch.Tensor, use_cache: bool, use_views: bool = False, pixels=None) -> torch.Tensor:
        labels = self.train_labels[indices.to(self.train_labels.device)]
        if use_cache:
            x, where = self.cached["train"][indices.to(self.cached["train"].device)], {"from_features": True}
        elif use_views:  # one of the cached views of each image, drawn afresh every time it comes up
            view = torch.randint(len(self.views), (len(indices),), generator=self.view_generator)
            x = self.views[view.to(self.views.device), indices.to(self.views.device)]
            where = {"from_block": self.prefix_blocks}
        else:
            x, where = self.batch(self.train_images, indices, augment=True, pixels=pixels), {}
        loss = F.cross_entropy(self.model(x, **where).float(), labels, label_smoothing=self.cfg.label_smoothing)
        self.accelerator.backward(loss)
        if self.cfg.grad_clip and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def on_cached_features(self, phase: Phase) -> bool:
        """Whether this phase's head trains (and validates) on backbone features computed once."""
        return phase.frozen and head_on_cached_features(self.cfg)

    def cache_features(self, fit_head: bool = False) -> None:
        """Compute the train and val features once; ``fit_head``: then solve the linear head on them."""
        full_train = self.accelerator.prepare(index_loader(len(self.train_set), self.cfg.eval_batch_size, False, 0))
        sets = {"train": (self.train_images, full_train), "val": (self.val_images, self.val_loader)}
        quiet = self.cfg.quiet or not self.accelerator.is_local_main_process
        self.cached = caches.extract_features(self.net, self.accelerator, self.batch, sets, quiet)
        line = caches.fit_head(self.net, self.cached, self.train_set.labels, self.val_set.labels) if fit_head else None
        if line:
            self.accelerator.print(line)

    def cache_views(self) -> None:
        """--frozen-views: once, outside the epoch's time (it is not the pace of a step)."""
        started, cfg = time.perf_counter(), self.cfg
        self.views = caches.cache_views(
            self.net, self.preprocess, self.train_images, self.prefix_blocks, cfg.frozen_views,
            augment_for(cfg, seed=cfg.seed), cfg.eval_batch_size, cfg.channels_last,
            quiet=cfg.quiet or not self.accelerator.is_local_main_process,
        )  # fmt: skip
        self.accelerator.print(
            f"cached {cfg.frozen_views} view(s) of {len(self.train_set):,} images through the first "
            f"{self.prefix_blocks} blocks in {time.perf_counter() - started:.1f}s ({self.views.nbytes / 2**20:,.0f} MiB)"
        )
        self.epoch_mark = time.perf_counter()

    def evaluate_val(self, phase: Phase) -> dict:
        labels = self.val_set.labels.to(self.accelerator.device)
        if self.on_cached_features(phase):
            if self.cached is None:
                self.cache_features()
            features = self.cached["val"]
            logits_of = lambda idx: self.model(features[idx.to(features.device)], from_features=True)  # noqa: E731
        else:
            logits_of = lambda idx: self.model(self.batch(self.val_images, idx, augment=False))  # noqa: E731
        return validate(self.model, self.val_loader, logits_of, labels, self.accelerator)

    def replan(self, epoch: int, train_s: float) -> None:
        """--budget: take the controller's new plan, if it has one (every process takes the main's)."""
        new = self.controller.after_epoch(self.plan, epoch, train_s, self.val_seconds) if self.controller else None
        if new is None:
            return
        before, new = self.plan.total_steps, broadcast_object_list([new])[0]
        self.plan = self.schedule.plan = new
        entry = self.controller.replans[-1]
        self.accelerator.print(
            f"re-planned after epoch {epoch} at {entry['seconds_per_step']:.3f}s a fine-tuning step, "
            f"{entry['val_pass_s']:.1f}s a validation pass: {new.total_steps} steps in all, was {before}; "
            f"{new.epochs} epochs"
        )

    def check_loss(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        skipped = self.optimizer.step_was_skipped if self.accelerator.scaler is not None else False
        divergence.check_loss(loss, self.accelerator, skipped, f"epoch {epoch} step {step}", self.divergence_advice)

    def check_weights(self, epoch: int) -> None:
        divergence.check_weights(self.net, epoch, self.divergence_advice)

    def divergence_advice(self) -> str:
        return divergence.advice(self.cfg, self.recorder.kept())

    def model_info(self, metrics: dict) -> RunInfo:
        cfg = self.cfg
        return RunInfo(
            architecture=cfg.model, classes=self.classes, input_spec=self.spec, head=cfg.head,
            strategy=self.plan.strategy, weights=str(cfg.weights), data=self.train_set.source,
            best_epoch=self.best["epoch"], flip_tta=self.net.flip_tta, data_options=data_options(cfg), metrics=metrics,
        )  # fmt: skip

    def restore_best(self) -> None:
        """The best epoch's saved weights back into the model (every process)."""
        self.accelerator.wait_for_everyone()
        self.net.load_state_dict(load_file(str(self.run_dir / MODEL_WEIGHTS)))  # copied onto the model's device
        self.net.backbone_frozen = False

    def predict(self, data: ImageSet) -> np.ndarray:
        """Softmax probabilities of the model as it is for ``data`` (every process takes part)."""
        loader = self.accelerator.prepare(index_loader(len(data), self.cfg.eval_batch_size, False, 0))
        images = Resident(data, self.accelerator.device, ranks_on_device(self.accelerator))
        return predict_probs(self.model, loader, lambda idx: self.batch(images, idx, False), self.accelerator)

    def resume(self) -> int:
        """Restore the last saved state; the epoch to go on from (inside it, for a state saved mid-epoch)."""
        epoch, self.position = self.recorder.resume()
        return epoch


# ---------------------------------------------------------------- a run


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
    with accelerator.local_main_process_first():  # one process a machine builds a folder's store
        splits = load_splits(cfg)
    cfg, picked = apply_recipe(cfg, len(splits.train), backbone_layout(cfg.model))
    cfg = with_eval_batch(cfg, accelerator.device.type)  # before planning: the warm-up times passes at it
    accelerator.print(picked)
    spe = steps_per_epoch(len(splits.train), cfg.batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps)
    plan, budget_plan, controller = plan_from_config(cfg, spe), None, None
    if cfg.resume:
        plan = plan_for_resume(cfg, run_dir, spe)
    elif cfg.budget:
        budget_plan, controller = plan_budget(cfg, splits, accelerator, clock)
        plan = make_plan(budget_plan.strategy, budget_plan.epochs, budget_plan.head_epochs, spe,
                         budget_plan.max_steps, budget_plan.eval_every)  # fmt: skip
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        reports.write_config(run_dir, cfg)
        if budget_plan is not None:
            atomic_write_text(run_dir / "plan.json", budget_plan.to_json())
    accelerator.init_trackers("fmtl", config={k: v for k, v in asdict(cfg).items() if v is not None})
    trainer = Trainer(cfg, accelerator, run_dir, splits, plan, controller)
    accelerator.print(f"{cfg.model} on {splits.train.source}: {len(splits.train)} train / {len(splits.val)} val / "
                      f"{len(splits.test)} test images, {len(trainer.classes)} classes, {trainer.spec.image_size}px, "
                      f"{plan.strategy}; {parameter_summary(trainer.net)}; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")  # fmt: skip
    start = trainer.resume() if cfg.resume else 1
    started = time.perf_counter()
    trainer.fit(start)
    seconds = time.perf_counter() - started
    if budget_plan is not None:  # --budget covers training; the test pass and the reports follow it
        budget_plan.finished_s = round(time.perf_counter() - clock, 1)
    trainer.restore_best()  # the end of training: the best epoch's weights are back in the model
    # the temperature, from the best model's validation probabilities (flip-TTA included, as exported)
    calibration = calibrate.for_run(lambda: trainer.predict(splits.val), splits.val.labels.numpy(), cfg.calibrate)
    probs = trainer.predict(splits.test)
    metrics = None
    if accelerator.is_main_process:
        metrics = reports.finish(run_dir, outcome_of(trainer, probs), trainer.recorder.rows(), seconds, calibration)
        accelerator.print(
            reports.summary(run_dir, metrics, trainer.classes, trainer.best, len(trainer.history), seconds)
        )
        if budget_plan is not None:  # how the plan came out, on the budget's clock
            budget_plan.replans = controller.replans
            budget_plan.total_s = round(time.perf_counter() - clock, 1)
            atomic_write_text(run_dir / "plan.json", budget_plan.to_json())
            accelerator.print(
                f"budget {budget_plan.budget_s:.0f}s: training finished at {budget_plan.finished_s:.0f}s, "
                f"the test pass and reports at {budget_plan.total_s:.0f}s"
            )
    accelerator.end_training()
    return metrics


def plan_for_resume(cfg: TrainConfig, run_dir, steps_per_epoch: int) -> RunPlan:
    """A resumed run goes on with the plan its state was saved under (a budget run's re-plans included), unless
    the command line changes its length against its config.yaml (``--resume RUN --epochs 5`` extends it)."""
    planned = plan_from_config(cfg, steps_per_epoch)
    saved = read_yaml(run_dir / "config.yaml")
    if (saved.get("epochs"), saved.get("max_steps")) != (cfg.epochs, cfg.max_steps):
        return planned
    return saved_plan(run_dir, steps_per_epoch, planned)


def plan_budget(cfg: TrainConfig, splits: Splits, accelerator: Accelerator, clock: float):
    """--budget: time this run's steps on a throwaway model and fit the epochs (every process takes the main's
    plan); returns the plan and the controller that re-plans the run as it goes."""
    model = build_model(cfg, len(splits.train.classes))
    counts = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    spec = input_spec(model, splits.train, cfg)
    plan = budget.plan_run(cfg, model, spec, counts, accelerator.device, clock, accelerator.num_processes)
    plan = broadcast_object_list([plan])[0]
    accelerator.print(plan.describe())
    val_pass = len(splits.val) * plan.costs["forward_image"] / accelerator.num_processes
    return plan, BudgetController(clock, plan.budget_s, val_pass, plan.costs["finetune_step"])


def outcome_of(trainer: Trainer, probs: np.ndarray) -> reports.TestOutcome:
    test = trainer.test_set
    return reports.TestOutcome(
        probs, LazyImages(test), test.labels.numpy(), trainer.classes, trainer.test_name, trainer.best["epoch"],
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
