"""The deployable runtime: ONNX Runtime sessions, the array back ends, the methods, the CLI (no torch)."""

from .install import check_onnxruntime

ONNXRUNTIME_DISTRIBUTION = check_onnxruntime()  # one ONNX Runtime, CPU or GPU, never both
