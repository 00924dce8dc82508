"""fmtl: transfer learning for image classification, from a pretrained CNN to a shipped ONNX model.

Importing fmtl (or anything under fmtl.runtime) never imports torch: the inference runtime needs only
onnxruntime, numpy and pillow.
"""

__version__ = "0.1.0"
