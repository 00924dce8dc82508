#!/usr/bin/env python3
"""How good is a converged linear probe on frozen Lite0 features, and what does today's head schedule reach?

    .venv/bin/python benchmarks/experiments/probe.py SIZE [N_TRAIN]

Features of fmtl's train/val split (seed 0) at SIZE px, then a softmax regression fitted by
L-BFGS to convergence (weight decay chosen on val) against AdamW with today's head schedule.
Validation only; the test split is not touched.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from fmtl.spec import InputSpec
from fmtl.training.augment import Preprocess
from fmtl.training.data import load_dataset, seeded_subset
from fmtl.training.models import create_model


@torch.no_grad()
def features(model, prep, images, batch=512):
    return torch.cat([model.features(prep(images[i : i + batch])) for i in range(0, len(images), batch)])


def lbfgs_fit(x, y, wd, classes=10, steps=200):
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> None:
    size = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    torch.manual_seed(0)
    train = seeded_subset(load_dataset("fashion-mnist", "train"), n, 0)
    val = load_dataset("fashion-mnist", "val")
    model = create_model("efficientnet_lite0", 10).eval()
    d = model.input_defaults
    prep = Preprocess(InputSpec(1, (28, 28), size, d.mean, d.std))
    t0 = time.perf_counter()
    xtr, xva = features(model, prep, train.images), features(model, prep, val.images)
    print(f"{size}px, {len(train)} train: features in {time.perf_counter() - t0:.0f}s (load {os.getloadavg()[0]:.1f})")
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr_n, xva_n = (xtr - mean) / std, (xva - mean) / std
    for wd in (1e-4, 1e-3, 1e-2):
        t0 = time.perf_counter()
        w, b = lbfgs_fit(xtr_n, train.labels, wd)
        acc = ((xva_n @ w + b).argmax(1) == val.labels).float().mean().item()
        print(f"  lbfgs wd {wd:g}: val acc {acc:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    for epochs in (1, 3, 20):  # today's head: AdamW lr 1e-3, batch 128, cosine, raw features
        head = torch.nn.Linear(xtr.shape[1], 10)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
        steps = epochs * ((len(xtr) + 127) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr)).split(128):
                loss = F.cross_entropy(head(xtr[idx]), train.labels[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            acc = (head(xva).argmax(1) == val.labels).float().mean().item()
        print(f"  adamw head {epochs} epoch(s): val acc {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
