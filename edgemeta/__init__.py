"""edgemeta: few-shot image recognition from a PyTorch training run to an edge device.

This module stays import-light (no torch, no onnx): ``import edgemeta.runtime`` must
work where only numpy and onnxruntime are installed.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
