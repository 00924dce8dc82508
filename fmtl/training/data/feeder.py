"""The feeder: which images each step gets, and how they reach it.

- ``EpochSampler``: batches of positions in an order that is a pure function of (seed, epoch), so a run
  killed mid-epoch resumes at its saved batch (``seek``; not ``set_epoch``, which Accelerate calls with its
  own count) without replaying any, whatever the number of workers. Accelerate shards its batches across
  ranks (rank r takes batches r, r + N, ...); with several ranks the epoch is padded to whole rounds of full
  batches, so every rank takes the same number.
- ``Resident``: a split's images where the step reads them: on the device when they fit its free memory
  shared among the ranks on it, else where they are (in memory, or the store's mapped pages).
- ``train_loaders``: index batches; for images that are not resident, also a loader whose DataLoader
  workers (pinned on CUDA) gather each batch's uint8 pixels off the main process, for the phases that train
  on images (a phase on cached features or views needs only the indices). Augmentation stays on the device.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset

from fmtl.training.data.imageset import ImageSet

DEVICE_SHARE = 0.25  # of a GPU's free memory (per rank on it) that a split's uint8 images may take
GPU_WORKERS = 4


class EpochSampler:
    """Batches of positions ``0..n-1``, shuffled by (seed, epoch); resumable at any batch."""

    def __init__(self, n: int, batch_size: int, seed: int, processes: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.processes = n, batch_size, seed, processes
        self.epoch, self.start = 0, 0

    def seek(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, and the first batch of it to hand out (a resumed run's position)."""
        self.epoch, self.start = epoch, start

    def batches(self) -> int:
        """Batches in a whole epoch, all ranks together."""
        batches = math.ceil(self.n / self.batch_size)
        return batches if self.processes == 1 else math.ceil(batches / self.processes) * self.processes

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=generator)

    def __len__(self) -> int:
        return self.batches() - self.start

    def __iter__(self):
        order = self.order()
        if self.processes > 1:  # whole rounds of full batches: wrap around the epoch's own order
            need = self.batches() * self.batch_size
            order = order.repeat(math.ceil(need / self.n))[:need]
        for batch in range(self.start, self.batches()):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()


def sampler_for(data: ImageSet, batch_size: int, seed: int, processes: int):
    """The training sampler: for packed shards one that has each rank read only its own chunks, else
    ``EpochSampler``."""
    from fmtl.training.data.shards import shard_sampler

    return shard_sampler(data, batch_size, seed, processes) or EpochSampler(len(data), batch_size, seed, processes)


class Resident:
    """A split's images for the step: ``take(indices)`` gives the uint8 batch on the device."""

    def __init__(self, data: ImageSet, device: torch.device, ranks_on_device: int = 1) -> None:
        self.data, self.device = data, device
        self.images = _device_copy(data, device, ranks_on_device)  # None: read from the set as needed

    @property
    def on_device(self) -> bool:
        return self.images is not None

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        if self.images is not None:
            return self.images[indices.to(self.images.device)]
        return self.data.take(indices.cpu()).to(self.device, non_blocking=True)


def _device_copy(data: ImageSet, device: torch.device, ranks_on_device: int) -> torch.Tensor | None:
    """The split's images on ``device`` when they belong there: always for an in-memory set on a CPU (the
    split's own copy, as fast as it gets); on a GPU when they fit its free memory shared among its ranks."""
    if getattr(data.pixels, "streamed", False):  # packed shards: read as the batches ask, never whole
        return None
    if device.type == "cpu":
        return None if data.mapped else data.images
    free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
    if data.nbytes > free * DEVICE_SHARE / max(1, ranks_on_device):
        return None
    out = torch.empty((len(data), *data.pixels.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, len(data), 4096):  # bounded host copies of a mapped store
        stop = min(start + 4096, len(data))
        out[start:stop] = data.take(torch.arange(start, stop)).to(device)
    return out


class _Positions(Dataset):
    """Index batches only: the step gathers the pixels from resident images."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, positions: list[int]) -> torch.Tensor:
        return torch.tensor(positions)


class _Gathered(_Positions):
    """Index batches with their uint8 pixels, read from the set (a store's mapped pages) in a worker."""

    def __init__(self, data: ImageSet) -> None:
        super().__init__(len(data))
        self.data = data

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.tensor(positions)
        return indices, self.data.take(indices)


def _as_is(batch):
    return batch


def train_loaders(resident: Resident, sampler: EpochSampler, workers: int) -> list[DataLoader]:
    """The training batches, in ``sampler``'s order: ``[indices]`` when the images are resident, else
    ``[indices, (indices, pixels) from workers]``.

    Each loader has a generator of its own: a new iterator draws its workers' base seed from it, never from
    the global RNG, so the run's random numbers do not depend on the workers or on where a resumed run began."""
    generator = torch.Generator().manual_seed(sampler.seed)
    indices = DataLoader(_Positions(len(resident.data)), batch_sampler=sampler, collate_fn=_as_is, generator=generator)
    if resident.on_device:
        return [indices]
    pin = resident.device.type == "cuda"
    return [indices, DataLoader(
        _Gathered(resident.data), batch_sampler=sampler, collate_fn=_as_is, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, prefetch_factor=2 if workers else None, generator=generator,
    )]  # fmt: skip


def worker_count(requested: int, device: torch.device, local_processes: int) -> int:
    """--workers: as asked, or 0 on a CPU (the step has every core) and up to 4 a rank on a GPU."""
    if requested >= 0:
        return requested
    if device.type == "cpu":
        return 0
    return max(0, min(GPU_WORKERS, (os.cpu_count() or 1) // max(1, local_processes) - 1))


def ranks_on_device(accelerator) -> int:
    """How many of the run's processes share this process's device (its memory is theirs to split)."""
    if accelerator.device.type != "cuda":
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, math.ceil(local / max(1, torch.cuda.device_count())))
