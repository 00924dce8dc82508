#!/usr/bin/env python3
"""Lite0 training steps with fmtl's depthwise weight gradient against PyTorch's own, in one run.

    .venv/bin/python benchmarks/depthwise.py [--sizes 32,48,64] [--batch 128] [--steps 4]

For each input size: milliseconds per image of a full training step (forward, backward, AdamW) of
EfficientNet-Lite0 at batch 128, all layers trainable and with ``--unfreeze last:5``, first with
PyTorch's depthwise backward (oneDNN on CPU), then with ``fmtl.training.depthwise``; the two are
timed alternately, median of ``--steps`` steps each, and their ratio printed.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from fmtl.training.budget import _timed
from fmtl.training.depthwise import _FastGradConv2d, fast_depthwise_grads
from fmtl.training.models import apply_freeze, create_model


def use_pytorch_depthwise(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is _FastGradConv2d:
            module.__class__ = nn.Conv2d


def step_ms_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return 1000 * _timed(step, steps) / len(x)  # median of timed steps after untimed warm-up steps, as --budget times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,48,64")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| size | layers trained | PyTorch depthwise | fmtl depthwise | speed-up |\n| --- | --- | --- | --- | --- |")
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
            print(f"| {size} px | {policy} | {theirs:.2f} ms/image | {ours:.2f} ms/image | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
