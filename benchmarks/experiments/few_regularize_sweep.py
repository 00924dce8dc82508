"""Regularizing ``few`` (batches of 32): mixup, weight averaging (EMA), learning rate, depth, views at equal epochs.

    OUT=runs/few-regularize python benchmarks/experiments/few_regularize_sweep.py   # 39 runs, 8 at a time

The EMA variants need ``git apply benchmarks/experiments/ema.patch`` first (an experiment, not an fmtl option:
``FMTL_EXP_EMA=decay`` averages the weights after every step and validates, saves and tests the average). Epochs as in
``few_batch_sweep.py`` (what the 2-core CPU's budget buys: 1 + 20 at 100/class, 1 + 150 at 10/class); val on
1,000 images decides, test on all 10,000 is reported. Run on a lent H100 on 2026-11-26; results in
``results/few-regularize.md``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from few_batch_sweep import sweep  # noqa: E402

VARIANTS_100 = {
    "base": [],
    "mixup0.2": ["--mixup", "0.2"],
    "mixup0.5": ["--mixup", "0.5"],
    "ema0.99": ["FMTL_EXP_EMA=0.99"],
    "ema0.998": ["FMTL_EXP_EMA=0.998"],
    "lr2e-3": ["--lr", "2e-3"],
    "last4": ["--unfreeze", "last:4"],
    "views8": ["--frozen-views", "8"],
    "mixup0.2-ema0.99": ["--mixup", "0.2", "FMTL_EXP_EMA=0.99"],
}
VARIANTS_10 = {
    "base": [],
    "mixup0.2": ["--mixup", "0.2"],
    "mixup0.5": ["--mixup", "0.5"],
    "ema0.99": ["FMTL_EXP_EMA=0.99"],
}

if __name__ == "__main__":
    sweep({100: (21, VARIANTS_100), 10: (151, VARIANTS_10)}, out=os.environ.get("OUT", "runs/few-regularize"))
