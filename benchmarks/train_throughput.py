"""Training throughput: fmtl against the lesson-style peer loop, in one process and one run.

    .venv/bin/python benchmarks/train_throughput.py            # full run, about 3-4 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run, about 1 minute

Three measurements, each against its reference in the same run:

1. The peer (``../shared/peers/lesson_loop.py``, run through its own ``main()``): per-sample
   torchvision transforms on PIL images, a frozen ResNet-18 (random weights) at 224 px with
   augmentation, batch 64, N timed batches after one warm-up batch.
2. fmtl on the same workload through its shipped code: a real ``Trainer`` (resnet18, random
   weights, ``linear`` strategy, new 10-class head, augmentation on, 224 px, batch 64) timing
   ``Trainer.train_step`` on uint8 index batches of real Fashion-MNIST. Peer and fmtl rounds
   alternate, so both see the same background load; the summary takes the median round.
3. The feature cache: EfficientNet-Lite0 (ImageNet weights) at 64 px, no augmentation, on a
   seeded subset of Fashion-MNIST: the epoch that extracts the backbone features against an
   epoch on the cached features (both through ``Trainer.train_one_epoch``).

Then variants of the frozen ResNet-18 forward (channels_last, inference_mode, BatchNorm mode,
folded BatchNorm, batch size, threads) and of the preprocessing, interleaved, median of
``--repeats``, to show where the speed comes from. Both loops use the same torch thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.fx.experimental.optimization import fuse

from fmtl.config import TrainConfig
from fmtl.data import find_fashion_mnist
from fmtl.train import Trainer, make_accelerator

DEFAULT_PEER = Path(__file__).resolve().parents[2] / "shared/peers/lesson_loop.py"
TARGET_SPEEDUP, TARGET_CACHE = 2.0, 50.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="the peer script [%(default)s]")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX .gz files (else fmtl's search)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per round, after 1 warm-up [10]")
    parser.add_argument("--rounds", type=int, default=2, help="alternating peer/fmtl rounds [2]")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, both loops [64]")
    parser.add_argument("--image-size", type=int, default=224, help="side the backbone sees, both loops [224]")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads, both loops (0: torch's default)")
    parser.add_argument("--cache-samples", type=int, default=5000, help="training images for the cache test [5000]")
    parser.add_argument("--cache-size", type=int, default=64, help="image side for the cache test [64]")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per variant (median) [3]")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                        help="time the forward/preprocessing variants [on]")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short run: 3 batches, 1 round, 1000 cache images, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds, args.cache_samples, args.repeats = 3, 1, 1000, 1
    return args


# ---------------------------------------------------------------- helpers


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores; torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def endless(loader) -> Iterator[torch.Tensor]:
    """Index batches epoch after epoch (a subset smaller than the run never runs dry)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ---------------------------------------------------------------- 1. the peer


def load_peer(path: Path):
    if not path.is_file():
        sys.exit(f"peer script not found: {path} (give --peer PATH)")
    spec = importlib.util.spec_from_file_location("lesson_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_rate(peer, args: argparse.Namespace, data_dir: Path) -> float:
    """One run of the peer's own ``main()``; its printed images/s."""
    argv = [str(args.peer), "--model", "resnet18", "--image-size", str(args.image_size), "--batch-size",
            str(args.batch_size), "--batches", str(args.batches), "--threads", str(torch.get_num_threads()),
            "--data-dir", str(data_dir)]  # fmt: skip
    printed, saved = io.StringIO(), sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(printed):
            peer.main()
    finally:
        sys.argv = saved
    match = re.search(r"([\d.]+) images/s", printed.getvalue())
    if match is None:
        sys.exit(f"the peer printed no rate: {printed.getvalue()!r}")
    return float(match.group(1))


# ---------------------------------------------------------------- 2. fmtl on the same workload


def throughput_config(args: argparse.Namespace, output: str) -> TrainConfig:
    return TrainConfig(
        model="resnet18", weights="none", strategy="linear", image_size=args.image_size,
        batch_size=args.batch_size, augment=True, quiet=True, save_state=False, output=output,
        max_train_samples=10_000, max_eval_samples=256, data_dir=args.data_dir,
    )  # fmt: skip


def fmtl_rate(trainer: Trainer, batches: Iterator[torch.Tensor], count: int) -> float:
    """``train_step`` as ``train_one_epoch`` runs it in a frozen phase with augmentation."""
    trainer.net.backbone_frozen = True
    trainer.model.train()
    trainer.net.backbone.eval()
    trainer.train_step(next(batches), use_cache=False)  # warm-up, as the peer's
    start, seen = time.perf_counter(), 0
    for _ in range(count):
        indices = next(batches)
        trainer.train_step(indices, use_cache=False)
        seen += len(indices)
    return seen / (time.perf_counter() - start)


def compare_loops(peer, trainer: Trainer, args: argparse.Namespace, data_dir: Path) -> tuple[float, float]:
    batches = endless(trainer.train_loader)
    peer_rates, fmtl_rates = [], []
    for round_ in range(1, args.rounds + 1):
        peer_rates.append(peer_rate(peer, args, data_dir))
        fmtl_rates.append(fmtl_rate(trainer, batches, args.batches))
        print(f"  round {round_}: peer {peer_rates[-1]:6.1f} img/s   fmtl {fmtl_rates[-1]:6.1f} img/s   "
              f"{fmtl_rates[-1] / peer_rates[-1]:.2f}x   (load {load_average()})", flush=True)  # fmt: skip
    return statistics.median(peer_rates), statistics.median(fmtl_rates)


# ---------------------------------------------------------------- 3. the feature cache


def cache_epochs(accelerator: Accelerator, args: argparse.Namespace, output: str) -> dict:
    """Seconds of the epoch that extracts features and of the epochs that reuse them."""
    cfg = TrainConfig(
        model="efficientnet_lite0", strategy="linear", image_size=args.cache_size, augment=False, epochs=3,
        max_train_samples=args.cache_samples, max_eval_samples=max(args.cache_samples // 10, 100),
        quiet=True, save_state=False, output=output, data_dir=args.data_dir,
    )  # fmt: skip
    trainer = Trainer(cfg, accelerator, Path(output))
    phase = trainer.phases[0]
    seconds = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        trainer.train_one_epoch(epoch, phase)
        seconds.append(time.perf_counter() - start)
    return {"extract": seconds[0], "cached": statistics.median(seconds[1:]), "train": len(trainer.train_set),
            "val": len(trainer.val_set), "batch_size": cfg.batch_size}  # fmt: skip


# ---------------------------------------------------------------- 4. where the speed comes from


def forward_variants(trainer: Trainer, args: argparse.Namespace) -> list[tuple[str, float]]:
    """images/s of the frozen backbone's forward pass, one change at a time from fmtl's setting."""
    backbone = trainer.net.backbone.eval()
    nchw = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    folded = fuse(backbone).to(memory_format=torch.channels_last)  # BatchNorm folded into the convolutions
    train_bn = copy.deepcopy(backbone).train()  # the peer's model.train(): batch statistics
    data = trainer.train_images
    batch = torch.arange(args.batch_size)
    x = trainer.batch(data, batch, augment=True)
    x_nchw = x.contiguous()
    x_half = trainer.batch(data, batch[: args.batch_size // 2], augment=True)
    x_double = trainer.batch(data, torch.arange(2 * args.batch_size) % len(data), augment=True)
    threads = torch.get_num_threads()

    def run(model, images, grad_mode=torch.no_grad, num_threads=threads):
        def call():
            torch.set_num_threads(num_threads)
            try:
                with grad_mode():
                    model(images)
            finally:
                torch.set_num_threads(threads)

        return call

    b = args.batch_size
    variants = {
        f"fmtl: eval, no_grad, channels_last, b{b}, {threads} threads": (run(backbone, x), b),
        "  NCHW (channels_last off)": (run(nchw, x_nchw), b),
        "  inference_mode instead of no_grad": (run(backbone, x, torch.inference_mode), b),
        "  BatchNorm in train mode (as the peer)": (run(train_bn, x), b),
        "  BatchNorm folded into conv (fx fuse)": (run(folded, x), b),
        f"  batch {b // 2}": (run(backbone, x_half), b // 2),
        f"  batch {2 * b}": (run(backbone, x_double), 2 * b),
    }
    if threads > 1:
        variants[f"  {threads // 2} thread(s)"] = (run(backbone, x, num_threads=threads // 2), b)
    return interleaved({name: fn for name, (fn, _) in variants.items()}, args.repeats,
                       {name: n for name, (_, n) in variants.items()})  # fmt: skip


def preprocessing_variants(trainer: Trainer, args: argparse.Namespace) -> list[tuple[str, float]]:
    """images/s of ``Trainer.batch`` (augment at the source size, then resize) and alternatives."""
    data, indices = trainer.train_images, torch.arange(args.batch_size)
    pre, augment = trainer.preprocess, trainer.augment

    def augment_after_resize():  # the peer's order: resize to 224 first, then warp every pixel at 224
        x = augment(pre.resize(data[indices].float() / 255.0))
        x = x.expand(-1, 3, -1, -1) * pre.scale + pre.shift
        return x.contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        x = trainer.batch(data, indices, augment=True)
        head_input = trainer.net.backbone(x)

    def head_step():  # what train_step adds after the backbone: head, loss, backward, optimizer
        logits = trainer.model(head_input, from_features=True)
        loss = torch.nn.functional.cross_entropy(logits, trainer.train_labels[indices], label_smoothing=0.1)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    variants = {
        "fmtl Trainer.batch: augment at 28 px, resize": lambda: trainer.batch(data, indices, augment=True),
        "  Trainer.batch without augmentation": lambda: trainer.batch(data, indices, augment=False),
        "  augment after resizing (at 224 px)": augment_after_resize,
        "  head + loss + backward + AdamW step": head_step,
    }
    with torch.no_grad():
        timed = interleaved({k: v for k, v in variants.items() if "backward" not in k}, args.repeats * 3,
                            dict.fromkeys(variants, args.batch_size))  # fmt: skip
    timed += interleaved({"  head + loss + backward + AdamW step": head_step}, args.repeats * 3,
                         {"  head + loss + backward + AdamW step": args.batch_size})  # fmt: skip
    return timed


def interleaved(calls: dict[str, Callable], repeats: int, images: dict[str, int]) -> list[tuple[str, float]]:
    """Median images/s of each call, the calls taking turns so background load hits them alike."""
    for fn in calls.values():
        fn()  # warm-up: oneDNN builds its kernels for each shape and layout on first use
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(median_time(fn, 1))
    return [(name, images[name] / statistics.median(t)) for name, t in times.items()]


def print_rates(title: str, rates: list[tuple[str, float]]) -> None:
    print(title)
    reference = rates[0][1]
    for name, rate in rates:
        print(f"  {name:<52} {rate:8.1f} img/s   {rate / reference:5.2f}x")


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    data_dir = find_fashion_mnist(args.data_dir)
    if data_dir is None:
        sys.exit("Fashion-MNIST not found: give --data-dir, set FMTL_DATA_DIR, or apt-get install dataset-fashion-mnist")
    peer = load_peer(args.peer)
    with tempfile.TemporaryDirectory(prefix="fmtl-bench-") as tmp:
        cfg = throughput_config(args, str(Path(tmp) / "resnet18"))
        accelerator = make_accelerator(cfg, Path(cfg.output))  # Accelerate's state is process-wide: one only
        if args.threads:
            torch.set_num_threads(args.threads)
        set_seed(cfg.seed)
        print(f"machine: {machine()}; load average {load_average()}")
        print(f"peer: {args.peer}\ndata: {data_dir}\n")
        trainer = Trainer(cfg, accelerator, Path(cfg.output))
        tag = f"resnet18 {args.image_size}px b{args.batch_size} aug"
        print(f"throughput, {tag}, {args.batches} timed batches after 1 warm-up, {args.rounds} round(s):", flush=True)
        peer_ips, fmtl_ips = compare_loops(peer, trainer, args, data_dir)
        if args.variants:
            print()
            print_rates("frozen resnet18 forward, one change at a time:", forward_variants(trainer, args))
            print_rates("per-batch work besides the backbone:", preprocessing_variants(trainer, args))
        del trainer
        accelerator.free_memory()
        print(f"\nfeature cache: efficientnet_lite0 {args.cache_size}px, {args.cache_samples} images ...", flush=True)
        cache = cache_epochs(accelerator, args, str(Path(tmp) / "lite0"))
    cache_tag = f"lite0 {args.cache_size}px {cache['train']} imgs:"
    print(f"  extract epoch: backbone on {cache['train']} train + {cache['val']} val images, then the head; "
          f"cached epochs: the head alone, batch {cache['batch_size']} (median of epochs 2-3)\n")  # fmt: skip
    print(f"peer lesson loop   {tag}: {peer_ips:6.1f} img/s")
    print(f"fmtl               {tag}: {fmtl_ips:6.1f} img/s   {fmtl_ips / peer_ips:.2f}x peer   "
          f"(target >= {TARGET_SPEEDUP:g}x)")  # fmt: skip
    print(f"feature cache      {cache_tag:<28} extract epoch {cache['extract']:.2f} s, cached epoch "
          f"{cache['cached']:.3f} s   {cache['extract'] / cache['cached']:.0f}x  (target >= {TARGET_CACHE:g}x)")  # fmt: skip
    print(f"machine            {machine()}; load average {load_average()}")


if __name__ == "__main__":
    main()
