"""Evaluate a model on a labelled split: an exported .onnx file (onnxruntime) or a run folder (PyTorch).

    fmtl evaluate export/NAME.onnx            # its own data's test split, through onnxruntime
    fmtl evaluate runs/NAME --split val       # the run's validation split, through PyTorch

Both paths compute the same thing (Preprocess + model + softmax), so for one model they
report the same accuracy. The data defaults to the model's own (``data_options`` in
model.json, and in the ONNX file's metadata); images and classes must match the model.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtl.errors import FmtlError
from fmtl.spec import InputSpec
from fmtl.training.data import ImageSet, load_dataset
from fmtl.training.metrics import classification_report, format_report

Echo = Callable[[str], object]
Predict = Callable[[np.ndarray, int], np.ndarray]  # (uint8 batch, batch size) -> probs [N, num_classes]


@dataclass
class LoadedModel:
    """What evaluation needs from a model, whatever its format."""

    predict: Predict
    classes: list[str]
    spec: InputSpec
    data_options: dict  # model.json's data_options ({} when unknown)
    kind: str  # "onnxruntime" or "pytorch"


def evaluate(
    model_path: str | os.PathLike,
    data: str | ImageSet | None = None,
    split: str = "test",
    batch_size: int = 256,
    echo: Echo = print,
) -> dict:
    """Classification report of a model on one split.

    Args:
        model_path: an exported ``.onnx`` file, or a run folder (model.safetensors + model.json).
        data: ``fashion-mnist``, a CSV, an image folder, or an ImageSet; None: the model's own data.
        split: ``train``, ``val`` or ``test``.
        batch_size: images per forward pass.
        echo: where the report table goes.

    Returns:
        ``classification_report`` (accuracy, top-k, macro F1, per-class figures, confusion
        matrix) plus ``model``, ``split``, ``data`` and ``runtime``.

    Raises:
        FmtlError: the model or the data cannot be read, or the data does not fit the model.
    """
    if batch_size < 1:
        raise FmtlError(f"batch size must be at least 1, got {batch_size}")
    loaded = load_for_evaluation(model_path)
    dataset = data if isinstance(data, ImageSet) else load_split(loaded, data, split)
    check_fit(dataset, loaded)
    probs = loaded.predict(dataset.images.numpy(), batch_size)
    report = classification_report(probs, dataset.labels.numpy(), loaded.classes)
    where = dataset.source or "the given images"
    echo(f"{model_path} ({loaded.kind}) on {where}, {split} split, {len(dataset)} images")
    echo(format_report(report, loaded.classes))
    return {
        **report,
        "model": str(model_path),
        "split": split,
        "data": dataset.source,
        "runtime": loaded.kind,
    }


def load_for_evaluation(model_path: str | os.PathLike) -> LoadedModel:
    """A run folder through PyTorch, anything else as an ONNX file through onnxruntime.

    Raises:
        FmtlError: the path does not exist, or is not a readable model.
    """
    path = Path(model_path)
    if path.is_dir():
        return _load_run(path)
    if not path.is_file():
        raise FmtlError(f"model not found: {path} (give an exported .onnx file or a run folder)")
    return _load_onnx(path)


def _load_onnx(path: Path) -> LoadedModel:
    from fmtl.runtime.classifier import Classifier, ModelError
    from fmtl.training.export import META_DATA_OPTIONS

    try:
        classifier = Classifier(path)
        options = json.loads(classifier.metadata.get(META_DATA_OPTIONS) or "{}")
    except ModelError as error:
        raise FmtlError(str(error)) from None
    except json.JSONDecodeError as error:
        raise FmtlError(f"{path}: metadata '{META_DATA_OPTIONS}' is not JSON: {error}") from None
    return LoadedModel(classifier.predict_proba, classifier.classes, classifier.spec, options, "onnxruntime")


def _load_run(path: Path) -> LoadedModel:
    from fmtl.training.augment import Preprocess
    from fmtl.training.export import Probabilities, load_run, torch_probs

    model, info, spec = load_run(path)
    predict = functools.partial(torch_probs, Probabilities(Preprocess(spec), model).eval())
    return LoadedModel(predict, list(info["classes"]), spec, info.get("data_options") or {}, "pytorch")


def load_split(loaded: LoadedModel, data: str | None, split: str) -> ImageSet:
    """``split`` of ``data``, or of the model's own data (with its validation fraction and seed).

    Raises:
        FmtlError: no data given and the model does not record its own, or the data cannot be loaded.
    """
    opts = loaded.data_options
    if data is None and not opts.get("source"):
        raise FmtlError("the model does not record the data it was trained on: give the data to evaluate on")
    return load_dataset(
        data or opts["source"], split, data_dir=opts.get("data_dir"),
        val_fraction=opts.get("val_fraction", 0.1), seed=opts.get("seed", 0),
        test_source=opts.get("test_source") if data is None else None,
        source_size=opts.get("source_size") or loaded.spec.source_size[0],
    )  # fmt: skip


def check_fit(data: ImageSet, loaded: LoadedModel) -> None:
    """The images must have the model's channels and source size, the classes its class names.

    Raises:
        FmtlError: they do not, or the split is empty.
    """
    spec, where = loaded.spec, data.source or "the data"
    if len(data) == 0:
        raise FmtlError(f"{where} has no images in this split")
    if data.channels != spec.channels or tuple(data.size) != tuple(spec.source_size):
        raise FmtlError(
            f"{where} holds {data.channels}x{data.size[0]}x{data.size[1]} images, the model takes "
            f"{spec.channels}x{spec.source_size[0]}x{spec.source_size[1]}"
        )
    if list(data.classes) != list(loaded.classes):
        raise FmtlError(f"{where} has classes {data.classes}, the model was trained on {loaded.classes}")
