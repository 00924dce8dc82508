#!/usr/bin/env python3
"""Choosing the ``few`` recipe: test accuracy of fine-tuning variants at 10 and 100 images per class.

    python benchmarks/experiments/fewshot_sweep.py lr --out runs/fewshot-lr        # 3 seeds x 4 variants x 2 sizes
    python benchmarks/experiments/fewshot_sweep.py resolution --seeds 2 --parallel 8

Accuracy after a given number of optimizer steps does not depend on the device, so this sweep ran on a
lent GPU (many runs in parallel); what each step costs on the 2-core CPU is measured there, and
``benchmarks/accuracy.py`` decides at equal wall-clock budgets. Every run is a real ``fmtl train``:
its seed picks the labelled subset and the validation split, choices are made on validation, and the
test split (all 10,000 images) is touched once. The peer's accuracy after more epochs is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# (images per class, total epochs): at batch 128 one epoch of 100 images is one step, of 1,000 eight.
STEPS = {"resolution": {10: (11, 26, 51), 100: (4, 7, 13)}, "lr": {10: (26,), 100: (7,)}}


def variants(grid: str, per_class: int) -> dict[str, list[str]]:
    if grid == "resolution":
        runs = {}
        for size in (128, 160, 224):
            runs[f"probe {size}"] = ["--strategy", "linear", "--no-augment", "--epochs", "1", "--image-size", str(size)]
            for epochs in STEPS[grid][per_class]:
                runs[f"{size} px, 1 + {epochs - 1} epochs"] = ["--epochs", str(epochs), "--image-size", str(size)]
        return runs
    base = ["--epochs", str(STEPS[grid][per_class][0]), "--image-size", "128", "--max-val-samples", "1000"]
    return {
        "backbone 0.1x, lr 1e-3": [*base, "--backbone-lr-scale", "0.1"],
        "backbone 0.3x, lr 1e-3": [*base, "--backbone-lr-scale", "0.3"],
        "backbone 0.3x, lr 2e-3": [*base, "--backbone-lr-scale", "0.3", "--lr", "2e-3"],
        "backbone 0.1x, lr 3e-3": [*base, "--backbone-lr-scale", "0.1", "--lr", "3e-3"],
    }


def run_fmtl(name: str, per_class: int, seed: int, args: list[str], runs: Path) -> dict:
    out = runs / f"{name.replace(' ', '_').replace(',', '')}-{per_class}-s{seed}"
    command = [sys.executable, "-m", "fmtl.train", "--quiet", "--no-save-state", "--threads", "2", "--seed", str(seed)]
    command += ["--max-train-samples", str(per_class * 10), "--output", str(out), *args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    row = {"name": name, "per_class": per_class, "seed": seed, "wall_s": round(time.perf_counter() - started, 1)}
    if result.returncode == 0:
        row["accuracy"] = json.loads((out / "metrics.json").read_text())["accuracy"]
    else:
        row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps(row), flush=True)
    return row


def run_peer(per_class: int, epochs: int) -> dict:
    env = {**os.environ, "PER_CLASS": str(per_class), "EVAL_EVERY": "1000000", "OMP_NUM_THREADS": "1"}
    peer = REPO / "benchmarks" / "peers" / "scratch_cnn.py"
    result = subprocess.run([sys.executable, str(peer), str(epochs), "32"], env=env, capture_output=True, text=True)
    last = (result.stdout.strip().splitlines() or ["?"])[-1]  # "epoch E test acc A elapsed Ss"
    row = {"name": f"peer, {epochs} epochs", "per_class": per_class, "seed": 0}
    row.update({"accuracy": float(last.split()[4])} if "test acc" in last else {"error": last})
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| images per class | variant | test accuracy per seed | mean |", "| --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "accuracy" in row:
            groups.setdefault((row["per_class"], row["name"]), []).append(row)
    for (per_class, name), group in sorted(groups.items()):
        accuracies = [100 * r["accuracy"] for r in sorted(group, key=lambda r: r["seed"])]
        shown = " / ".join(f"{a:.2f}" for a in accuracies)
        lines.append(f"| {per_class} | {name} | {shown} | {statistics.mean(accuracies):.2f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", choices=sorted(STEPS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=8, help="runs at once (a GPU machine's CPU cores / 2)")
    parser.add_argument("--peer-epochs", default="10:232,10:600,100:30,100:90,100:180")
    parser.add_argument("--out", default="runs/fewshot-sweep")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (name, per_class, seed, options)
        for seed in range(args.seeds)
        for per_class in (10, 100)
        for name, options in variants(args.grid, per_class).items()
    ]
    peers = [tuple(int(n) for n in pair.split(":")) for pair in args.peer_epochs.split(",") if pair]
    with ThreadPoolExecutor(args.parallel) as pool:
        peer_rows = [pool.submit(run_peer, per_class, epochs) for per_class, epochs in peers]
        rows = list(pool.map(lambda job: run_fmtl(*job, out / "runs"), jobs)) + [f.result() for f in peer_rows]
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "sweep.md").write_text(table(rows) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
