"""A CNN trained from scratch to the speedrun standard: fmtl's baseline for transfer learning to beat.

The shape of the public speedrun recipes (airbench, the ResNet-9 DAWNBench entries), sized for 28 px
images on a CPU, as ``benchmarks/peers/speedrun_cnn.py``: a conv-BatchNorm-GELU stem, three blocks of
conv, max-pool, BatchNorm, GELU and a second conv-BatchNorm-GELU, global max pooling, scaled by 1/9
before the linear classifier (a small head at the start keeps SGD's first steps from saturating the
softmax). The recipe that trains it (SGD with Nesterov momentum, warm-up, label smoothing 0.2, flips and
shifts) is ``recipe.SCRATCH``. It takes the same 3-channel input as every other fmtl model (grey is
repeated), so training, export, the parity gate and the runtime treat it like any backbone. It has no
pretrained weights: ``--weights none`` (or a state dict file of its own).
"""

from __future__ import annotations

from torch import Tensor, nn

SCRATCH_CNN = "scratch_cnn"
SCRATCH_IMAGE_SIZE = 28  # its native input: Fashion-MNIST's own side, no resizing
SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.5, 0.5, 0.5)
SCRATCH_WIDTHS = (64, 128, 256)  # channels of the three blocks; the stem has half the first
HEAD_SCALE = 1 / 9  # pooled features are scaled by this before the classifier (airbench's)


def _conv_bn_gelu(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(out_channels), nn.GELU())


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv, max-pool (halving the side), BN, GELU, then conv-BN-GELU at the new width."""
    return nn.Sequential(_conv_bn_gelu(in_channels, out_channels, pool=True), _conv_bn_gelu(out_channels, out_channels))


class ScaledMaxPool(nn.Module):
    """Global max pooling, flattened and scaled by ``HEAD_SCALE``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(2, 3)) * HEAD_SCALE


class ScratchCNN(nn.Module):
    """``features`` (stem and blocks) -> ``pool`` -> ``classifier``, the layout fmtl's head swap expects."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = SCRATCH_WIDTHS, in_channels: int = 3):
        super().__init__()
        stem = widths[0] // 2
        blocks = [_block(a, b) for a, b in zip((stem, *widths[:-1]), widths, strict=True)]
        self.features = nn.Sequential(_conv_bn_gelu(in_channels, stem), *blocks)
        self.pool = ScaledMaxPool()
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def scratch_cnn(widths: tuple[int, ...] = SCRATCH_WIDTHS) -> ScratchCNN:
    """The baseline with random weights (PyTorch's default initialisation); ``models`` loads a weights file."""
    return ScratchCNN(widths=widths)
