"""The torch-free classifier: one fmtl ONNX file, onnxruntime, numpy and pillow.

    from fmtl.runtime.classifier import Classifier
    clf = Classifier("export/model.onnx")
    for top in clf.predict(["shoe.png", "shirt.jpg"], k=3, min_probability=0.6):
        print(top[0].label, top[0].probability, "(unsure)" if top.unsure else "")

The ONNX file carries everything needed (see fmtl/spec.py): it takes uint8 images at the
source size, does its own resizing and normalisation, ends in a softmax, and names its
classes in its metadata. This module only decodes images and runs the session.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image

from fmtl.errors import FmtlError, one_line
from fmtl.runtime.images import DecodeError, Source, decode_many
from fmtl.spec import (
    META_ARCHITECTURE,
    META_CLASSES,
    META_INPUT_SPEC,
    ONNX_INPUT,
    ONNX_OUTPUT,
    InputSpec,
)


class ModelError(FmtlError, ValueError):
    """The model file is missing, is not ONNX, or is not an fmtl export; the message is one line."""


class Prediction(NamedTuple):
    label: str  # class name
    index: int  # class index, as in Classifier.classes
    probability: float  # softmax probability, 0..1


class TopK(list[Prediction]):
    """One image's top-k Predictions, most probable first (a plain list of them), and ``unsure``: True when
    the top-1 probability is below the ``min_probability`` asked for (False when none was asked for)."""

    def __init__(self, predictions: Sequence[Prediction] = (), unsure: bool = False) -> None:
        super().__init__(predictions)
        self.unsure = unsure

    def __repr__(self) -> str:
        return f"TopK({list.__repr__(self)}, unsure={self.unsure})"


def check_min_probability(min_probability: float | None) -> None:
    """Raise ValueError unless ``min_probability`` is None or a number within 0..1."""
    if min_probability is not None and not 0.0 <= min_probability <= 1.0:
        raise ValueError(f"min_probability must be within 0..1, got {min_probability}")


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


class Classifier:
    """An fmtl ONNX model ready to classify uint8 batches, files, PIL images or arrays.

    Attributes:
        classes: class names, index order.
        spec: the InputSpec the model was exported with (channels, source_size, background, ...).
        metadata: every metadata_props entry of the file, as strings.
        architecture: the backbone's name, or "" when not recorded.
        path: the model file.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
        """Load ``path``; ``threads`` sets onnxruntime's intra-op threads (None: its default, all cores).

        Raises:
            ModelError: the file is missing, unreadable as ONNX, or lacks fmtl's metadata.
        """
        self.path = Path(path)
        self.session = open_session(self.path, providers, threads)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.classes, self.spec = _read_metadata(self.path, self.metadata)
        self.architecture: str = self.metadata.get(META_ARCHITECTURE, "")
        _check_signature(self.path, self.session, self.spec, len(self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the model takes it."""
        return (self.spec.channels, *self.spec.source_size)

    def __repr__(self) -> str:
        arch = self.architecture or "unknown"
        return f"Classifier({str(self.path)!r}, {arch}, {self.num_classes} classes, input {self.input_shape})"

    def predict_proba(self, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities float32 [N, num_classes] for a uint8 batch [N, C, H, W] at the source size."""
        self._check_batch(batch)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(batch) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return run_in_batches(self.session, batch, batch_size)

    def predict(
        self,
        inputs: np.ndarray | Sequence[Source] | Source,
        k: int = 5,
        batch_size: int = 64,
        min_probability: float | None = None,
    ) -> list[TopK]:
        """Top-k predictions per image, most probable first.

        Args:
            inputs: a uint8 batch [N, C, H, W] at the source size, or a list of paths, PIL
                images or arrays (decoded to the model's channels and size), or one path or
                PIL image.
            k: how many classes per image; clamped to 1..num_classes.
            batch_size: images per onnxruntime call.
            min_probability: mark an image ``unsure`` when its top-1 probability is below this.

        Raises:
            DecodeError: an input could not be decoded (the message names it).
        """
        check_min_probability(min_probability)
        batch = inputs if isinstance(inputs, np.ndarray) else self.decode(inputs)
        return self.top_k(self.predict_proba(batch, batch_size), k, min_probability)

    def decode(self, inputs: Sequence[Source] | Source) -> np.ndarray:
        """Decode paths / PIL images / arrays (in a thread pool) into one uint8 batch for this model."""
        inputs = [inputs] if isinstance(inputs, (str, Path, Image.Image)) else list(inputs)
        decoded = decode_many(
            inputs, self.spec.channels, self.spec.source_size, self.spec.background, fit=self.spec.fit
        )
        for source, item in zip(inputs, decoded, strict=True):
            if isinstance(item, DecodeError):
                name = source if isinstance(source, (str, Path)) else type(source).__name__
                raise DecodeError(f"{name}: {item}")
        if not decoded:
            return np.zeros((0, *self.input_shape), dtype=np.uint8)
        return np.stack(decoded)

    def top_k(self, probs: np.ndarray, k: int = 5, min_probability: float | None = None) -> list[TopK]:
        """The k best Predictions per row of probabilities [N, num_classes], k clamped to 1..num_classes;
        a row whose top-1 probability is below ``min_probability`` is marked ``unsure``."""
        check_min_probability(min_probability)
        k = max(1, min(int(k), self.num_classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # stable: ties go to the lower index
        floor = -1.0 if min_probability is None else min_probability
        return [
            TopK([Prediction(self.classes[i], int(i), float(row[i])) for i in indices], float(row[indices[0]]) < floor)
            for row, indices in zip(probs, order, strict=True)
        ]

    def _check_batch(self, batch: np.ndarray) -> None:
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise ValueError(f"expected a uint8 numpy batch, got {getattr(batch, 'dtype', type(batch).__name__)}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected a batch of shape [N, {', '.join(map(str, self.input_shape))}], got {list(batch.shape)}"
            )


def run_in_batches(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The one uint8 -> probabilities path: float32 [N, classes] for uint8 ``images`` [N, C, H, W] (N > 0).

    Used by ``Classifier``, the export's parity gate and its int8 accuracy check alike.
    """
    parts = [
        session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def open_session(
    path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """The one way fmtl opens an onnxruntime session (runtime, export checks, evaluation).

    Raises:
        ModelError: the file is missing or not a valid ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    options = ort.SessionOptions()
    # ENABLE_ALL (NCHWc layout) is worth ~1.6x on CPU here. Spinning off: idle worker threads yield
    # instead of busy-waiting. Measured (benchmarks/inference.py): costs ~2 % at batch 64 and ~15 % at
    # batch 1 on an idle machine, but is 1.2-2x faster when another job shares the cores.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"not a valid ONNX model: {path} ({one_line(error)})") from None


def _read_metadata(path: Path, metadata: dict[str, str]) -> tuple[list[str], InputSpec]:
    """Class names and InputSpec from the file's metadata_props."""
    missing = [key for key in (META_CLASSES, META_INPUT_SPEC) if key not in metadata]
    if missing:
        raise ModelError(f"{path} has no fmtl metadata ({', '.join(missing)}): export it with `fmtl export --onnx`")
    try:
        classes = json.loads(metadata[META_CLASSES])
        spec = InputSpec.from_json(metadata[META_INPUT_SPEC])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{path} has unreadable fmtl metadata: {error}") from None
    if not isinstance(classes, list) or not classes:
        raise ModelError(f"{path}: metadata '{META_CLASSES}' must be a non-empty JSON list")
    return [str(c) for c in classes], spec


def _check_signature(path: Path, session: ort.InferenceSession, spec: InputSpec, num_classes: int) -> None:
    """The graph must take uint8 `images` [N, C, H, W] as the spec says and give `probs` [N, num_classes]."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != ONNX_INPUT or inputs[0].type != "tensor(uint8)":
        found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
        raise ModelError(f"{path}: expected one input '{ONNX_INPUT}' of uint8, found {found}")
    want = [None, spec.channels, *spec.source_size]
    shape = inputs[0].shape
    # symbolic dimensions (strings or None) match anything; numbers must agree with the spec
    if len(shape) != 4 or any(
        isinstance(d, int) and w is not None and d != w for d, w in zip(shape, want, strict=True)
    ):
        raise ModelError(
            f"{path}: input shape {shape} does not match the input spec [N, {spec.channels}, "
            f"{spec.source_size[0]}, {spec.source_size[1]}]"
        )
    names = [o.name for o in outputs]
    if ONNX_OUTPUT not in names:
        raise ModelError(f"{path}: no output named '{ONNX_OUTPUT}' (found {', '.join(names)})")
    out_shape = outputs[names.index(ONNX_OUTPUT)].shape
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != num_classes):
        raise ModelError(f"{path}: output shape {out_shape} does not match {num_classes} classes")
