"""Batched preprocessing agrees with torchvision's per-sample transforms; augmentation is seeded and sane."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from fmtl.spec import InputSpec
from fmtl.training.augment import Augment, Preprocess
from fmtl.training.data import load_dataset


@pytest.fixture(scope="module")
def images():
    return load_dataset("fashion-mnist", "test").images[:32]


@pytest.mark.parametrize("size", [32, 64, 224])
def test_preprocess_matches_torchvision_per_sample(images, size):
    spec = InputSpec(channels=1, source_size=(28, 28), image_size=size)
    reference = v2.Compose([
        v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True),
        v2.Lambda(lambda t: t.expand(3, -1, -1)), v2.Normalize(spec.mean, spec.std),
    ])  # fmt: skip
    expected = torch.stack([reference(image) for image in images])
    assert (Preprocess(spec)(images) - expected).abs().max() < 1e-3


def test_preprocess_shrinks_rgb_with_antialias():
    rgb = torch.randint(0, 256, (4, 3, 96, 80), dtype=torch.uint8)
    spec = InputSpec(channels=3, source_size=(96, 80), image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize((48, 48), antialias=True),
                            v2.Normalize(spec.mean, spec.std)])  # fmt: skip
    assert (Preprocess(spec)(rgb) - torch.stack([reference(i) for i in rgb])).abs().max() < 1e-3


def test_augment_is_reproducible_for_a_seed(images):
    x = images.float() / 255
    a, b, c = Augment(seed=7)(x), Augment(seed=7)(x), Augment(seed=8)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_augment_changes_images_but_keeps_them_recognisable(images):
    x = images.float() / 255
    out = Augment(seed=0)(x)
    assert (out - x).abs().mean() > 0.01
    # Mild warps: most of the ink stays (no image goes blank).
    assert (out.sum(dim=(1, 2, 3)) > 0.5 * x.sum(dim=(1, 2, 3))).all()


def test_identity_augment_is_identity(images):
    x = images.float() / 255
    out = Augment(seed=0, flip=0, degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)(x)
    assert (out - x).abs().max() < 1e-5


def test_training_preprocess_with_augment_keeps_shape(images):
    spec = InputSpec(channels=1, source_size=(28, 28), image_size=32)
    out = Preprocess(spec)(images, Augment(seed=0))
    assert out.shape == (32, 3, 32, 32) and torch.isfinite(out).all()
