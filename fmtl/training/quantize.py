"""int8 quantization of an exported fp32 graph (onnxruntime's static QDQ tools), and the accuracy and speed
comparison that gates it (``fmtl export --quantize int8``; ``export.quantize_int8`` runs it and publishes).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import onnx

from fmtl.atomic import temp_path_beside
from fmtl.errors import ExportError, one_line
from fmtl.runtime.classifier import open_session, run_in_batches
from fmtl.spec import ONNX_INPUT


@dataclass(frozen=True)
class QuantizationReport:
    """fp32 against int8 on the same labelled images."""

    images: int
    fp32_accuracy: float  # 0..1
    int8_accuracy: float  # 0..1
    fp32_images_per_s: float
    int8_images_per_s: float

    @property
    def drop(self) -> float:
        """Accuracy lost by quantizing, in percentage points (negative: int8 did better)."""
        return 100 * (self.fp32_accuracy - self.int8_accuracy)

    def summary(self) -> str:
        speedup = self.int8_images_per_s / max(self.fp32_images_per_s, 1e-9)
        change = 100 * (self.int8_accuracy - self.fp32_accuracy)
        fp32_speed, int8_speed = self.fp32_images_per_s, self.int8_images_per_s
        return (
            f"int8 accuracy {self.int8_accuracy:.2%} vs fp32 {self.fp32_accuracy:.2%} ({change:+.2f} pp) on "
            f"{self.images} val images; {int8_speed:.0f} vs {fp32_speed:.0f} images/s ({speedup:.2f}x)"
        )


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over uint8 batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 32):
        self.batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {ONNX_INPUT: np.ascontiguousarray(batch)}


def quantize_file(fp32_path: str | os.PathLike, output: str | os.PathLike, calibration: np.ndarray) -> None:
    """quant_pre_process, then quantize_static (QDQ, per-channel int8 weights, uint8 activations).

    The preprocessing nodes (everything before the first Conv/Gemm/MatMul: Cast, /255, Resize,
    channel Expand, normalise) and the head (the last Gemm/MatMul, the logits and the Softmax) stay
    float. Quantizing the preprocessing rounds the input image and a quantized Softmax rounds the
    probabilities to steps of 1/255, for no speed (cheap elementwise ops). The head is a few
    thousand multiply-adds, but one int8 scale per class row cannot hold a solved head's weights
    (``--head-fit lbfgs`` folds the feature scaling into them, so they span orders of magnitude):
    measured on this EPYC with a tiny Lite0 (32 px, solved head, 600 val images), int8 lost 23.7 pp
    against fp32 with the head quantized and 3.3 pp with it float (MinMax, Percentile and Entropy
    calibration alike); the accuracy gate below refuses an int8 file that loses too much.

    Weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2, e.g. AMD Zen 3) onnxruntime's
    u8s8 kernels sum pairs of products in saturating int16, and full-range weights overflow there.
    Measured on such an EPYC (a Lite0 at 32 px, 600 val images): 8-bit weights lost 6.7 pp against fp32,
    7-bit weights 1.0 pp; an int8 file must stay right on whatever CPU it is later served from.

    Raises:
        ExportError: onnxruntime's quantization tools failed.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = temp_path_beside(output)
    try:
        try:
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception:  # symbolic shape inference loses some graphs' shapes (the six-view TTA's): ONNX's own
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(output), _Calibration(calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
            nodes_to_exclude=float_nodes(onnx.load(str(prepared), load_external_data=False)),
        )  # fmt: skip
    except Exception as error:  # onnxruntime's tools raise assorted types
        raise ExportError(f"int8 quantization failed: {one_line(error)}") from error
    finally:
        prepared.unlink(missing_ok=True)


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept float: those before the first Conv/Gemm/MatMul (preprocessing), and the
    classifier head from the last Gemm/MatMul on (head layer, logits, Softmax)."""
    nodes = list(model.graph.node)  # ONNX graphs are stored in topological order
    weighted = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "Gemm", "MatMul")]
    if not weighted:
        return [n.name for n in nodes]
    return [n.name for n in nodes[: weighted[0]]] + [n.name for n in nodes[weighted[-1] :]]


def compare_accuracy(
    fp32_path: str | os.PathLike, int8_path_: str | os.PathLike, images: np.ndarray, labels: np.ndarray
) -> QuantizationReport:
    """Accuracy and images/s (onnxruntime, CPU, batches of 64) of two images -> probs files.

    Args:
        fp32_path: the reference file.
        int8_path_: the quantized file.
        images: uint8 [N, C, H, W] labelled images.
        labels: their class indices.
    """
    results = [_accuracy_and_speed(path, images, labels) for path in (fp32_path, int8_path_)]
    return QuantizationReport(len(images), results[0][0], results[1][0], results[0][1], results[1][1])


def _accuracy_and_speed(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    session = open_session(path, providers=["CPUExecutionProvider"])
    run_in_batches(session, images[:64])  # warm-up: first runs allocate
    started = time.perf_counter()
    probs = run_in_batches(session, images)
    seconds = time.perf_counter() - started
    return float((probs.argmax(1) == labels).mean()), len(images) / max(seconds, 1e-9)
