"""Training throughput: fmtl against a peer loop measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py            # full run, about 3-4 minutes on 2 quiet cores
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run, about 1 minute
    python benchmarks/train_throughput.py --device cuda --report   # fine-tuning on a GPU against its ceiling
    .venv/bin/python benchmarks/train_throughput.py --device cpu   # the same, small, on the CPU

With ``--device cuda|cpu`` it measures fine-tuning instead (the last part of this file): fmtl's own
Trainer and epoch loop on EfficientNet-Lite0 (224 px, batches of 128, 256 and 512, fp32/bf16/fp16,
with and without torch.compile on a GPU; 64 px, batches of 8 and 16 on a CPU) against a minimal
plain-PyTorch AdamW loop on the same model and data (the ceiling), printing images/s, peak GPU memory
and each rate over the ceiling's; ``--report`` writes the table to
``benchmarks/results/train_throughput_<device>.md``. Without ``--device``, the CPU race below:

1. The peer (``benchmarks/peers/lesson_loop.py``, a copy of the shared peer, run through its own ``main()``): per-sample
   torchvision transforms on PIL images, a frozen ResNet-18 (random weights) at 224 px with
   augmentation, batch 64, N timed batches after one warm-up batch.
2. fmtl on the same workload through its shipped code: a real ``Trainer`` (resnet18, random
   weights, ``linear`` strategy, new 10-class head, augmentation on, 224 px, batch 64) timing
   ``Trainer.train_step`` on uint8 index batches of real Fashion-MNIST, N batches after one
   warm-up. The same step with the frozen backbone's BatchNorm folded into its convolutions,
   and with the frozen backbone compiled (``torch.compile``, inductor freezing), is timed
   beside it: changes proposed for fmtl, not shipped. Peer and fmtl runs alternate, and the
   summary takes the median of the undisturbed runs of each.
3. The feature cache: EfficientNet-Lite0 (ImageNet weights) at 64 px, no augmentation, on a
   seeded subset of Fashion-MNIST: the epoch that extracts the backbone features against an
   epoch on the cached features (both ``Trainer.train_one_epoch``).
4. Where the speed comes from: the frozen ResNet-18 forward with one change at a time
   (channels_last, inference_mode, BatchNorm mode, folded BatchNorm, batch size, threads),
   and the per-batch work besides it; interleaved, median of ``--repeats``.
5. Last, the peer and fmtl once more with glibc told to keep freed memory (``mallopt``): by
   default each batch's activations are fresh mmap'ed pages, faulted in and zeroed by the kernel.
   Process-wide and not undoable, hence last. fmtl's ``run()`` now does this on CPUs
   (``fmtl.train.keep_freed_memory``), so "kept memory: fmtl" against the first "peer lesson
   loop" line is fmtl as shipped against the peer as shipped; the first "fmtl" line is the same
   training step without the allocator setting (this script builds a Trainer, not ``run()``).

Both loops use the same torch thread count. This machine may be shared: every measurement
notes the share of the CPU other processes took meanwhile (from /proc/stat), and one where
they took more than ``--max-background`` is measured again (up to ``--retries`` times).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import io
import math
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.fx.experimental.optimization import fuse

from fmtl.training.config import TrainConfig
from fmtl.training.data import find_fashion_mnist
from fmtl.training.loop import Trainer
from fmtl.training.phases import ImageInput
from fmtl.training.prepare import load_splits, make_accelerator
from fmtl.training.settings import resolve

DEFAULT_PEER = Path(__file__).resolve().parent / "peers/lesson_loop.py"
TARGET_SPEEDUP, TARGET_CACHE = 2.0, 50.0
PEER, FMTL = "peer lesson loop", "fmtl"
FOLDED, COMPILED = "fmtl + folded BatchNorm *", "fmtl + compiled backbone *"  # * proposed, not shipped


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--peer", type=Path, default=DEFAULT_PEER, help="the peer script [%(default)s]")
    add("--data-dir", help="folder of the Fashion-MNIST IDX .gz files (else fmtl's own search)")
    add("--batches", type=int, default=10, help="timed batches per run, after 1 warm-up [10]")
    add(
        "--rounds",
        type=int,
        default=2,
        help="alternating peer/fmtl runs; the summary takes the median of the undisturbed ones [2]",
    )
    add("--batch-size", type=int, default=64, help="images per batch, both loops [64]")
    add("--image-size", type=int, default=224, help="side the backbone sees, both loops [224]")
    add("--threads", type=int, default=0, help="torch intra-op threads, both loops (0: torch's default)")
    add("--cache-samples", type=int, default=5000, help="training images for the feature-cache test [5000]")
    add("--cache-size", type=int, default=64, help="image side for the feature-cache test [64]")
    add("--repeats", type=int, default=3, help="repeats per variant, median taken [3]")
    add("--variants", action=argparse.BooleanOptionalAction, default=True, help="time the variants [on]")
    add("--compile", action=argparse.BooleanOptionalAction, default=True,
        help="also time fmtl with its frozen backbone compiled (about 15-25 s to compile) [on]")  # fmt: skip
    add("--max-background", type=float, default=0.10, help="CPU share of other processes that counts as disturbed")
    add("--retries", type=int, default=2, help="times a disturbed measurement is repeated [2]")
    add("--kept-memory", action=argparse.BooleanOptionalAction, default=True,
        help="last, measure again with glibc keeping freed memory (process-wide) [on]")  # fmt: skip
    add("--quick", action="store_true", help="3 batches, 1 round, 1000 cache images, 1 repeat, no compile")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds, args.cache_samples, args.repeats, args.compile = 3, 1, 1000, 1, False
    return args


# ---------------------------------------------------------------- the machine, and who else is using it


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


def cpu_sample() -> tuple[float, float, float] | None:
    """(machine CPU seconds, of them idle, this process's CPU seconds), or None off Linux."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    hz, own = os.sysconf("SC_CLK_TCK"), os.times()
    return sum(ticks) / hz, (ticks[3] + ticks[4]) / hz, own.user + own.system


def background_share(start, end) -> float | None:
    """Share of the machine's CPU time that other processes used between two samples."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    total, idle, own = (b - a for a, b in zip(start, end, strict=True))
    return max(0.0, total - idle - own) / total


def clean(label: str, measure: Callable[[], object], args: argparse.Namespace) -> tuple[object, float | None]:
    """``measure()``, again while other processes took more than ``--max-background`` of the CPU."""
    for attempt in range(args.retries + 1):
        start, started = cpu_sample(), time.perf_counter()
        result = measure()
        share = background_share(start, cpu_sample())
        if share is None or share <= args.max_background or attempt == args.retries:
            break
        pause = min(5.0, max(1.0, time.perf_counter() - started))  # let a short burst of someone else's pass
        print(f"    ({label}: other processes took {share:.0%} of the CPU; again in {pause:.0f} s)", flush=True)
        time.sleep(pause)
    return result, share


def noted(share: float | None, args: argparse.Namespace) -> str:
    if share is None:
        return ""
    return f"[others {share:4.0%}{' DISTURBED' if share > args.max_background else ''}]"


# ---------------------------------------------------------------- 1. the peer, through its own main()


def load_peer(path: Path):
    if not path.is_file():
        sys.exit(f"peer script not found: {path} (give --peer PATH)")
    spec = importlib.util.spec_from_file_location("lesson_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_rate(peer, args: argparse.Namespace, data_dir: Path) -> float:
    """One run of the peer's ``main()``: the images/s it prints."""
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
        model="resnet18", weights="none", strategy="linear", image_size=args.image_size, recipe="small",
        batch_size=args.batch_size, augment=True, quiet=True, save_state=False, output=output,
        max_train_samples=10_000, max_val_samples=256, max_test_samples=256, data_dir=args.data_dir,
    )  # fmt: skip


def fmtl_trainer(cfg: TrainConfig, accelerator: Accelerator, output: Path, splits) -> Trainer:
    """fmtl's Trainer as ``run()`` builds it: the options resolved once (the recipe, the defaults)."""
    return Trainer(resolve(cfg, len(splits.train), accelerator), accelerator, output, splits)


def full_batches(trainer: Trainer) -> Iterator[torch.Tensor]:
    """Index batches, epoch after epoch; an epoch's short last batch is skipped, as the peer never meets one."""
    epoch = 0
    while True:
        trainer.sampler.seek(epoch)
        yield from (b for b in trainer.train_loaders[0] if len(b) == trainer.cfg.batch_size)
        epoch += 1


def fmtl_rate(trainer: Trainer, batches: Iterator[torch.Tensor], count: int) -> float:
    """``train_step`` as ``train_one_epoch`` runs it in a frozen phase with augmentation."""
    trainer.net.backbone_frozen = True
    trainer.model.train()
    trainer.net.backbone.eval()  # what a frozen phase does: BatchNorm statistics stay put
    images = ImageInput(trainer)
    trainer.train_step(next(batches), images)  # warm-up, as the peer's
    start, seen = time.perf_counter(), 0
    for _ in range(count):
        indices = next(batches)
        trainer.train_step(indices, images)
        seen += len(indices)
    return seen / (time.perf_counter() - start)


@contextlib.contextmanager
def backbone_swapped(trainer: Trainer, backbone: torch.nn.Module | None):
    """Run ``train_step`` with another module as the frozen backbone (None: fmtl's own)."""
    original = trainer.net.backbone
    if backbone is not None:
        trainer.net.backbone = backbone
    try:
        yield
    finally:
        trainer.net.backbone = original


def folded_backbone(trainer: Trainer) -> torch.nn.Module:
    """The frozen backbone with each BatchNorm folded into the convolution before it (eval mode only)."""
    return fuse(trainer.net.backbone.eval()).to(memory_format=torch.channels_last)


def compiled_backbone(trainer: Trainer) -> tuple[torch.nn.Module | None, str]:
    """The frozen backbone through ``torch.compile`` with inductor's freezing (weights as constants)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(trainer.net.backbone.eval())
    start = time.perf_counter()
    try:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            compiled(trainer.batch(trainer.train_images, torch.arange(trainer.cfg.batch_size), augment=True))
    except Exception as error:  # noqa: BLE001 - no C++ compiler, unsupported platform...: skip, say why
        return None, f"torch.compile unavailable here: {str(error).splitlines()[0][:120]}"
    return compiled, f"compiled in {time.perf_counter() - start:.1f} s"


def build_loops(peer, trainer: Trainer, args: argparse.Namespace, data_dir: Path) -> dict[str, Callable[[], float]]:
    """Each loop to compare: a function that runs it once and returns its images/s."""
    batches = full_batches(trainer)
    loops: dict[str, Callable[[], float]] = {PEER: lambda: peer_rate(peer, args, data_dir)}
    backbones = {FMTL: None, FOLDED: folded_backbone(trainer)}
    if args.compile:
        compiled, message = compiled_backbone(trainer)
        print(f"  frozen backbone for the compiled runs: {message}")
        if compiled is not None:
            backbones[COMPILED] = compiled
    for name, backbone in backbones.items():
        loops[name] = lambda backbone=backbone: timed_fmtl(trainer, backbone, batches, args.batches)
    return loops


def compare_loops(loops: dict[str, Callable[[], float]], rounds: int, args) -> dict[str, tuple[float, bool]]:
    """Median images/s of each loop over alternating runs, and whether any of its runs was undisturbed."""
    rates: dict[str, list[tuple[float, bool]]] = {name: [] for name in loops}
    for round_ in range(1, rounds + 1):
        for name, measure in loops.items():
            faults = page_faults()
            rate, share = clean(name, measure, args)
            faults = (page_faults() - faults) / (args.batches + 1) / 1000
            rates[name].append((rate, share is None or share <= args.max_background))
            extra = " " * 30 if name == PEER else f"{rate / rates[PEER][-1][0]:5.2f}x peer {faults:6.0f}k faults/batch"
            print(f"  round {round_}  {name:<27} {rate:6.1f} img/s  {extra}  {noted(share, args)}", flush=True)
    return {name: undisturbed_median(values) for name, values in rates.items()}


def undisturbed_median(values: list[tuple[float, bool]]) -> tuple[float, bool]:
    """Median of the undisturbed measurements; of all of them (and False) when every one was disturbed."""
    undisturbed = [value for value, ok in values if ok]
    return statistics.median(undisturbed or [value for value, _ in values]), bool(undisturbed)


def timed_fmtl(trainer: Trainer, backbone: torch.nn.Module | None, batches, count: int) -> float:
    with backbone_swapped(trainer, backbone):
        return fmtl_rate(trainer, batches, count)


def keep_freed_memory() -> str | None:
    """fmtl's own entry-point setting (``fmtl.train.keep_freed_memory``); None where glibc lacks it.

    Process-wide and cannot be undone cleanly, so it is measured last.
    """
    from fmtl.train import keep_freed_memory as keep

    return "mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB" if keep() else None


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------- 3. the feature cache


def cache_epochs(accelerator: Accelerator, args: argparse.Namespace, output: str) -> dict:
    """Seconds of an epoch that extracts the backbone features, and of one on the cached features."""
    cfg = TrainConfig(
        model="efficientnet_lite0", strategy="linear", image_size=args.cache_size, augment=False, epochs=4, recipe="small",
        max_train_samples=args.cache_samples, max_val_samples=max(args.cache_samples // 10, 100),
        max_test_samples=max(args.cache_samples // 10, 100),
        quiet=True, save_state=False, output=output, data_dir=args.data_dir,
    )  # fmt: skip
    trainer = fmtl_trainer(cfg, accelerator, Path(output), load_splits(cfg))
    phase = trainer.plan.phases[0]

    def epoch(number: int, extract: bool) -> float:
        if extract:
            trainer.inputs = None  # the phase's input is made again: the features extracted again
        start = time.perf_counter()
        trainer.train_one_epoch(number, phase, trainer.enter(phase, number))
        return time.perf_counter() - start

    extract, extract_share = clean("extract epoch", lambda: epoch(1, extract=True), args)
    cached, cached_share = clean("cached epochs", lambda: statistics.median(epoch(n, False) for n in (2, 3, 4)), args)
    return {"extract": extract, "cached": cached, "train": len(trainer.train_set), "val": len(trainer.val_set),
            "batch_size": cfg.batch_size, "shares": (extract_share, cached_share)}  # fmt: skip


# ---------------------------------------------------------------- 4. where the speed comes from


def forward_variants(trainer: Trainer, args: argparse.Namespace) -> tuple[list, float | None]:
    """images/s of the frozen backbone's forward pass, one change at a time from fmtl's setting."""
    backbone, b, threads = trainer.net.backbone.eval(), args.batch_size, torch.get_num_threads()
    nchw = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    train_bn = copy.deepcopy(backbone).train()  # the peer's model.train(): batch statistics, running stats move
    x = trainer.batch(trainer.train_images, torch.arange(b), augment=True)
    x_half = x[: b // 2].clone()
    x_double = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)

    def forward(model, images, grad_mode=torch.no_grad, num_threads=threads):
        def call():
            torch.set_num_threads(num_threads)
            try:
                with grad_mode():
                    model(images)
            finally:
                torch.set_num_threads(threads)

        return call, len(images)

    variants = {
        f"fmtl: eval, no_grad, channels_last, b{b}, {threads} threads": forward(backbone, x),
        "  NCHW (channels_last off)": forward(nchw, x.contiguous()),
        "  inference_mode instead of no_grad": forward(backbone, x, torch.inference_mode),
        "  BatchNorm in train mode (as the peer)": forward(train_bn, x),
        "  BatchNorm folded into the convolutions": forward(folded_backbone(trainer), x),
        f"  batch {b // 2}": forward(backbone, x_half),
        f"  batch {2 * b}": forward(backbone, x_double),
    }
    if threads > 1:
        variants[f"  {threads // 2} thread(s)"] = forward(backbone, x, num_threads=threads // 2)
    return interleaved(variants, args.repeats, args)


def batch_variants(trainer: Trainer, args: argparse.Namespace) -> tuple[list, float | None]:
    """images/s of ``Trainer.batch`` (augment at the source size, then resize), alternatives, and the head step."""
    data, indices, b = trainer.train_images, torch.arange(args.batch_size), args.batch_size
    pre, augment = trainer.preprocess, trainer.augment

    def augment_after_resize():  # the peer's order: resize to 224 first, then warp every 224 px image
        with torch.no_grad():
            x = augment(pre.resize(data.take(indices).float() / 255.0))
            return (x.expand(-1, 3, -1, -1) * pre.scale + pre.shift).contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        features = trainer.net.backbone(trainer.batch(data, indices, augment=True))

    def head_step():  # what train_step adds after the backbone: head, loss, backward, optimizer
        logits = trainer.model(features, from_features=True)
        loss = torch.nn.functional.cross_entropy(logits, trainer.train_labels[indices], label_smoothing=0.1)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    variants = {
        "fmtl Trainer.batch: augment at 28 px, then resize": (lambda: trainer.batch(data, indices, True), b),
        "  Trainer.batch without augmentation": (lambda: trainer.batch(data, indices, False), b),
        "  augment after resizing (at 224 px)": (augment_after_resize, b),
        "  head + loss + backward + AdamW step": (head_step, b),
    }
    return interleaved(variants, args.repeats * 3, args)


def interleaved(calls: dict[str, tuple[Callable, int]], repeats: int, args) -> tuple[list, float | None]:
    """Median images/s of each call; the calls take turns, and a disturbed turn is taken again."""
    for fn, _ in calls.values():
        fn()  # warm-up: oneDNN builds its kernels for each shape and layout on first use
    times: dict[str, list[float]] = {name: [] for name in calls}

    def one_turn() -> dict[str, float]:
        turn = {}
        for name, (fn, _) in calls.items():
            start = time.perf_counter()
            fn()
            turn[name] = time.perf_counter() - start
        return turn

    shares = []
    for _ in range(repeats):
        turn, share = clean("a turn of the variants", one_turn, args)
        shares.append(share)
        for name, seconds in turn.items():
            times[name].append(seconds)
    worst = max((s for s in shares if s is not None), default=None)
    return [(name, calls[name][1] / statistics.median(t)) for name, t in times.items()], worst


def print_rates(title: str, measured: tuple[list[tuple[str, float]], float | None], args) -> None:
    rates, worst = measured
    print(f"{title:<58} {noted(worst, args).replace('others', 'worst turn: others')}")
    reference = rates[0][1]
    for name, rate in rates:
        print(f"  {name:<56} {rate:9.1f} img/s   {rate / reference:5.2f}x")


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    data_dir = find_fashion_mnist(args.data_dir)
    if data_dir is None:
        sys.exit(
            "Fashion-MNIST not found: give --data-dir, set FMTL_DATA_DIR, or apt-get install dataset-fashion-mnist"
        )
    peer = load_peer(args.peer)
    with tempfile.TemporaryDirectory(prefix="fmtl-bench-") as tmp:
        cfg = throughput_config(args, str(Path(tmp) / "resnet18"))
        accelerator = make_accelerator(cfg, Path(cfg.output))  # Accelerate's state is process-wide: one only
        if args.threads:
            torch.set_num_threads(args.threads)
        set_seed(cfg.seed)
        print(f"machine: {machine()}; load average {load_average()}\npeer: {args.peer}\ndata: {data_dir}\n")
        trainer = fmtl_trainer(cfg, accelerator, Path(cfg.output), load_splits(cfg))
        tag = f"resnet18 {args.image_size}px b{args.batch_size} aug"
        print(f"throughput, {tag}, {args.batches} timed batches after 1 warm-up, {args.rounds} round(s):", flush=True)
        loops = build_loops(peer, trainer, args, data_dir)
        rates = compare_loops(loops, args.rounds, args)
        if args.variants:
            print_rates("\nfrozen resnet18 forward, one change at a time:", forward_variants(trainer, args), args)
            print_rates("per-batch work besides the backbone:", batch_variants(trainer, args), args)
        print(f"\nfeature cache, efficientnet_lite0 {args.cache_size}px, {args.cache_samples} images:", flush=True)
        cache = cache_epochs(accelerator, args, str(Path(tmp) / "lite0"))
        print(f"  extract epoch: the backbone on {cache['train']} train + {cache['val']} val images, then the "
              f"head: {cache['extract']:.2f} s {noted(cache['shares'][0], args)}\n  cached epoch: the head alone, "
              f"batch {cache['batch_size']}, median of 3 epochs: {cache['cached']:.3f} s "
              f"{noted(cache['shares'][1], args)}")  # fmt: skip
        kept = kept_memory_rates(loops, args)
    summary(rates, kept, cache, tag, args)


def kept_memory_rates(loops: dict[str, Callable[[], float]], args) -> dict[str, tuple[float, bool]]:
    """The peer and fmtl once more, with glibc keeping freed memory (last: it cannot be undone)."""
    how = keep_freed_memory() if args.kept_memory else None
    if how is None:
        return {}
    print(f"\nwith glibc keeping freed memory ({how}), 1 round:", flush=True)
    return compare_loops({name: loops[name] for name in (PEER, FMTL, COMPILED) if name in loops}, 1, args)


def summary(rates: dict, kept: dict, cache: dict, tag: str, args: argparse.Namespace) -> None:
    """The figures that matter, each fmtl rate as a multiple of the peer's (default allocator)."""
    print()
    peer, peer_clean = rates[PEER]
    for label, table in (("", rates), ("kept memory: ", kept)):
        for name, (rate, undisturbed) in table.items():
            flag = "" if undisturbed and peer_clean else "   DISTURBED"
            if name == PEER:
                versus = f"   {rate / peer:.2f}x the peer as shipped" if label else ""
            else:
                target = f"   (as shipped; target >= {TARGET_SPEEDUP:g}x)" if name == FMTL and label else ""
                versus = f"   {rate / peer:.2f}x peer{target}"
            print(f"{label + name:<39} {tag}: {rate:6.1f} img/s{versus}{flag}")
    cache_tag = f"lite0 {args.cache_size}px {cache['train']} imgs:"
    flag = "" if all(s is None or s <= args.max_background for s in cache["shares"]) else "   DISTURBED"
    print(f"{'feature cache':<39} {cache_tag:<23} extract epoch {cache['extract']:.2f} s, cached epoch "
          f"{cache['cached']:.3f} s   {cache['extract'] / cache['cached']:.0f}x  (target >= {TARGET_CACHE:g}x){flag}")  # fmt: skip
    print(f"{'machine':<39} {machine()}; load average {load_average()}")
    print("* proposed for fmtl, not shipped; 'kept memory': glibc keeps freed memory, as fmtl's run() now sets")


# ================================================================ --device: fmtl's step against a plain-PyTorch ceiling

CEILING = "plain PyTorch loop (ceiling)"
PRECISION_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # the table's name -> Accelerate's
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_DEFAULTS = {  # what a run measures on each device when not told otherwise
    "cuda": {"image_size": 224, "batch_sizes": "128,256,512", "precisions": "fp32,bf16,fp16",
             "compile_precisions": "bf16", "images": 10240, "ceiling": "bf16"},
    "cpu": {"image_size": 64, "batch_sizes": "8,16", "precisions": "fp32", "compile_precisions": "",
            "images": 48, "ceiling": "fp32"},
}  # fmt: skip
TABLE_HEADER = (
    "| contender | precision | compile | batch | images/s | ms/step | peak memory (MiB) | vs ceiling | wall (s) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def parse_device_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_throughput.py --device",
        description="fmtl's training step (EfficientNet-Lite0, fine-tuning all layers) against a minimal "
        "plain-PyTorch AdamW loop on the same model and data, in one process; ratios to that ceiling.",
    )
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), required=True, help="where to train")
    add("--data-dir", help="folder of the Fashion-MNIST IDX .gz files (else fmtl's own search)")
    add("--image-size", type=int, help="side the model sees [cuda 224, cpu 64]")
    add("--batch-sizes", help="comma-separated batch sizes [cuda 128,256,512; cpu 8,16]")
    add("--precisions", help="fmtl's precisions, of fp32,bf16,fp16 [cuda all three; cpu fp32, + bf16 if native]")
    add("--compile-precisions", help="precisions also timed with torch.compile ('' for none) [cuda bf16; cpu none]")
    add("--compile-backend", default="inductor", help="torch.compile backend, through Accelerate [inductor]")
    add("--ceiling-precision", choices=("fp32", "bf16"), help="the plain loop's precision [cuda bf16, cpu fp32]")
    add("--images", type=int, help="images per timed epoch, after a warm-up epoch as long [cuda 10240, cpu 48]")
    add("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    add("--max-seconds", type=float, default=0, help="start no contender after this long; say what was left (0: off)")
    add("--report", action="store_true", help="write the table to RESULTS_DIR/train_throughput_<device>.md")
    add("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results",
        help="folder --report writes to [benchmarks/results]")  # fmt: skip
    args = parser.parse_args(argv)
    defaults = DEVICE_DEFAULTS[args.device]
    if args.device == "cpu" and args.precisions is None and cpu_bf16_native():
        defaults = {**defaults, "precisions": "fp32,bf16"}
    for key, value in defaults.items():
        name = "ceiling_precision" if key == "ceiling" else key
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of whole numbers")
    args.precisions = _precision_list(parser, args.precisions)
    args.compile_precisions = _precision_list(parser, args.compile_precisions)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(
            1, "train_throughput.py: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)\n"
        )
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.images < max(args.batch_sizes):
        parser.error("--batch-sizes must be positive and --images at least the largest batch")
    return args


def _precision_list(parser: argparse.ArgumentParser, text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in AUTOCAST]
    if unknown:
        parser.error(f"unknown precision {unknown[0]!r}: choose from fp32, bf16, fp16")
    return names


def cpu_bf16_native() -> bool:
    """Whether fmtl would accept bf16 on this CPU (its own test: AVX512-BF16 or AMX)."""
    from fmtl.training import loop

    return loop.cpu_has_native_bf16()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_memory(device: torch.device) -> None:
    """Forget what earlier contenders held, so each row's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------- the ceiling: a minimal plain loop


def plain_loop_rate(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, args) -> dict:
    """A minimal plain-PyTorch fine-tuning loop on the same model and data: what the device allows.

    The same EfficientNet-Lite0 (fmtl's ``create_model``) and the same uint8 images on the device;
    per step a random batch is indexed, scaled, resized and normalised, then forward and backward
    under autocast, channels_last, and AdamW (fused on CUDA). Nothing else: no augmentation, no
    schedule, no clipping, no loss read back. Warm-up steps first, as many as the timed ones.
    """
    from fmtl.training.models import create_model

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # shapes never change here: let cuDNN pick its fastest kernels
    start_memory(device)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 10, weights="none").to(device, memory_format=torch.channels_last)
    model.train()
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (model.input_defaults.mean,
                                                                           model.input_defaults.std))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    size, dtype = args.image_size, AUTOCAST[args.ceiling_precision]
    images, labels = images.to(device), labels.to(device)

    def step() -> None:
        index = torch.randint(len(images), (batch_size,), device=device, generator=generator)
        x = F.interpolate(images[index].float() / 255, size=(size, size), mode="bilinear", align_corners=False)
        x = ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), labels[index], label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"rate": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps, "peak": peak_mib(device)}


# ---------------------------------------------------------------- fmtl: its own Trainer and epoch loop


def fmtl_epoch_rate(splits, batch_size: int, precision: str, compiled: bool, args, tmp: str) -> dict:
    """fmtl's Trainer, built as ``fmtl train`` builds it, running its own epoch loop: one warm-up epoch,
    then one timed epoch (steps, per-step loss checks and progress bookkeeping included).

    torch.compile goes through Accelerate's dynamo plugin, which is what ``accelerate launch
    --dynamo_backend`` sets; fmtl has no flag of its own for it.
    """
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False  # fmtl's own setting decides (it may set it when it builds)
    start_memory(device)
    cfg = TrainConfig(
        model="efficientnet_lite0", weights="none", strategy="finetune", image_size=args.image_size,
        batch_size=batch_size, epochs=2, mixed_precision=PRECISION_NAMES[precision], quiet=True,
        save_state=False, output=str(Path(tmp) / f"fmtl-{precision}-{batch_size}"), data_dir=args.data_dir,
        threads=args.threads,
    )  # fmt: skip
    accelerator = fresh_accelerator(cfg, args.compile_backend if compiled else None)
    set_seed(cfg.seed)
    trainer = fmtl_trainer(cfg, accelerator, Path(cfg.output), splits)  # the recipe fills what no option set
    phase = trainer.plan.phases[0]
    run_epoch(trainer, 1, phase)  # warm-up: cuDNN's and the compiler's choices, the allocator's pools
    synchronize(device)
    started = time.perf_counter()
    seen = run_epoch(trainer, 2, phase)
    synchronize(device)
    seconds = time.perf_counter() - started
    steps = math.ceil(seen / batch_size)
    result = {"rate": seen / seconds, "step_ms": 1000 * seconds / steps, "peak": peak_mib(device)}
    del trainer
    accelerator.free_memory()
    if compiled:
        torch._dynamo.reset()
    return result


def fresh_accelerator(cfg: TrainConfig, compile_backend: str | None) -> Accelerator:
    """fmtl's own ``make_accelerator`` for this precision. Accelerate keeps one process-wide state, made by
    the first Accelerator: it is cleared first, so each precision gets the Accelerator a fresh run gets."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    key = "ACCELERATE_DYNAMO_BACKEND"
    saved = os.environ.pop(key, None)
    if compile_backend:
        os.environ[key] = compile_backend.upper()
    try:
        return make_accelerator(cfg, Path(cfg.output))
    finally:
        os.environ.pop(key, None)
        if saved is not None:
            os.environ[key] = saved


def run_epoch(trainer: Trainer, epoch: int, phase) -> int:
    """Images one epoch of fmtl's own loop trained on (its ``train_one_epoch``, wherever it lives now)."""
    epoch_fn = getattr(trainer, "train_one_epoch", None)
    if epoch_fn is None:  # the Trainer is being split into smaller parts: look for the function beside it
        from fmtl.training import loop

        epoch_fn = getattr(loop, "train_one_epoch", None)
        if epoch_fn is None:
            sys.exit("fmtl's epoch loop moved: neither Trainer.train_one_epoch nor loop.train_one_epoch exists")
        return epoch_fn(trainer, epoch, phase)[1]
    return epoch_fn(epoch, phase, trainer.enter(phase, epoch))[1]


# ---------------------------------------------------------------- the run and its table


def device_machine(device: str) -> str:
    """CPU, cores, GPU and versions: the provenance line of the table."""
    import accelerate

    gpu = ""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = f"; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
        gpu += f"; CUDA {torch.version.cuda}"
    return f"{machine()}{gpu}; accelerate {accelerate.__version__}"


def device_rows(args: argparse.Namespace, on_row: Callable[[list[dict]], None]) -> list[dict]:
    """Every contender at every batch size, in the order they are measured: per batch size the ceiling, fmtl
    in each precision, then the compiled runs (slowest to start) last. ``on_row`` sees the table so far."""
    from fmtl.training.data import load_dataset, seeded_subset
    from fmtl.training.prepare import Splits

    data_dir = find_fashion_mnist(args.data_dir)
    if data_dir is None:
        sys.exit(
            "Fashion-MNIST not found: give --data-dir, set FMTL_DATA_DIR, or apt-get install dataset-fashion-mnist"
        )
    args.data_dir = str(data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = seeded_subset(load_dataset("fashion-mnist", "train", data_dir=args.data_dir), args.images, seed=0)
    val = seeded_subset(load_dataset("fashion-mnist", "val", data_dir=args.data_dir), 100, seed=0)
    splits = Splits(train, val, val, "val")
    plan = [(CEILING, args.ceiling_precision, False, b) for b in args.batch_sizes]
    plan += [("fmtl", p, False, b) for b in args.batch_sizes for p in args.precisions]
    plan += [("fmtl", p, True, b) for p in args.compile_precisions for b in args.batch_sizes]
    plan.sort(key=lambda row: (row[2], args.batch_sizes.index(row[3]), row[0] != CEILING))
    rows: list[dict] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmtl-throughput-") as tmp:
        for done, (name, precision, compiled, batch_size) in enumerate(plan):
            if done and args.max_seconds and time.perf_counter() - began > args.max_seconds:  # the first always runs
                left = ", ".join(f"{n} {p}{' compiled' if c else ''} b{b}" for n, p, c, b in plan[done:])
                args.not_measured = f"Not measured (--max-seconds {args.max_seconds:g} had passed): {left}."
                print(args.not_measured, flush=True)
                on_row(rows)
                break
            row = {"contender": name, "precision": precision, "compile": compiled, "batch": batch_size}
            started = time.perf_counter()
            try:
                if name == CEILING:
                    steps = args.images // batch_size
                    row |= plain_loop_rate(train.images, train.labels, batch_size, steps, args)
                else:
                    row |= fmtl_epoch_rate(splits, batch_size, precision, compiled, args, tmp)
            except Exception as error:  # noqa: BLE001 - one contender failing (out of memory, no compiler): say so, go on
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                start_memory(torch.device(args.device))
            row["wall_s"] = time.perf_counter() - started
            rows.append(row)
            print(format_row(row, rows), flush=True)
            on_row(rows)
    return rows


def ceiling_of(row: dict, rows: list[dict]) -> float | None:
    """The ceiling's images/s at this row's batch size (None where it was not measured)."""
    for other in rows:
        if other["contender"] == CEILING and other["batch"] == row["batch"] and "rate" in other:
            return other["rate"]
    return None


def format_row(row: dict, rows: list[dict]) -> str:
    compiled = "yes" if row["compile"] else "no"
    head = f"| {row['contender']} | {row['precision']} | {compiled} | {row['batch']} |"
    if "rate" not in row:
        return f"{head} failed: {row['error']} | | | | {row['wall_s']:.0f} |"
    ceiling = ceiling_of(row, rows)
    versus = f"{row['rate'] / ceiling:.2f}" if ceiling else "n/a"
    peak = f"{row['peak']:.0f}" if row["peak"] is not None else "n/a"
    return f"{head} {row['rate']:.1f} | {row['step_ms']:.1f} | {peak} | {versus} | {row['wall_s']:.0f} |"


def device_table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEADER, *(format_row(row, rows) for row in rows)])


def write_device_report(args: argparse.Namespace, rows: list[dict], argv: list[str]) -> Path:
    """benchmarks/results/train_throughput_<device>.md: provenance, workload, the table (rewritten per row)."""
    from fmtl.atomic import atomic_write_text

    path = args.results_dir / f"train_throughput_{args.device}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/train_throughput.py", *argv])
    workload = (
        f"EfficientNet-Lite0 (random initialisation), {args.image_size} px from Fashion-MNIST's 28 px uint8 images "
        f"kept on the device, every layer trained with AdamW; {args.images:,} images a timed epoch after a warm-up "
        f"epoch as long. fmtl: its own Trainer and epoch loop as `fmtl train --strategy finetune` runs them "
        f"(augmentation on the device, schedule, clipping, loss checks); compile: torch.compile "
        f"({args.compile_backend}) through Accelerate's dynamo plugin. Ceiling: a minimal plain-PyTorch loop on "
        f"the same model and images ({ceiling_how(args)}, no augmentation); 'vs ceiling' is images/s over the "
        f"ceiling's at the same batch size. fmtl keeps BatchNorm in inference mode while fine-tuning (its "
        f"--freeze-bn default); the ceiling trains it. Peak memory: the most torch's allocator held on the GPU. "
        f"Wall: the whole row, building, warm-up (compiling) and timed epoch."
    )
    text = (
        "# Training throughput: fmtl's step against a plain-PyTorch ceiling\n\n"
        f"- machine: {device_machine(args.device)}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC)\n"
        f"- command: `{command}`\n\n"
        f"{workload}\n\n{device_table(rows)}\n"
        + (f"\n{args.not_measured}\n" if getattr(args, "not_measured", None) else "")
    )
    atomic_write_text(path, text)
    return path


def ceiling_how(args: argparse.Namespace) -> str:
    precision = "fp32" if args.ceiling_precision == "fp32" else f"{args.ceiling_precision} autocast"
    if args.device == "cuda":
        return f"{precision}, channels_last, fused AdamW, cuDNN autotuning"
    return f"{precision}, channels_last, AdamW"


def device_main(argv: list[str]) -> None:
    args = parse_device_args(argv)
    print(f"machine: {device_machine(args.device)}\n{TABLE_HEADER}", flush=True)
    written: list[Path] = []

    def on_row(rows: list[dict]) -> None:  # rewritten after every row: a run stopped early keeps what it measured
        if args.report:
            written[:] = [write_device_report(args, rows, argv)]

    rows = device_rows(args, on_row)
    if written:
        print(f"wrote {written[0]}")
    if any("error" in row for row in rows):
        sys.exit(f"{sum('error' in row for row in rows)} contender(s) failed (see the table)")


if __name__ == "__main__":
    if any(arg == "--device" or arg.startswith("--device=") for arg in sys.argv[1:]):
        device_main(sys.argv[1:])
    else:
        main()
