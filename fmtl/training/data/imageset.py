"""ImageSet: one split's uint8 images, their labels and the class names.

The images are rows of a source's pixel array, which is either in memory (Fashion-MNIST, a CSV) or a
memory-mapped store on disk (an image folder, ``fmtl.training.data.store``). A split or a subset only
narrows ``rows``: nothing is copied until a batch is taken, so a split of a 100,000-photo store costs an
index array, not the photos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageSet:
    """uint8 images ``[N, C, H, W]`` at the source's size, int64 labels ``[N]``, class names."""

    pixels: torch.Tensor  # the source's images, uint8 [M, C, H, W]; this set holds pixels[rows]
    labels: torch.Tensor  # int64 [N], one per row
    classes: list[str]
    source: str = ""  # where it came from, for messages and model.json
    rows: torch.Tensor | None = None  # int64 [N] indices into pixels; None: all of them, in order
    mapped: bool = False  # pixels is a memory-mapped store (its pages are the page cache's, not ours)
    fit: str = "stretch"  # how images of another shape were brought to the source size (InputSpec.fit)

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.pixels.dtype} {tuple(self.pixels.shape)}")
        count = len(self.pixels) if self.rows is None else len(self.rows)
        if count != len(self.labels):
            raise ValueError(f"{count} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.pixels.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[2:])

    @property
    def nbytes(self) -> int:
        return len(self) * self.pixels[0].numel() if len(self.pixels) else 0

    @property
    def images(self) -> torch.Tensor:
        """All of this set's images as one tensor: a copy, unless the set is the whole in-memory source."""
        return self.pixels if self.rows is None else self.pixels[self.rows]

    def take(self, indices: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """The images at positions ``indices`` of this set (a copy, read from memory or the store)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.pixels[indices if self.rows is None else self.rows[indices]]

    def subset(self, indices: torch.Tensor | np.ndarray) -> ImageSet:
        indices = torch.as_tensor(indices, dtype=torch.long)
        rows = indices if self.rows is None else self.rows[indices]
        return ImageSet(self.pixels, self.labels[indices], self.classes, self.source, rows, self.mapped, self.fit)


class LazyImages:
    """An ImageSet's images indexed like an array and read only when indexed (a few of a store's test split)."""

    def __init__(self, data: ImageSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices) -> np.ndarray:
        return self.data.take(np.asarray(indices)).numpy()
