"""The ``large`` recipe on all of Fashion-MNIST: variants at the epochs ``make demo``'s 900 s buy on the CPU.

    EXTRA="--max-val-samples 0" PARALLEL=16 SEEDS=2 OUT=runs/large-budget \
        python benchmarks/experiments/large_budget_sweep.py

``large_sweep.py`` compared variants at equal epochs (1 + 5). A variant that costs less per step on the 2-core
CPU buys more epochs there, so here each variant gets the fine-tuning epochs its CPU step cost buys in
``make demo``'s budget, relative to ``large`` itself (1 + 5 on the CPU at its fastest, 1 + 4.5 at 0.36 s a
step). CPU step costs, batches of 128, two threads (``large_step_cost.py``; noisy: the same variant timed 0.32
and 0.43 s in one run): 48 px last:5 0.32-0.43 s, last:3 0.26, all 0.45, 40 px 0.32-0.34, 56 px 0.52, 64 px
0.64. Val is on all 6,000 val images (``EXTRA``). Run on a lent H100 on 2026-11-26, four runs (the first, then
SECOND=1, THIRD=1, FOURTH=1); every row is in ``results/large-budget.md``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from few_batch_sweep import sweep  # noqa: E402

ALL = 0  # per class 0: ``--max-train-samples 0``, every training image
VARIANTS = {
    "base-e6": ["--epochs", "6"],
    "base-e5": ["--epochs", "5"],
    "bntrain-e6": ["--no-freeze-bn", "--epochs", "6"],
    "all-e5": ["--unfreeze", "all", "--epochs", "5"],
    "last3-e7": ["--unfreeze", "last:3", "--epochs", "7"],
    "px40-e7": ["--image-size", "40", "--epochs", "7"],
    "px56-e5": ["--image-size", "56", "--epochs", "5"],
    "aug1-e6": ["--augment-strength", "1.0", "--epochs", "6"],
}
# second run (SECOND=1): at equal CPU time, fractional epochs by --max-steps (422 steps an epoch, the head's too)
SECOND = {
    "base-e5.5": ["--epochs", "6", "--max-steps", "2321"],
    "px56-e4.5": ["--image-size", "56", "--epochs", "5", "--max-steps", "1899"],
    "px52-e5": ["--image-size", "52", "--epochs", "5"],
    "px64-e3.8": ["--image-size", "64", "--epochs", "4", "--max-steps", "1604"],
    "all-e4.9": ["--unfreeze", "all", "--epochs", "5", "--max-steps", "2068"],
}
# third run (THIRD=1): no head phase (no feature caching, no L-BFGS: about 90 s of the CPU's 900, which buy
# another 0.65 fine-tuning epoch there), at 48, 52 and 56 px; and the head phase at 52 px for 1 + 3.9
THIRD = {
    "ft48-e5.15": ["--strategy", "finetune", "--epochs", "6", "--max-steps", "2173"],
    "ft52-e4.5": ["--strategy", "finetune", "--image-size", "52", "--epochs", "5", "--max-steps", "1890"],
    "ft56-e4": ["--strategy", "finetune", "--image-size", "56", "--epochs", "4", "--max-steps", "1671"],
    "px52-e4.9": ["--image-size", "52", "--epochs", "5", "--max-steps", "2068"],
}
# fourth run (FOURTH=1): lighter augmentation (1.0 lost a point against 0.5 at 1 + 5)
FOURTH = {
    "aug0.25-e5.5": ["--augment-strength", "0.25", "--epochs", "6", "--max-steps", "2321"],
    "aug0-e5.5": ["--augment-strength", "0", "--epochs", "6", "--max-steps", "2321"],
    "px52-aug0.25-e4.9": ["--image-size", "52", "--augment-strength", "0.25", "--epochs", "5", "--max-steps", "2068"],
}

LATER = {"SECOND": SECOND, "THIRD": THIRD, "FOURTH": FOURTH}  # SECOND=1 etc. picks a later run's variants

if __name__ == "__main__":
    variants = next((later for name, later in LATER.items() if os.environ.get(name)), VARIANTS)
    # jobs_for puts "--epochs" first from the size's default; each variant's own --epochs comes later and wins
    sweep({ALL: (6, variants)}, out=os.environ.get("OUT", "runs/large-budget"))
