"""The ``large`` recipe's batch size and learning rates on all of Fashion-MNIST at equal epochs, 2 seeds.

    OUT=runs/large-sweep python benchmarks/experiments/large_sweep.py      # 10 runs at once

Run on a lent H100 on 2026-11-26 (results in ``results/large-batch.md``): 1 head + 5 fine-tuning epochs, what
``make demo``'s 900 s buys on the 2-core CPU. No variant beat the recipe on test; ``large`` was left as it is.
"""

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

OUT = os.environ.get("OUT", "runs/large-sweep")
VARIANTS = {
    "base": [],
    "bs64": ["--batch-size", "64"],
    "bs64-lr2e-3": ["--batch-size", "64", "--lr", "2e-3"],
    "lr2e-3": ["--lr", "2e-3"],
    "bb1.0": ["--backbone-lr-scale", "1.0"],
}
jobs = [(name, seed, args) for seed in range(2) for name, args in VARIANTS.items()]


def run(job):
    name, seed, args = job
    out = f"{OUT}/runs/{name}-s{seed}"
    cmd = [
        sys.executable,
        "-m",
        "fmtl.train",
        "--quiet",
        "--no-save-state",
        "--threads",
        "1",
        "--seed",
        str(seed),
        "--epochs",
        "6",
        "--output",
        out,
        *args,
    ]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    res = {"name": name, "seed": seed, "wall": round(time.time() - t, 1)}
    try:
        res["test"] = json.load(open(f"{out}/metrics.json"))["accuracy"]
        rows = [r for r in csv.DictReader(open(f"{out}/results.csv")) if r.get("val_acc")]
        res["val"] = max(float(r["val_acc"]) for r in rows)
        res["vals"] = [float(r["val_acc"]) for r in rows]
    except Exception:
        res["error"] = (r.stderr.strip().splitlines() or ["?"])[-3:]
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(run, jobs))
    summary = {}
    for r in results:
        if "test" in r:
            summary.setdefault(r["name"], []).append((r["val"], r["test"]))
    for name, vals in summary.items():
        print(
            f"{name:14s} n={len(vals)} val {sum(a for a, _ in vals) / len(vals):.4f} test {sum(b for _, b in vals) / len(vals):.4f}"
        )


if __name__ == "__main__":
    main()
