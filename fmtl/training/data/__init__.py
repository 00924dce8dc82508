"""fmtl's training data: sources, the memory-mapped store, the splits and the feeder, one job a module.

- ``sources``: Fashion-MNIST, CSVs and image folders, each read whole as an ``ImageSet``;
- ``store``: an image folder decoded once into a memory-mapped array that every process shares;
- ``splits``: a run's train, val and test sets, as indices into their sources;
- ``feeder``: the sampler (order a pure function of seed and epoch, sharded across ranks, resumable
  mid-epoch) and the loaders that hand batches to the step.
"""

from fmtl.training.data.imageset import ImageSet
from fmtl.training.data.samples import write_samples
from fmtl.training.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    SYSTEM_DATA_DIR,
    cache_dir,
    find_fashion_mnist,
    load_csv,
    load_fashion_mnist,
    load_folder,
    read_idx,
)
from fmtl.training.data.splits import (
    SPLITS,
    load_dataset,
    load_run_split,
    load_run_splits,
    seeded_subset,
    stratified_split,
)

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "SPLITS", "SYSTEM_DATA_DIR", "ImageSet", "cache_dir",
    "find_fashion_mnist", "load_csv", "load_dataset", "load_fashion_mnist", "load_folder", "load_run_split",
    "load_run_splits", "read_idx", "seeded_subset", "stratified_split", "write_samples",
]  # fmt: skip
