"""Shared fixtures: tiny random CLIP ResNets, their exports, and generated images (no network, no GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("DECOMCAM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "decomcam"))


def has_cuda() -> bool:
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver: no GPU
        return False


def has_trt() -> bool:
    try:
        import onnxruntime as ort

        return "TensorrtExecutionProvider" in ort.get_available_providers() and has_cuda()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with onnxruntime-gpu and CuPy")
    skip_trt = pytest.mark.skip(reason="needs ONNX Runtime's TensorrtExecutionProvider on a GPU")
    gpu, trt = has_cuda(), has_trt()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not trt:
            item.add_marker(skip_trt)


def make_images(n: int, seed: int = 0, sizes=((150, 200), (224, 224), (260, 180), (128, 300))) -> list[np.ndarray]:
    """Photo-like uint8 RGB images: smooth background, a few filled shapes, mild noise."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        low = rng.random((4, 4, 3)).astype(np.float32)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * 200 + 20
        for _ in range(3):
            c = tuple(float(v) for v in rng.integers(0, 255, 3))
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            r = int(rng.integers(min(h, w) // 10, min(h, w) // 3))
            if rng.random() < 0.5:
                cv2.circle(img, center, r, c, -1)
            else:
                cv2.rectangle(img, (center[0] - r, center[1] - r), (center[0] + r, center[1] + r), c, -1)
        img = img + rng.normal(0, 5, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def tiny():
    """The RN-tiny random model (live BatchNorm)."""
    from export.models import load_model

    return load_model("RN-tiny", "none", seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny, tmp_path_factory):
    """RN-tiny exported once per session, with the voc class set."""
    from export.classes import get_class_set
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "RN-tiny"
    res = export_model(tiny, [get_class_set("voc")], out)
    return res


@pytest.fixture(scope="session")
def images():
    return make_images(4, seed=0)
