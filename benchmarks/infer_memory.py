"""Peak memory of ``fmtl infer`` as folders grow: rows are streamed, so it should stay flat.

    .venv/bin/python benchmarks/infer_memory.py                  # 1,000 / 10,000 / 50,000 images, about 3 minutes
    .venv/bin/python benchmarks/infer_memory.py --sizes 1000 5000

For each size, a folder of that many real Fashion-MNIST test images (PNG, 28x28 grey, copies
beyond 10,000) is classified by a tiny fmtl-contract ONNX model (tests/runtime/onnx_fixtures.py:
uint8 in, softmax out; the model's size does not change what is measured) in a fresh process:

- ``fmtl infer DIR --format jsonl -o FILE`` (streamed to a temporary file renamed at the end);
- ``fmtl infer DIR --format csv`` to stdout (streamed, piped to /dev/null);
- the peer, in the same run: the same rows kept in a list and formatted at the end
  (every row of ``iter_rows`` in a list, then ``format_stream``: what ``fmtl infer`` did before it streamed).

Peak RSS is the child's ru_maxrss (getrusage of a small parent that only runs it). The last lines print each
variant's peak at the largest size against its peak at the smallest (1.00x is flat).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "runtime"))
from onnx_fixtures import grey_model  # noqa: E402

FMTL = str(Path(sys.executable).parent / "fmtl")
PEER = """
import sys
from fmtl.runtime.classifier import Classifier
from fmtl.runtime.images import collect_image_paths
from fmtl.runtime.infer import format_stream, iter_rows
classifier = Classifier(sys.argv[1])
paths, _ = collect_image_paths([sys.argv[2]])
rows = list(iter_rows(classifier, paths, 5, 64))
width = max((len(row.path) for row in rows), default=0)
sys.stdout.write("".join(format_stream(rows, "csv", classifier, 5, width)))
"""


def write_images(folder: Path, count: int) -> None:
    """``count`` PNG files of Fashion-MNIST test images (repeating after 10,000)."""
    from fmtl.training.data import load_dataset

    images = load_dataset("fashion-mnist", "test").images[:, 0].numpy()
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(images[i % len(images)]).save(folder / f"{i:06d}.png", compress_level=1)


# A small Python runs the command and reports its child's peak RSS: a child forked from this
# (big) process would count this process's pages until it exec()s.
MEASURE = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
if result.returncode:
    sys.exit(result.stderr.decode()[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(command: list[str]) -> float:
    """Run ``command`` (it must succeed) and return its peak resident memory in MiB."""
    result = subprocess.run([sys.executable, "-S", "-c", MEASURE, *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed: {result.stderr}")
    return int(result.stdout) / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    variants = {
        "fmtl infer -o FILE (jsonl)": lambda model, folder, out: [FMTL, "infer", str(folder), "-m", str(model),
                                                                  "--format", "jsonl", "-o", str(out), "--quiet"],
        "fmtl infer to stdout (csv)": lambda model, folder, out: [FMTL, "infer", str(folder), "-m", str(model),
                                                                  "--format", "csv", "--quiet"],
        "peer: rows kept, formatted at the end": lambda model, folder, out: [sys.executable, "-c", PEER, str(model),
                                                                             str(folder)],
    }  # fmt: skip
    peaks: dict[str, dict[int, float]] = {name: {} for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        model = grey_model(Path(tmp))
        for size in args.sizes:
            folder = Path(tmp) / f"images-{size}"
            write_images(folder, size)
            for name, command in variants.items():
                peaks[name][size] = peak_rss_mib(command(model, folder, Path(tmp) / "out.jsonl"))
                print(f"{size:>7,} images  {name:<40} peak RSS {peaks[name][size]:7.1f} MiB", flush=True)
    small, large = min(args.sizes), max(args.sizes)
    print(f"\npeak RSS at {large:,} images against {small:,} (1.00x is flat):")
    for name, by_size in peaks.items():
        growth = by_size[large] - by_size[small]
        print(f"  {name:<40} {by_size[large] / by_size[small]:.2f}x  (+{growth:.1f} MiB)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
