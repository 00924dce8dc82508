"""Shards beside the store: images/s of the training batches and the anonymous memory of the process tree.

Packs a folder of generated photos (and, with --fashion-mnist, Fashion-MNIST) into shards, then reads one
epoch of training batches three ways in a fresh process each: from the folder's memory-mapped store, from
the shards in place, and from the shards as a bucket (``local:DIR``) through the bounded cache. Each reader
reports images/s and the peak RssAnon summed over its process tree (it and its DataLoader workers).

    .venv/bin/python benchmarks/data_shards.py [--images 4000] [--workers 2] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_anon_tree(pid: int) -> int:
    """RssAnon (bytes) of ``pid`` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon")) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        todo += map(int, children)
    return total


def reader(kind: str, source: str, workers: int, batch: int) -> None:
    """One epoch of training batches (the Trainer's loader), then a JSON line: images, seconds."""
    import torch

    from fmtl.training.data import feeder, load_dataset
    from fmtl.training.data.shards import shard_sampler

    data = load_dataset(source, "train")
    sampler = shard_sampler(data, batch, 0) if kind != "store" else None
    sampler = sampler or feeder.EpochSampler(len(data), batch, 0)
    resident = feeder.Resident(data, torch.device("cpu"))
    resident.images = None  # read through the workers, as from a store
    loader = feeder.train_loader(resident, sampler, workers)
    started, count = time.perf_counter(), 0
    for _, pixels in loader:
        count += len(pixels)
    print(json.dumps({"images": count, "seconds": time.perf_counter() - started}))


def measure(kind: str, source: str, args, env: dict) -> dict:
    command = [sys.executable, __file__, "--read", kind, "--source", source, "--workers", str(args.workers)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, rss_anon_tree(process.pid))
        time.sleep(0.05)
    result = json.loads(process.stdout.read().strip().splitlines()[-1])
    return {**result, "rss_anon_mib": peak / (1 << 20)}


def photos(root: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 4000], help="photo folder sizes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="write benchmarks/results/data_shards.md")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        return reader(args.read, args.source, args.workers, 64)
    from fmtl.training.data.pack import pack_source

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FMTL_CACHE_DIR": f"{tmp}/cache", "FMTL_SHARD_CACHE_MB": "64"}
        os.environ.update(env)
        for count in args.images:
            folder = photos(Path(tmp) / f"photos{count}", count)
            pack_source(str(folder), f"{tmp}/shards{count}", source_size=96, chunk_bytes=8 << 20, quiet=True)
            for kind, source in (("store", str(folder)), ("shards", f"{tmp}/shards{count}"),
                                 ("bucket", f"local:{tmp}/shards{count}")):  # fmt: skip
                result = measure(kind, source, args, env)
                rows.append((count, kind, result["images"] / result["seconds"], result["rss_anon_mib"]))
                print(f"{count:>7} {kind:>7} {rows[-1][2]:>9.0f} img/s {rows[-1][3]:>7.1f} MiB RssAnon", flush=True)
    if args.report:
        from benchmarks.results_file import write_results

        body = ["| train images | read from | images/s | RssAnon of the process tree (MiB) |", "|---:|---|---:|---:|"]
        body += [f"| {n} | {kind} | {rate:.0f} | {mib:.1f} |" for n, kind, rate, mib in rows]
        note = (f"96x96 RGB PNGs, batches of 64, {args.workers} DataLoader workers, one epoch each in a fresh "
                "process; bucket: `local:DIR` through the 64 MiB cache, shards of 8 MiB.")  # fmt: skip
        write_results("data_shards", "Training batches from shards beside the store", "\n".join(body) + "\n",
                      note=note)  # fmt: skip


if __name__ == "__main__":
    main()
