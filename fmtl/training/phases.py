"""What each phase of a run trains and validates on, made at the phase's boundary in ``Trainer.fit``.

- ``ImageInput``: images, preprocessed (and, for training, augmented) on the device every step;
- ``FeatureInput``: a frozen backbone's features of the un-augmented train and val images, computed once
  (``plan.head_on_cached_features``), the linear head first solved on them where ``--head-fit lbfgs``;
- ``ViewInput``: ``--frozen-views``: the frozen first blocks' outputs for several views of each image,
  computed once; fine-tuning runs only the blocks after them, validation runs on images.
"""

from __future__ import annotations

import time

import torch

from fmtl.training import caches
from fmtl.training.prepare import index_loader


class ImageInput:
    """Images, a batch at a time."""

    reads_pixels = True  # its training batches need their images

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def train_batch(self, indices: torch.Tensor, pixels) -> tuple[torch.Tensor, dict]:
        """The model's input for a training batch, and how the model takes it."""
        return self.trainer.batch(self.trainer.train_images, indices, True, pixels), {}

    def val_logits(self, indices: torch.Tensor) -> torch.Tensor:
        trainer = self.trainer
        return trainer.model(trainer.batch(trainer.val_images, indices, False))


class FeatureInput:
    """The backbone's features of every train and val image, computed once (each process its shard). They
    live where the images do: beside images on the device, and in a file every process on the machine maps
    when the images are read from a store or shards."""

    reads_pixels = False

    def __init__(self, trainer, fit_head: bool) -> None:
        loader = trainer.accelerator.prepare(index_loader(len(trainer.train_set), trainer.cfg.eval_batch_size))
        sets = {"train": (trainer.train_images, loader), "val": (trainer.val_images, trainer.val_loader)}
        self.model, self.device = trainer.model, trainer.accelerator.device
        spill_dir = None if trainer.train_images.on_device else trainer.run_dir
        self.features = caches.extract_features(
            trainer.net, trainer.accelerator, trainer.batch, sets, trainer.quiet, spill_dir
        )
        if fit_head:
            labels = trainer.train_set.labels, trainer.val_set.labels
            line = caches.fit_head(trainer.net, self.features, *labels, mapped=spill_dir is not None)
            trainer.accelerator.print(line or "")

    def rows(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        features = self.features[name]
        return features[indices.to(features.device)].to(self.device, non_blocking=True)

    def train_batch(self, indices: torch.Tensor, pixels) -> tuple[torch.Tensor, dict]:
        return self.rows("train", indices), {"from_features": True}

    def val_logits(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model(self.rows("val", indices), from_features=True)


class ViewInput(ImageInput):
    """Cached views through the frozen first blocks; each image shows one of them, drawn afresh each time."""

    reads_pixels = False

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        started, cfg = time.perf_counter(), trainer.cfg
        self.blocks, self.generator = trainer.prefix_blocks, trainer.view_generator
        self.views = caches.cache_views(
            trainer.net, trainer.preprocess, trainer.train_images, self.blocks, cfg.frozen_views,
            trainer.settings.augment(), cfg.eval_batch_size, cfg.channels_last, quiet=trainer.quiet,
        )  # fmt: skip
        trainer.accelerator.print(
            f"cached {cfg.frozen_views} view(s) of {len(trainer.train_set):,} images through the first {self.blocks} "
            f"blocks in {time.perf_counter() - started:.1f}s ({self.views.nbytes / 2**20:,.0f} MiB)"
        )

    def train_batch(self, indices: torch.Tensor, pixels) -> tuple[torch.Tensor, dict]:
        view = torch.randint(len(self.views), (len(indices),), generator=self.generator)
        return self.views[view.to(self.views.device), indices.to(self.views.device)], {"from_block": self.blocks}
