"""A small CNN trained from scratch: fmtl's built-in baseline for transfer learning to beat.

The common tutorial shape for 28 px images (as ``benchmarks/peers/scratch_cnn.py``): five
conv-BatchNorm-ReLU blocks, two max-pools, global average pooling and a linear classifier.
It takes the same 3-channel input as every other fmtl model (grey is repeated), so training,
export, the parity gate and the runtime treat it like any backbone. It has no pretrained
weights: ``--weights none`` (or a state dict file of its own).
"""

from __future__ import annotations

from torch import Tensor, nn

SCRATCH_CNN = "scratch_cnn"
SCRATCH_IMAGE_SIZE = 28  # its native input: Fashion-MNIST's own side, no resizing
SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.5, 0.5, 0.5)
SCRATCH_WIDTH = 32  # channels of the first stage; doubled after each pool


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ScratchCNN(nn.Module):
    """``features`` (conv stages) -> ``avgpool`` -> ``classifier``, the layout fmtl's head swap expects."""

    def __init__(self, num_classes: int = 10, width: int = SCRATCH_WIDTH, in_channels: int = 3):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w),
            _block(w, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def scratch_cnn(width: int = SCRATCH_WIDTH) -> ScratchCNN:
    """The baseline with random weights (PyTorch's default initialisation); ``models`` loads a weights file."""
    return ScratchCNN(width=width)
