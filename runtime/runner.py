"""One runner per graph: checks the feed against the graph's declaration, then runs it.

On the CPU (numpy back end) it calls `session.run`. On the GPU (cupy back end) it binds CuPy buffers
to the session with ORT's IOBinding both ways, so inputs and outputs stay on the device; output buffers
are preallocated per shape and reused.
"""

from __future__ import annotations

import time

import numpy as np

from .backend import Backend
from .spec import DYNAMIC_AXES, GraphSpec


class GraphRunner:
    def __init__(self, session, spec: GraphSpec, backend: Backend, dims: dict[str, int], device_id: int = 0):
        self.session = session
        self.spec = spec
        self.backend = backend
        self.dims = dims                 # fixed axes of this model (C, h, w, D, H, W)
        self.device_id = device_id
        self.on_device = backend.xp.__name__ == "cupy"
        self._outputs: dict = {}         # (name, shape) -> preallocated device buffer
        self.calls = 0
        self.seconds = 0.0

    def _out_shape(self, name: str, feed) -> tuple[int, ...]:
        t = next(o for o in self.spec.outputs if o.name == name)
        sizes = dict(self.dims)
        first = feed[self.spec.inputs[0].name]
        sizes["batch"] = first.shape[0]
        if "text" in feed:
            sizes["L"] = feed["text"].shape[0]
        return t.shape(sizes)

    def run(self, feed: dict, outputs: list[str] | None = None) -> dict:
        names = outputs or self.spec.output_names
        t0 = time.perf_counter()
        if not self.on_device:
            host = {k: np.ascontiguousarray(v) for k, v in feed.items()}
            self.spec.check_feed(host, self.dims)
            res = dict(zip(names, self.session.run(names, host)))
        else:
            res = self._run_bound(feed, names)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return res

    def _run_bound(self, feed: dict, names: list[str]) -> dict:
        cp = self.backend.xp
        io = self.session.io_binding()
        keep = []
        for t in self.spec.inputs:
            arr = cp.ascontiguousarray(cp.asarray(feed[t.name], dtype=t.dtype))
            if arr.ndim != len(t.axes) or any(
                a not in DYNAMIC_AXES and a in self.dims and s != self.dims[a] for s, a in zip(arr.shape, t.axes)
            ):
                raise ValueError(f"{self.spec.filename}: input '{t.name}' has shape {arr.shape}, declared {t.axes}")
            keep.append(arr)
            io.bind_input(t.name, "cuda", self.device_id, np.dtype(t.dtype), list(arr.shape), arr.data.ptr)
        res = {}
        for name in names:
            shape = self._out_shape(name, feed)
            key = (name, shape)
            buf = self._outputs.get(key)
            if buf is None:
                dtype = next(o.dtype for o in self.spec.outputs if o.name == name)
                buf = self._outputs[key] = cp.empty(shape, dtype=dtype)
            io.bind_output(name, "cuda", self.device_id, buf.dtype, list(shape), buf.data.ptr)
            res[name] = buf
        io.synchronize_inputs()
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        # the buffers are reused by the next call with the same shape: hand out copies on the device
        return {k: v.copy() for k, v in res.items()}
