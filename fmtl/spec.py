"""The run contract: what travels with a trained model, defined once. Torch-free.

- ``InputSpec``: how raw uint8 images become what the model sees;
- ``DataOptions``: how to reload exactly the splits the run trained, validated and tested on;
- ``RunInfo``: a checkpoint's model.json, and (``to_metadata``/``from_metadata``) the exported
  ONNX file's metadata_props.

Training writes them, and export, evaluation and the runtime read them through these
types, so nothing downstream rebuilds a dict with defaults of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

# Keys of the ONNX file's metadata_props (all values are strings; JSON where structured).
META_CLASSES = "classes"  # JSON list of class names, index order
META_INPUT_SPEC = "input_spec"  # JSON InputSpec
META_ARCHITECTURE = "architecture"  # e.g. "efficientnet_lite0"
META_FMTL_VERSION = "fmtl_version"
META_METRICS = "metrics"  # JSON: training metrics of the exported checkpoint
META_WEIGHTS_SHA256 = "weights_sha256"  # sha256 of the model.safetensors exported
META_OPSET = "opset"
META_DATA_OPTIONS = "data_options"  # JSON DataOptions, so evaluation can reload the run's splits
META_QUANTIZATION = "quantization"  # "int8" in the quantized variant; absent in the fp32 file
META_QUANTIZATION_CHECK = "quantization_check"  # JSON: fp32 vs int8 accuracy measured when it was made
META_TEMPERATURE = "temperature"  # the graph divides its logits by this before the softmax; absent: 1

ONNX_INPUT = "images"  # uint8 [N, channels, H, W] at source_size
ONNX_OUTPUT = "probs"  # float32 [N, num_classes], softmax probabilities (of logits / temperature)


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
    fit: str = "stretch"  # how an image of another shape reaches source_size: stretch, or crop (shorter side, centre)

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


@dataclass(frozen=True)
class DataOptions:
    """How a run's splits were made, so export checks and evaluation reload exactly those images."""

    source: str = "fashion-mnist"  # fashion-mnist, a CSV, or an image folder
    test_source: str | None = None  # a separate test CSV or folder
    data_dir: str | None = None  # where the Fashion-MNIST IDX files were found
    val_fraction: float = 0.1  # stratified share of the training data held out for validation
    seed: int = 0  # seeds the split and the evaluation subsets
    source_size: int = 224  # side folder images are stored at
    max_eval_samples: int = 0  # test was a seeded stratified subset of this size (0: all; the name predates val's own)
    max_val_samples: int = 0  # val was a seeded stratified subset of this size (0: all)

    @classmethod
    def from_dict(cls, d: dict) -> DataOptions:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class RunInfo:
    """A trained model's description: model.json in a run folder, metadata_props in an ONNX file."""

    architecture: str  # the model name create_model builds
    classes: list[str]  # class names, in output index order
    input_spec: InputSpec
    head: str = "linear"  # linear or mlp
    strategy: str = ""  # linear, finetune or hybrid
    weights: str = ""  # the pretrained weights it started from
    data: str = ""  # the training data's description
    best_epoch: int = 0
    flip_tta: bool = False  # its logits average each image's and its mirror image's (in the ONNX graph too)
    shift_tta: bool = False  # and of both shifted a pixel up-left and down-right (six views)
    temperature: float = 1.0  # probabilities are softmax(logits / temperature), fitted on val (1: uncalibrated)
    data_options: DataOptions | None = None  # None: not recorded (evaluation then needs --data)
    metrics: dict = field(default_factory=dict)  # {"val": {...}, "test": {...}}
    fmtl_version: str = ""
    weights_sha256: str = ""  # of model.safetensors

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_spec"] = self.input_spec.to_dict()
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        """From model.json; raises KeyError/TypeError/ValueError when it does not describe a model."""
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        values["classes"] = [str(c) for c in d["classes"]]
        values["input_spec"] = InputSpec.from_dict(d["input_spec"])
        if d.get("data_options"):
            values["data_options"] = DataOptions.from_dict(d["data_options"])
        values["temperature"] = checked_temperature(d.get("temperature", 1.0))
        return cls(**values)

    def to_metadata(self, opset: int) -> dict[str, str]:
        """The ONNX file's metadata_props (all strings; JSON where structured)."""
        props = {
            META_CLASSES: json.dumps(self.classes),
            META_INPUT_SPEC: self.input_spec.to_json(),
            META_ARCHITECTURE: self.architecture,
            META_FMTL_VERSION: self.fmtl_version,
            META_METRICS: json.dumps(self.metrics, sort_keys=True),
            META_WEIGHTS_SHA256: self.weights_sha256,
            META_OPSET: str(opset),
            META_TEMPERATURE: repr(float(self.temperature)),
        }
        if self.data_options is not None:
            props[META_DATA_OPTIONS] = json.dumps(asdict(self.data_options), sort_keys=True)
        return props

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> RunInfo:
        """From an ONNX file's metadata_props; raises KeyError or ValueError (bad JSON) when incomplete."""
        options = json.loads(props.get(META_DATA_OPTIONS) or "null")
        return cls(
            architecture=props.get(META_ARCHITECTURE, ""),
            classes=[str(c) for c in json.loads(props[META_CLASSES])],
            input_spec=InputSpec.from_json(props[META_INPUT_SPEC]),
            data_options=DataOptions.from_dict(options) if options else None,
            metrics=json.loads(props.get(META_METRICS) or "{}"),
            fmtl_version=props.get(META_FMTL_VERSION, ""),
            weights_sha256=props.get(META_WEIGHTS_SHA256, ""),
            temperature=checked_temperature(props.get(META_TEMPERATURE, "1")),
        )


def checked_temperature(value) -> float:
    """A temperature read from model.json or metadata: a finite number above 0 (absent means 1).

    Raises:
        ValueError: it is not one (bool, string, zero, negative, NaN or infinite).
    """
    if isinstance(value, bool):
        raise ValueError(f"temperature must be a number, got {value!r}")
    temperature = float(value)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number above 0, got {value!r}")
    return temperature
