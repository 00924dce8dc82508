"""ONNX export: Preprocess + model + softmax as one graph, checked before it is published.

    fmtl export --onnx runs/NAME                 # -> export/NAME.onnx
    fmtl export --onnx runs/NAME --quantize int8 # -> also export/NAME.int8.onnx

The graph takes uint8 ``images`` [N, C, H, W] at the source size (N dynamic) and gives
float ``probs`` [N, num_classes]; the preprocessing inside it is ``fmtl.training.augment.Preprocess``,
the module training used. The file carries its classes, input spec, metrics and data
options as metadata_props (keys in fmtl/spec.py), so nothing downstream guesses.

Nothing is published until every check passes: ``onnx.checker`` (full check), the runtime's
own contract check (``fmtl.runtime.classifier.Classifier`` opens it), and parity with PyTorch on real
validation images (top-1 agreement 100 %, max |Δprob| ≤ 1e-4). The run's temperature (model.json) is
baked into the graph, logits / T before the softmax, and recorded in the metadata, so every runtime
gets calibrated probabilities; the parity gate compares the calibrated probabilities, and the int8
twin keeps the same division (its head stays float). The file is written to a
temporary path beside the target and moved into place atomically; on failure no file is left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from fmtl import __version__
from fmtl.atomic import publish, temp_path_beside, write_errors
from fmtl.errors import ExportError, FmtlError, one_line
from fmtl.runtime.classifier import open_session, run_in_batches
from fmtl.spec import (
    META_CLASSES,
    META_QUANTIZATION,
    META_QUANTIZATION_CHECK,
    META_TEMPERATURE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    InputSpec,
    RunInfo,
)
from fmtl.training.augment import Preprocess
from fmtl.training.checkpoint import MODEL_WEIGHTS, load_model, sha256_file
from fmtl.training.data import ImageSet, load_run_split, seeded_subset
from fmtl.training.quantize import QuantizationReport, compare_accuracy, quantize_file

DEFAULT_FOLDER = "export"
PARITY_TOLERANCE = 1e-4  # max |Δprob| allowed between onnxruntime and PyTorch
MAX_SINGLE_FILE_BYTES = 2**31 - 1  # protobuf's limit: bigger weights would need external data files
QUANTIZATIONS = ("int8",)
MIN_OPSET = 18  # torch.export's ONNX translation starts at 18; converting down to 17 fails on these graphs

Echo = Callable[[str], object]


class Probabilities(nn.Module):
    """uint8 images at the source size -> class probabilities: exactly what the ONNX graph computes.

    The logits are divided by ``temperature`` (model.json's, fitted on val) before the softmax; at 1
    the graph has no division at all, as exports made before calibration existed.
    """

    def __init__(self, preprocess: nn.Module, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.preprocess = preprocess
        self.model = model
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.preprocess(images)).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime against PyTorch on the same uint8 images."""

    images: int  # how many images were compared
    top1_agreement: float  # share of images whose most probable class is the same, 0..1
    max_abs_diff: float  # largest |Δprob| over all images and classes
    tolerance: float  # the largest max_abs_diff allowed

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.top1_agreement == 1.0 and self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity on {self.images} images: top-1 agreement {self.top1_agreement:.2%}, "
            f"max |Δprob| {self.max_abs_diff:.1e} (limit {self.tolerance:.0e}): {verdict}"
        )


# ---------------------------------------------------------------- the export


def default_output(run_dir: str | os.PathLike) -> Path:
    """``export/<run folder name>.onnx``, relative to the current folder."""
    return Path(DEFAULT_FOLDER) / f"{Path(run_dir).resolve().name}.onnx"


def int8_path(output: str | os.PathLike) -> Path:
    """Where the int8 variant of ``output`` goes: ``NAME.onnx`` -> ``NAME.int8.onnx``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.int8{output.suffix or '.onnx'}")


def export_onnx(
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    opset: int = 18,
    parity_images: int = 512,
    quantize: str | None = None,
    max_accuracy_drop: float = 1.0,
    echo: Echo = print,
    *,
    calibration_images: int = 256,
    accuracy_images: int = 2000,
) -> Path:
    """Export a run folder's model as one checked ONNX file; optionally an int8 variant beside it.

    Args:
        run_dir: a run folder (model.safetensors + model.json).
        output: the .onnx file to write (default ``export/<run folder name>.onnx``).
        opset: ONNX opset of the default domain (18 or newer).
        parity_images: validation images on which onnxruntime must match PyTorch (at least 1).
        quantize: None, or ``"int8"`` for static QDQ quantization into ``NAME.int8.onnx``.
        max_accuracy_drop: the most val accuracy (percentage points) int8 may lose against fp32.
        echo: where progress lines go.
        calibration_images: training images that calibrate the int8 activation ranges.
        accuracy_images: validation images on which fp32 and int8 accuracy and speed are measured.

    Returns:
        The fp32 .onnx path (the int8 one is ``int8_path(output)``).

    Raises:
        FmtlError: the run folder or its data cannot be read.
        ExportError: export, checker, parity or the int8 accuracy limit failed. The fp32 file is
            published only when all its checks pass; a refused int8 file is removed (the fp32 stays).
    """
    _check_options(opset, parity_images, quantize)
    started = time.perf_counter()
    model, info, spec = load_run(run_dir)
    reference = Probabilities(Preprocess(spec), model, info.temperature).eval()
    output = Path(output) if output else default_output(run_dir)
    metadata = export_metadata(run_dir, info, opset)
    images = reference_images(info, "val", parity_images).images.numpy()
    tmp = temp_path_beside(output)
    try:
        with write_errors(output):  # a full disk: one line naming the file and the free space
            write_graph(reference, spec, tmp, opset, metadata, describe(info))
        check_graph(tmp)
        report = check_parity(tmp, reference, images)
        echo(report.summary())
        if not report.passed:
            raise ExportError(f"{report.summary()}; the graph does not compute what the model does, nothing written")
        publish(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    seconds, megabytes = time.perf_counter() - started, output.stat().st_size / 1e6
    echo(f"wrote {output} ({megabytes:.1f} MB, opset {opset}, temperature {info.temperature:.4g}) in {seconds:.1f} s")
    if quantize == "int8":
        quantize_int8(output, info, max_accuracy_drop, calibration_images, accuracy_images, echo)
    return output


def _check_options(opset: int, parity_images: int, quantize: str | None) -> None:
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZATIONS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: torch's exporter writes opset {MIN_OPSET} or newer")
    if parity_images < 1:
        raise ExportError("parity_images must be at least 1: an export is checked on real images")


def load_run(run_dir: str | os.PathLike) -> tuple[nn.Module, RunInfo, InputSpec]:
    """``checkpoint.load_model``, with a damaged or mismatched weights file reported in one line.

    Raises:
        FmtlError: not a run folder, or its weights do not load into the model model.json describes.
    """
    try:
        return load_model(run_dir)
    except FmtlError:
        raise
    except Exception as error:  # safetensors and load_state_dict raise assorted types for bad weights
        raise FmtlError(f"cannot load the model in {run_dir}: {one_line(error)}") from error


def export_metadata(run_dir: str | os.PathLike, info: RunInfo, opset: int) -> dict[str, str]:
    """The metadata_props of the exported file: ``RunInfo.to_metadata`` of model.json, hash checked.

    Raises:
        ExportError: model.safetensors is not the file model.json describes.
    """
    sha = sha256_file(Path(run_dir) / MODEL_WEIGHTS)
    if info.weights_sha256 and info.weights_sha256 != sha:
        raise ExportError(f"{Path(run_dir) / MODEL_WEIGHTS} does not match the sha256 recorded in model.json")
    return dataclasses.replace(info, fmtl_version=__version__, weights_sha256=sha).to_metadata(opset)


def describe(info: RunInfo) -> str:
    """The file's doc_string: what goes in and what comes out."""
    spec = info.input_spec
    (height, width), classes = spec.source_size, info.num_classes
    return (
        f"fmtl {info.architecture} classifier, {classes} classes. Input '{ONNX_INPUT}': uint8 "
        f"[N, {spec.channels}, {height}, {width}], 0..255, no preprocessing needed (resize to "
        f"{spec.image_size} and normalisation are in the graph). Output '{ONNX_OUTPUT}': float32 "
        f"[N, {classes}] softmax probabilities of the logits divided by {info.temperature:.6g} (metadata "
        f"'{META_TEMPERATURE}'), class names in metadata '{META_CLASSES}'."
    )


def write_graph(
    module: nn.Module,
    spec: InputSpec,
    path: str | os.PathLike,
    opset: int,
    metadata: dict[str, str],
    doc: str = "",
) -> None:
    """Export ``module`` (uint8 images -> probs) with a dynamic batch axis to one self-contained file.

    Uses torch.export (``dynamo=True``, torch's default exporter), which handled every backbone
    tried here (EfficientNet-Lite0, ResNet, MobileNetV3, ConvNeXt) and the antialiased resize.

    Args:
        module: takes one argument named ``images`` (uint8 [N, C, H, W]) and returns probabilities.
        spec: gives the channels and source size of the example input.
        path: the file to write (weights inside, no external data).
        opset: the default-domain opset the file must have.
        metadata: metadata_props to set (string values).
        doc: the model's doc_string.

    Raises:
        ExportError: the model is too big for one file, or the exporter failed.
    """
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if size > MAX_SINGLE_FILE_BYTES:
        raise ExportError(f"the model's weights take {size / 2**30:.1f} GiB: over the 2 GiB an ONNX file can hold")
    # A batch of 2, not 1: torch.export specialises a dimension of size 1 to a constant. The key
    # "images" is the name of module.forward's argument; input_names gives the graph input that name too.
    example = torch.zeros((2, spec.channels, *spec.source_size), dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            module.eval(), (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=opset,
            external_data=False, optimize=True, verbose=False,
        )  # fmt: skip
    except Exception as error:  # the exporter raises many types; its first line names the unsupported part
        raise ExportError(f"torch.onnx.export failed: {one_line(error)}") from error
    written = program.model.opset_imports.get("")
    if written != opset:  # the exporter falls back to another opset (with a log line) when it cannot convert
        raise ExportError(f"torch's exporter could not write opset {opset} (it wrote {written})")
    program.model.metadata_props.update(metadata)
    program.model.doc_string = doc
    program.save(str(path), external_data=False)


def check_graph(path: str | os.PathLike) -> None:
    """onnx's full checker, then the runtime's own contract (input/output names, types, shapes, metadata).

    Raises:
        ExportError: either check failed.
    """
    from fmtl.runtime.classifier import Classifier, ModelError

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported graph is not valid ONNX: {one_line(error)}") from None
    try:
        Classifier(path, providers=["CPUExecutionProvider"])
    except ModelError as error:
        raise ExportError(f"the exported graph does not fit fmtl's runtime: {error}") from None


# ---------------------------------------------------------------- parity


@torch.no_grad()
def torch_probs(module: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run an images -> probs torch module (CPU, eval mode, no gradients) over a uint8 batch in chunks.

    Args:
        module: e.g. ``Probabilities``.
        images: uint8 [N, C, H, W].
        batch_size: images per forward pass.
    """
    module.eval()
    parts = [module(torch.from_numpy(images[i : i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def check_parity(
    onnx_path: str | os.PathLike,
    torch_module: nn.Module,
    images_uint8: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> ParityReport:
    """Compare onnxruntime (all graph optimisations on, as the runtime runs it) with PyTorch.

    Args:
        onnx_path: a graph with input ``images`` (uint8) and output ``probs``.
        torch_module: the reference, uint8 images -> probabilities (e.g. ``Probabilities``).
        images_uint8: real images, uint8 [N, C, H, W] at the source size.
        tolerance: the largest |Δprob| that still passes.
    """
    images_uint8 = np.ascontiguousarray(images_uint8, dtype=np.uint8)
    if len(images_uint8) == 0:
        return ParityReport(0, 0.0, float("inf"), tolerance)
    session = open_session(onnx_path, providers=["CPUExecutionProvider"])  # exactly as the runtime opens it
    got, want = run_in_batches(session, images_uint8), torch_probs(torch_module, images_uint8)
    if got.shape != want.shape:
        return ParityReport(len(images_uint8), 0.0, float("inf"), tolerance)
    return ParityReport(
        images=len(images_uint8),
        top1_agreement=float((got.argmax(1) == want.argmax(1)).mean()),
        max_abs_diff=float(np.abs(got.astype(np.float64) - want).max()),
        tolerance=tolerance,
    )


def reference_images(info: RunInfo, split: str, count: int) -> ImageSet:
    """A seeded, stratified sample of the run's own ``split`` (``train`` or ``val``), as trained.

    Raises:
        FmtlError: the run's data cannot be loaded, or its images no longer match the input spec.
    """
    options, spec = info.data_options, info.input_spec
    if options is None:
        raise ExportError("model.json has no data_options: cannot find the run's images for the checks")
    try:
        data = load_run_split(options, split)
    except FmtlError as error:
        raise type(error)(f"the export checks need the run's {split} images: {error}") from None
    if len(data) == 0 and split == "val":  # trained with val_fraction 0
        return reference_images(info, "train", count)
    if data.channels != spec.channels or data.size != tuple(spec.source_size):
        found, trained = (data.channels, *data.size), (spec.channels, *spec.source_size)
        raise ExportError(
            f"{options.source} now holds {'x'.join(map(str, found))} images, the model was trained on "
            f"{'x'.join(map(str, trained))}"
        )
    return seeded_subset(data, count, options.seed)


# ---------------------------------------------------------------- int8


def quantize_int8(
    fp32_path: Path,
    info: RunInfo,
    max_accuracy_drop: float = 1.0,
    calibration_images: int = 256,
    accuracy_images: int = 2000,
    echo: Echo = print,
) -> QuantizationReport:
    """Static QDQ int8 quantization of an exported fp32 file into ``int8_path(fp32_path)``.

    Args:
        fp32_path: a published fmtl export.
        info: the run's model.json (its data_options locate the images).
        max_accuracy_drop: the most val accuracy (percentage points) int8 may lose.
        calibration_images: training images calibrating the activation ranges.
        accuracy_images: validation images for the accuracy and speed comparison.
        echo: where the report line goes.

    Raises:
        ExportError: quantization failed or lost too much accuracy; no int8 file is left.
    """
    target = int8_path(fp32_path)
    calibration = reference_images(info, "train", calibration_images).images.numpy()
    val = reference_images(info, "val", accuracy_images)
    tmp = temp_path_beside(target)
    try:
        quantize_file(fp32_path, tmp, calibration)
        report = compare_accuracy(fp32_path, tmp, val.images.numpy(), val.labels.numpy())
        _write_int8_metadata(fp32_path, tmp, report)
        echo(report.summary())
        if report.drop > max_accuracy_drop:
            raise ExportError(f"{report.summary()}: int8 loses {report.drop:.2f} pp, more than the "
                              f"{max_accuracy_drop:g} allowed; kept {fp32_path} only")  # fmt: skip
        publish(tmp, target)
    except ExportError:
        target.unlink(missing_ok=True)  # an older int8 file would not match the fp32 just written
        raise
    finally:
        tmp.unlink(missing_ok=True)
    echo(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return report


def _write_int8_metadata(fp32_path: Path, int8_file: Path, report: QuantizationReport) -> None:
    """Copy the fp32 file's metadata_props into the int8 one, add the quantization keys, check it."""
    source = onnx.load(str(fp32_path), load_external_data=False)
    model = onnx.load(str(int8_file))
    props = {p.key: p.value for p in source.metadata_props}
    props[META_QUANTIZATION] = "int8"
    props[META_QUANTIZATION_CHECK] = json.dumps({
        "images": report.images, "fp32_accuracy": report.fp32_accuracy, "int8_accuracy": report.int8_accuracy,
    })  # fmt: skip
    onnx.helper.set_model_props(model, props)
    model.doc_string = f"{source.doc_string} Static int8 (QDQ) quantization of the fp32 export."
    onnx.save(model, str(int8_file))
    check_graph(int8_file)
