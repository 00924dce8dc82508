"""Batched, on-device preprocessing and augmentation.

The dataset stays uint8 at its source size. Per batch, on the device:
``uint8 -> float 0..1 -> (train: augment) -> resize -> grey to RGB -> normalise``.

``Preprocess`` is the deterministic part. It is the one module used by training,
evaluation and, inside the ONNX graph, by every deployment, so serving cannot drift
from training. ``Augment`` draws one random affine warp (flip, rotation, translation,
scale) and one brightness/contrast change per image, for the whole batch at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmtl.spec import InputSpec


class Preprocess(nn.Module):
    """uint8 ``[N, C, H, W]`` at the source size -> normalised float ``[N, 3, S, S]`` for the backbone."""

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.spec = spec
        # (x / 255 - mean) / std folded into one multiply-add per channel.
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor, augment: Augment | None = None) -> torch.Tensor:
        x = images.float() / 255.0
        if augment is not None:
            x = augment(x)
        x = self.resize(x)
        if x.shape[1] != self.spec.model_channels:  # grey source, RGB backbone
            x = x.expand(-1, self.spec.model_channels, -1, -1)
        return x * self.scale + self.shift

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.spec.image_size
        if tuple(x.shape[-2:]) == (size, size):
            return x
        mode = self.spec.interpolation if self.spec.interpolation in ("bilinear", "bicubic") else "bilinear"
        # Antialias only matters when shrinking; upscaling (28 -> 224) is plain bilinear.
        shrink = x.shape[-1] > size or x.shape[-2] > size
        return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=shrink)


def augment_for(cfg, seed: int) -> Augment | None:
    """The run's augmentation (``--augment``, ``--flip``, ``--augment-strength``, ``--augment-warp``), or None."""
    if not cfg.augment:
        return None
    k = cfg.augment_strength
    warp = k if cfg.augment_warp else 0.0  # --no-augment-warp: flips and shifts only
    return Augment(
        seed=seed,
        flip=0.5 if cfg.flip else 0.0,
        degrees=15.0 * warp,
        translate=0.1 * k,
        scale=(1 - 0.1 * warp, 1 + 0.1 * warp),
        brightness=0.2 * warp,
        contrast=0.2 * warp,
    )


class Augment(nn.Module):
    """Seeded random flip, rotation, translation, scale (one affine warp) and brightness/contrast.

    Works on float images in 0..1, any size and channel count, all images of a batch at once.
    Parameters are drawn on the CPU from the module's own generator (so a seed reproduces the
    same augmentations on any device); the warp runs wherever the images are.
    """

    def __init__(
        self,
        seed: int = 0,
        flip: float = 0.5,
        degrees: float = 15.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.2,
        contrast: float = 0.2,
    ):
        super().__init__()
        self.flip, self.degrees, self.translate, self.scale_range = flip, degrees, translate, scale
        self.brightness, self.contrast = brightness, contrast
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (high - low) + low

    def affine_matrices(self, n: int) -> torch.Tensor:
        """``[n, 2, 3]`` matrices mapping output to input coordinates (affine_grid's convention)."""
        angle = self._uniform(n, -self.degrees, self.degrees) * math.pi / 180
        scale = self._uniform(n, *self.scale_range)
        flip = torch.where(torch.rand(n, generator=self.generator) < self.flip, -1.0, 1.0)
        shift = self._uniform(2 * n, -self.translate, self.translate).view(n, 2) * 2  # grid spans -1..1
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        return torch.stack(
            [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        theta = self.affine_matrices(n).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gain = self._uniform(n, 1 - self.brightness, 1 + self.brightness).to(x.device, x.dtype).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - self.contrast, 1 + self.contrast).to(x.device, x.dtype).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean).mul(gain).clamp_(0, 1)
