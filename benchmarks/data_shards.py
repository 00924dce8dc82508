"""Shards beside the store: images/s of the training batches and the anonymous memory of the process tree.

Packs a folder of generated photos into shards, then reads one epoch of training batches three ways in a
fresh process each: from the folder's memory-mapped store, from the shards in place, and from the shards
as a bucket (``local:DIR``) through the bounded cache. Each reader reports images/s and the peak RssAnon
summed over its process tree (it and its DataLoader workers).

With ``--accuracy``: two processes fine-tuned from packed shards against the same two-process run from the
source (a seeded Fashion-MNIST subset, and a generated photo folder whose classes are shapes): test accuracy.

    .venv/bin/python benchmarks/data_shards.py [--images 4000 20000] [--workers 2] [--accuracy] [--report]
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

    data = load_dataset(source, "train")
    sampler = feeder.sampler_for(data, batch, 0, 1)  # for shards, the ShardSampler
    resident = feeder.Resident(data, torch.device("cpu"))
    resident.images = None  # read through the workers, as from a store
    loader = feeder.train_loaders(resident, sampler, workers)[-1]
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


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def photos(root: Path, count: int, side: int = 96) -> Path:
    """``count`` seeded JPEGs, one shape a class, of a random colour, size and place on a noisy cluttered ground."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(1)
    for i in range(count):
        ground = rng.integers(0, 256, 3) + rng.normal(0, 40, (side, side, 3))
        image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
        draw, shape = ImageDraw.Draw(image), SHAPES[i % len(SHAPES)]
        for _ in range(3):
            draw.line(tuple(rng.integers(0, side, 4).tolist()), fill=tuple(rng.integers(0, 256, 3).tolist()), width=2)
        colour, s = tuple(rng.integers(0, 256, 3).tolist()), int(rng.integers(side // 6, side // 3))
        x, y = rng.integers(s, side - s, 2).tolist()
        box = (x - s, y - s, x + s, y + s)
        if shape in ("circle", "ring"):
            draw.ellipse(box, fill=colour if shape == "circle" else None, outline=colour, width=max(2, s // 4))
        elif shape == "triangle":
            draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=colour)
        else:  # square, cross, bar
            draw.rectangle(box if shape == "square" else (x - s, y - s // 5, x + s, y + s // 5), fill=colour)
            if shape == "cross":
                draw.rectangle((x - s // 5, y - s, x + s // 5, y + s), fill=colour)
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2)))).save(folder / f"{i:06d}.jpg", quality=85)
    return root


def train_accuracy(data: list[str], options: list[str], out: Path, env: dict) -> tuple[float, int, float]:
    """Two processes trained on ``data``: (test accuracy, test images, seconds)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "launch/cpu-multiprocess.yaml"), "--main_process_port", str(port),
               str(ROOT / "fmtl/train.py"), "--data", *data, *options, "--quiet", "--output", str(out)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["accuracy"], metrics["num_images"], time.perf_counter() - started


TUNE = ["--strategy", "finetune", "--batch-size", "64", "--workers", "1"]
FM_OPTIONS = [*TUNE, "--epochs", "2", "--image-size", "32"]
PHOTO_OPTIONS = [*TUNE, "--epochs", "3", "--image-size", "64"]


def accuracy(tmp: Path, env: dict) -> list[tuple]:
    """(data, how, accuracy, test images, seconds) for the store and the shards of two sources, 2 processes each."""
    from fmtl.training.data import load_dataset, seeded_subset
    from fmtl.training.data.pack import pack, pack_source

    train = seeded_subset(load_dataset("fashion-mnist", "train"), 6000, seed=0)  # what --max-*-samples take
    val = seeded_subset(load_dataset("fashion-mnist", "val"), 1000, seed=0)
    pack({"train": train, "val": val, "test": load_dataset("fashion-mnist", "test")}, tmp / "fm-pack",
         chunk_bytes=784 * 250, source="fashion-mnist", quiet=True)  # fmt: skip
    folder = photos(tmp / "shapes", 6000, side=64)
    pack_source(str(folder), tmp / "shapes-pack", val_fraction=0.25, source_size=64, chunk_bytes=2 << 20, quiet=True)
    runs = [("Fashion-MNIST, 6000 train", ["fashion-mnist", "--max-train-samples", "6000", "--max-val-samples", "1000"],
             [str(tmp / "fm-pack")], FM_OPTIONS),
            ("shapes folder, 4500 train", [str(folder), "--source-size", "64", "--val-fraction", "0.25"],
             [str(tmp / "shapes-pack")], PHOTO_OPTIONS)]  # fmt: skip
    rows = []
    for name, source, shards, options in runs:
        for how, data in (("store", source), ("shards", shards)):
            rows.append((name, how, *train_accuracy(data, options, tmp / f"run-{len(rows)}", env)))
            print(f"{name:>26} {how:>7} test accuracy {rows[-1][2]:.4f} ({rows[-1][3]} images)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[4000, 20000], help="photo folder sizes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--accuracy", action="store_true", help="also: 2 processes trained from store and shards")
    parser.add_argument("--note", default="", help="a line added to the report (e.g. that the machine was shared)")
    parser.add_argument("--report", action="store_true", help="write benchmarks/results/data_shards.md")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        return reader(args.read, args.source, args.workers, 64)
    from fmtl.training.data.pack import pack_source

    rows, trained = [], []
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
        if args.accuracy:
            trained = accuracy(Path(tmp), env)
    if args.report:
        from benchmarks.results_file import write_results

        body = ["| train images | read from | images/s | RssAnon of the process tree (MiB) |", "|---:|---|---:|---:|"]
        body += [f"| {n} | {kind} | {rate:.0f} | {mib:.1f} |" for n, kind, rate, mib in rows]
        note = (f"96x96 RGB JPEGs, batches of 64, {args.workers} DataLoader workers, one epoch each in a fresh "
                "process; bucket: `local:DIR` through the 64 MiB cache, shards of 8 MiB.")  # fmt: skip
        if trained:
            body += ["", "| data | trained from (2 processes) | test accuracy | test images | wall s |",
                     "|---|---|---:|---:|---:|"]  # fmt: skip
            body += [f"| {name} | {how} | {acc:.2%} | {n} | {s:.0f} |" for name, how, acc, n, s in trained]
            note += (" Accuracy: efficientnet_lite0 fine-tuned (`--strategy finetune`), Fashion-MNIST "
                     f"`{' '.join(FM_OPTIONS)}`, shapes `{' '.join(PHOTO_OPTIONS)}`; the store and the shards "
                     "hold the same train, val and test images.")  # fmt: skip
        note += f" {args.note}" if args.note else ""
        write_results("data_shards", "Training batches from shards beside the store", "\n".join(body) + "\n",
                      note=note)  # fmt: skip


if __name__ == "__main__":
    main()
