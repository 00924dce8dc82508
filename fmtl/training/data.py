"""Dataset sources -> ImageSet: uint8 images at their source size, int64 labels, class names.

Three sources, one result:

- ``fashion-mnist``: the four original IDX .gz files, read by fmtl's own reader;
- a Kaggle-style CSV (``label,pixel1,...,pixel784``), with or without a header;
- an image folder, ``DIR/<class>/<images>`` or ``DIR/train|val|test/<class>/<images>``,
  decoded once and cached as uint8 arrays.

The ``val`` split of a source without its own is a stratified, seeded slice of the
training data, so ``train`` + ``val`` together are the whole training set.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmtl.errors import DataError, MissingSplitError
from fmtl.spec import DataOptions

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
SPLITS = ("train", "val", "test")
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` at the source's own size, labels int64 ``[N]``, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""  # where it came from, for messages and model.json

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def subset(self, indices: torch.Tensor | np.ndarray) -> ImageSet:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[indices], self.labels[indices], self.classes, self.source)


def cache_dir() -> Path:
    """fmtl's cache folder: $FMTL_CACHE_DIR, else $XDG_CACHE_HOME/fmtl, else ~/.cache/fmtl."""
    if os.environ.get("FMTL_CACHE_DIR"):
        return Path(os.environ["FMTL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmtl"


def load_dataset(
    source: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_source: str | None = None,
    source_size: int = 224,
    download: bool = True,
) -> ImageSet:
    """Load one split of a dataset.

    Args:
        source: ``fashion-mnist``, a ``.csv`` file, or an image folder.
        split: ``train``, ``val`` or ``test``.
        data_dir: where the Fashion-MNIST IDX files are (else $FMTL_DATA_DIR, Debian's folder, the cache).
        val_fraction: share of the training data held out as ``val`` when the source has no val split.
        seed: seeds the stratified validation split.
        test_source: a second CSV or folder that provides the test split.
        source_size: side that folder images of mixed sizes are brought to.
        download: let torchvision download Fashion-MNIST when no local copy exists.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "test" and test_source:
        return _load_split(test_source, "all", data_dir, source_size, download)
    if split == "test":
        return _load_split(source, "test", data_dir, source_size, download)
    if _has_own_val(source):
        return _load_split(source, split, data_dir, source_size, download)
    full = _load_split(source, "train", data_dir, source_size, download)
    train_idx, val_idx = stratified_split(full.labels, val_fraction, seed)
    return full.subset(train_idx if split == "train" else val_idx)


def load_run_split(options: DataOptions, split: str) -> ImageSet:
    """``split`` of a run's data exactly as the run used it: val and test are its seeded subsets.

    Training, the export checks and evaluation all load a run's images through this one function.
    """
    data = load_dataset(
        options.source, split, data_dir=options.data_dir, val_fraction=options.val_fraction, seed=options.seed,
        test_source=options.test_source, source_size=options.source_size,
    )  # fmt: skip
    if split == "train":
        return data
    count = options.max_val_samples if split == "val" else options.max_eval_samples  # 0: all
    return seeded_subset(data, count, options.seed)


def _load_split(source: str, split: str, data_dir, source_size: int, download: bool) -> ImageSet:
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


def _has_own_val(source: str) -> bool:
    path = Path(source).expanduser()
    return path.is_dir() and (path / "train").is_dir() and (path / "val").is_dir()


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of indices into (rest, picked) keeping each class's share; both sorted.

    ``picked`` holds ``val_fraction`` of each class (at least one of a class with several members), or,
    when ``count`` is given, exactly ``count`` images shared out over the classes by their sizes.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    members = [torch.nonzero(labels == cls).flatten() for cls in classes]
    if count is None:
        takes = [round(len(m) * val_fraction) for m in members]
        takes = [max(t, 1) if val_fraction > 0 and len(m) > 1 else t for t, m in zip(takes, members, strict=True)]
    else:
        takes = _class_quotas([len(m) for m in members], count)
    picked = [m[torch.randperm(len(m), generator=generator)[:t]] for m, t in zip(members, takes, strict=True)]
    val = torch.sort(torch.cat(picked)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


def _class_quotas(sizes: list[int], total: int) -> list[int]:
    """Per-class counts proportional to ``sizes`` that add up to exactly ``total`` (largest remainders)."""
    exact = [size * total / sum(sizes) for size in sizes]
    quotas = [int(share) for share in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def seeded_subset(data: ImageSet, max_samples: int, seed: int) -> ImageSet:
    """A seeded, stratified subset of exactly ``max_samples`` images (all of them when there are fewer)."""
    if not max_samples or max_samples >= len(data):
        return data
    _, keep = stratified_split(data.labels, 0.0, seed, count=max_samples)
    return data.subset(keep)


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


def load_folder(root: Path, split: str | None, source_size: int = 224) -> ImageSet:
    """Images under ``root/<class>/`` (or ``root/<split>/<class>/``), decoded once and cached."""
    folder = _split_folder(root, split)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<images>)")
    files = [(path, index) for index, name in enumerate(classes) for path in _class_images(folder / name)]
    key = _folder_cache_key(files, source_size)
    cached = _read_folder_cache(key)
    if cached is None:
        cached = _decode_folder(files, source_size)
        _write_folder_cache(key, cached)
    images, labels, skipped = cached
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {'; '.join(skipped)}", stacklevel=2)
    if len(labels) == 0:
        raise DataError(f"{folder} holds no readable images")
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, f"folder:{folder}")


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


def _folder_cache_key(files: list[tuple[Path, int]], source_size: int) -> str:
    digest = hashlib.sha256(f"v1 size={source_size}".encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode_folder(files: list[tuple[Path, int]], source_size: int):
    from PIL import Image

    from fmtl.runtime.images import DecodeError, decode_many

    modes, sizes = set(), set()
    for path, _ in files:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes.add((image.height, image.width))
        except Exception:  # noqa: BLE001 - reported by the decoder below, with its reason
            pass
    channels = 1 if modes and modes <= {"1", "L", "LA", "I", "I;16", "F"} else 3
    size = next(iter(sizes)) if len(sizes) == 1 else (source_size, source_size)
    decoded = decode_many([path for path, _ in files], channels, size)
    keep = [i for i, item in enumerate(decoded) if not isinstance(item, DecodeError)]
    skipped = [f"{files[i][0]} ({decoded[i]})" for i in range(len(files)) if isinstance(decoded[i], DecodeError)]
    images = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, channels, *size), np.uint8)
    labels = np.array([files[i][1] for i in keep], dtype=np.int64)
    return images, labels, skipped


def _folder_cache_path(key: str) -> Path:
    return cache_dir() / "folders" / f"{key}.npz"


def _read_folder_cache(key: str):
    path = _folder_cache_path(key)
    if not path.exists():
        return None
    try:
        with np.load(path) as npz:
            return npz["images"], npz["labels"], json.loads(str(npz["skipped"]))
    except Exception:  # noqa: BLE001 - a damaged cache is simply rebuilt
        return None


def _write_folder_cache(key: str, decoded) -> None:
    from fmtl.atomic import atomic_open

    images, labels, skipped = decoded
    try:
        with atomic_open(_folder_cache_path(key), "wb") as handle:
            np.savez(handle, images=images, labels=labels, skipped=np.array(json.dumps(skipped)))
    except OSError as error:  # a read-only cache only costs speed
        warnings.warn(f"could not cache decoded images: {error}", stacklevel=2)


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
