"""Array back ends: where the numerics run, next to the data.

One algorithm (runtime/decomcam.py) is written over `Backend.xp` (numpy or cupy) plus the few image
operations below. Two implementations of the image operations:

- `NumpyBackend`: numpy + OpenCV (cv2.resize, cv2.GaussianBlur), the CPU path.
- `MatrixBackend(xp)`: resize and blur as matrix products, R_h X R_w^T, with the operator matrices taken
  from OpenCV once per shape (both operations are linear and separable, so the matrices reproduce OpenCV
  exactly up to float rounding). With xp = cupy this is the GPU path (cuBLAS batched matmul); with
  xp = numpy it runs here, which is how the GPU formulation is tested on a CPU machine.

On a device back end every host<->device copy is recorded in `Backend.transfers` (a `TransferLog`: name,
bytes, direction): the explicit ones (`asarray`, `to_host`, the runner's graph inputs and outputs) by
name, and any `xp.asarray(host array)` a method makes through `backend.xp` under its caller's name, since
`xp` is then a `CountingModule` around CuPy (`backend.module` is CuPy itself).

The small batched eigendecomposition (`eigh`, [B, n, n] with n = h*w = 49 for RN50 at 224 px, 81..196 for
larger inputs) runs on the device (CuPy -> cuSOLVER syevjBatched), faster than the host path with its copies
(docs/implementation.md); with a CuPy older than 14 it goes through the host. The component signs are fixed
after the eigh (decomcam.py), so the two paths give the same components.
"""

from __future__ import annotations

import functools
import sys

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


class TransferLog:
    """Host<->device copies since the last `take()`: [{"name", "bytes", "direction": "h2d" | "d2h"}]."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, name: str, nbytes: int, direction: str) -> None:
        self.records.append({"name": name, "bytes": int(nbytes), "direction": direction})

    def take(self) -> list[dict]:
        out, self.records = self.records, []
        return out

    @staticmethod
    def totals(records: list[dict]) -> dict:
        """{"h2d": {"count", "bytes"}, "d2h": {...}} over a list of records."""
        out = {d: {"count": 0, "bytes": 0} for d in ("h2d", "d2h")}
        for r in records:
            out[r["direction"]]["count"] += 1
            out[r["direction"]]["bytes"] += r["bytes"]
        return out


def _caller(depth: int = 2) -> str:
    """'module.function' of the code that called the caller (the name of an unnamed transfer)."""
    f = sys._getframe(depth)
    return f"{f.f_globals.get('__name__', '?').rsplit('.', 1)[-1]}.{f.f_code.co_name}"


class CountingModule:
    """A device array module (CuPy) whose host->device constructors record each copy in a TransferLog;
    every other attribute is the module's own."""

    _UPLOADS = ("asarray", "array", "ascontiguousarray")

    def __init__(self, module, log: TransferLog):
        self._module, self._log = module, log

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name not in self._UPLOADS:
            return attr

        def upload(a, *args, **kw):
            out = attr(a, *args, **kw)
            if not isinstance(a, self._module.ndarray):
                self._log.add(_caller(), out.nbytes, "h2d")
            return out

        return upload


class Backend:
    """Interface: `xp` is the array module; the methods take and return xp arrays. `on_device`: the
    arrays live on a GPU (then host<->device copies are logged in `transfers`)."""

    name = "base"
    xp = np
    on_device = False
    device_id = 0

    @property
    def transfers(self) -> TransferLog:
        log = self.__dict__.get("_transfers")
        if log is None:
            log = self.__dict__["_transfers"] = TransferLog()
        return log

    @property
    def module(self):
        """The array module itself (CuPy, not the counting wrapper)."""
        return getattr(self.xp, "_module", self.xp)

    def is_device_array(self, a) -> bool:
        return self.on_device and isinstance(a, self.module.ndarray)

    def asarray(self, a, dtype=None, name: str | None = None):
        """To this back end's device; a host array crossing is logged under `name` (else the caller's)."""
        out = self.module.asarray(a, dtype=dtype)
        if self.on_device and not self.is_device_array(a):
            self.transfers.add(name or _caller(), out.nbytes, "h2d")
        return out

    def to_host(self, a, name: str | None = None) -> np.ndarray:
        """To a numpy array; a device array crossing is logged under `name` (else the caller's)."""
        if not self.is_device_array(a):
            return np.asarray(a)
        out = a.get()
        self.transfers.add(name or _caller(), out.nbytes, "d2h")
        return out

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


DEVICE_EIGH_MIN_CUPY = 14   # the CuPy major version whose batched eigh was measured right (benchmarks/gpu/)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


class MatrixBackend(Backend):
    """Resize and blur as batched matrix products over any numpy-compatible array module."""

    def __init__(self, xp=np, name: str | None = None, device_id: int = 0):
        self.on_device = xp is not np
        # the small batched eigh on the device (see the module docstring), with the CuPy measured there
        # (14) or later; an older CuPy sends it through the host
        self._device_eigh = _major(getattr(xp, "__version__", "0")) >= DEVICE_EIGH_MIN_CUPY
        self.device_id = int(device_id)
        self.xp = CountingModule(xp, self.transfers) if self.on_device else xp
        self.name = name or f"matrix-{xp.__name__}"
        self.cache: dict = {}   # operators (resize, blur, preprocessing) on the device, per shape

    def _mat(self, key, make):
        m = self.cache.get(key)
        if m is None:
            m = self.cache[key] = self.asarray(make(), dtype=np.float32, name=f"operator {key[0]}{key[1:3]}")
        return m

    def eigh(self, gram):
        if not self.on_device or self._device_eigh:
            return self.xp.linalg.eigh(gram)
        w, v = np.linalg.eigh(self.to_host(gram, name="eigh.gram"))
        return self.asarray(w, name="eigh.eigenvalues"), self.asarray(v, name="eigh.eigenvectors")

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
        if self.on_device:
            self.module.cuda.get_current_stream().synchronize()


def cupy_backend(device_id: int = 0) -> MatrixBackend:
    try:
        import cupy
    except ImportError as e:
        raise ValueError("the GPU back end needs CuPy: pip install 'decomcam[cuda]' (CUDA 13) "
                         "or 'decomcam[cuda12]'") from e
    cupy.cuda.Device(int(device_id)).use()  # arrays the methods allocate land on the session's GPU
    return MatrixBackend(cupy, name="cupy", device_id=device_id)


def get_backend(name: str = "numpy", device_id: int = 0) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "matrix-numpy":
        return MatrixBackend(np)
    if name == "cupy":
        return cupy_backend(device_id)
    raise ValueError(f"unknown array back end '{name}'; valid: numpy, matrix-numpy, cupy")
