"""Choosing ``few``'s batch size: val (the choice) and test accuracy of variants at equal epochs, 3 seeds.

    OUT=runs/few-batch python benchmarks/experiments/few_batch_sweep.py     # 36 runs, 8 at a time

Run on a lent H100 on 2026-11-26 (torch 2.11, fmtl from this tree, all of Fashion-MNIST in FMTL_DATA_DIR);
results in ``results/few-batch.md``. Epochs match what the 2-core CPU's budget bought with the recipe as
it was (100/class: 1 + 20 at 180 s; 10/class: 1 + 150 at 120 s): accuracy after a number of epochs does not
depend on the device. What a variant costs per epoch on the CPU is measured there (``benchmarks/accuracy.py``).
EPOCH_SCALE, SEEDS, PARALLEL and EXTRA (more ``fmtl train`` options) make a CPU dry run possible.
"""

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

OUT = os.environ.get("OUT", "runs/few-batch")
RUNS = os.environ.get("RUNS", "/tmp/runs")
SEEDS = int(os.environ.get("SEEDS", "3"))
SCALE = float(os.environ.get("EPOCH_SCALE", "1"))  # < 1 for a CPU dry run
VARIANTS_100 = {
    "base": [],
    "bs64": ["--batch-size", "64"],
    "bs32": ["--batch-size", "32"],
    "bs64-lr2e-3": ["--batch-size", "64", "--lr", "2e-3"],
    "lr2e-3": ["--lr", "2e-3"],
    "bb0.6": ["--backbone-lr-scale", "0.6"],
    "ls0": ["--label-smoothing", "0"],
    "aug1.5": ["--augment-strength", "1.5"],
    "wd0.05": ["--weight-decay", "0.05"],
}
VARIANTS_10 = {"base": [], "bs32": ["--batch-size", "32"], "bs64": ["--batch-size", "64"]}


def jobs_for(sizes: dict) -> list:
    """(variant, per class, seed, options) for {per class: (epochs, {variant: options})}; an option NAME=value
    is set in the run's environment instead (an experiment that is not an fmtl option)."""
    return [
        (name, pc, seed, ["--epochs", str(max(2, int(epochs * SCALE))), *args])
        for seed in range(SEEDS)
        for pc, (epochs, variants) in sizes.items()
        for name, args in variants.items()
    ]


def best_val(out):
    rows = [r for r in csv.DictReader(open(f"{out}/results.csv")) if r.get("val_acc")]
    return max(float(r["val_acc"]) for r in rows)


def run(job):
    name, pc, seed, args = job
    out = f"{RUNS}/{name}-{pc}-s{seed}"
    env = {**os.environ, **dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))}
    args = [a for a in args if a.startswith("-") or "=" not in a]
    cmd = [
        sys.executable,
        "-m",
        "fmtl.train",
        "--quiet",
        "--no-save-state",
        "--threads",
        "2",
        "--seed",
        str(seed),
        "--max-train-samples",
        str(pc * 10),
        "--max-val-samples",
        "1000",
        "--output",
        out,
        *args,
        *os.environ.get("EXTRA", "").split(),
    ]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    res = {"name": name, "per_class": pc, "seed": seed, "wall": round(time.time() - t, 1)}
    try:
        res["test"] = json.load(open(f"{out}/metrics.json"))["accuracy"]
        res["val"] = best_val(out)
    except Exception:
        res["error"] = (r.stderr.strip().splitlines() or ["?"])[-3:]
    print(json.dumps(res), flush=True)
    return res


def sweep(sizes: dict, out: str = OUT) -> None:
    with ThreadPoolExecutor(int(os.environ.get("PARALLEL", "8"))) as pool:
        results = list(pool.map(run, jobs_for(sizes)))
    os.makedirs(out, exist_ok=True)
    json.dump(results, open(f"{out}/sweep.json", "w"), indent=1)
    summary = {}
    for r in results:
        if "test" in r:
            summary.setdefault((r["per_class"], r["name"]), []).append((r["val"], r["test"]))
    for (pc, name), vals in sorted(summary.items()):
        v = sum(a for a, _ in vals) / len(vals)
        t = sum(b for _, b in vals) / len(vals)
        print(f"{pc:4d}/class {name:14s} n={len(vals)} val {v:.4f} test {t:.4f}")


if __name__ == "__main__":
    sweep({100: (21, VARIANTS_100), 10: (151, VARIANTS_10)})
