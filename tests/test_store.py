"""The memory-mapped store and the feeder: built once and shared, never read when stale or damaged, and a
sampler whose order is a pure function of (seed, epoch), sharded evenly, resumable at any batch."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmtl.training.data import load_dataset, load_folder
from fmtl.training.data import store as store_module
from fmtl.training.data.feeder import EpochSampler, Resident


def photo_folder(root: Path, per_class: int = 6, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FMTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def store_folder(cache: Path) -> Path:
    (found,) = [p for p in (cache / "stores").iterdir() if ".tmp-" not in p.name]
    return found


def test_a_folder_is_decoded_once_into_a_mapped_store_that_splits_do_not_copy(tmp_path, cache, monkeypatch):
    root = photo_folder(tmp_path / "photos")
    first = load_folder(root, None)
    data_file = store_folder(cache) / store_module.DATA_FILE
    assert first.mapped and str(data_file) in Path("/proc/self/maps").read_text()  # file pages, not our memory
    assert len(first) == 18 and first.size == (30, 40) and first.channels == 3
    expected = np.asarray(Image.open(root / "class1" / "2.png")).transpose(2, 0, 1)
    assert np.array_equal(first.take([6 + 2])[0].numpy(), expected)  # sorted classes, then sorted files
    monkeypatch.setattr(store_module, "_build", lambda *a: pytest.fail("decoded again"))
    train = load_dataset(str(root), "train", val_fraction=0.2)
    assert train.mapped and train.rows is not None and train.pixels.shape[0] == 18  # a split is indices into the store
    assert torch.equal(train.images, first.take(train.rows))


def test_images_larger_than_source_size_are_stored_at_it(tmp_path, cache):
    root = photo_folder(tmp_path / "photos", size=(64, 48))
    assert load_folder(root, None, source_size=32).size == (32, 32)  # never a store of 12 MP photos
    assert load_folder(photo_folder(tmp_path / "small", size=(24, 20)), None, source_size=32).size == (20, 24)


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_a_source_file_added_removed_or_changed_is_noticed_and_rebuilt(tmp_path, cache, capsys, change):
    root = photo_folder(tmp_path / "photos")
    load_folder(root, None)
    target = root / "class0" / "0.png"
    if change == "added":
        Image.new("RGB", (40, 30), (9, 9, 9)).save(root / "class0" / "new.png")
    elif change == "removed":
        target.unlink()
    else:
        Image.new("RGB", (40, 30), (1, 2, 3)).save(target)
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    data = load_folder(root, None)
    assert f"1 file(s) {change} since it was built: rebuilding it" in capsys.readouterr().err
    assert len(data) == {"added": 19, "removed": 17, "changed": 18}[change]
    if change == "changed":
        assert data.take([0])[0, :, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncated", "edited", "manifest"])
def test_a_truncated_or_edited_store_is_rebuilt_never_read_as_data(tmp_path, cache, capsys, damage):
    root = photo_folder(tmp_path / "photos")
    good = load_folder(root, None).images.clone()
    folder = store_folder(cache)
    data_file = folder / store_module.DATA_FILE
    if damage == "truncated":
        os.truncate(data_file, data_file.stat().st_size // 2)
    elif damage == "edited":
        with open(data_file, "r+b") as handle:
            handle.write(b"\xff" * 64)
    else:
        (folder / store_module.MANIFEST_FILE).write_text("{not json")
    again = load_folder(root, None)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "fmtl: " in line and "rebuilding it" in line]) == 1
    assert torch.equal(again.images, good)


def test_a_build_abandoned_by_a_killed_process_is_never_read_and_is_cleared(tmp_path, cache):
    root = photo_folder(tmp_path / "photos")
    key = store_module.store_key(root, 224)
    dead = cache / "stores" / f"{key}.tmp-999999999"  # no such pid
    dead.mkdir(parents=True)
    (dead / store_module.DATA_FILE).write_bytes(b"\0" * 100)
    data = load_folder(root, None)
    assert len(data) == 18 and not dead.exists()


def test_a_failed_build_leaves_no_store(tmp_path, cache, monkeypatch):
    root = photo_folder(tmp_path / "photos")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "_decode_into", no_space)
    with pytest.raises(OSError, match="No space left"):
        load_folder(root, None)
    assert not list((cache / "stores").iterdir())


def test_the_sampler_order_is_a_pure_function_of_seed_and_epoch():
    a, b = EpochSampler(100, 8, seed=3), EpochSampler(100, 8, seed=3)
    a.seek(5)
    list(EpochSampler(100, 8, seed=3))  # drawing another sampler changes nothing
    b.seek(5)
    assert list(a) == list(b)
    a.seek(6)
    assert list(a) != list(b)
    assert sorted(sum(list(b), [])) == list(range(100)) and len(list(b)) == 13  # every image once, last batch short


def test_a_resumed_sampler_hands_out_the_rest_of_its_epoch():
    whole = EpochSampler(100, 8, seed=1)
    whole.seek(2)
    resumed = EpochSampler(100, 8, seed=1)
    resumed.seek(2, start=5)
    assert list(resumed) == list(whole)[5:] and len(resumed) == 8


@pytest.mark.parametrize("processes", [2, 3])
def test_several_ranks_get_equal_full_batches_covering_every_image(processes):
    sampler = EpochSampler(101, 8, seed=0, processes=processes)
    batches = list(sampler)
    assert len(batches) % processes == 0 and all(len(batch) == 8 for batch in batches)
    per_rank = [batches[rank::processes] for rank in range(processes)]  # Accelerate's round-robin shard
    assert len({len(mine) for mine in per_rank}) == 1
    assert set(sum(batches, [])) == set(range(101))


def test_host_resident_images_reach_the_device_the_step_runs_on(tmp_path, cache):
    data = load_folder(photo_folder(tmp_path / "photos"), None)
    resident = Resident(data, torch.device("cpu"))
    assert not resident.on_device  # a mapped store is read where it is, a batch at a time
    assert torch.equal(resident.take(torch.tensor([3, 1])), data.images[[3, 1]])
    resident.device = torch.device("meta")  # any device: the batch is moved onto it, not left on the host
    assert resident.take(torch.tensor([0])).device.type == "meta"


def test_photos_of_another_shape_are_centre_cropped_and_the_runtime_decodes_them_the_same(tmp_path, cache):
    from fmtl.runtime.images import decode_image
    from fmtl.spec import InputSpec

    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 200  # a bright centre third, black sides
    Image.fromarray(wide).save(root / "a" / "wide.png")
    Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(root / "b" / "square.png")
    data = load_folder(root, None, source_size=20)
    assert data.fit == "crop" and data.size == (20, 20)
    stored = data.take([0])[0].numpy()
    assert stored.min() >= 190  # the centre, not the whole photo squashed (which keeps the black sides)
    spec = InputSpec(channels=3, source_size=(20, 20), image_size=32, fit=data.fit)
    assert np.array_equal(decode_image(root / "a" / "wide.png", 3, spec.source_size, fit=spec.fit), stored)
    old = InputSpec.from_dict({"channels": 3, "source_size": [20, 20], "image_size": 32})
    assert old.fit == "stretch"  # models saved before the policy was recorded keep theirs
    assert decode_image(root / "a" / "wide.png", 3, old.source_size, fit=old.fit).min() == 0


def test_a_store_the_disk_cannot_hold_is_refused_before_decoding(tmp_path, cache, monkeypatch):
    import shutil
    from collections import namedtuple

    from fmtl.errors import DataError

    root = photo_folder(tmp_path / "photos")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))  # 18 photos need 64,800
    monkeypatch.setattr(store_module, "_decode_into", lambda *a: pytest.fail("decoded anyway"))
    with pytest.raises(DataError, match="needs 0.1 MiB and .* has 0.0 MiB free: free some space"):
        load_folder(root, None)
    assert not [p for p in (cache / "stores").iterdir()]
