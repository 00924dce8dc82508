#!/usr/bin/env python3
"""What one Fashion-MNIST epoch (54,000 images) costs per candidate, from a few timed steps.

    .venv/bin/python benchmarks/experiments/epoch_cost.py

Lite0 fine-tuning (forward + backward, BatchNorm in inference mode) and frozen feature
extraction (forward only) at 32/48/64 px, fmtl's scratch CNN and the peer's shape at 28 px.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from fmtl.training.models import create_model

EPOCH_IMAGES = 54_000


def timed(step, batch: int, warmup: int = 2, steps: int = 6) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps / batch * EPOCH_IMAGES


def train_cost(model, size: int, channels: int = 3, batch: int = 128) -> float:
    model = model.to(memory_format=torch.channels_last).train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and hasattr(model, "backbone"):
            m.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, batch)


@torch.no_grad()
def feature_cost(model, size: int, batch: int = 256) -> float:
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return timed(lambda: model.features(x), batch)


def main() -> None:
    print(f"load {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    for size in (32, 48, 64):
        lite = create_model("efficientnet_lite0", 10)
        print(
            f"lite0 {size}px: fine-tune epoch {train_cost(lite, size):6.1f}s, "
            f"feature extraction {feature_cost(lite, size):6.1f}s",
            flush=True,
        )
    for name in ("scratch_cnn",):
        try:
            net = create_model(name, 10, weights="none")
        except Exception as error:  # noqa: BLE001
            print(f"{name}: {error}")
            continue
        print(f"{name} 28px: train epoch {train_cost(net, 28):6.1f}s")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
