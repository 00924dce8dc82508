"""Tiny fmtl-style ONNX models built with onnx.helper (no torch), for runtime and infer tests.

The graph keeps fmtl's contract (fmtl/spec.py): uint8 `images` [N, C, H, W] at the source
size -> Cast -> /255 -> Flatten -> MatMul (fixed seeded weights) + bias -> Softmax ->
`probs` [N, num_classes]. Different images give different probabilities, so ordering
and batching mistakes show up.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ModuleNotFoundError:  # the runtime-only install: use the models the full install wrote
    onnx = None

from fmtl.spec import (
    META_ARCHITECTURE,
    META_CLASSES,
    META_FMTL_VERSION,
    META_INPUT_SPEC,
    META_METRICS,
    META_OPSET,
    META_WEIGHTS_SHA256,
    ONNX_INPUT,
    ONNX_OUTPUT,
    InputSpec,
)

OPSET = 17
GREY_CLASSES = ("dark", "medium", "bright")
RGB_CLASSES = ("red", "green", "blue", "grey")
# class names as a hostile model file could carry them: a spreadsheet formula, a terminal escape, a newline
HOSTILE_CLASSES = ("=HYPERLINK(1)", "\x1b[2Jclear", "two\nlines")


def build_model(
    channels: int = 1,
    source_size: tuple[int, int] = (28, 28),
    classes: Sequence[str] = GREY_CLASSES,
    *,
    with_metadata: bool = True,
    input_name: str = ONNX_INPUT,
    input_type: int | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A linear softmax classifier over the raw pixels, with fmtl's metadata_props."""
    input_type = TensorProto.UINT8 if input_type is None else input_type
    height, width = source_size
    features = channels * height * width
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((features, len(classes))) * 4.0 / np.sqrt(features)).astype(np.float32)
    bias = rng.standard_normal(len(classes)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", [input_name], ["x_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x_float", "scale"], ["x_unit"]),
        helper.make_node("Flatten", ["x_unit"], ["x_flat"], axis=1),
        helper.make_node("MatMul", ["x_flat", "weight"], ["x_mm"]),
        helper.make_node("Add", ["x_mm", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [ONNX_OUTPUT], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(bias, "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "fmtl_test",
        [helper.make_tensor_value_info(input_name, input_type, ["N", channels, height, width])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N", len(classes)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by any onnxruntime from 1.14 on
    if with_metadata:
        spec = InputSpec(channels=channels, source_size=source_size, image_size=32, background=0)
        helper.set_model_props(
            model,
            {
                META_CLASSES: json.dumps(list(classes)),
                META_INPUT_SPEC: spec.to_json(),
                META_ARCHITECTURE: "linear_test",
                META_FMTL_VERSION: "0.1.0",
                META_METRICS: json.dumps({"val_acc": 0.5}),
                META_WEIGHTS_SHA256: "0" * 64,
                META_OPSET: str(OPSET),
            },
        )
    onnx.checker.check_model(model)
    return model


def save_model(path: str | Path, **kwargs) -> Path:
    """build_model(**kwargs) written to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(**kwargs), str(path))
    return path


def grey_model(folder: Path, name: str = "grey.onnx") -> Path:
    """1 channel, 28x28 (Fashion-MNIST-like), 3 classes."""
    if onnx is None:
        return prebuilt("grey.onnx", folder / name)
    return save_model(folder / name, channels=1, source_size=(28, 28), classes=GREY_CLASSES)


def rgb_model(folder: Path, name: str = "rgb.onnx") -> Path:
    """3 channels, 20 high x 30 wide (not square, so a width/height mix-up fails), 4 classes."""
    if onnx is None:
        return prebuilt("rgb.onnx", folder / name)
    return save_model(folder / name, channels=3, source_size=(20, 30), classes=RGB_CLASSES, seed=1)


def hostile_model(folder: Path, name: str = "hostile.onnx") -> Path:
    """Like grey_model, with HOSTILE_CLASSES as its class names."""
    if onnx is None:
        return prebuilt("hostile.onnx", folder / name)
    return save_model(folder / name, channels=1, source_size=(28, 28), classes=HOSTILE_CLASSES)


def prebuilt(name: str, path: Path) -> Path:
    """A model written by ``python tests/runtime/onnx_fixtures.py DIR`` in the full install."""
    folder = os.environ.get("FMTL_TEST_MODELS")
    if not folder or not (Path(folder) / name).is_file():
        raise RuntimeError("onnx is not installed: set FMTL_TEST_MODELS to a folder written by onnx_fixtures.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(Path(folder) / name, path))


if __name__ == "__main__":  # write the fixture models for the runtime-only test run
    out = Path(sys.argv[1])
    grey_model(out), rgb_model(out), hostile_model(out)
