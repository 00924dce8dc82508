"""Fine-tuning the last 4 or 5 of Lite0's feature blocks instead of 3, at the epochs the CPU's budget buys.

    OUT=runs/few-depth python benchmarks/experiments/few_depth_sweep.py   # 18 runs, 8 at a time
    SECOND=1 OUT=runs/few-depth2 python benchmarks/experiments/few_depth_sweep.py   # 15 more

``few_regularize_sweep.py`` found ``--unfreeze last:4`` best at equal epochs (1 + 20 at 100/class: val 88.0
against 87.6 %, test 87.47 against 86.48 %), but on the 2-core CPU here a step through 4 blocks cost 2.1x one
through 3 (0.274 against 0.131 s, the budget warm-up of ``fmtl train --budget 180s --max-train-samples 1000``).
So these runs get about half the epochs: 1 + 10 at 100/class, 1 + 75 at 10/class (``last:3`` had 1 + 20 and
1 + 150). Run on a lent H100 on 2026-11-26; results in ``results/few-regularize.md``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from few_batch_sweep import sweep  # noqa: E402

VARIANTS_100 = {
    "last4-e11": ["--unfreeze", "last:4", "--epochs", "11"],
    "last4-e11-lr2e-3": ["--unfreeze", "last:4", "--epochs", "11", "--lr", "2e-3"],
    "last4-e13": ["--unfreeze", "last:4", "--epochs", "13"],
    "last5-e11": ["--unfreeze", "last:5", "--epochs", "11"],
}
VARIANTS_10 = {
    "last4-e76": ["--unfreeze", "last:4", "--epochs", "76"],
    "last4-e76-lr2e-3": ["--unfreeze", "last:4", "--epochs", "76", "--lr", "2e-3"],
}

# second run (SECOND=1): last:5 at 1 + 9 and with lr 2e-3; last:3 with lr 2e-3 at 10/class
SECOND_100 = {
    "last5-e10": ["--unfreeze", "last:5", "--epochs", "10"],
    "last5-e10-lr2e-3": ["--unfreeze", "last:5", "--epochs", "10", "--lr", "2e-3"],
    "last5-e11-lr2e-3": ["--unfreeze", "last:5", "--epochs", "11", "--lr", "2e-3"],
}
SECOND_10 = {"lr2e-3": ["--lr", "2e-3"], "last5-e70": ["--unfreeze", "last:5", "--epochs", "70"]}

if __name__ == "__main__":
    sizes = {100: (21, SECOND_100), 10: (151, SECOND_10)} if os.environ.get("SECOND") else None
    sweep(sizes or {100: (21, VARIANTS_100), 10: (151, VARIANTS_10)}, out=os.environ.get("OUT", "runs/few-depth"))
