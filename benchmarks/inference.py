"""Inference speed: PyTorch eager against onnxruntime fp32 and int8, same model, same real images, one run.

    .venv/bin/python benchmarks/inference.py --report        # about 3.5 minutes on 2 quiet cores (8 when busy)
    .venv/bin/python benchmarks/inference.py --quick         # smoke run, about 2 minutes
    .venv/bin/python benchmarks/inference.py --run runs/NAME # an existing run folder instead of training one

1. The model: trains a small real one (``python -m fmtl.train``, ResNet-18 at 112 px, random-init
   backbone, linear head, 1 epoch on 1,000 images: speed does not depend on the weights, and
   "identical top-1" is the check) unless ``--run`` names a run folder, then exports it with
   ``fmtl.training.export.export_onnx(..., quantize="int8")`` into a temporary folder: fp32 and int8 files.
2. The same uint8 Fashion-MNIST test images ([N, 1, 28, 28]) go through four contenders:
   PyTorch eager (``fmtl.training.export.Probabilities``: Preprocess + model + softmax, eval,
   ``torch.inference_mode()``), the same in channels_last, onnxruntime fp32 and int8 as
   ``fmtl.runtime.classifier.Classifier`` opens them. Batch 1 (a few hundred calls) and batch 64 (a few
   dozen calls), each on successive test images, after a warm-up; images/s from the median call,
   p50/p99 latency per call (p99 of a few dozen calls is about their maximum). The contenders take turns, and the whole comparison runs
   ``--rounds`` times; the round in which other processes used the least CPU is reported (each
   round's CPU use by others is printed: this machine is shared). Top-1 agreement with eager is
   counted over every image timed.
3. onnxruntime session options, one change at a time from what the runtime sets (graph
   optimisation level, threads, spinning, execution mode, memory pattern, arena, int8), batch 1
   and 64, interleaved, median of ``--repeats``, with eager in the same table; then spinning on
   and off again with every core also kept busy by another process (a shared machine).
4. ``fmtl.runtime.infer.run`` end to end on a folder of PNG test images (decoding included), fp32 and int8,
   and ``Classifier.predict`` on the same files with the runtime's session and with spinning off, and
   decoding alone.

Disturbance: a block of calls during which other processes used more than 0.3 CPUs is measured
again after waiting for quiet, within ``--max-wait`` seconds in all; each table says how much CPU
others used. On 2 shared cores this matters more than any option: with another job busy, eager
batch 1 can fall to a few images/s (OpenMP barriers wait for a descheduled thread).

``--report`` writes the comparison (2) and the end-to-end rates (4) to benchmarks/results/inference.md
(``--quick``: inference-quick.md) with the machine, the date and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from results_file import write_results
from torch import nn

from fmtl.runtime.classifier import Classifier
from fmtl.runtime.images import decode_many
from fmtl.runtime.infer import run
from fmtl.spec import ONNX_INPUT, ONNX_OUTPUT
from fmtl.training.augment import Preprocess
from fmtl.training.checkpoint import load_model
from fmtl.training.data import find_fashion_mnist, load_dataset, write_samples
from fmtl.training.export import Probabilities, export_onnx, int8_path

TARGET_BATCH1, TARGET_BATCH64 = 1.3, 1.0  # ort fp32 / best eager
DISTURBED = 0.3  # CPUs used by other processes during a measurement above which it is flagged
BLOCK_LIMIT = 10.0  # seconds after which a block of calls stops early (a disturbed eager block can crawl)
Run = Callable[[np.ndarray], np.ndarray]  # uint8 batch -> probabilities


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder to export and measure (else one is trained)")
    parser.add_argument("--onnx", type=Path,
                        help="the run's exported fp32 .onnx (its .int8.onnx beside it) instead of exporting")  # fmt: skip
    parser.add_argument("--model", default="resnet18", help="backbone to train when no --run [resnet18]")
    parser.add_argument("--image-size", type=int, default=112, help="side the backbone sees when training [112]")
    parser.add_argument("--train-samples", type=int, default=1000, help="training images when training [1000]")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX .gz files (else fmtl's search)")
    parser.add_argument("--calls1", type=int, default=300, help="timed batch-1 calls per contender [300]")
    parser.add_argument("--calls64", type=int, default=24, help="timed batch-64 calls per contender [24]")
    parser.add_argument("--rounds", type=int, default=2, help="whole comparisons; the cleanest is reported [2]")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per session-option variant (median) [3]")
    parser.add_argument("--infer-images", type=int, default=500, help="PNG images for fmtl infer [500]")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads and ort intra-op threads (0: each library's default)")  # fmt: skip
    parser.add_argument("--max-wait", type=float, default=90,
                        help="seconds in all to spend waiting for other processes to go quiet and measuring again [90]")  # fmt: skip
    parser.add_argument("--contended", action=argparse.BooleanOptionalAction, default=True,
                        help="time spinning on/off with every core also busy in another process [on]")  # fmt: skip
    parser.add_argument("--keep", type=Path, help="copy the exported .onnx files into this folder")
    parser.add_argument("--report", action="store_true",
                        help="write the comparison and fmtl infer rates to benchmarks/results/inference.md")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 500 training images, 60/4 calls, 1 round, 1 repeat, 128 infer images")  # fmt: skip
    args = parser.parse_args()
    if args.onnx and not args.run:
        parser.error("--onnx needs --run: the run folder gives the PyTorch model to compare with")
    if args.quick:
        args.train_samples, args.calls1, args.calls64, args.rounds, args.repeats = 500, 60, 4, 1, 1
        args.infer_images, args.max_wait = 128, 30
    return args


# ---------------------------------------------------------------- the machine and its load


def machine() -> str:
    cpu, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f in flags]
    return (f"{cpu} ({' '.join(isa) or 'no AVX2'}), {cpu_cores()} cores; torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}")  # fmt: skip


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine incl. steal, CPU-seconds of this process), Linux only."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / tick, (int(own[11]) + int(own[12])) / tick  # utime, stime


class Load:
    """CPU used by other processes while we measure, and waiting for it to drop (and measuring again),
    within a total budget of seconds.

    On 2 cores a second busy process is ruinous, and not evenly: torch's OpenMP barriers and
    onnxruntime's spinning workers each wait for a descheduled thread, so one contender can drop
    to a few percent of its speed while another loses a third. A disturbed block is measured again.
    """

    def __init__(self, budget: float):
        self.budget, self.waited = budget, 0.0

    @staticmethod
    def others(before: tuple[float, float] | None, seconds: float) -> float:
        """CPUs others used on average since ``before`` (a ``_cpu_seconds()``), 0 where unknown."""
        after = _cpu_seconds()
        if not before or not after or seconds <= 0:
            return 0.0
        return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)

    def wait_quiet(self, sample: float = 0.5) -> bool:
        """Sleep until others use under DISTURBED CPUs; False once the waiting budget is spent."""
        while self.waited < self.budget:
            before = _cpu_seconds()
            time.sleep(sample)
            self.waited += sample
            if self.others(before, sample) < DISTURBED:
                return True
        return False


# ---------------------------------------------------------------- 1. the model


def train_run(args: argparse.Namespace, folder: Path) -> Path:
    command = [sys.executable, "-m", "fmtl.train", "--model", args.model, "--weights", "none",
               "--strategy", "linear", "--no-augment", "--image-size", str(args.image_size), "--epochs", "1",
               "--max-train-samples", str(args.train_samples), "--max-val-samples", "500", "--max-test-samples", "500", "--quiet",
               "--no-save-state", "--output", str(folder)]  # fmt: skip
    print(f"training: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def export_both(run_dir: Path, folder: Path, quick: bool) -> tuple[Path, Path]:
    print(f"exporting {run_dir} (fp32 + int8) ...", flush=True)
    started = time.perf_counter()
    fp32 = export_onnx(
        run_dir, output=folder / "m.onnx", quantize="int8", max_accuracy_drop=100, echo=lambda s: print(f"  {s}"),
        parity_images=64 if quick else 256, calibration_images=64 if quick else 128,
        accuracy_images=200 if quick else 500,
    )  # fmt: skip
    print(f"  exported in {time.perf_counter() - started:.0f} s", flush=True)
    return fp32, int8_path(fp32)


# ---------------------------------------------------------------- contenders


class ChannelsLast(nn.Module):
    """A copy of ``model`` with channels_last weights, fed a channels_last input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def eager(module: nn.Module) -> Run:
    module.eval()

    def call(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return call


def session_run(session: ort.InferenceSession) -> Run:
    return lambda images: session.run([ONNX_OUTPUT], {ONNX_INPUT: images})[0]


def open_session(path: Path, threads: int = 0, spinning: bool = True, **options) -> ort.InferenceSession:
    """A CPU session with the runtime's settings (ORT_ENABLE_ALL), changed by ``options``
    (SessionOptions attributes) and ``session.*`` config entries given as ``config={...}``."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    for key, value in options.pop("config", {}).items():
        opts.add_session_config_entry(key, value)
    for name, value in options.items():
        setattr(opts, name, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runtime_session(path: Path, threads: int) -> ort.InferenceSession:
    """The session ``fmtl.runtime.classifier.Classifier`` opens (CPU provider; threads=None is its default)."""
    return Classifier(path, providers=["CPUExecutionProvider"], threads=threads or None).session


def contenders(run_dir: Path, fp32: Path, int8: Path, threads: int) -> dict[str, Run]:
    model, info, spec = load_model(run_dir)
    return {  # the exported graph divides by the run's fitted temperature: eager does the same
        "torch eager": eager(Probabilities(Preprocess(spec), model, info.temperature)),
        "torch eager channels_last": eager(Probabilities(Preprocess(spec), ChannelsLast(model), info.temperature)),
        "ort fp32 (Classifier)": session_run(runtime_session(fp32, threads)),
        "ort int8 (Classifier)": session_run(runtime_session(int8, threads)),
    }


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    batch: int
    seconds: list[float] = field(default_factory=list)  # per call
    probs: list[np.ndarray] = field(default_factory=list)
    others: float = 0.0  # CPUs other processes used meanwhile

    @property
    def rate(self) -> float:
        return self.batch / statistics.median(self.seconds)

    def percentile_ms(self, q: float) -> float:
        return 1000 * float(np.percentile(self.seconds, q))


def batches(images: np.ndarray, batch: int, calls: int) -> list[np.ndarray]:
    """``calls`` successive batches of the test images (wrapping around), each contiguous."""
    starts = [(i * batch) % max(1, len(images) - batch + 1) for i in range(calls)]
    return [np.ascontiguousarray(images[s : s + batch]) for s in starts]


def time_calls(fn: Run, inputs: list, keep: bool = False, warmup: bool = True, limit: float = BLOCK_LIMIT) -> Timing:
    """Call ``fn`` on each input in turn (stopping after ``limit`` seconds, 3 calls at least)."""
    time.sleep(0.05)  # let the previous contender's spinning threads go to sleep
    if warmup:  # each library builds its kernels for a new shape on first use
        fn(inputs[0])
    timing = Timing(len(inputs[0]))
    before, started = _cpu_seconds(), time.perf_counter()
    for x in inputs:
        start = time.perf_counter()
        out = fn(x)
        timing.seconds.append(time.perf_counter() - start)
        if keep:
            timing.probs.append(out)
        if start - started > limit and len(timing.seconds) >= 3:
            break
    timing.others = Load.others(before, time.perf_counter() - started)
    return timing


def timed_block(fn: Run, inputs: list, load: Load, keep: bool = False, warmup: bool = True) -> Timing:
    """``time_calls``, again (twice at most) after waiting for quiet when other processes disturbed it;
    the least disturbed attempt."""
    best = time_calls(fn, inputs, keep, warmup)
    for _ in range(2):
        if best.others < DISTURBED or not load.wait_quiet():
            break
        started = time.perf_counter()
        timing = time_calls(fn, inputs, keep, warmup)
        load.waited += time.perf_counter() - started  # measuring again spends the same budget as waiting
        best = timing if timing.others < best.others else best
    return best


def compare(
    runs: dict[str, Run], inputs: dict[int, list[np.ndarray]], rounds: int, load: Load
) -> tuple[dict[tuple[str, int], Timing], float]:
    """Every contender at every batch size, taking turns, ``rounds`` times; the round whose blocks
    other processes disturbed least, and their mean load."""
    results = []
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        load.wait_quiet()
        timed = {(name, b): timed_block(runs[name], x, load, keep=round_ == 0) for b, x in inputs.items()
                 for name in order}  # fmt: skip
        others = statistics.mean(t.others for t in timed.values())
        flag = "   DISTURBED" if max(t.others for t in timed.values()) > DISTURBED else ""
        summary = "  ".join(f"{n.split(' (')[0]} b{b} {t.rate:.0f}" for (n, b), t in timed.items())
        print(f"  round {round_ + 1}: others used {others:.2f} CPUs{flag}\n    {summary} img/s", flush=True)
        results.append((others, timed))
    best = min(range(len(results)), key=lambda i: (results[i][0], i))
    if best:  # probabilities are kept from round 1 only: they are the same in every round
        for key, timing in results[best][1].items():
            timing.probs = results[0][1][key].probs
    return results[best][1], results[best][0]


def interleaved(calls: dict, repeats: int, load: Load, warmup: bool = True) -> tuple[dict, float]:
    """Median images/s of each (fn, inputs) block over ``repeats``, the blocks taking turns so background
    load hits them alike, and the most CPUs others used during a kept block."""
    rates: dict = {name: [] for name in calls}
    worst = 0.0
    for _ in range(repeats):
        load.wait_quiet()
        for name, (fn, inputs) in calls.items():
            timing = timed_block(fn, inputs, load, warmup=warmup)
            rates[name].append(timing.rate)
            worst = max(worst, timing.others)
    return {name: statistics.median(r) for name, r in rates.items()}, worst


# ---------------------------------------------------------------- 2. the comparison


def agreement(timed: dict, name: str, batch: int, reference: str = "torch eager") -> tuple[float, float]:
    """(top-1 agreement, max |Δprob|) of ``name`` against ``reference`` over the images timed at ``batch``."""
    got, want = (np.concatenate(timed[(n, batch)].probs) for n in (name, reference))
    got, want = got[: len(want)], want[: len(got)]  # a block stopped early by its time limit
    return float((got.argmax(1) == want.argmax(1)).mean()), float(np.abs(got - want).max())


def print_comparison(timed: dict, others: float, threads: str) -> list[str]:
    """Print the comparison; return it as markdown table rows."""
    rows = ["| contender | batch | images/s | p50 ms | p99 ms | top-1 = eager (max abs diff of probabilities) |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    print(f"\ncomparison (cleanest round; others used {others:.2f} CPUs; {threads}):")
    print(f"  {'contender':<27}{'batch':>6}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'others':>8}"
          "   top-1 = eager (max |dprob|)")  # fmt: skip
    for (name, batch), timing in sorted(timed.items(), key=lambda item: (item[0][1], list(timed).index(item[0]))):
        agree, diff = agreement(timed, name, batch)
        images = min(sum(len(p) for p in t.probs) for t in (timing, timed[("torch eager", batch)]))
        print(f"  {name:<27}{batch:>6}{timing.rate:>9.1f}{timing.percentile_ms(50):>9.2f}"
              f"{timing.percentile_ms(99):>9.2f}{timing.others:>8.2f}   {agree:7.2%} of {images} ({diff:.1e})")  # fmt: skip
        rows.append(f"| {name} | {batch} | {timing.rate:.1f} | {timing.percentile_ms(50):.2f} | "
                    f"{timing.percentile_ms(99):.2f} | {agree:.2%} of {images} ({diff:.1e}) |")  # fmt: skip
    return rows


def print_ratios(timed: dict) -> list[str]:
    """Print ort fp32 against the best eager contender and int8 against fp32; return the lines."""
    lines = []
    print()
    for batch, target in ((1, TARGET_BATCH1), (64, TARGET_BATCH64)):
        rate = {name: timed[(name, batch)].rate for name, b in timed if b == batch}
        best_eager = max((n for n in rate if n.startswith("torch")), key=rate.get)
        fp32, int8 = rate["ort fp32 (Classifier)"], rate["ort int8 (Classifier)"]
        verdict = "met" if fp32 / rate[best_eager] >= target else "NOT met"
        print(f"  batch {batch:>2}: ort fp32 / {best_eager} = {fp32 / rate[best_eager]:.2f}x (target >= {target}x: "
              f"{verdict}); ort fp32 / eager NCHW = {fp32 / rate['torch eager']:.2f}x; "
              f"int8 / fp32 = {int8 / fp32:.2f}x")  # fmt: skip
        lines.append(f"- batch {batch}: onnxruntime fp32 / {best_eager} = {fp32 / rate[best_eager]:.2f}x; "
                     f"int8 / fp32 = {int8 / fp32:.2f}x")  # fmt: skip
    return lines


# ---------------------------------------------------------------- 3. session options


def option_variants(run_dir: Path, fp32: Path, int8: Path, threads: int) -> dict[str, Run]:
    model, info, spec = load_model(run_dir)
    level = ort.GraphOptimizationLevel
    sessions = {
        "ort fp32 as Classifier: ENABLE_ALL, spin on": runtime_session(fp32, threads),
        "  ORT_ENABLE_EXTENDED (no NCHWc layout)": open_session(fp32, threads, graph_optimization_level=level.ORT_ENABLE_EXTENDED),
        "  ORT_ENABLE_BASIC": open_session(fp32, threads, graph_optimization_level=level.ORT_ENABLE_BASIC),
        "  allow_spinning 0": open_session(fp32, threads, spinning=False),
        "  intra_op_num_threads 1": open_session(fp32, 1),
        "  execution_mode ORT_PARALLEL": open_session(fp32, threads, execution_mode=ort.ExecutionMode.ORT_PARALLEL),
        "  enable_mem_pattern off": open_session(fp32, threads, enable_mem_pattern=False),
        "  enable_cpu_mem_arena off": open_session(fp32, threads, enable_cpu_mem_arena=False),
        "  session.dynamic_block_base 4": open_session(fp32, threads, config={"session.dynamic_block_base": "4"}),
        "ort int8 as Classifier": runtime_session(int8, threads),
        "  int8 allow_spinning 0": open_session(int8, threads, spinning=False),
        "  int8 intra_op_num_threads 1": open_session(int8, 1),
        "  int8 ORT_ENABLE_EXTENDED": open_session(int8, threads, graph_optimization_level=level.ORT_ENABLE_EXTENDED),
    }  # fmt: skip
    return {
        "torch eager": eager(Probabilities(Preprocess(spec), model, info.temperature)),
        "torch eager channels_last": eager(Probabilities(Preprocess(spec), ChannelsLast(model), info.temperature)),
        **{name: session_run(s) for name, s in sessions.items()},
    }


def print_variants(variants: dict[str, Run], inputs: dict[int, list[np.ndarray]], repeats: int, load: Load) -> None:
    calls = {(name, b): (fn, x) for name, fn in variants.items() for b, x in inputs.items()}
    rates, worst = interleaved(calls, repeats, load)
    calls_text = ", ".join(f"{len(x)} calls at batch {b}" for b, x in inputs.items())
    print(f"\nsession options, one change at a time ({calls_text}; median of {repeats}, interleaved; "
          f"others used at most {worst:.2f} CPUs):")  # fmt: skip
    _print_rate_table(rates, list(variants), inputs)


def _print_rate_table(rates: dict, names: list[str] | tuple[str, ...], inputs: dict) -> None:
    print(f"  {'variant':<46}{'b1 img/s':>10}{'vs ship':>8}{'b64 img/s':>11}{'vs ship':>8}")
    for name in names:
        ship = "ort int8 as Classifier" if "int8" in name else "ort fp32 as Classifier: ENABLE_ALL, spin on"
        cells = "".join(f"{rates[(name, b)]:>10.1f}{rates[(name, b)] / rates[(ship, b)]:>7.2f}x " for b in inputs)
        print(f"  {name:<46}{cells}")


CONTENDED = ("torch eager channels_last", "ort fp32 as Classifier: ENABLE_ALL, spin on", "  allow_spinning 0",
             "ort int8 as Classifier", "  int8 allow_spinning 0")  # fmt: skip


@contextlib.contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """``count`` other processes, each keeping a core busy (a pure-Python loop), while the block runs."""
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for neighbour in neighbours:
            neighbour.kill()
            neighbour.wait()


def print_contended(variants: dict[str, Run], inputs: dict[int, list[np.ndarray]], repeats: int) -> None:
    """Spinning on and off again, with every core also busy in another process (a shared machine)."""
    inputs = {1: inputs[1][:20], 64: inputs[64][:3]}
    calls = {(name, b): (variants[name], x) for name in CONTENDED for b, x in inputs.items()}
    rates: dict = {key: [] for key in calls}
    cores = cpu_cores()
    with busy_neighbours(cores):
        for _ in range(repeats):
            for key, (fn, x) in calls.items():
                rates[key].append(time_calls(fn, x, limit=2.5).rate)
    calls_text = ", ".join(f"{len(x)} calls at batch {b}" for b, x in inputs.items())
    print(f"\nthe same with {cores} busy processes beside (a Python loop per core; {calls_text}, 2.5 s at most "
          f"per block; median of {repeats}):")  # fmt: skip
    _print_rate_table({key: statistics.median(r) for key, r in rates.items()}, CONTENDED, inputs)


# ---------------------------------------------------------------- 4. fmtl infer end to end


def infer_rates(fp32: Path, int8: Path, folder: Path, args: argparse.Namespace, load: Load) -> list[str]:
    """``fmtl.runtime.infer.run`` as the CLI calls it (its Classifier takes onnxruntime's default threads), and parts."""
    images = folder / "images"
    images.mkdir()
    paths = write_samples(images, "fashion-mnist", "test", args.infer_images, seed=0)
    repeats = max(2, args.repeats)
    out, quiet = str(folder / "out.jsonl"), lambda message: None

    def infer(model: Path) -> Callable[[], object]:
        return lambda: run([str(images)], str(model), k=5, batch_size=64, fmt="jsonl", output=out,
                           recursive=False, progress=False, echo=quiet, echo_err=quiet)  # fmt: skip

    shipped = Classifier(fp32, providers=["CPUExecutionProvider"], threads=args.threads or None)
    nospin = Classifier(fp32, providers=["CPUExecutionProvider"], threads=args.threads or None)
    nospin.session = open_session(fp32, args.threads, spinning=False)
    spec = nospin.spec
    thunks = {
        "fmtl.runtime.infer.run, fp32 (open + decode + classify + jsonl)": infer(fp32),
        "fmtl.runtime.infer.run, int8": infer(int8),
        "  Classifier.predict, fp32 as it opens the model": lambda: shipped.predict(paths, k=5, batch_size=64),
        "  Classifier.predict, fp32 with spinning off": lambda: nospin.predict(paths, k=5, batch_size=64),
        "  decoding alone (fmtl.runtime.images.decode_many)": lambda: decode_many(
            paths, spec.channels, spec.source_size
        ),
    }
    opened = {name: _seconds(lambda p=p: Classifier(p, providers=["CPUExecutionProvider"])) for name, p in
              (("fp32", fp32), ("int8", int8))}  # fmt: skip
    for fn in thunks.values():
        fn()  # warm-up
    # a whole folder is one "batch" of len(paths) images: Timing.rate is then images/s
    calls = {name: ((lambda _, fn=fn: fn()), [paths]) for name, fn in thunks.items()}
    rates, worst = interleaved(calls, repeats, load, warmup=False)
    print(f"\nfmtl infer on {len(paths)} PNG files of the test set, batch 64, k=5 (median of {repeats}; "
          f"others used at most {worst:.2f} CPUs):")  # fmt: skip
    rows = [f"| {len(paths)} PNG files, batch 64, k=5 | images/s |", "| --- | --- |"]
    for name, rate in rates.items():
        print(f"  {name:<56}{rate:>9.1f} img/s")
        rows.append(f"| {name.strip()} | {rate:.1f} |")
    print(f"  (opening a Classifier: fp32 {opened['fp32']:.2f} s, int8 {opened['int8']:.2f} s)")
    return rows


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- main


def measure(args: argparse.Namespace, run_dir: Path, fp32: Path, int8: Path, tmp: Path) -> None:
    test = load_dataset("fashion-mnist", "test").images.numpy()
    _, _, spec = load_model(run_dir)
    if (test.shape[1], *test.shape[2:]) != (spec.channels, *spec.source_size):
        sys.exit(f"the run takes {spec.channels}x{spec.source_size} images, not Fashion-MNIST's {test.shape[1:]}")
    inputs = {1: batches(test, 1, args.calls1), 64: batches(test, 64, args.calls64)}
    threads = (f"torch {torch.get_num_threads()} threads, ort intra-op "
               f"{args.threads or 'default (one per physical core)'}, spinning on")  # fmt: skip
    print(f"\nmodel: {fp32} ({spec.image_size} px), fp32 {fp32.stat().st_size / 1e6:.1f} MB, "
          f"int8 {int8.stat().st_size / 1e6:.1f} MB; {threads}")  # fmt: skip
    print(f"comparison: {args.calls1} calls at batch 1, {args.calls64} at batch 64, {args.rounds} round(s) ...")
    load = Load(args.max_wait)
    timed, others = compare(contenders(run_dir, fp32, int8, args.threads), inputs, args.rounds, load)
    comparison = print_comparison(timed, others, threads)
    ratios = print_ratios(timed)
    variant_inputs = {1: inputs[1][: max(20, args.calls1 // 5)], 64: inputs[64][: max(3, args.calls64 // 6)]}
    variants = option_variants(run_dir, fp32, int8, args.threads)
    print_variants(variants, variant_inputs, args.repeats, load)
    if args.contended:
        print_contended(variants, variant_inputs, args.repeats)
    end_to_end = infer_rates(fp32, int8, tmp, args, load)
    if args.report:
        report(args, spec, others, threads, comparison, ratios, end_to_end)
    print(f"\nspent {load.waited:.0f} s in all waiting for other processes to go quiet and measuring again "
          f"(budget {args.max_wait:g} s)")  # fmt: skip


def report(args, spec, others: float, threads: str, comparison, ratios, end_to_end) -> None:
    model = f"{args.model} at {spec.image_size} px" if not args.run else f"{args.run} ({spec.image_size} px)"
    body = "\n".join([*comparison, "", *ratios, "", "`fmtl infer` end to end, and its parts:", "", *end_to_end])
    write_results(
        "inference-quick" if args.quick else "inference",
        "Inference: PyTorch eager against onnxruntime fp32 and int8",
        body,
        versions=f"torch {torch.__version__}, onnxruntime {ort.__version__}; {threads}",
        note=f"Model: {model}. The same Fashion-MNIST test images through each contender, taking turns; "
        f"images/s from the median call of the round other processes disturbed least (they used {others:.2f} CPUs).",
    )


def main() -> None:
    args = parse_args()
    if args.data_dir:  # the training subprocess and write_samples find it there too
        os.environ["FMTL_DATA_DIR"] = args.data_dir
    if find_fashion_mnist() is None:
        sys.exit(
            "Fashion-MNIST not found: give --data-dir, set FMTL_DATA_DIR, or apt-get install dataset-fashion-mnist"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fmtl-infer-bench-") as folder:
        tmp = Path(folder)
        run_dir = args.run or train_run(args, tmp / "run")
        fp32, int8 = (args.onnx, int8_path(args.onnx)) if args.onnx else export_both(run_dir, tmp, args.quick)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in (fp32, int8):
                (args.keep / path.name).write_bytes(path.read_bytes())
        measure(args, run_dir, fp32, int8, tmp)
    print(f"\nmachine: {machine()}\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
