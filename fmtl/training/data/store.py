"""The store: an image folder decoded once into a memory-mapped uint8 array on disk (photos of another
shape brought to it by resizing the shorter side and cutting out the centre: ``FIT``, recorded in the
run contract so the runtime decodes the same way).

``open_store(folder, files, size)`` returns the folder's images, labels and skipped files. The images
are ``np.memmap`` pages of ``images.u8``: every rank and worker on a machine shares them through the
page cache, so the memory a process owns does not grow with the folder. A store lives in
``<cache>/stores/<key>/`` beside ``manifest.json`` (the source files with their sizes and mtimes, the
shape, the classes, the data file's size, mtime and sampled digest) and ``labels.npy``.

It is built in bounded chunks into ``<key>.tmp-<pid>/`` and renamed into place only when complete, so
a build killed at any point leaves nothing a later run reads as a store; a full disk is one
``WriteError`` and no partial store. A store whose folder changed (files added, removed or edited),
or whose data file was truncated or edited, is rebuilt, with a line saying why.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fmtl.atomic import atomic_write_text, write_errors
from fmtl.errors import DataError

STORE_VERSION = 2
DATA_FILE, LABELS_FILE, MANIFEST_FILE = "images.u8", "labels.npy", "manifest.json"
CHUNK = 256  # images decoded and written at a time: what a build holds in memory
SAMPLE = 1 << 20  # bytes at each end of the data file that the manifest's digest covers
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
FIT = "crop"  # photos of another shape: the shorter side resized to the store's, the centre cut out


@dataclass
class Stored:
    """A store's content: memory-mapped images, labels, the files skipped as unreadable."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[str]


def open_store(root: Path, files: list[tuple[Path, int]], classes: list[str], source_size: int,
               cache: Path, quiet: bool = False) -> Stored:  # fmt: skip
    """The store of ``files`` (path, label) under ``root``; built first when missing, stale or damaged."""
    folder = cache / "stores" / store_key(root, source_size)
    listing = _listing(root, files)
    problem = _check(folder, listing)
    if problem is None:
        return _map(folder)
    if problem != "missing":
        print(f"fmtl: the store of {root} {problem}: rebuilding it", file=sys.stderr)
    _build(folder, root, files, listing, classes, source_size, quiet)
    return _map(folder)


def store_key(root: Path, source_size: int) -> str:
    return hashlib.sha256(f"v{STORE_VERSION} {root.resolve()} size={source_size}".encode()).hexdigest()[:24]


def _listing(root: Path, files: list[tuple[Path, int]]) -> list[list]:
    """What the manifest records of each source file: relative path, label, size, mtime."""
    rows = []
    for path, label in files:
        info = path.stat()
        rows.append([str(path.relative_to(root)), label, info.st_size, info.st_mtime_ns])
    return rows


def _check(folder: Path, listing: list[list]) -> str | None:
    """Why the store in ``folder`` cannot be used as it is (None: it can)."""
    manifest = _read_manifest(folder)
    if manifest is None:
        return "missing" if not folder.exists() else "has no readable manifest"
    if manifest.get("version") != STORE_VERSION:
        return "was written by another version of fmtl"
    changed = _changes(manifest["files"], listing)
    if changed:
        return f"is out of date: {changed} since it was built"
    data = folder / DATA_FILE
    if not data.is_file() or data.stat().st_size != manifest["data_bytes"]:
        return f"is damaged: {DATA_FILE} is not the {manifest['data_bytes']:,} bytes its manifest says"
    if data.stat().st_mtime_ns != manifest["data_mtime_ns"] or _digest(data) != manifest["data_digest"]:
        return f"is damaged: {DATA_FILE} was modified after it was built"
    return None


def _changes(recorded: list[list], listing: list[list]) -> str:
    before = {row[0]: row[1:] for row in recorded}
    now = {row[0]: row[1:] for row in listing}
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    edited = sum(1 for name in now.keys() & before.keys() if now[name] != before[name])
    parts = [f"{n} file(s) {what}" for n, what in ((added, "added"), (removed, "removed"), (edited, "changed")) if n]
    return ", ".join(parts)


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def _digest(path: Path) -> str:
    """sha256 of the data file's size and its first and last MiB: a cheap check that it is what was built."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE))
        handle.seek(max(0, size - SAMPLE))
        digest.update(handle.read(SAMPLE))
    return digest.hexdigest()


def _map(folder: Path) -> Stored:
    manifest = _read_manifest(folder)
    shape = tuple(manifest["shape"])
    labels = torch.from_numpy(np.load(folder / LABELS_FILE).astype(np.int64))
    if len(labels) != shape[0]:
        raise DataError(f"the store in {folder} holds {shape[0]} images but {len(labels)} labels: delete the folder")
    if shape[0] == 0:
        return Stored(torch.zeros(shape, dtype=torch.uint8), labels, manifest["skipped"])
    # copy-on-write: a writable view without owning a page (nothing writes to it)
    pixels = np.memmap(folder / DATA_FILE, dtype=np.uint8, mode="c", shape=shape)
    return Stored(torch.from_numpy(pixels), labels, manifest["skipped"])


def _build(folder: Path, root: Path, files: list[tuple[Path, int]], listing: list[list], classes: list[str],
           source_size: int, quiet: bool) -> None:  # fmt: skip
    """Decode every file once, in chunks, into a temporary folder renamed into place when complete."""
    channels, size = _layout([path for path, _ in files], source_size)
    _remove_abandoned(folder)
    _check_room(folder.parent, len(files) * channels * size[0] * size[1], root)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with write_errors(tmp / DATA_FILE):
            tmp.mkdir(parents=True)
            kept, skipped = _decode_into(tmp / DATA_FILE, files, channels, size, quiet)
            np.save(tmp / LABELS_FILE, np.array([files[i][1] for i in kept], dtype=np.int64))
        data = tmp / DATA_FILE
        manifest = {
            "version": STORE_VERSION, "root": str(root.resolve()), "source_size": source_size, "classes": classes,
            "shape": [len(kept), channels, *size], "fit": FIT, "files": listing, "skipped": skipped,
            "data_bytes": data.stat().st_size, "data_mtime_ns": data.stat().st_mtime_ns, "data_digest": _digest(data),
        }  # fmt: skip
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest))
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_room(parent: Path, need: int, root: Path) -> None:
    """Refuse, before decoding anything, a store the cache's disk cannot hold (a full disk midway still fails
    in one line and leaves nothing)."""
    with write_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise DataError(
            f"the store of {root} needs {need / 2**20:,.1f} MiB and {parent} has {free / 2**20:,.1f} MiB free: free "
            "some space, point FMTL_CACHE_DIR at a bigger disk, or lower --source-size"
        )


def _decode_into(path: Path, files, channels: int, size: tuple[int, int], quiet: bool):
    """Decode ``files`` a chunk at a time, appending each readable image's bytes to ``path``."""
    from fmtl.runtime.images import DecodeError, iter_decoded

    kept, skipped = [], []
    with open(path, "wb") as handle, tqdm(total=len(files), desc="building the store", unit="img",
                                          disable=quiet, leave=False) as bar:  # fmt: skip
        start = 0
        for chunk in iter_decoded([p for p, _ in files], channels, size, batch_size=CHUNK, fit=FIT):
            good = [i for i, item in enumerate(chunk) if not isinstance(item, DecodeError)]
            if good:
                handle.write(np.ascontiguousarray(np.stack([chunk[i] for i in good])).tobytes())
            kept.extend(start + i for i in good)
            skipped.extend(f"{files[start + i][0]} ({item})" for i, item in enumerate(chunk)
                           if isinstance(item, DecodeError))  # fmt: skip
            start += len(chunk)
            bar.update(len(chunk))
        handle.flush()
        os.fsync(handle.fileno())
    return kept, skipped


def _layout(paths: list[Path], source_size: int) -> tuple[int, tuple[int, int]]:
    """Channels (grey only when every image is) and size (the images' own, when they share one no larger than
    ``source_size``; else ``source_size`` square), from the files' headers."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        headers = [h for h in pool.map(_header, paths, chunksize=64) if h is not None]
    modes = {mode for mode, _ in headers}
    sizes = {hw for _, hw in headers}
    channels = 1 if modes and modes <= GREY_MODES else 3
    if len(sizes) == 1 and max(next(iter(sizes))) <= source_size:
        return channels, next(iter(sizes))
    return channels, (source_size, source_size)


def _header(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except Exception:  # noqa: BLE001 - the decoder reports it, with its reason
        return None


def _remove_abandoned(folder: Path) -> None:
    """Temporary folders of builds whose process is gone (killed): never read, removed."""
    for tmp in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete build into place (a stale store is moved aside first, then removed)."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.exists():  # not another process's complete build: put the old one back and fail
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
