"""torch -> ONNX: export, verification, fp16 and int8 variants, ORT format, inspection.

One module per stage: ``convert`` (torch -> ONNX), ``verify`` (does ONNX match torch?),
``quantize`` (fp16, int8), ``optimize`` (ONNX Runtime offline optimization, ORT format),
``inspection`` (what is in a model file: :func:`inspect`), and ``pipeline`` (the one call behind each CLI
command). Only :func:`inspect` works without torch and onnx (a device install); the
rest needs ``pip install 'edgemeta[export,cpu]'``.

Example:
    >>> from edgemeta.exporters import ExportOptions, export_checkpoint
    >>> outcome = export_checkpoint("conv4.safetensors", "conv4.onnx", ExportOptions())
    >>> outcome.verification.summary()["episodes"]["agreement"]
"""

from edgemeta.exporters.inspection import inspect

try:
    from edgemeta.exporters.convert import (
        DEFAULT_OPSET,
        Exporter,
        ExportResult,
        ExportSpec,
        WrappedExtractor,
        export,
        load_module_ref,
        module_fingerprint,
        to_onnx,
    )
    from edgemeta.exporters.images import ArrayImages, CalibrationImages, LabelledImages
    from edgemeta.exporters.optimize import optimize_offline, to_ort_format
    from edgemeta.exporters.pipeline import (
        ExportOptions,
        ExportOutcome,
        ModuleRef,
        calibration_images,
        export_checkpoint,
        export_module,
        labelled_images,
        metadata_for_checkpoint,
        quantize_model,
        source_model,
        verify_model,
    )
    from edgemeta.exporters.quantize import QuantizeSpec, convert_fp16, fp16_model, int8_model, quantize_int8, to_fp16
    from edgemeta.exporters.verify import Check, Tolerance, VerificationReport, VerifySpec, verify
except ModuleNotFoundError as _missing:  # a device install: torch and onnx are extras
    if _missing.name not in ("torch", "onnx", "onnxscript", "onnx_ir"):
        raise
    _MISSING = _missing.name

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(f"edgemeta.exporters.{name} needs {_MISSING}: pip install 'edgemeta[export,cpu]'")
        raise AttributeError(f"module 'edgemeta.exporters' has no attribute {name!r}")


__all__ = [
    "inspect",
    "DEFAULT_OPSET",
    "Exporter",
    "ExportSpec",
    "ExportResult",
    "WrappedExtractor",
    "export",
    "to_onnx",
    "load_module_ref",
    "module_fingerprint",
    "optimize_offline",
    "to_ort_format",
    "ArrayImages",
    "CalibrationImages",
    "LabelledImages",
    "calibration_images",
    "labelled_images",
    "ExportOptions",
    "ExportOutcome",
    "ModuleRef",
    "export_checkpoint",
    "export_module",
    "metadata_for_checkpoint",
    "quantize_model",
    "source_model",
    "verify_model",
    "QuantizeSpec",
    "convert_fp16",
    "fp16_model",
    "int8_model",
    "quantize_int8",
    "to_fp16",
    "Check",
    "Tolerance",
    "VerificationReport",
    "VerifySpec",
    "verify",
]
