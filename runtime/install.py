"""Which ONNX Runtime is installed: exactly one of the `onnxruntime` (CPU) and `onnxruntime-gpu`
distributions, checked when `runtime` is imported.

Both install the same `onnxruntime` module, so with both present whichever was installed last wins, file
by file (onnxruntime#26996); with neither, nothing can run. Either is a one-line ImportError naming the fix.
"""

from __future__ import annotations

from importlib import metadata

CPU, GPU = "onnxruntime", "onnxruntime-gpu"


def installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_onnxruntime() -> str:
    """The installed ONNX Runtime distribution's name; ImportError when both or neither are installed."""
    cpu, gpu = installed(CPU), installed(GPU)
    if cpu and gpu:
        raise ImportError(f"both {CPU} and {GPU} are installed and overwrite the same module: "
                          f"pip uninstall -y {CPU} {GPU}, then pip install 'decomcam[cuda]' (or [cuda12], or [cpu])")
    if not cpu and not gpu:
        raise ImportError("no ONNX Runtime is installed: pip install 'decomcam[cpu]', or on a GPU "
                          "'decomcam[cuda]' (CUDA 13) or 'decomcam[cuda12]' (CUDA 12)")
    return GPU if gpu else CPU
