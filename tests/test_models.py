"""Models: torchvision architectures by name, head replacement, freezing, weights files, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fmtl.errors import ModelConfigError
from fmtl.training.models import apply_freeze, create_model, parameter_groups, parameter_summary


@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11", "convnext_tiny", "densenet121"],
)
def test_torchvision_architectures_build_with_random_weights(name):
    model = create_model(name, num_classes=10, weights=None).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.input_defaults.mean == (0.485, 0.456, 0.406)


def test_vit_head_is_replaced():
    model = create_model("vit_b_16", num_classes=7, weights=None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


def test_mlp_head_and_imagenet_head():
    mlp = create_model("resnet18", num_classes=4, weights=None, head="mlp")
    assert [type(m).__name__ for m in mlp.head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert mlp.head[0].out_features == 512
    imagenet = create_model("resnet18", num_classes=None, weights=None)
    assert imagenet.head.out_features == 1000


def test_freeze_policies():
    model = create_model("mobilenet_v2", num_classes=10, weights=None)
    apply_freeze(model, "frozen")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    apply_freeze(model, "last:2")
    blocks = list(model.backbone.features.children())
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    apply_freeze(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    assert "100.0%" in parameter_summary(model)
    with pytest.raises(ModelConfigError, match="freeze policy"):
        apply_freeze(model, "last:x")


def test_parameter_groups_scale_backbone_lr():
    model = create_model("resnet18", num_classes=10, weights=None)
    groups = parameter_groups(model, lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.01)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-4, 1e-3])
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelConfigError, match="did you mean.*resnet18"):
        create_model("resnet81", num_classes=10)


def test_weights_that_cannot_download_give_one_line(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None: offline() if weights else None)
    with pytest.raises(ModelConfigError) as error:
        create_model("resnet18", num_classes=10, weights="DEFAULT")
    message = str(error.value)
    assert "--weights PATH" in message and "--weights none" in message and "efficientnet_lite0" in message
    assert "\n" not in message


def test_local_weights_file_loads_before_head_replacement(tmp_path):
    source = create_model("resnet18", num_classes=None, weights=None)
    state = {k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    state.update({"fc.weight": source.head.weight, "fc.bias": source.head.bias})
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = create_model("resnet18", num_classes=3, weights=str(path))
    assert torch.equal(loaded.backbone.conv1.weight, source.backbone.conv1.weight)
    assert loaded.head.out_features == 3
    torch.save(state, tmp_path / "resnet18.pth")
    assert torch.equal(create_model("resnet18", 3, weights=str(tmp_path / "resnet18.pth")).backbone.conv1.weight,
                       source.backbone.conv1.weight)  # fmt: skip
    with pytest.raises(ModelConfigError, match="not found"):
        create_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))


def test_lite0_carries_its_input_spec_and_imagenet_backbone():
    model = create_model("efficientnet_lite0", num_classes=10)
    assert model.input_defaults.mean == (0.5, 0.5, 0.5) and model.input_defaults.image_size == 224
    imagenet = create_model("efficientnet_lite0", num_classes=None)
    assert torch.equal(model.backbone.features[0][0].weight, imagenet.backbone.features[0][0].weight)
