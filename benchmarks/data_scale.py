"""Training from photo folders as they grow: fmtl's memory-mapped store against ImageFolder + DataLoader.

For folders of synthetic 320x240 JPEG "photos" in 10 class folders (2k, 10k and 50k; 100k with --full),
in the same run:

- the first build of fmtl's store: seconds and photos/s, and the peak anonymous memory while building;
- ``fmtl train`` (1 process, and 2 processes on this machine) with the store built, 1 process with
  ``--head-cache`` (the default: the epoch trains the head on cached features, solved first by L-BFGS), and
  1 process with ``--no-keep-freed-memory`` (glibc then hands freed blocks back, so what stays is what the run holds): the peak anonymous
  memory of the whole process tree (RssAnon summed over every process: the store's mapped pages are page
  cache, not counted), seconds to the run's start line (store opened, splits made, model built: the first
  step follows it), training images/s;
- the peer ``peers/imagefolder_loop.py`` (torchvision ImageFolder, DataLoader with 2 workers, ResNet-18):
  the same memory figure and images/s;
- with ``--baseline REV``: Fashion-MNIST training images/s of this tree against REV's, interleaved.

    .venv/bin/python benchmarks/data_scale.py --report            # 2k, 10k, 50k (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/data_scale.py --sizes 2000 --quick  # a smoke run (results: data_scale-quick.md)
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = [PY, str(ROOT / "fmtl" / "train.py")]
# one linear epoch of 20 steps at 32 px, trained from the images (no feature cache): the data path's cost
# (--batch-size fixed: the recipe picks the batch by the data's size, and the batch, not the data, sets the memory)
STEPS = ["--strategy", "linear", "--image-size", "32", "--batch-size", "128", "--epochs", "1", "--max-steps", "20",
         "--no-head-cache", "--no-calibrate", "--quiet"]  # fmt: skip


def make_photos(folder: Path, count: int) -> Path:
    """``count`` seeded 320x240 JPEGs in 10 class folders (kept between runs: made once a size)."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(count)
    for i in range(count):
        label = i % 10
        target = folder / f"class{label}"
        target.mkdir(parents=True, exist_ok=True)
        base = np.zeros((240, 320, 3), np.uint8)
        base[..., label % 3] = 40 + 20 * label
        noise = rng.integers(0, 60, (30, 40, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(base + noise).save(target / f"{i:06d}.jpg", quality=85)
    done.touch()
    return folder


class PeakAnon:
    """Samples the RssAnon of a process and all its descendants every 50 ms; keeps the peak sum."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, sum(_rss_anon(p.pid) for p in tree))
            time.sleep(0.05)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(command: list[str], env: dict, marker: str | None = None) -> dict:
    """Run ``command``; its seconds, peak anonymous memory, output, and when ``marker`` first appeared."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=env.get("FMTL_BENCH_CWD", ROOT))  # fmt: skip
    peak, lines, marked = PeakAnon(process.pid), [], None
    for line in process.stdout:
        lines.append(line)
        if marker and marked is None and marker in line:
            marked = time.perf_counter() - started
    code = process.wait()
    result = {"seconds": time.perf_counter() - started, "anon": peak.finish(), "output": "".join(lines),
              "marked": marked}  # fmt: skip
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(command)}\n{result['output'][-3000:]}")
    return result


def epoch_images_per_s(run_dir: Path) -> float:
    with open(run_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1]["images_per_s"])


def build_store(folder: Path, env: dict) -> dict:
    code = f"from pathlib import Path; from fmtl.training.data import load_folder; load_folder(Path({str(folder)!r}), None, quiet=True)"
    return measured([PY, "-c", code], env)


def fmtl_run(folder: Path, env: dict, work: Path, processes: int, *extra: str) -> dict:
    out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    args = [*STEPS, *extra, "--data", str(folder), "--output", str(out / "run")]
    if processes == 1:
        command = [*TRAIN, *args]
    else:
        launch = [PY, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu-multiprocess.yaml"),
                  "--num_processes", str(processes)]  # fmt: skip
        command = [*launch, str(ROOT / "fmtl" / "train.py"), *args]
    result = measured(command, env, marker=" train / ")
    result["images_per_s"] = epoch_images_per_s(out / "run")
    return result


def peer_run(folder: Path, env: dict) -> dict:
    result = measured([PY, str(ROOT / "benchmarks/peers/imagefolder_loop.py"), str(folder), "--steps", "21"], env)
    result["images_per_s"] = float(re.search(r"images_per_s=([\d.]+)", result["output"]).group(1))
    return result


def fashion_mnist_speed(tree: Path, env: dict, work: Path) -> float:
    """Fashion-MNIST fine-tuning images/s of the code in ``tree`` (this checkout, or the baseline's)."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="fm-"))
    command = [PY, str(tree / "fmtl" / "train.py"), "--strategy", "finetune", "--image-size", "32", "--epochs", "1",
               "--max-train-samples", "6000", "--max-val-samples", "500", "--max-test-samples", "500", "--quiet",
               "--no-calibrate", "--output", str(out / "run")]  # fmt: skip
    measured(command, {**env, "PYTHONPATH": str(tree), "FMTL_BENCH_CWD": str(tree)})
    return epoch_images_per_s(out / "run")


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 10000, 50000], help="none: Fashion-MNIST only")
    parser.add_argument("--full", action="store_true", help="add a 100,000-photo folder")
    parser.add_argument("--quick", action="store_true", help="skip the 2-process runs and the peer")
    parser.add_argument("--baseline", help="a git revision: Fashion-MNIST images/s against it, interleaved")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the Fashion-MNIST comparison")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fmtl-data-scale"))
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    sizes = [*args.sizes, *([100_000] if args.full else [])]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for count in sizes:
        folder = make_photos(work / f"photos-{count}", count)
        env["FMTL_CACHE_DIR"] = str(work / f"cache-{count}")
        subprocess.run(["rm", "-rf", env["FMTL_CACHE_DIR"]], check=True)
        build = build_store(folder, env)
        one = fmtl_run(folder, env, work, 1)
        unkept = fmtl_run(folder, env, work, 1, "--no-keep-freed-memory")
        cached = fmtl_run(folder, env, work, 1, "--head-cache")
        cached_unkept = fmtl_run(folder, env, work, 1, "--head-cache", "--no-keep-freed-memory")
        two = None if args.quick else fmtl_run(folder, env, work, 2)
        peer = None if args.quick else peer_run(folder, env)
        row = {"photos": count, "build_s": build["seconds"], "build_rate": count / build["seconds"],
               "build_anon": build["anon"], "one": one, "unkept": unkept, "cached": cached, "cached_unkept": cached_unkept, "two": two, "peer": peer}  # fmt: skip
        rows.append(row)
        print(_row_line(row), flush=True)
        subprocess.run(["rm", "-rf", env["FMTL_CACHE_DIR"]], check=True)
    table = _table(rows) if rows else ""
    verdicts = _verdicts(rows) if rows else ""
    fm = _fashion_mnist(args, env, work) if args.baseline else ""
    print(table, verdicts, fm, sep="\n\n")
    if args.report:
        write_results("data_scale" + ("-quick" if args.quick else ""), "Training from photo folders as they grow", "\n\n".join(filter(None, [table, verdicts, fm])),
                      note="Synthetic 320x240 JPEGs in 10 class folders; one linear epoch of 20 steps at 32 px from "
                      "the images (`" + " ".join(STEPS) + "`); the --head-cache column caches every image's features first, "
                      "solves the head on them by L-BFGS, then takes the 20 steps on features. Anonymous memory: the peak of RssAnon summed over "
                      "every process of the run (a store's mapped pages are page cache, not counted).")  # fmt: skip


def _row_line(row: dict) -> str:
    return (f"{row['photos']:,} photos: build {row['build_s']:.1f}s ({row['build_rate']:.0f}/s), "
            f"1 process {mb(row['one']['anon'])}, start {row['one']['marked']:.1f}s, "
            f"{row['one']['images_per_s']:.0f} img/s")  # fmt: skip


def _table(rows: list[dict]) -> str:
    lines = [
        "| photos | store build | build photos/s | build anon | fmtl 1 process anon | same, --no-keep-freed-memory "
        "| same, --head-cache | --head-cache --no-keep-freed-memory | to start line | fmtl img/s | fmtl 2 processes anon | 2 / 1 | peer anon | peer img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        two = f"{mb(r['two']['anon'])} | {r['two']['anon'] / r['one']['anon']:.2f}x" if r["two"] else "- | -"
        peer = f"{mb(r['peer']['anon'])} | {r['peer']['images_per_s']:.0f}" if r["peer"] else "- | -"
        lines.append(
            f"| {r['photos']:,} | {r['build_s']:.1f} s | {r['build_rate']:.0f} | {mb(r['build_anon'])} "
            f"| {mb(r['one']['anon'])} | {mb(r['unkept']['anon'])} | {mb(r['cached']['anon'])} | {mb(r['cached_unkept']['anon'])} | {r['one']['marked']:.1f} s | {r['one']['images_per_s']:.0f} | {two} | {peer} |"
        )
    return "\n".join(lines)


def _verdicts(rows: list[dict]) -> str:
    first, last = rows[0], rows[-1]
    growth = last["one"]["anon"] / first["one"]["anon"] - 1
    unkept = last["unkept"]["anon"] / first["unkept"]["anon"] - 1
    cached = last["cached"]["anon"] / first["cached"]["anon"] - 1
    cached_unkept = last["cached_unkept"]["anon"] / first["cached_unkept"]["anon"] - 1
    lines = [
        f"- anonymous memory from {first['photos']:,} to {last['photos']:,} photos: {growth:+.1%} "
        f"(target at most +15 %): {'met' if growth <= 0.15 else 'NOT met'}; with --no-keep-freed-memory "
        f"{unkept:+.1%}: {'met' if unkept <= 0.15 else 'NOT met'}; with --head-cache (the default) {cached:+.1%}: "
        f"{'met' if cached <= 0.15 else 'NOT met'}; with --head-cache --no-keep-freed-memory {cached_unkept:+.1%}: "
        f"{'met' if cached_unkept <= 0.15 else 'NOT met'}",
        f"- slowest first build: {min(r['build_rate'] for r in rows):.0f} photos/s (target >= 250): "
        f"{'met' if min(r['build_rate'] for r in rows) >= 250 else 'NOT met'}",
        f"- start line at {last['photos']:,} photos, store built: {last['one']['marked']:.1f} s (target within 10 s): "
        f"{'met' if last['one']['marked'] <= 10 else 'NOT met'}",
    ]
    ratios = [r["two"]["anon"] / r["one"]["anon"] for r in rows if r["two"]]
    if ratios:
        lines.append(f"- 2 processes against 1: at most {max(ratios):.2f}x (target at most 1.5x): "
                     f"{'met' if max(ratios) <= 1.5 else 'NOT met'}")  # fmt: skip
    if first["two"] and last["two"]:
        growth = last["two"]["anon"] / first["two"]["anon"] - 1
        lines.append(f"- 2 processes, from {first['photos']:,} to {last['photos']:,} photos: {growth:+.1%}")
    return "\n".join(lines)


def _fashion_mnist(args, env: dict, work: Path) -> str:
    baseline = work / "baseline"
    subprocess.run(["rm", "-rf", str(baseline)], check=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(baseline), args.baseline],
                   check=True, capture_output=True)  # fmt: skip
    try:
        now, before = [], []
        for _ in range(args.rounds):
            before.append(fashion_mnist_speed(baseline, env, work))
            now.append(fashion_mnist_speed(ROOT, env, work))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
    ratio = np.median(now) / np.median(before)
    return (
        f"Fashion-MNIST fine-tuning at 32 px, 6,000 images, {args.rounds} interleaved rounds: this tree "
        f"{np.median(now):.0f} images/s (runs {', '.join(f'{x:.0f}' for x in now)}), {args.baseline} "
        f"{np.median(before):.0f} (runs {', '.join(f'{x:.0f}' for x in before)}): {ratio:.2f}x "
        f"(target >= 0.95x): {'met' if ratio >= 0.95 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
