"""The training side of fmtl: data sources, models, augmentation, the Accelerate loop, reports,
export and evaluation. Needs torch, torchvision, accelerate and onnx (``pip install 'fmtl[train]'``).
"""
