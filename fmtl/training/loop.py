"""The transfer-learning loop, driven by Hugging Face Accelerate: ``Trainer`` runs a run's epochs (``fit``)
and steps (``train_step``) around the splits and the settings it was given (``fmtl.training.run`` puts a
run together; ``fmtl/train.py`` is the command line).

Data stays uint8 at its source size; the loaders hand out index batches (sharded by
``accelerator.prepare``; a store's pixels read by workers) and each batch is preprocessed and augmented on
the device. Each phase's input (images, cached features, cached views) is made at its boundary
(``phases``); validation and prediction passes live in ``validation``, what a run keeps in ``recorder``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from tqdm.auto import tqdm

from fmtl.spec import RunInfo
from fmtl.training import caches, divergence
from fmtl.training.augment import Preprocess
from fmtl.training.budget import BudgetController
from fmtl.training.checkpoint import MODEL_WEIGHTS
from fmtl.training.data import ImageSet, feeder
from fmtl.training.data.feeder import Resident, ranks_on_device, worker_count
from fmtl.training.models import FmtlModel, cached_view_blocks, freeze_batchnorm
from fmtl.training.phases import FeatureInput, ImageInput, ViewInput
from fmtl.training.plan import Phase, Schedule, head_on_cached_features
from fmtl.training.prepare import Splits, build_model, data_options, index_loader, input_spec, make_optimizer
from fmtl.training.recorder import EpochRow, Recorder
from fmtl.training.settings import RunSettings
from fmtl.training.validation import VAL_KEYS, predict_probs, validate


class Trainer:
    """One run's epochs and steps: its model, optimizer, loaders and inputs, built from its settings."""

    def __init__(self, settings: RunSettings, accelerator: Accelerator, run_dir, splits: Splits,
                 controller: BudgetController | None = None) -> None:  # fmt: skip
        self.settings, self.cfg, self.plan = settings, settings.cfg, settings.plan
        self.accelerator, self.run_dir, self.controller = accelerator, run_dir, controller  # controller: --budget
        self.train_set, self.val_set, self.classes = splits.train, splits.val, splits.train.classes
        cfg, device, ranks_here = self.cfg, accelerator.device, ranks_on_device(accelerator)
        self.quiet = cfg.quiet or not accelerator.is_local_main_process
        model = build_model(cfg, len(self.classes))
        self.spec = input_spec(model, self.train_set, cfg)
        self.preprocess, self.augment = Preprocess(self.spec).to(device), settings.augment(accelerator.process_index)
        self.train_images, self.val_images = (
            Resident(splits.train, device, ranks_here),
            Resident(splits.val, device, ranks_here),
        )
        self.train_labels = self.train_set.labels.to(device)
        self.sampler = feeder.sampler_for(self.train_set, cfg.batch_size, cfg.seed, accelerator.num_processes)
        loaders = feeder.train_loaders(self.train_images, self.sampler, worker_count(cfg.workers, device, ranks_here))
        self.schedule = Schedule(self.plan, accelerator.num_processes, cfg.warmup_fraction)
        optimizer, scheduler = make_optimizer(cfg, model, self.schedule)
        val_loader = index_loader(len(self.val_set), cfg.eval_batch_size)
        self.model, self.optimizer, self.val_loader, self.scheduler, *self.train_loaders = accelerator.prepare(
            model, optimizer, val_loader, scheduler, *loaders
        )  # train_loaders: [indices] or [indices, (indices, pixels)]
        # Clip only what the optimizer updates: walking a frozen backbone every step is wasted time.
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.val_seconds, self.epoch_mark = 0.0, time.perf_counter()  # the last fine-tuning val pass; the last mark
        self.prefix_blocks = cached_view_blocks(cfg, self.net)
        self.view_generator = torch.Generator().manual_seed(cfg.seed)  # which view each image shows, per epoch
        generators = {"views": self.view_generator} if self.prefix_blocks else {}
        generators.update({"augment": self.augment.generator} if self.augment is not None else {})
        self.recorder = Recorder(accelerator, run_dir, generators, cfg.save_state, cfg.patience)
        self.inputs, self.position = None, None  # the current phase's input; a mid-epoch resume's position
        if self.prefix_blocks:
            one = self.batch(self.train_images, torch.arange(1), augment=False)
            caches.check_views_fit(self.net, one, self.prefix_blocks, cfg.frozen_views, len(self.train_set))

    @property
    def net(self) -> FmtlModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def best(self) -> dict:
        return self.recorder.best

    def batch(self, images: Resident, indices: torch.Tensor, augment: bool, pixels=None) -> torch.Tensor:
        """Model input for ``indices`` of ``images`` (``pixels``: their uint8 batch, when a worker read it)."""
        x = images.take(indices) if pixels is None else pixels.to(self.accelerator.device, non_blocking=True)
        x = self.preprocess(x, self.augment if augment else None)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def enter(self, phase: Phase, epoch: int):
        """The phase's input, made at its boundary (the last phase's let go), and the backbone frozen or not."""
        if phase.frozen and head_on_cached_features(self.cfg):
            kind = FeatureInput
        else:
            kind = ViewInput if not phase.frozen and self.prefix_blocks else ImageInput
        self.net.backbone_frozen = phase.frozen
        if type(self.inputs) is not kind:
            self.inputs = None  # the last phase's cache let go before the next is made
            if kind is FeatureInput:
                fit_head = epoch == phase.first_epoch and self.position is None and self.cfg.head_fit == "lbfgs"
                self.inputs = FeatureInput(self, fit_head)
            else:
                self.inputs = kind(self)
            self.epoch_mark = time.perf_counter() if kind is ViewInput else self.epoch_mark  # caching is no step
        return self.inputs

    def fit(self, start_epoch: int) -> None:
        epoch, self.epoch_mark = start_epoch - 1, time.perf_counter()
        while epoch < self.plan.epochs:  # a re-plan may move the end
            epoch += 1
            phase = self.plan.phase_of(epoch)
            inputs = self.enter(phase, epoch)
            started = time.perf_counter()
            train_loss, seen = self.train_one_epoch(epoch, phase, inputs)
            divergence.check_weights(self.net, epoch, self.divergence_advice)
            val, val_s = dict.fromkeys(VAL_KEYS), 0.0
            if self.plan.validates(epoch):
                labels = self.val_set.labels.to(self.accelerator.device)
                val = validate(self.model, self.val_loader, inputs.val_logits, labels, self.accelerator)
                val_s = time.perf_counter() - started - self.train_seconds
                self.val_seconds = val_s if not phase.frozen else self.val_seconds  # what fine-tuning's pass costs
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

    def train_mode(self, phase: Phase) -> None:
        self.model.train()
        if phase.frozen:
            self.net.backbone.eval()  # feature extraction: BatchNorm statistics must not move
        elif self.cfg.freeze_bn:
            freeze_batchnorm(self.net.backbone)

    def train_one_epoch(self, epoch: int, phase: Phase, inputs) -> tuple[float, int]:
        accelerator, started = self.accelerator, time.perf_counter()
        self.train_mode(phase)
        done, loss_sum, seen = self.resume_position(epoch)
        self.sampler.seek(epoch, start=done * accelerator.num_processes)
        total_loss, counted = torch.full((), loss_sum, device=accelerator.device), seen
        loader = self.train_loaders[-1 if inputs.reads_pixels else 0]  # pixels read only for a phase on images
        batches = min(len(loader) + done, self.plan.steps_in(epoch) * self.cfg.gradient_accumulation_steps)
        bar = tqdm(loader, total=batches, initial=done, desc=f"epoch {epoch}/{self.plan.epochs} {phase.name}",
                   leave=False, disable=self.quiet)  # fmt: skip
        for step, item in enumerate(bar, done + 1):
            indices, pixels = item if isinstance(item, (tuple, list)) else (item, None)
            with accelerator.accumulate(self.model):
                loss = self.train_step(indices, inputs, pixels)
            skipped = self.optimizer.step_was_skipped if accelerator.scaler is not None else False
            divergence.check_loss(loss, accelerator, skipped, f"epoch {epoch} step {step}", self.divergence_advice)
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
        self.train_seconds = time.perf_counter() - started
        total = accelerator.reduce(torch.stack([total_loss, torch.tensor(float(seen), device=total_loss.device)]))
        return (total[0] / total[1]).item(), int(total[1].item())

    def resume_position(self, epoch: int) -> tuple[int, float, int]:
        """Steps already taken in ``epoch``, their loss sum and images, when resuming inside it (else zeros)."""
        position, self.position = self.position, None
        if position is None or position["epoch"] != epoch:
            return 0, 0.0, 0
        return position["step"], position["loss_sum"], position["seen"]

    def train_step(self, indices: torch.Tensor, inputs, pixels=None) -> torch.Tensor:
        """One batch: forward, loss, backward and (when the accumulation syncs) the optimizer's step."""
        x, where = inputs.train_batch(indices, pixels)
        labels = self.train_labels[indices.to(self.train_labels.device)]
        loss = F.cross_entropy(self.model(x, **where).float(), labels, label_smoothing=self.cfg.label_smoothing)
        self.accelerator.backward(loss)
        if self.cfg.grad_clip and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

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

    def divergence_advice(self) -> str:
        return divergence.advice(self.cfg, self.recorder.kept())

    def model_info(self, metrics: dict) -> RunInfo:
        cfg = self.cfg
        return RunInfo(
            architecture=cfg.model, classes=self.classes, input_spec=self.spec, head=cfg.head,
            strategy=self.plan.strategy, weights=str(cfg.weights), data=self.train_set.source,
            best_epoch=self.best["epoch"], flip_tta=self.net.flip_tta, shift_tta=self.net.shift_tta,
            data_options=data_options(cfg), metrics=metrics,
        )  # fmt: skip

    def restore_best(self) -> None:
        """The best epoch's saved weights back into the model (every process)."""
        self.accelerator.wait_for_everyone()
        self.net.load_state_dict(load_file(str(self.run_dir / MODEL_WEIGHTS)))  # copied onto the model's device

    def predict(self, data: ImageSet) -> np.ndarray:
        """Softmax probabilities of the model as it is for ``data`` (every process takes part)."""
        loader = self.accelerator.prepare(index_loader(len(data), self.cfg.eval_batch_size))
        images = Resident(data, self.accelerator.device, ranks_on_device(self.accelerator))
        return predict_probs(self.model, loader, lambda idx: self.batch(images, idx, False), self.accelerator)

    def resume(self) -> int:
        """Restore the last saved state; the epoch to go on from (inside it, for a state saved mid-epoch)."""
        epoch, self.position = self.recorder.resume()
        return epoch
