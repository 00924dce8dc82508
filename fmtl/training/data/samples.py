"""Sample images of a split written out as PNG files (``fmtl data samples``), for a first look or a quick test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmtl.training.data.splits import load_dataset


def write_samples(out_dir: str | Path, source: str, split: str, count: int, seed: int = 0) -> list[Path]:
    """Save ``count`` seeded random images of a split as ``<index>_<class>.png`` (atomically)."""
    from PIL import Image

    from fmtl.atomic import atomic_open

    data = load_dataset(source, split)
    chosen = np.random.default_rng(seed).choice(len(data), size=min(count, len(data)), replace=False)
    written = []
    for index in sorted(chosen.tolist()):
        pixels = data.images[index].permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[:, :, 0] if data.channels == 1 else pixels)
        name = data.classes[int(data.labels[index])].replace("/", "-").replace(" ", "_")
        path = Path(out_dir) / f"{index:05d}_{name}.png"
        with atomic_open(path, "wb") as handle:
            image.save(handle, format="PNG")
        written.append(path)
    return written
