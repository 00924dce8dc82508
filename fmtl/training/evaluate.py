"""Evaluate a model on a labelled split: an exported .onnx file (onnxruntime) or a run folder (PyTorch).

    fmtl evaluate export/NAME.onnx            # its own data's test split, through onnxruntime
    fmtl evaluate runs/NAME --split val       # the run's validation split, through PyTorch

Both paths compute the same thing (Preprocess + model + softmax of logits / temperature), so for
one model they report the same accuracy and calibration (ECE, NLL, Brier). A run folder's report
gives them before (temperature 1) and after its temperature; an ONNX file's, those of the
probabilities the file gives (its temperature is in the graph). The data defaults to the model's own (``data_options`` in
model.json, and in the ONNX file's metadata); images and classes must match the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtl.errors import FmtlError
from fmtl.spec import DataOptions, InputSpec, RunInfo
from fmtl.training.calibrate import apply_temperature
from fmtl.training.data import ImageSet, load_dataset, load_run_split
from fmtl.training.metrics import calibration_report, classification_report, format_calibration, format_report

Echo = Callable[[str], object]
Predict = Callable[[np.ndarray, int], np.ndarray]  # (uint8 batch, batch size) -> probs [N, num_classes]


@dataclass
class LoadedModel:
    """What evaluation needs from a model, whatever its format."""

    predict: Predict
    classes: list[str]
    spec: InputSpec
    data_options: DataOptions | None  # how the run made its splits (None: not recorded)
    kind: str  # "onnxruntime" or "pytorch"
    temperature: float = 1.0  # the model's: softmax(logits / temperature)
    raw: bool = False  # True: ``predict`` gives the probabilities at temperature 1 (evaluation applies it)


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
        matrix) plus ``calibration`` (ECE, NLL, Brier, the temperature; a run folder's also
        ``before``, at temperature 1), ``model``, ``split``, ``data`` and ``runtime``.

    Raises:
        FmtlError: the model or the data cannot be read, or the data does not fit the model.
    """
    if batch_size < 1:
        raise FmtlError(f"batch size must be at least 1, got {batch_size}")
    loaded = load_for_evaluation(model_path)
    dataset = data if isinstance(data, ImageSet) else load_split(loaded, data, split)
    check_fit(dataset, loaded)
    probs, labels = loaded.predict(dataset.images.numpy(), batch_size), dataset.labels.numpy()
    raw, probs = (probs, apply_temperature(probs, loaded.temperature)) if loaded.raw else (None, probs)
    report = classification_report(probs, labels, loaded.classes)
    calibration = {"temperature": loaded.temperature, **calibration_report(probs, labels)}
    where = dataset.source or "the given images"
    echo(f"{model_path} ({loaded.kind}) on {where}, {split} split, {len(dataset)} images")
    echo(format_report(report, loaded.classes))
    if raw is not None:
        calibration["before"] = calibration_report(raw, labels)
        echo(f"calibration: {format_calibration(calibration['before'], calibration, loaded.temperature)}")
    else:
        echo(f"calibration: ECE {100 * calibration['ece']:.2f} %, NLL {calibration['nll']:.4f}, Brier "
             f"{calibration['brier']:.4f} (temperature {loaded.temperature:.3f}, in the graph)")  # fmt: skip
    return {
        **report,
        "calibration": calibration,
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
    from fmtl.runtime.classifier import Classifier

    classifier = Classifier(path)
    try:
        info = RunInfo.from_metadata(classifier.metadata)
    except (KeyError, ValueError, TypeError) as error:
        raise FmtlError(f"{path}: fmtl metadata is damaged: {type(error).__name__}: {error}") from None
    return LoadedModel(classifier.predict_proba, classifier.classes, classifier.spec, info.data_options, "onnxruntime",
                       info.temperature)  # fmt: skip


def _load_run(path: Path) -> LoadedModel:
    from fmtl.training.augment import Preprocess
    from fmtl.training.export import Probabilities, load_run, torch_probs

    model, info, spec = load_run(path)
    predict = functools.partial(torch_probs, Probabilities(Preprocess(spec), model).eval())  # temperature 1
    return LoadedModel(predict, info.classes, spec, info.data_options, "pytorch", info.temperature, raw=True)


def load_split(loaded: LoadedModel, data: str | None, split: str) -> ImageSet:
    """``split`` of ``data``, or exactly the run's own ``split`` (its seeded subsets included).

    Raises:
        FmtlError: no data given and the model does not record its own, or the data cannot be loaded.
    """
    options = loaded.data_options
    if data is None and options is None:
        raise FmtlError("the model does not record the data it was trained on: give the data to evaluate on")
    if data is None:
        return load_run_split(options, split)
    given = options or DataOptions(source_size=loaded.spec.source_size[0])  # the defaults training used
    return load_dataset(
        data, split, data_dir=given.data_dir, val_fraction=given.val_fraction, seed=given.seed,
        source_size=given.source_size,
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
