"""The torch-free side of fmtl: decode images, run an exported ONNX model, classify folders, serve.

Everything under ``fmtl.runtime`` needs only onnxruntime, numpy and pillow (and, for serving,
starlette and uvicorn); a test imports every module here and finds no torch.
"""

from fmtl.runtime.classifier import Classifier, ModelError, Prediction

__all__ = ["Classifier", "ModelError", "Prediction"]
