"""``fmtl data pack``: any source fmtl reads written as LitData chunks (``shards`` reads them back).

Each chunk is written by LitData's ``BinaryWriter`` in a temporary folder, renamed into place, then
recorded, so a killed pack run again keeps every whole chunk; ``fmtl-shards.json`` is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fmtl.atomic import atomic_write_text, write_errors
from fmtl.errors import DataError, MissingSplitError
from fmtl.training.data.shards import CHUNK_BYTES, INDEX, LABELS, MANIFEST, SHARDS_VERSION, _litdata, is_shards
from fmtl.training.data.splits import load_dataset


def pack(sets: dict, out: str | Path, *, seed: int = 0, chunk_bytes: int = CHUNK_BYTES, source: str = "",
         quiet: bool = False) -> dict:  # fmt: skip
    """Write ``sets`` (split -> ImageSet) into ``out`` as shards; chunks already whole are kept (a resume)."""
    from tqdm.auto import tqdm

    writer, _ = _litdata()
    out = Path(out)
    classes = next(iter(sets.values())).classes
    splits = {}
    total = sum(len(data) for data in sets.values())
    with tqdm(total=total, desc="packing", unit="img", disable=quiet) as bar:
        for split, data in sets.items():
            splits[split] = _pack_split(writer, data, out / split, seed, chunk_bytes, bar)
    manifest = {"version": SHARDS_VERSION, "source": source, "classes": classes, "seed": seed,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": splits}  # fmt: skip
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def pack_source(source: str, out: str | Path, *, val_fraction: float = 0.1, seed: int = 0, source_size: int = 224,
                test_source: str | None = None, data_dir: str | None = None, chunk_bytes: int = CHUNK_BYTES,
                quiet: bool = False) -> dict:  # fmt: skip
    """Pack any source fmtl reads: its train and val splits as a run makes them, and its test split if any."""
    if is_shards(source):
        raise DataError(f"{source} is packed shards already")
    options = {"data_dir": data_dir, "val_fraction": val_fraction, "seed": seed, "source_size": source_size,
               "test_source": test_source}  # fmt: skip
    sets = {split: load_dataset(source, split, **options) for split in ("train", "val")}
    try:
        sets["test"] = load_dataset(source, "test", **options)
    except MissingSplitError:
        pass
    return pack(sets, out, seed=seed, chunk_bytes=chunk_bytes, source=source, quiet=quiet)


def _pack_split(writer, data, folder: Path, seed: int, chunk_bytes: int, bar) -> dict:
    item_bytes = data.pixels[0].numel()
    chunk_items = max(1, chunk_bytes // item_bytes)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))  # chunks mix the classes
    labels = data.labels[order]
    parts = folder / ".parts"
    with write_errors(folder):
        parts.mkdir(parents=True, exist_ok=True)
    entries = []
    for chunk, start in enumerate(range(0, len(data), chunk_items)):
        entry = _done(folder, parts, chunk)
        if entry is None:
            entry = _pack_chunk(writer, data, order[start : start + chunk_items], labels, start, folder, parts, chunk)
        entries.append(entry)
        bar.update(min(chunk_items, len(data) - start))
    with write_errors(folder / INDEX):
        config = json.loads((parts / "config.json").read_text()) if entries else {}
        atomic_write_text(folder / INDEX, json.dumps({"chunks": entries, "config": config}))
        np.save(folder / f".{LABELS}.tmp", labels.numpy())
        os.replace(folder / f".{LABELS}.tmp.npy", folder / LABELS)
    return {"count": len(data), "shape": list(data.pixels.shape[1:]), "chunk_items": chunk_items,
            "chunks": len(entries), "source": data.source, "fit": data.fit}  # fmt: skip


def _done(folder: Path, parts: Path, chunk: int) -> dict | None:
    """A chunk's index entry when the chunk is whole on disk (renamed in, then recorded), else None."""
    try:
        entry = json.loads((parts / f"{chunk:06d}.json").read_text())
    except (OSError, ValueError):
        return None
    path = folder / entry["filename"]
    return entry if path.is_file() and path.stat().st_size == entry["chunk_bytes"] else None


def _pack_chunk(writer, data, order, labels, start, folder: Path, parts: Path, chunk: int) -> dict:
    """One chunk written by LitData's BinaryWriter in a temporary folder, renamed into place, then recorded."""
    tmp = folder / f".tmp-{chunk:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    images = data.take(order).numpy()
    try:
        with write_errors(folder / f"chunk-{chunk:06d}.bin"):
            tmp.mkdir()
            binary = writer.BinaryWriter(str(tmp), chunk_size=len(order) + 1)
            for i in range(len(order)):
                binary.add_item(i, {"id": start + i, "label": int(labels[start + i]), "image": images[i]})
            binary.done()
            index = json.loads(next(tmp.glob("*.json")).read_text())
            entry = {**index["chunks"][0], "filename": f"chunk-{chunk:06d}.bin"}
            os.replace(tmp / index["chunks"][0]["filename"], folder / entry["filename"])
            if not (parts / "config.json").is_file():
                atomic_write_text(parts / "config.json", json.dumps(index["config"]))
            atomic_write_text(parts / f"{chunk:06d}.json", json.dumps(entry))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
