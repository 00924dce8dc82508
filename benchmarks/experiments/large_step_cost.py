#!/usr/bin/env python3
"""What a ``large``-recipe fine-tuning step costs on this CPU, per image size and number of trained blocks.

    .venv/bin/python benchmarks/experiments/large_step_cost.py 48:5 52:5 56:5 64:5 48:9 48:3

Each argument is SIZE:N, N of Lite0's 9 feature blocks trained (``--unfreeze last:N``; 9 is ``all``). A step is
a batch of 128 through augmentation, resizing, forward, backward and AdamW, BatchNorm in inference mode; the
median of 15 steps after 5 untimed ones, two torch threads. These timings are noisy on a shared machine (the
same variant timed 0.32 and 0.43 s a step in one run): ``large_budget_sweep.py`` used their ratios.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fmtl.training.augment import augment_for
from fmtl.training.budget import _timed  # the planner's own timing: median after untimed warm-up calls
from fmtl.training.config import TrainConfig
from fmtl.training.models import create_model

BATCH = 128
BLOCKS = 9


def step_cost(size: int, trained: int) -> float:
    model = create_model("efficientnet_lite0", 10).to(memory_format=torch.channels_last)
    for index, block in enumerate(model.backbone.features):
        block.requires_grad_(index >= BLOCKS - trained)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)
    augment = augment_for(TrainConfig(image_size=size, augment_strength=0.5), seed=0)
    images, labels = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))

    def step() -> None:
        x = F.interpolate(augment(images), size=(size, size), mode="bilinear").expand(-1, 3, -1, -1)
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _timed(step, steps=15, warmup=5)


def main() -> None:
    torch.set_num_threads(2)
    for arg in sys.argv[1:] or ["48:5"]:
        size, trained = map(int, arg.split(":"))
        seconds = step_cost(size, trained)
        print(f"{size} px, last {trained} blocks: {seconds:.3f} s a step, {seconds * 54_000 / BATCH:.0f} s an epoch")


if __name__ == "__main__":
    main()
