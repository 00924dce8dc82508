"""The sources fmtl reads, each as an ImageSet of the whole source (splitting is ``splits``'s job):

- ``fashion-mnist``: the four original IDX .gz files, read by fmtl's own reader;
- a Kaggle-style CSV (``label,pixel1,...,pixel784``), with or without a header;
- an image folder, ``DIR/<class>/<images>`` or ``DIR/train|val|test/<class>/<images>``, decoded once
  into a memory-mapped store (``store``).

Fashion-MNIST and CSVs are small and held in memory; a folder's images stay on disk, mapped.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from fmtl.errors import DataError, MissingSplitError
from fmtl.training.data import shards
from fmtl.training.data.imageset import ImageSet
from fmtl.training.data.store import FIT, open_store

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801


def cache_dir() -> Path:
    """fmtl's cache folder: $FMTL_CACHE_DIR, else $XDG_CACHE_HOME/fmtl, else ~/.cache/fmtl."""
    if os.environ.get("FMTL_CACHE_DIR"):
        return Path(os.environ["FMTL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmtl"


def open_source(source: str, split: str, data_dir, source_size: int, download: bool = True) -> ImageSet:
    """The whole of one source's ``split`` (``all``: a folder's top level, for a separate test source)."""
    if shards.is_shards(source):  # packed shards (`fmtl data pack`): a folder or a URL, read a batch at a time
        return shards.open_split(source, split, cache_dir())
    if source.lower().replace("_", "-") == "fashion-mnist":
        return load_fashion_mnist("test" if split == "test" else "train", data_dir, download)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {source} (use fashion-mnist, a .csv file or an image folder)")
    if path.is_file():
        if split == "test":
            raise MissingSplitError(f"{source} has no test split (give one with --test-data)")
        return load_csv(path)
    return load_folder(path, None if split == "all" else split, source_size)


def has_own_val(source: str) -> bool:
    if shards.is_shards(source):
        return True  # packed with its val split
    path = Path(source).expanduser()
    return path.is_dir() and (path / "train").is_dir() and (path / "val").is_dir()


# ---------------------------------------------------------------- Fashion-MNIST (IDX)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not), checking its magic number and that its size matches its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(raw) - offset} bytes of data, its header promises {int(np.prod(dims))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def find_fashion_mnist(data_dir: str | None = None) -> Path | None:
    """The first folder holding all four IDX files: data_dir, $FMTL_DATA_DIR, Debian's, the cache."""
    candidates = [data_dir, os.environ.get("FMTL_DATA_DIR"), SYSTEM_DATA_DIR, *_cache_candidates()]
    for folder in filter(None, candidates):
        folder = Path(folder).expanduser()
        if all(_idx_file(folder, name) for pair in FASHION_MNIST_FILES.values() for name in pair):
            return folder
    return None


def _cache_candidates() -> list[Path]:
    root = cache_dir() / "fashion-mnist"
    return [root, root / "FashionMNIST" / "raw"]  # the second is torchvision's download layout


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "train", data_dir: str | None = None, download: bool = True) -> ImageSet:
    """Fashion-MNIST's ``train`` (60,000) or ``test`` (10,000) images as 1 x 28 x 28 uint8."""
    folder = find_fashion_mnist(data_dir) or (_download_fashion_mnist() if download else None)
    if folder is None:
        raise DataError(_missing_fashion_mnist_message())
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = read_idx(_idx_file(folder, images_name), IDX_IMAGES_MAGIC)
    labels = read_idx(_idx_file(folder, labels_name), IDX_LABELS_MAGIC)
    if len(images) != len(labels) or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST files in {folder} do not match ({len(images)} images, {len(labels)} labels)")
    return ImageSet(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
        f"fashion-mnist:{folder}",
    )


def _download_fashion_mnist() -> Path | None:
    """Let torchvision fetch the dataset into the cache; None (quietly) when there is no network."""
    from torchvision.datasets import FashionMNIST

    root = cache_dir() / "fashion-mnist"
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001 - any network failure means: not available this way
        return None
    return find_fashion_mnist(str(root / "FashionMNIST" / "raw"))


def _missing_fashion_mnist_message() -> str:
    return (
        "Fashion-MNIST not found. Get it one of three ways: install Debian's package "
        f"(apt-get install dataset-fashion-mnist, into {SYSTEM_DATA_DIR}); put the four IDX .gz files in a "
        "folder and pass --data-dir or set FMTL_DATA_DIR; or connect to the network so torchvision can "
        f"download it into {cache_dir() / 'fashion-mnist'}"
    )


# ---------------------------------------------------------------- Kaggle-style CSV


def load_csv(path: str | Path) -> ImageSet:
    """A ``label,pixel1,...,pixelN`` CSV (header optional) of square grey images."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    header = 1 if first.strip().lower().startswith("label") else 0
    if not first.strip():
        raise DataError(f"{path} is empty")
    rows = _read_csv_rows(path, header)
    pixels = rows.shape[1] - 1
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise DataError(f"{path}: {pixels} pixel columns do not make a square image (784 = 28 x 28 expected)")
    _check_csv_values(path, rows, header)
    labels = rows[:, 0]
    names = FASHION_MNIST_CLASSES if labels.max() < 10 else [str(i) for i in range(labels.max() + 1)]
    images = torch.from_numpy(rows[:, 1:].astype(np.uint8).reshape(-1, 1, side, side))
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), list(names), f"csv:{path}")


def _read_csv_rows(path: Path, header: int) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=header, ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: {_csv_error_line(path, header)}{error}") from None


def _csv_error_line(path: Path, header: int) -> str:
    """Find the first malformed line (numpy's message does not always name it)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = iter(handle)
        for _ in range(header):
            first = next(lines)
        expected = len(first.split(",")) if header else None
        for number, line in enumerate(lines, start=header + 1):
            fields = line.strip().split(",")
            expected = expected or len(fields)
            if len(fields) != expected:
                return f"line {number} has {len(fields)} columns, expected {expected}: "
            if not all(f.strip().lstrip("-").isdigit() for f in fields):
                return f"line {number} has a value that is not a whole number: "
    return ""


def _check_csv_values(path: Path, rows: np.ndarray, header: int) -> None:
    bad = np.nonzero((rows[:, 1:] > 255).any(axis=1) | (rows[:, 1:] < 0).any(axis=1))[0]
    if len(bad):
        raise DataError(f"{path}: line {bad[0] + header + 1} has a pixel value outside 0..255")
    if (rows[:, 0] < 0).any():
        raise DataError(f"{path}: line {np.argmax(rows[:, 0] < 0) + header + 1} has a negative label")


# ---------------------------------------------------------------- image folders


def load_folder(root: Path, split: str | None, source_size: int = 224, quiet: bool = False) -> ImageSet:
    """Images under ``root/<class>/`` (or ``root/<split>/<class>/``), from the folder's store (built once)."""
    folder = _split_folder(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<images>)")
    files = [(path, index) for index, name in enumerate(classes) for path in _class_images(folder / name)]
    stored = open_store(folder, files, classes, source_size, cache_dir(), quiet)
    if stored.skipped:
        warnings.warn(f"skipped {len(stored.skipped)} unreadable image(s): {'; '.join(stored.skipped[:20])}"
                      + (" ..." if len(stored.skipped) > 20 else ""), stacklevel=2)  # fmt: skip
    if len(stored.labels) == 0:
        raise DataError(f"{folder} holds no readable images")
    return ImageSet(stored.images, stored.labels, classes, f"folder:{folder}", mapped=True, fit=FIT)


def _split_folder(root: Path, split: str | None) -> Path:
    if not (root / "train").is_dir():
        if split == "test":
            raise MissingSplitError(f"{root} has no test split (add {root}/test/<class>/ or give --test-data)")
        return root
    if split in (None, "train"):
        return root / "train"
    if not (root / split).is_dir():
        raise MissingSplitError(f"{root} has no {split} split (no {root / split} folder)")
    return root / split


def _class_images(folder: Path) -> list[Path]:
    from fmtl.runtime.images import IMAGE_EXTENSIONS, folder_images

    images = sorted(folder_images(folder, recursive=True))
    if not images:
        raise DataError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images
