"""A run's splits as indices into its sources: ``train`` and ``val`` from one load of the training source
(the ``val`` of a source without its own is a stratified, seeded slice, so together they are the whole
training set), ``test`` from the source's test split or a second source.
"""

from __future__ import annotations

import torch

from fmtl.errors import DataError
from fmtl.spec import DataOptions
from fmtl.training.data.imageset import ImageSet
from fmtl.training.data.sources import has_own_val, open_source

SPLITS = ("train", "val", "test")


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
        return open_source(test_source, "all", data_dir, source_size, download)
    if split == "test":
        return open_source(source, "test", data_dir, source_size, download)
    if has_own_val(source):
        return open_source(source, split, data_dir, source_size, download)
    full = open_source(source, "train", data_dir, source_size, download)
    train_idx, val_idx = stratified_split(full.labels, val_fraction, seed)
    return full.subset(train_idx if split == "train" else val_idx)


def load_run_split(options: DataOptions, split: str) -> ImageSet:
    """``split`` of a run's data exactly as the run used it: val and test are its seeded subsets.

    Training (through ``load_run_splits``), the export checks and evaluation all load a run's images this way.
    """
    data = load_dataset(
        options.source, split, data_dir=options.data_dir, val_fraction=options.val_fraction, seed=options.seed,
        test_source=options.test_source, source_size=options.source_size,
    )  # fmt: skip
    return _narrowed(data, split, options)


def load_run_splits(options: DataOptions) -> tuple[ImageSet, ImageSet]:
    """The run's train and val splits from one load of the training source, split once."""
    if has_own_val(options.source):
        return load_run_split(options, "train"), load_run_split(options, "val")
    full = open_source(options.source, "train", options.data_dir, options.source_size)
    train_idx, val_idx = stratified_split(full.labels, options.val_fraction, options.seed)
    return full.subset(train_idx), _narrowed(full.subset(val_idx), "val", options)


def _narrowed(data: ImageSet, split: str, options: DataOptions) -> ImageSet:
    if split == "train":
        return data
    count = options.max_val_samples if split == "val" else options.max_eval_samples  # 0: all
    return seeded_subset(data, count, options.seed)


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
