"""Array back ends: where the numerics run, next to the data.

One algorithm (runtime/decomcam.py) is written over `Backend.xp` (numpy or cupy) plus the few image
operations below. Two implementations of the image operations:

- `NumpyBackend`: numpy + OpenCV (cv2.resize, cv2.GaussianBlur), the CPU path.
- `MatrixBackend(xp)`: resize and blur as matrix products, R_h X R_w^T, with the operator matrices taken
  from OpenCV once per shape (both operations are linear and separable, so the matrices reproduce OpenCV
  exactly up to float rounding). With xp = cupy this is the GPU path (cuBLAS batched matmul, nothing leaves
  the device); with xp = numpy it runs here, which is how the GPU formulation is tested on a CPU machine.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
    """[n_out, n_in] matrix R with resize_1d(v) = R @ v, exactly OpenCV's 1-D operator."""
    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[interpolation]
    eye = np.eye(n_in, dtype=np.float64)
    # cv2.resize dsize is (width, height): resize the rows axis n_in -> n_out, keep the columns.
    return cv2.resize(eye, (n_in, n_out), interpolation=flag)


@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float, radius: int) -> np.ndarray:
    """[n, n] matrix K with blur_1d(v) = K @ v: OpenCV's Gaussian with reflect-101 borders."""
    eye = np.eye(n, dtype=np.float64)
    # ksize (width=1, height=2r+1): blur along axis 0 only.
    return cv2.GaussianBlur(eye, (1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


class Backend:
    """Interface: `xp` is the array module; the methods take and return xp arrays."""

    name = "base"
    xp = np

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def resize(self, maps, size: int, interpolation: str = "bilinear"):
        """maps [N, h, w] -> [N, size, size] float32."""
        raise NotImplementedError

    def blur(self, images, sigma: float, radius: int):
        """images [N, 3, S, S] -> Gaussian blurred, reflect-101 borders."""
        raise NotImplementedError

    def eigh(self, gram):
        """Batched symmetric eigendecomposition in float64: gram [B, n, n] -> (w [B, n] ascending, v [B, n, n])."""
        return self.xp.linalg.eigh(gram)

    def synchronize(self) -> None:
        pass


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def resize(self, maps, size: int, interpolation: str = "bilinear"):
        flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[interpolation]
        maps = np.asarray(maps, dtype=np.float32)
        n = maps.shape[0]
        out = np.empty((n, size, size), np.float32)
        step = 128  # OpenCV 5 takes at most 128 channels per call (4.x: 512)
        for i in range(0, n, step):
            chunk = np.ascontiguousarray(maps[i:i + step].transpose(1, 2, 0))  # [h, w, k]
            r = cv2.resize(chunk, (size, size), interpolation=flag)
            out[i:i + step] = (r[:, :, None] if r.ndim == 2 else r).transpose(2, 0, 1)
        return out

    def blur(self, images, sigma: float, radius: int):
        images = np.asarray(images, dtype=np.float32)
        out = np.empty_like(images)
        k = 2 * radius + 1
        for i in range(images.shape[0]):
            hwc = np.ascontiguousarray(images[i].transpose(1, 2, 0))
            b = cv2.GaussianBlur(hwc, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
            out[i] = b.transpose(2, 0, 1)
        return out


class MatrixBackend(Backend):
    """Resize and blur as batched matrix products over any numpy-compatible array module."""

    def __init__(self, xp=np, name: str | None = None):
        self.xp = xp
        self.name = name or f"matrix-{xp.__name__}"
        self._cache: dict = {}

    def _mat(self, key, make):
        m = self._cache.get(key)
        if m is None:
            m = self._cache[key] = self.xp.asarray(make(), dtype=self.xp.float32)
        return m

    def to_host(self, a) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def resize(self, maps, size: int, interpolation: str = "bilinear"):
        maps = self.xp.asarray(maps, dtype=self.xp.float32)
        _, h, w = maps.shape
        rh = self._mat(("r", h, size, interpolation), lambda: resize_matrix(h, size, interpolation))  # [S, h]
        rw = self._mat(("r", w, size, interpolation), lambda: resize_matrix(w, size, interpolation))  # [S, w]
        return rh @ maps @ rw.T

    def blur(self, images, sigma: float, radius: int):
        images = self.xp.asarray(images, dtype=self.xp.float32)
        s_h, s_w = images.shape[-2:]
        kh = self._mat(("b", s_h, sigma, radius), lambda: blur_matrix(s_h, sigma, radius))
        kw = self._mat(("b", s_w, sigma, radius), lambda: blur_matrix(s_w, sigma, radius))
        return kh @ images @ kw.T

    def synchronize(self) -> None:
        if self.xp.__name__ == "cupy":
            self.xp.cuda.get_current_stream().synchronize()


def cupy_backend() -> MatrixBackend:
    try:
        import cupy
    except ImportError as e:
        raise ValueError("the GPU back end needs CuPy: pip install 'decomcam[gpu]'") from e
    return MatrixBackend(cupy, name="cupy")


def get_backend(name: str = "numpy") -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "matrix-numpy":
        return MatrixBackend(np)
    if name == "cupy":
        return cupy_backend()
    raise ValueError(f"unknown array back end '{name}'; valid: numpy, matrix-numpy, cupy")
