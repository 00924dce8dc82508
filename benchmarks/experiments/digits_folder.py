#!/usr/bin/env python3
"""A second, different dataset as an image folder: the UCI handwritten digits that scikit-learn bundles.

    pip download scikit-learn --no-deps -d /tmp/skl && cd /tmp/skl && unzip -o scikit_learn*.whl \\
        sklearn/datasets/data/digits.csv.gz
    .venv/bin/python benchmarks/experiments/digits_folder.py /tmp/skl/sklearn/datasets/data/digits.csv.gz runs/digits

1,797 grey 8 x 8 digits (values 0..16, scaled to 0..255), written as PNGs under OUT/train/<digit>/
and OUT/test/<digit>/ with a seeded, stratified 30 % test split. No scikit-learn install needed.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TEST_FRACTION = 0.3


def main(csv_gz: str, out: str) -> None:
    with gzip.open(csv_gz, "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images = (rows[:, :64].reshape(-1, 8, 8) * 255 / 16).round().astype(np.uint8)
    labels = rows[:, 64]
    rng = np.random.default_rng(0)
    for digit in range(10):
        members = rng.permutation(np.nonzero(labels == digit)[0])
        cut = round(len(members) * TEST_FRACTION)
        for split, chosen in (("test", members[:cut]), ("train", members[cut:])):
            folder = Path(out) / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
    print(f"{len(labels)} digits -> {out}/train, {out}/test")


if __name__ == "__main__":
    main(*sys.argv[1:3])
