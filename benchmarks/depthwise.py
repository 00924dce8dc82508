#!/usr/bin/env python3
"""Lite0 training steps with fmtl's depthwise weight gradient against PyTorch's own, in one run.

    .venv/bin/python benchmarks/depthwise.py [--sizes 32,48,64] [--batch 128] [--steps 4] [--report]
    .venv/bin/python benchmarks/depthwise.py --quick --report     # 32 and 48 px, 3 timed steps

For each input size: milliseconds per image of a full training step (forward, backward, AdamW) of
EfficientNet-Lite0, all layers trainable and with ``--unfreeze last:5``, first with PyTorch's
depthwise backward (oneDNN on CPU), then with ``fmtl.training.depthwise``; median of ``--steps`` timed
steps each after untimed warm-up steps, and their ratio. ``--report`` writes the table to
benchmarks/results/depthwise.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from results_file import write_results
from torch import nn

from fmtl.training.depthwise import _FastGradConv2d, fast_depthwise_grads
from fmtl.training.models import apply_freeze, create_model

WARMUP_STEPS = 6  # the first steps allocate and warm caches (the 2nd to 4th still run slow): not throughput


def use_pytorch_depthwise(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is _FastGradConv2d:
            module.__class__ = nn.Conv2d


def median_seconds(step, steps: int) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def step_ms_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return 1000 * median_seconds(step, steps) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,48,64", help="input sides in pixels, comma-separated")
    parser.add_argument("--batch", type=int, default=128, help="images per training step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="32 and 48 px, 3 timed steps")
    parser.add_argument("--report", action="store_true", help="write the table to benchmarks/results/depthwise.md")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps = "32,48", 3
    load_at_start = os.getloadavg()[0]
    rows = [
        "| size | layers trained | PyTorch depthwise | fmtl depthwise | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("\n".join(rows), flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for policy in ("all", "last:5"):
            model = create_model("efficientnet_lite0", 10).to(memory_format=torch.channels_last).train()
            apply_freeze(model, policy)
            x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (args.batch,))
            use_pytorch_depthwise(model)
            theirs = step_ms_per_image(model, x, y, args.steps)
            fast_depthwise_grads(model)
            ours = step_ms_per_image(model, x, y, args.steps)
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
            f"milliseconds per image, median of {args.steps} steps each after {WARMUP_STEPS} untimed ones.",
        )


if __name__ == "__main__":
    main()
