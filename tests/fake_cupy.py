"""A numpy stand-in for CuPy, for testing device-side logic on a CPU machine.

`FakeCupy()` is a module-like object: device arrays are `DeviceArray`, a numpy subclass with CuPy's
`.get()`, `.data.ptr` and `.device.id`; functions are numpy's, returning DeviceArrays. Like CuPy it refuses
host (numpy) arrays in its functions and ufuncs, except in the constructors `asarray`, `array` and
`ascontiguousarray` (the host->device copies), so a host array reaching device code fails here as it would
on a GPU. It records the devices entered (`cuda.Device(i)`), and stream synchronisations.
"""

from __future__ import annotations

import types

import numpy as np


class _Mem:
    def __init__(self, ptr: int):
        self.ptr = ptr


class _Dev:
    def __init__(self, i: int):
        self.id = i


def _is_host(x) -> bool:
    return isinstance(x, np.ndarray) and not isinstance(x, DeviceArray)


def _to_dev(x, device: int):
    if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray):
        d = x.view(DeviceArray)
        d._device = device
        return d
    if isinstance(x, tuple):
        return tuple(_to_dev(v, device) for v in x)
    if isinstance(x, list):
        return [_to_dev(v, device) for v in x]
    return x


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, DeviceArray) else x


class DeviceArray(np.ndarray):
    _device = 0

    def __array_finalize__(self, obj):
        self._device = getattr(obj, "_device", 0)

    def get(self) -> np.ndarray:
        return np.array(self.view(np.ndarray))

    @property
    def data(self):  # CuPy's MemoryPointer
        return _Mem(self.ctypes.data)

    @property
    def device(self):
        return _Dev(self._device)

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        outs = kw.get("out", ())
        for x in inputs + tuple(outs):
            if _is_host(x):
                raise TypeError(f"fake cupy: host array (shape {x.shape}) passed to ufunc {ufunc.__name__}")
        args = [_plain(x) for x in inputs]
        if outs:
            kw["out"] = tuple(_plain(o) for o in outs)
        res = getattr(ufunc, method)(*args, **kw)
        return _to_dev(res, self._device)


class _Stream:
    def __init__(self, owner):
        self.owner = owner

    def synchronize(self):
        self.owner.synchronized += 1


class FakeCupy(types.ModuleType):
    """The stand-in module. `entered`: device ids entered with cuda.Device; `current`: the current device."""

    _UPLOADS = ("asarray", "array", "ascontiguousarray")

    def __init__(self, version: str = "14.2.0"):
        super().__init__("fakecupy")
        self.__version__ = version       # the CuPy it stands in for
        self.ndarray = DeviceArray
        self.entered: list[int] = []
        self.current = 0
        self.synchronized = 0
        fake = self

        class Device:
            def __init__(self, i=0):
                self.id = int(i)

            def __enter__(self):
                self._prev = fake.current
                fake.current = self.id
                fake.entered.append(self.id)
                return self

            def __exit__(self, *exc):
                fake.current = self._prev

            def use(self):
                fake.current = self.id

        self.cuda = types.SimpleNamespace(Device=Device, get_current_stream=lambda: _Stream(fake))
        self.linalg = types.SimpleNamespace(eigh=self._wrap(np.linalg.eigh, "linalg.eigh"),
                                            norm=self._wrap(np.linalg.norm, "linalg.norm"))

    def asnumpy(self, a):
        return a.get() if isinstance(a, DeviceArray) else np.asarray(a)

    def _wrap(self, fn, name: str, upload: bool = False):
        def call(*args, **kw):
            if not upload:
                for x in list(args) + list(kw.values()):
                    items = x if isinstance(x, (list, tuple)) else (x,)
                    if any(_is_host(v) for v in items):
                        raise TypeError(f"fake cupy: host array passed to {name}")
            args = [[_plain(v) for v in x] if isinstance(x, list) else _plain(x) for x in args]
            kw = {k: _plain(v) for k, v in kw.items()}
            return _to_dev(fn(*args, **kw), self.current)

        return call

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return self._wrap(attr, name, upload=name in self._UPLOADS)
        return attr  # dtypes (float32, ...) and constants
