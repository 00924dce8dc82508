#!/usr/bin/env python3
"""Lite0 training steps with fmtl's depthwise weight gradient against PyTorch's own, in one run.

    .venv/bin/python benchmarks/depthwise.py [--sizes 32,48,64] [--batch 128] [--steps 4] [--report]
    .venv/bin/python benchmarks/depthwise.py --quick --report     # 32 px, batch 32, 5 timed steps each

For each input size: milliseconds per image of a full training step (forward, backward, AdamW) of
EfficientNet-Lite0, all layers trainable and with ``--unfreeze last:5``, with PyTorch's depthwise
backward (oneDNN on CPU) and with ``fmtl.training.depthwise``, on two copies of the same model taking
turns step by step; median of ``--steps`` timed steps each after untimed warm-up steps, and their
ratio. ``--report`` writes the table to benchmarks/results/depthwise.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from results_file import write_results
from torch import nn

from fmtl.training.depthwise import _FastGradConv2d, fast_depthwise_grads
from fmtl.training.models import apply_freeze, create_model

WARMUP_STEPS = 4  # the first steps allocate and warm caches: not throughput


def use_pytorch_depthwise(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is _FastGradConv2d:
            module.__class__ = nn.Conv2d


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One full training step (forward, backward, AdamW) of ``model`` on ``x``, as a callable."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_ms_per_image(steps: dict, images: int, timed: int) -> dict[str, float]:
    """Median milliseconds per image of each step, the steps taking turns so that other processes on the
    machine slow them alike (on a shared machine a block of one after a block of the other is not fair)."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * sorted(t)[len(t) // 2] / images for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,48,64", help="input sides in pixels, comma-separated")
    parser.add_argument("--batch", type=int, default=128, help="images per training step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="32 px, batch 32, 5 timed steps each")
    parser.add_argument("--report", action="store_true", help="write the table to benchmarks/results/depthwise.md")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batch, args.steps = "32", 32, 5
    load_at_start = os.getloadavg()[0]
    rows = [
        "| size | layers trained | PyTorch depthwise | fmtl depthwise | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("\n".join(rows), flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for policy in ("all", "last:5"):
            pytorch = create_model("efficientnet_lite0", 10).to(memory_format=torch.channels_last).train()
            apply_freeze(pytorch, policy)
            fmtl = copy.deepcopy(pytorch)
            use_pytorch_depthwise(pytorch)
            fast_depthwise_grads(fmtl)
            x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (args.batch,))
            steps = {"pytorch": training_step(pytorch, x, y), "fmtl": training_step(fmtl, x, y)}
            ms = interleaved_ms_per_image(steps, args.batch, args.steps)
            theirs, ours = ms["pytorch"], ms["fmtl"]
            rows.append(
                f"| {size} px | {policy} | {theirs:.2f} ms/image | {ours:.2f} ms/image | {theirs / ours:.2f}x |"
            )
            print(rows[-1], flush=True)
    if args.report:
        write_results(
            "depthwise",
            "Fine-tuning step: fmtl's depthwise weight gradient against PyTorch's",
            "\n".join(rows),
            versions=f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
            note=f"EfficientNet-Lite0, a full training step (forward, backward, AdamW) at batch {args.batch}, "
            f"milliseconds per image, median of {args.steps} steps each (the two taking turns) after {WARMUP_STEPS} untimed ones.",
        )


if __name__ == "__main__":
    main()
