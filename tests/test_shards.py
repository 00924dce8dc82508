"""Packed shards (fmtl.training.data.shards): the pack, its resume, one-line faults, the bounded cache and the
chunk-aware sampler's promises (a pure function of seed and epoch, each rank its own chunks, equal batches)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("litdata")

from fmtl.errors import DataError  # noqa: E402
from fmtl.training.data.imageset import ImageSet  # noqa: E402
from fmtl.training.data.pack import pack  # noqa: E402
from fmtl.training.data.shards import ShardSampler, open_split, shard_sampler  # noqa: E402


def images(n: int = 300, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.integers(0, 256, (n, 3, 6, 5), dtype=np.uint8))
    labels = torch.arange(n) % 4
    return ImageSet(pixels, labels, ["a", "b", "c", "d"], "test")


@pytest.fixture
def packed(tmp_path):
    sets = {"train": images(300), "val": images(40, 1)}
    pack(sets, tmp_path / "shards", chunk_bytes=90 * 32, quiet=True)  # 32 images a chunk: 10 chunks
    return sets, tmp_path / "shards"


def test_a_pack_reads_back_as_its_source_in_the_packed_order(packed, tmp_path):
    sets, out = packed
    manifest = json.loads((out / "fmtl-shards.json").read_text())
    assert manifest["splits"]["train"]["chunks"] == 10 and manifest["classes"] == ["a", "b", "c", "d"]
    data = open_split(str(out), "train", tmp_path / "cache")
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(data.labels, sets["train"].labels[order])
    ids = torch.tensor([0, 299, 31, 32, 150])
    assert torch.equal(data.take(ids), sets["train"].pixels[order[ids]])
    assert data.mapped and len(data) == 300 and data.size == (6, 5) and data.channels == 3
    from litdata import StreamingDataset  # the format is LitData's: its own reader agrees

    item = StreamingDataset(str(out / "train"))[77]
    assert item["id"] == 77 and np.array_equal(item["image"], sets["train"].pixels[order[77]].numpy())


def test_a_killed_pack_resumes_keeping_the_whole_chunks(packed):
    sets, out = packed
    (out / "train" / "chunk-000004.bin").unlink()  # as if killed before its rename
    (out / "train" / ".parts" / "000007.json").unlink()  # killed between the rename and its record
    (out / "fmtl-shards.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("chunk-*.bin")}
    index = (out / "train" / "index.json").read_text()
    pack(sets, out, chunk_bytes=90 * 32, quiet=True)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("chunk-*.bin")}
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed == {"chunk-000004.bin", "chunk-000007.bin"}
    assert (out / "train" / "index.json").read_text() == index and (out / "fmtl-shards.json").is_file()
    assert not list((out / "train").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_shard_is_one_line(packed, tmp_path, damage):
    _, out = packed
    chunk = out / "train" / "chunk-000003.bin"
    if damage == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(DataError) as error:
        open_split(str(out), "train", tmp_path / "cache")
    assert "\n" not in str(error.value) and "chunk-000003.bin" in str(error.value) and damage in str(error.value)
    remote = open_split(f"local:{out}", "train", tmp_path / "cache")  # a bucket: found when the chunk is fetched
    with pytest.raises(DataError) as error:
        remote.take(torch.arange(90, 110))
    assert "\n" not in str(error.value) and "chunk-000003.bin" in str(error.value)


def test_no_pack_and_no_litdata_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="fmtl data pack"):
        open_split(f"local:{tmp_path}", "train", tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "litdata.streaming.downloader", None)
    with pytest.raises(DataError, match=r"pip install 'fmtl\[stream\]'"):
        open_split(str(tmp_path), "train", tmp_path / "cache")


def test_the_cache_of_a_bucket_stays_within_its_byte_limit(packed, tmp_path, monkeypatch):
    sets, out = packed
    chunk_bytes = (out / "train" / "chunk-000000.bin").stat().st_size
    monkeypatch.setenv("FMTL_SHARD_CACHE_MB", str(3.5 * chunk_bytes / (1 << 20)))
    data = open_split(f"local:{out}", "train", tmp_path / "cache")
    sampler = shard_sampler(data, 16, seed=3)
    cache = tmp_path / "cache" / "shards"
    peak = 0
    for epoch in (1, 2):
        sampler.seek(epoch)
        for batch in sampler:
            data.take(batch)
            peak = max(peak, sum(p.stat().st_size for p in cache.rglob("*.bin")))
    assert chunk_bytes * 2 <= peak <= 3.5 * chunk_bytes
    assert torch.equal(data.take(torch.arange(300)), open_split(str(out), "train", tmp_path).take(torch.arange(300)))


def chunks_of(n=300, per=32):
    return torch.arange(n) // per


def test_the_order_is_a_pure_function_of_seed_and_epoch_and_seek_resumes_it():
    sampler = ShardSampler(chunks_of(), 16, seed=5)
    sampler.seek(2)
    epoch2 = list(sampler)
    assert sorted(i for b in epoch2 for i in b) == list(range(300))  # one process: each image once
    assert len(epoch2) == 19 and len(epoch2[-1]) == 300 - 18 * 16
    again = ShardSampler(chunks_of(), 16, seed=5)
    again.seek(2, start=7)
    assert list(again) == epoch2[7:] and len(again) == 12
    again.seek(3)
    assert list(again) != epoch2


@pytest.mark.parametrize("processes", [2, 4])
def test_each_rank_reads_only_its_chunks_and_gets_as_many_batches(processes):
    sampler = ShardSampler(chunks_of(), 16, seed=1, processes=processes)
    for epoch in (1, 2):
        sampler.seek(epoch)
        batches = list(sampler)
        ranks = [batches[r::processes] for r in range(processes)]  # Accelerate's round-robin sharding
        assert len({len(r) for r in ranks}) == 1 and all(len(b) == 16 for b in batches)
        seen = [{i for b in rank for i in b} for rank in ranks]
        assert set().union(*seen) == set(range(300))
        assert sum(len(s) for s in seen) == 300  # each image read by exactly one rank
        chunks = [{i // 32 for i in s} for s in seen]
        shared = [c for c in range(10) if sum(c in cs for cs in chunks) > 1]
        assert len(shared) <= processes - 1  # only where one rank's run of chunks ends and the next begins


def test_the_order_does_not_depend_on_the_number_of_processes():
    n = 8 * 16 * 3  # no padding: the same epoch for 1, 2, 4 and 8 processes
    orders = []
    for processes in (1, 2, 4, 8):
        sampler = ShardSampler(torch.arange(n) // 20, 16, seed=2, processes=processes)
        sampler.seek(4)
        orders.append(list(sampler))
    assert all(order == orders[0] for order in orders)


def test_a_subset_of_a_pack_keeps_its_chunks(packed, tmp_path):
    _, out = packed
    data = open_split(str(out), "train", tmp_path / "cache").subset(torch.arange(0, 300, 3))
    sampler = shard_sampler(data, 10, seed=0, processes=2)
    assert torch.equal(sampler.chunk_of, torch.arange(0, 300, 3) // 32)
    assert os.environ.get("FMTL_SHARD_TRACE") is None
