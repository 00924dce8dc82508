"""The input spec: how raw uint8 images become what a model sees.

Written once into a checkpoint's model.json and into the ONNX file's metadata, and read
by evaluation, export and the runtime, so nothing downstream guesses. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Keys of the ONNX file's metadata_props (all values are strings; JSON where structured).
META_CLASSES = "classes"  # JSON list of class names, index order
META_INPUT_SPEC = "input_spec"  # JSON InputSpec
META_ARCHITECTURE = "architecture"  # e.g. "efficientnet_lite0"
META_FMTL_VERSION = "fmtl_version"
META_METRICS = "metrics"  # JSON: training metrics of the exported checkpoint
META_WEIGHTS_SHA256 = "weights_sha256"  # sha256 of the model.safetensors exported
META_OPSET = "opset"

ONNX_INPUT = "images"  # uint8 [N, channels, H, W] at source_size
ONNX_OUTPUT = "probs"  # float32 [N, num_classes], softmax probabilities


@dataclass(frozen=True)
class InputSpec:
    """Everything needed to turn a uint8 image at the source size into model input."""

    channels: int  # channels of the stored/source images: 1 (grey) or 3 (RGB)
    source_size: tuple[int, int]  # (height, width) of the uint8 images the model is fed
    image_size: int  # side of the square image the backbone sees after resizing
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per model channel, on the 0..1 scale
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per model channel, on the 0..1 scale
    interpolation: str = "bilinear"  # resize mode from source_size to image_size
    model_channels: int = 3  # channels the backbone takes (grey is repeated to 3)
    background: int = 0  # grey level transparent pixels are composited onto (0: black, as Fashion-MNIST)
    extra: dict = field(default_factory=dict)  # room for future keys without breaking old readers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["source_size"] = list(self.source_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["source_size"] = tuple(int(x) for x in known["source_size"])
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(x) for x in known[key])
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        return cls.from_dict(json.loads(text))
