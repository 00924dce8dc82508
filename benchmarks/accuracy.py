#!/usr/bin/env python3
"""Transfer against training from scratch, at equal wall-clock budgets, on one machine.

    .venv/bin/python benchmarks/accuracy.py --quick --report   # ~10 minutes: 10 and 100 per class, 1 seed, 4 contenders
    .venv/bin/python benchmarks/accuracy.py --report           # everything below (hours on 2 CPU cores)
    .venv/bin/python benchmarks/accuracy.py --sizes 6000 --seeds 1 --contenders default,scratch

Two measurements, printed and written to OUT (default runs/accuracy) as accuracy.md and accuracy.png:

1. test accuracy against labelled images per class (10, 100, 1,000 and all, and 100 at a 1-minute budget),
   each size on 3 seeded subsets, for fmtl's default recipe (``--recipe auto``: transfer, or its
   ``scratch`` recipe where that wins), transfer from EfficientNet-Lite0 and fmtl's ``scratch_cnn`` each
   forced, a frozen linear probe, fine-tuning without the head phase, and the peer
   ``benchmarks/peers/speedrun_cnn.py`` (the speedrun recipes' standard, plain PyTorch), every contender
   given the same wall-clock training budget per size (``fmtl train --budget``, which covers training and
   its validation passes; every contender's test pass comes after it; the peer plans its epochs into the
   budget the same way). A forced contender that is what the default picked reuses the default's run;
2. test accuracy against wall time (1, 5, 15 minutes) on all the data, fmtl's default against the
   scratch baseline (``--wall``).

``--report`` also writes the table and plot to benchmarks/results/accuracy.md and .png (``--quick``:
accuracy-quick), with the machine, the date and this command.

Every run gets one torch thread (``--threads``, default 1): on a 2-core machine that other jobs
share, two OpenMP threads per process measured 5-100x slower per step than one.

Protocol: every fmtl run makes its choices (best epoch) on its validation split, a seeded 10 % of the
training data that is not counted as labelled images; the test split is touched once per trained
model, by the run itself at its end. Results are kept in OUT/results.json as they come, so an
interrupted benchmark continues where it stopped, and a finished OUT only re-writes its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from results_file import write_results

REPO = Path(__file__).resolve().parents[1]
PEER = REPO / "benchmarks" / "peers" / "speedrun_cnn.py"  # the strongest from-scratch recipe we know
ALL = 6000  # "all" labelled images per class (fmtl trains on the 5,400 per class its val split leaves)

CONTENDERS = {
    "default": ("fmtl default", []),
    "transfer": ("fmtl transfer (Lite0)", ["--model", "efficientnet_lite0"]),  # auto's transfer recipe by size
    "scratch": ("fmtl scratch_cnn", ["--model", "scratch_cnn", "--weights", "none"]),  # the scratch recipe
    "linear": ("frozen linear probe", ["--strategy", "linear", "--no-augment"]),
    "finetune": ("fine-tune, no head phase", ["--strategy", "finetune"]),
    "peer": ("peer speedrun_cnn.py", None),
}
# A contender that is what the default picked at a size (transfer or scratch) reuses the default's run there.
SAME_AS_DEFAULT = {"transfer": ("few", "small", "large"), "scratch": ("scratch",)}
# Transfer needs a few dozen 128 px fine-tuning steps (~3 s each on 2 cores) to pull ahead at 10 and 100 per
# class; the scratch CNN has converged there by 45 s (at 10 per class 232 and 600 epochs both gave 71 %).
FULL = {"sizes": [10, 100, 1000, ALL], "seeds": 3, "budgets": {10: 120, 100: 180, 1000: 300, ALL: 900}}
SHORT = {100: 60}  # a second, shorter budget at these sizes: its own row
VAL_IMAGES = 1000  # below all the data, fmtl validates on this many of its val split (a 6,000-image pass at 128 px
# costs ~50 s here, more than the training it would check); the test set stays whole
QUICK = {"sizes": [10, 100], "seeds": 1, "budgets": {10: 45, 100: 60}, "contenders": "default,linear,scratch,peer"}
WALL_BUDGETS = [60, 300, 900]  # the accuracy-against-time curve on all the data


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- one run each


def run_fmtl(
    key: str, per_class: int, seed: int, budget: int, out: Path, eval_images: int, val_images: int, threads: int
) -> dict:
    run_dir = out / "runs" / f"{key}-{per_class}-s{seed}-{budget}s"
    args = [sys.executable, "-m", "fmtl.train", "--budget", f"{budget}s", "--seed", str(seed), "--quiet"]
    args += ["--no-save-state", "--threads", str(threads), "--output", str(run_dir), *CONTENDERS[key][1]]
    if per_class != ALL:
        args += ["--max-train-samples", str(per_class * 10)]
    if eval_images:
        args += ["--max-test-samples", str(eval_images)]
    if val_images and per_class != ALL:
        args += ["--max-val-samples", str(val_images)]
    elif eval_images:
        args += ["--max-val-samples", str(eval_images)]
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started, before = time.perf_counter(), load()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1), "load": before}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]
    plan = json.loads((run_dir / "plan.json").read_text())
    epochs = (plan.get("replans") or [plan])[-1]["epochs"]  # what ran: the last re-plan's, else the plan's
    return {
        "accuracy": metrics["accuracy"], "test_images": metrics["num_images"], "wall_s": round(wall, 1), "recipe": recipe,
        "epochs": epochs, "head_epochs": plan["head_epochs"], "finished_s": plan.get("finished_s"),
        "load": before, "plan": plan, "run_dir": str(run_dir.relative_to(REPO)) if run_dir.is_relative_to(REPO) else str(run_dir),
    }  # fmt: skip


def run_peer(per_class: int, seed: int, budget: int, out: Path, threads: int) -> dict:
    """The speedrun peer given the same training budget; it plans its epochs into it as ``--budget`` does."""
    args = [sys.executable, str(PEER), "--budget", str(budget), "--seed", str(seed), "--threads", str(threads)]
    args += ["--per-class", str(0 if per_class == ALL else per_class)]  # 0: the 90 % a class fmtl trains on
    started, before = time.perf_counter(), load()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    match = re.findall(r"test acc ([0-9.]+) trained (\d+) s epochs (\d+)", result.stdout)
    if result.returncode != 0 or not match:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1), "load": before}
    accuracy, trained, epochs = match[-1]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"peer-{per_class}-s{seed}-{budget}s.log").write_text(result.stdout)
    return {"accuracy": float(accuracy), "test_images": 10_000, "wall_s": round(wall, 1), "epochs": int(epochs),
            "finished_s": float(trained), "load": before}  # fmt: skip


# ---------------------------------------------------------------- tables and plot


def summarise(results: dict, key: str, per_class: int, budget: int) -> dict | None:
    runs = [r for k, r in results.items() if k.startswith(f"{key}|{per_class}|") and k.endswith(f"|{budget}")]
    accs = [r["accuracy"] for r in runs if "accuracy" in r]
    if not accs:
        return None
    return {"mean": statistics.mean(accs), "spread": (max(accs) - min(accs)) / 2, "n": len(accs),
            "wall": max(r["wall_s"] for r in runs if "accuracy" in r)}  # fmt: skip


def label(per_class: int) -> str:
    return "all (5,400)" if per_class == ALL else f"{per_class:,}"


def rows(sizes: list[int], budgets: dict, short: dict) -> list[tuple[int, int]]:
    """(size, budget) of every table row: each size at its budget, then the shorter budgets asked for."""
    return [(s, budgets[s]) for s in sizes] + [(s, b) for s, b in short.items() if s in sizes]


def table(results: dict, sizes: list[int], budgets: dict, keys: list[str], short: dict) -> str:
    lines = [
        "| labelled / class | budget | " + " | ".join(CONTENDERS[k][0] for k in keys) + " | default - peer |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |",
    ]
    for size, budget in rows(sizes, budgets, short):
        cells, peer, default = [], None, None
        for key in keys:
            s = summarise(results, key, size, budget)
            if s is None:
                cells.append("-")
                continue
            spread = f" ± {100 * s['spread']:.1f}" if s["n"] > 1 else ""
            cells.append(f"{100 * s['mean']:.2f}{spread} (n={s['n']})")
            if key == "default":
                default = s["mean"]
            if key == "peer":
                peer = s["mean"]
        margin = f"{100 * (default - peer):+.2f}" if default is not None and peer else "-"
        lines.append(f"| {label(size)} | {budget}s | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines)


def wall_table(results: dict) -> str:
    lines = ["| budget (all data) | fmtl default | fmtl scratch_cnn |", "| --- | --- | --- |"]
    for budget in WALL_BUDGETS:
        cells = []
        for key in ("default", "scratch"):
            s = summarise(results, key, ALL, budget)
            cells.append(f"{100 * s['mean']:.2f}" if s else "-")
        lines.append(f"| {budget // 60} min | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, sizes: list[int], budgets: dict, keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        points = [(s, summarise(results, key, s, budgets[s])) for s in sizes]
        points = [(s, v) for s, v in points if v]
        if points:
            left.errorbar([s for s, _ in points], [100 * v["mean"] for _, v in points],
                          yerr=[100 * v["spread"] for _, v in points], marker="o", capsize=3, label=CONTENDERS[key][0])  # fmt: skip
    left.set(xscale="log", xlabel="labelled images per class", ylabel="test accuracy (%)",
             title="equal wall-clock budget per size")  # fmt: skip
    if left.get_legend_handles_labels()[0]:
        left.legend()
    for key in ("default", "scratch"):
        points = [(b, summarise(results, key, ALL, b)) for b in WALL_BUDGETS]
        points = [(b, v) for b, v in points if v]
        if points:
            right.plot([b / 60 for b, _ in points], [100 * v["mean"] for _, v in points], marker="o",
                       label=CONTENDERS[key][0])  # fmt: skip
    right.set(xlabel="training budget (minutes)", ylabel="test accuracy (%)", title="all data: accuracy against time")
    if right.get_legend_handles_labels()[0]:
        right.legend()
    else:
        right.text(0.5, 0.5, "not measured (--wall)", ha="center", va="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 per class, one seed, short budgets")
    parser.add_argument("--sizes", help="labelled images per class, comma-separated (6000: all)")
    parser.add_argument("--seeds", type=int, help="seeded subsets per size")
    parser.add_argument("--budgets", help="override budgets, e.g. 100:180,1000:300 (per class: seconds)")
    parser.add_argument("--contenders", help=f"of {', '.join(CONTENDERS)} (--quick: all but finetune)")
    parser.add_argument("--wall", action="store_true", help="also the 1/5/15 min curve on all the data")
    parser.add_argument("--eval-images", type=int, help="val and test images per run (0: all; --quick: 500)")
    parser.add_argument(
        "--val-images", type=int, default=VAL_IMAGES, help="fmtl's val images below all the data (0: all)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run, every contender alike")
    parser.add_argument("--out", default="runs/accuracy")
    parser.add_argument("--no-run", action="store_true", help="only write the tables from OUT/results.json")
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write the table and plot under benchmarks/results/ (with provenance)",
    )
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else mode["sizes"]
    budgets = {**FULL["budgets"], **mode["budgets"]}
    if args.budgets:
        budgets.update({int(k): int(v) for k, v in (pair.split(":") for pair in args.budgets.split(","))})
    seeds = args.seeds or mode["seeds"]
    keys = [
        k for k in (args.contenders or mode.get("contenders") or ",".join(CONTENDERS)).split(",") if k in CONTENDERS
    ]
    eval_images = args.eval_images if args.eval_images is not None else (500 if args.quick else 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    header = (
        f"machine: {machine()}; {args.threads} torch thread(s) per run; load at start {load()}; budgets: "
        + ", ".join(f"{label(s)}/class {budgets[s]}s" for s in sizes)
    )
    print(header, flush=True)
    short = {} if args.budgets or args.quick else SHORT
    jobs = [(k, s, seed, b) for s, b in rows(sizes, budgets, short) for seed in range(seeds) for k in keys]
    if args.wall:
        jobs += [(k, ALL, 0, b) for b in WALL_BUDGETS for k in ("default", "scratch")]
    for key, size, seed, budget in [] if args.no_run else jobs:
        name = f"{key}|{size}|{seed}|{budget}"
        if name in results and "accuracy" in results[name]:
            continue
        default = results.get(f"default|{size}|{seed}|{budget}", {})
        if default.get("recipe") in SAME_AS_DEFAULT.get(key, ()):
            row = {**default, "same_as": "default"}
        elif key == "peer":
            row = run_peer(size, seed, budget, out, args.threads)
        else:
            row = run_fmtl(key, size, seed, budget, out, eval_images, args.val_images, args.threads)
        results[name] = row
        store.write_text(json.dumps(results, indent=1) + "\n")
        shown = f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else f"failed: {row['error']}"
        print(f"{CONTENDERS[key][0]:<26} {label(size):>11}/class seed {seed} budget {budget:>4}s: {shown} "
              f"(wall {row.get('wall_s', 0):.0f}s, epochs {row.get('epochs', '-')}, load {row.get('load')})", flush=True)  # fmt: skip
    images = (
        f"test images per run: {eval_images or 'all 10,000'}; fmtl's val images below all the data: "
        f"{args.val_images or eval_images or 'all'}"  # as run_fmtl passes --max-val-samples
    )
    tables = "\n\n".join([table(results, sizes, budgets, keys, short), *([wall_table(results)] if args.wall else [])])
    text = f"{header}; load at end {load()}\n{images}\n\n{tables}"
    (out / "accuracy.md").write_text(text + "\n")
    plot(results, sizes, budgets, keys, out / "accuracy.png")
    print("\n" + text + f"\n\nwrote {out / 'accuracy.md'} and {out / 'accuracy.png'}")
    if args.report:
        name = "accuracy-quick" if args.quick else "accuracy"
        path = write_results(
            name,
            "Transfer against training from scratch at equal wall-clock budgets",
            f"{tables}\n\n![accuracy against labelled images]({name}.png)",
            versions=f"{args.threads} torch thread(s) per run, load {load()}",
            note=f"{images}. Budgets: " + ", ".join(f"{label(s)}/class {budgets[s]} s" for s in sizes) + ".",
        )
        plot(results, sizes, budgets, keys, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
