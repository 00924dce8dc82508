"""The head phase's cached features: from a store they live in a file every process on the machine maps
(page cache, not each rank's memory), equal to the in-memory ones, gone from the disk once mapped; the
linear head solved a chunk at a time on them lands where the solve in memory does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_store import photo_folder

from fmtl.training import caches
from fmtl.training.data import load_folder
from fmtl.training.data.feeder import Resident
from fmtl.training.headfit import fit_linear_head
from fmtl.training.prepare import index_loader


class Flatten:
    """A stand-in backbone: an image's features are its pixels, scaled."""

    def eval(self):
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() / 255


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FMTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def batch(images: Resident, indices: torch.Tensor, augment: bool) -> torch.Tensor:
    return images.take(indices)


def test_features_of_a_store_are_a_mapped_file_equal_to_the_in_memory_ones(tmp_path, cache):
    data = load_folder(photo_folder(tmp_path / "photos", per_class=7), None)
    accelerator = Accelerator(cpu=True)
    images = Resident(data, accelerator.device)
    sets = {"train": (images, accelerator.prepare(index_loader(len(data), 4)))}
    held = caches.extract_features(Flatten(), accelerator, batch, sets, True)["train"]
    mapped = caches.extract_features(Flatten(), accelerator, batch, sets, True, spill_dir=tmp_path)["train"]
    assert torch.equal(mapped, held) and torch.equal(held, data.images.flatten(1).float() / 255)
    assert not list(tmp_path.glob(".features-*"))  # nothing left on disk ...
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / ".features-train-0.f32") + " (deleted)" in maps  # ... and the rows are its file's pages


def test_the_head_solved_a_chunk_at_a_time_lands_where_the_solve_in_memory_does():
    torch.manual_seed(0)
    centres = torch.randn(5, 32) * 2
    labels, val_labels = torch.randint(0, 5, (3000,)), torch.randint(0, 5, (500,))
    train, val = centres[labels] + torch.randn(3000, 32) * 3 + 4, centres[val_labels] + torch.randn(500, 32) * 3 + 4
    held, chunked = torch.nn.Linear(32, 5), torch.nn.Linear(32, 5)
    chosen_held = fit_linear_head(held, train, labels, val, val_labels)
    chosen_chunked = fit_linear_head(chunked, train, labels, val, val_labels, chunk_rows=256)
    assert chosen_held == chosen_chunked  # same weight decay, same val accuracy
    assert torch.allclose(held.weight, chunked.weight, atol=1e-3) and torch.allclose(held.bias, chunked.bias, atol=1e-3)
