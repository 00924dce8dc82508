#!/usr/bin/env python3
"""What a few-shot fine-tuning step and an evaluation image cost on this CPU, per image size.

    .venv/bin/python benchmarks/experiments/step_cost.py

Lite0 (fmtl's model, its fast depthwise gradients), a training step on 100 images (10 per class: one
step per epoch) with BatchNorm in inference mode, median of 5; and the forward pass per image on
batches of 256 (validation and test; flip averaging doubles it). Two torch threads.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fmtl.training.models import create_model


def freeze_bn(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def main() -> None:
    torch.set_num_threads(2)
    model = create_model("efficientnet_lite0", 10).to(memory_format=torch.channels_last)
    freeze_bn(model)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    labels = torch.randint(0, 10, (100,))
    for size in (128, 160, 192, 224):
        x = torch.randn(100, 3, size, size).contiguous(memory_format=torch.channels_last)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        with torch.no_grad():
            model.eval()
            batch = torch.randn(256, 3, size, size).contiguous(memory_format=torch.channels_last)
            model(batch)
            started = time.perf_counter()
            model(batch)
            per_image = (time.perf_counter() - started) / 256
            model.train()
            freeze_bn(model)
        print(
            f"{size} px: training step on 100 images {sorted(times)[2]:.2f} s, evaluation {1000 * per_image:.1f} ms/image"
        )


if __name__ == "__main__":
    main()
