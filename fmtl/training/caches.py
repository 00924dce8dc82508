"""What a run computes once and trains on many times: backbone features, frozen-block views, the solved head.

- Features: a frozen backbone without augmentation gives every image the same features each epoch, so
  head-only epochs train on features computed once (``plan.head_on_cached_features``).
- Views (``--frozen-views V``): with ``--unfreeze last:N`` the first blocks are frozen; their outputs for V
  views of each image (the first plain, the rest augmented) are computed once, and fine-tuning runs only
  the blocks after them.
- The head fit (``--head-fit lbfgs``): on cached features the linear head is a convex problem, solved
  before its epochs (``fmtl.training.headfit``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from fmtl.atomic import write_errors
from fmtl.errors import ConfigError, WriteError
from fmtl.training.augment import Augment, Preprocess
from fmtl.training.data.feeder import Resident
from fmtl.training.headfit import fit_linear_head
from fmtl.training.models import FmtlModel

MAPPED_CHUNK_ROWS = 2048  # rows of mapped features the head's solve reads at a time (10 MB of 1280-d ones)
MAX_VIEW_BYTES = 8 * 2**30  # --frozen-views: the most activation memory its cache may hold

Batch = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (images, indices, augment) -> model input


@torch.no_grad()
def extract_features(
    net: FmtlModel, accelerator: Accelerator, batch: Batch, sets: dict, quiet: bool, spill_dir: Path | None = None
) -> dict:
    """Backbone features of every image of each set (``name: (images, loader)``), computed once: each process
    its shard, then gathered batch by batch in order.

    With ``spill_dir`` (images read from a mapped store or shards) the features go to a file there that every
    process on the machine maps, so a process holds a batch of them, not all N x D: the features of a
    100,000-photo folder are 512 MB of page cache, shared, instead of that much in every rank.
    """
    net.eval()
    features = {}
    for name, (images, loader) in sets.items():
        path = None if spill_dir is None else spill_dir / _spill_name(name, accelerator)
        table = _InMemory() if path is None else _Mapped(path, len(images.data), accelerator.is_local_main_process)
        for indices in tqdm(loader, desc=f"caching {name} features", leave=False,
                            disable=quiet or not accelerator.is_local_main_process):  # fmt: skip
            feats, idx = accelerator.gather_for_metrics((net.features(batch(images, indices, False)), indices))
            table.put(idx, feats.float())
        features[name] = table.finish(accelerator)
    return features


def _spill_name(name: str, accelerator: Accelerator) -> str:
    """One file a set and a machine (its first process's rank names it): ranks of one machine share it."""
    return f".features-{name}-{accelerator.process_index - accelerator.local_process_index}.f32"


def _allocated(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float32 file of ``shape`` with its blocks allocated now: a disk too small fails here in one line,
    not as a SIGBUS in the middle of writing a mapped page."""
    try:
        with write_errors(path), open(path, "wb") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, int(np.prod(shape)) * 4)
    except WriteError:
        path.unlink(missing_ok=True)
        raise
    return np.memmap(path, dtype=np.float32, mode="r+", shape=shape)


class _InMemory:
    """Gathered features kept as one tensor on the model's device."""

    def __init__(self) -> None:
        self.parts, self.order = [], []

    def put(self, indices: torch.Tensor, feats: torch.Tensor) -> None:
        self.parts.append(feats)
        self.order.append(indices)

    def finish(self, accelerator: Accelerator) -> torch.Tensor:
        stacked, order = torch.cat(self.parts), torch.cat(self.order)
        return torch.empty_like(stacked).index_copy_(0, order.to(stacked.device), stacked)


class _Mapped:
    """Gathered features written by each machine's first process into a file that all its processes map."""

    def __init__(self, path: Path, rows: int, writer: bool) -> None:
        self.path, self.rows, self.writer = path, rows, writer
        self.shape, self.array = None, None

    def put(self, indices: torch.Tensor, feats: torch.Tensor) -> None:
        self.shape = (self.rows, *feats.shape[1:])
        if self.writer and self.array is None:
            self.array = _allocated(self.path, self.shape)
        if self.writer:
            self.array[indices.cpu().numpy()] = feats.cpu().numpy()

    def finish(self, accelerator: Accelerator) -> torch.Tensor:
        if self.array is not None:
            self.array.flush()
            self.array = None
        accelerator.wait_for_everyone()
        # copy-on-write: writable for torch, and its pages stay the shared file's while nobody writes them
        table = torch.from_numpy(np.memmap(self.path, dtype=np.float32, mode="c", shape=self.shape))
        accelerator.wait_for_everyone()
        if self.writer:
            self.path.unlink()  # the mappings keep the pages; nothing is left on disk after the run
        return table


@torch.no_grad()
def cache_views(
    net: FmtlModel, preprocess: Preprocess, images: Resident, blocks: int, views: int, augment: Augment | None,
    eval_batch_size: int, channels_last: bool, quiet: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The first ``blocks`` blocks' output for ``views`` views of every image, ``[V, N, ...]``.

    The first view is the plain image, the others augmented by ``augment`` (its own generator, seeded by
    --seed alone, so a resumed run rebuilds the same views).
    """
    net.eval()
    chunks = torch.arange(len(images.data)).split(eval_batch_size)
    result = []
    for view in tqdm(range(views), desc="caching views", leave=False, disable=quiet):
        parts = []
        for indices in chunks:
            x = preprocess(images.take(indices), augment if view else None)  # on the model's device
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            parts.append(net.prefix(x, blocks).float())
        result.append(torch.cat(parts))
    return torch.stack(result)


@torch.no_grad()
def check_views_fit(net: FmtlModel, one_image: torch.Tensor, blocks: int, views: int, n_images: int) -> None:
    """Refuse, before training, a --frozen-views cache that would not fit in MAX_VIEW_BYTES."""
    need = net.eval().prefix(one_image, blocks).numel() * 4 * n_images * views
    if need > MAX_VIEW_BYTES:
        raise ConfigError(
            f"--frozen-views {views} on {n_images:,} images would hold {need / 2**30:.1f} GiB of activations "
            f"(at most {MAX_VIEW_BYTES / 2**30:.0f}): fewer views, fewer images or a smaller --image-size, "
            "or --frozen-views 0"
        )


def fit_head(
    net: FmtlModel, cached: dict, train_labels: torch.Tensor, val_labels: torch.Tensor, mapped: bool = False
) -> str | None:
    """Solve a linear head by L-BFGS on the cached features; a line saying what was chosen (None: not linear).
    ``mapped``: the features are a mapped file (``extract_features``'s ``spill_dir``), read in chunks."""
    if not isinstance(net.head, torch.nn.Linear):
        return None
    chunk_rows = MAPPED_CHUNK_ROWS if mapped else None
    chosen = fit_linear_head(net.head, cached["train"], train_labels, cached["val"], val_labels, chunk_rows)
    return (
        f"head solved by L-BFGS on cached features: val acc {chosen['val_acc']:.4f} "
        f"(weight decay {chosen['weight_decay']:g}, chosen on val)"
    )
