"""One runner per graph: checks the feed against the graph's declaration, then runs it.

How a graph runs follows the session, not the engine name:

- host back end (numpy): `session.run` on host arrays.
- device back end (CuPy) and a session with a GPU provider: CuPy buffers bound both ways with ORT's
  IOBinding, on the back end's GPU (`cupy.cuda.Device(device_id)`), so inputs and outputs stay there;
  output buffers are allocated per call (CuPy's pool makes that cheap) and handed out as they are.
- device back end and a session without a GPU provider (a CPU onnxruntime on a GPU machine): a host
  round trip, inputs copied to the host and outputs back, each copy logged; this is how the CuPy
  numerics are tested where no onnxruntime-gpu is installed.

`make_runner` creates the session for a graph (with TensorRT optimisation profiles covering batch
1..max_batch and the class count L, so one TensorRT engine serves every batch the runtime sends).
"""

from __future__ import annotations

import numpy as np

from .artifacts import ArtifactsError
from .backend import Backend
from .engines import EngineOptions, create_session, session_on_gpu
from .spec import DYNAMIC_AXES, MANIFEST_NAME, GraphSpec

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(double)": "float64", "tensor(int32)": "int32"}


def check_session_io(session, spec: GraphSpec, dims: dict[str, int], path) -> None:
    """The graph's own declared inputs and outputs against the contract and the manifest's dims (H, W, C, h,
    w, K, D): an ArtifactsError naming the graph, the tensor and both values when they differ (a graph
    swapped for another with its checksum updated, a manifest whose dims or input size were changed)."""
    def compare(kind: str, got: dict, want) -> None:
        for t in want:
            if t.name not in got:
                raise ArtifactsError(f"{path}: has no {kind} '{t.name}' (it has {', '.join(sorted(got))}); the graph "
                                     f"does not match {MANIFEST_NAME}")
            node = got[t.name]
            dtype = _ORT_TYPES.get(node.type, node.type)
            if dtype != t.dtype:
                raise ArtifactsError(f"{path}: {kind} '{t.name}' is {dtype}, the contract says {t.dtype}")
            shape = list(node.shape)
            if len(shape) != len(t.axes):
                raise ArtifactsError(f"{path}: {kind} '{t.name}' has {len(shape)} axes, the contract "
                                     f"{len(t.axes)} {tuple(t.axes)}")
            for size, axis in zip(shape, t.axes):
                want_size = int(axis) if axis.isdigit() else dims.get(axis) if axis not in DYNAMIC_AXES else None
                if isinstance(size, int) and want_size is not None and size != want_size:
                    raise ArtifactsError(f"{path}: {kind} '{t.name}' axis {axis} is {size} in the graph and "
                                         f"{want_size} in {MANIFEST_NAME}; the graph does not match its manifest")

    ins = {i.name: i for i in session.get_inputs()}
    extra = sorted(set(ins) - set(spec.input_names))
    if extra:
        raise ArtifactsError(f"{path}: unexpected input(s) {', '.join(extra)}; the graph does not match {MANIFEST_NAME}")
    compare("input", ins, spec.inputs)
    compare("output", {o.name: o for o in session.get_outputs()}, spec.outputs)


def profile_shapes(spec: GraphSpec, dims: dict[str, int], max_batch: int, n_classes: int | None) -> dict:
    """{input: (min, opt, max) shape} for a TensorRT optimisation profile: batch 1..max_batch (optimised for
    max_batch), L fixed at n_classes, the other axes the model's."""
    def shape(t, batch):
        sizes = {**dims, "batch": batch, "L": n_classes}
        return tuple(int(a) if a.isdigit() else int(sizes[a]) for a in t.axes)

    return {t.name: (shape(t, 1), shape(t, max_batch), shape(t, max_batch)) for t in spec.inputs}


class GraphRunner:
    def __init__(self, session, spec: GraphSpec, backend: Backend, dims: dict[str, int], device_id: int = 0,
                 max_batch: int | None = None):
        self.session = session
        self.spec = spec
        self.backend = backend
        self.dims = dims                 # fixed axes of this model (C, h, w, D, H, W)
        self.device_id = device_id
        self.max_batch = max_batch       # the TensorRT profile's largest batch (None: any)
        self.bound = backend.on_device and session_on_gpu(session)     # device buffers bound to the session
        self.round_trip = backend.on_device and not self.bound          # device arrays through a host session

    def _out_shape(self, name: str, feed) -> tuple[int, ...]:
        t = next(o for o in self.spec.outputs if o.name == name)
        sizes = dict(self.dims)
        first = feed[self.spec.inputs[0].name]
        sizes["batch"] = first.shape[0]
        if "text" in feed:
            sizes["L"] = feed["text"].shape[0]
        return t.shape(sizes)

    def _check_batch(self, feed: dict) -> None:
        b = feed[self.spec.inputs[0].name].shape[0]
        if self.max_batch is not None and b > self.max_batch:
            raise ValueError(f"{self.spec.filename}: batch {b} exceeds the TensorRT profile's {self.max_batch} "
                             f"(the Explainer's batch_size); explain fewer images per call")

    def run(self, feed: dict, outputs: list[str] | None = None) -> dict:
        names = outputs or self.spec.output_names
        self._check_batch(feed)
        if self.bound:
            res = self._run_bound(feed, names)
        else:
            be, g = self.backend, self.spec.name
            host = {k: np.ascontiguousarray(be.to_host(v, name=f"{g}.{k}")) for k, v in feed.items()}
            self.spec.check_feed(host, self.dims)
            res = dict(zip(names, self.session.run(names, host)))
            if self.round_trip:
                res = {k: be.asarray(v, name=f"{g}.{k}") for k, v in res.items()}
        return res

    def _run_bound(self, feed: dict, names: list[str]) -> dict:
        be, g = self.backend, self.spec.name
        cp = be.module
        with cp.cuda.Device(self.device_id):
            io = self.session.io_binding()
            keep = []
            for t in self.spec.inputs:
                arr = be.asarray(feed[t.name], dtype=t.dtype, name=f"{g}.{t.name}")
                dev = getattr(getattr(arr, "device", None), "id", self.device_id)
                if dev != self.device_id:  # allocated on another GPU: a peer copy onto the session's
                    arr = arr.copy()
                arr = cp.ascontiguousarray(arr)
                if arr.ndim != len(t.axes) or any(
                    a not in DYNAMIC_AXES and a in self.dims and s != self.dims[a] for s, a in zip(arr.shape, t.axes)
                ):
                    raise ValueError(f"{self.spec.filename}: input '{t.name}' has shape {arr.shape}, declared {t.axes}")
                keep.append(arr)
                io.bind_input(t.name, "cuda", self.device_id, np.dtype(t.dtype), list(arr.shape), arr.data.ptr)
            res = {}
            for name in names:
                shape = self._out_shape(name, feed)
                dtype = next(o.dtype for o in self.spec.outputs if o.name == name)
                buf = res[name] = cp.empty(shape, dtype=dtype)   # fresh per call: handed out without a copy
                io.bind_output(name, "cuda", self.device_id, buf.dtype, list(shape), buf.data.ptr)
            io.synchronize_inputs()
            self.session.run_with_iobinding(io)
            io.synchronize_outputs()
        return res


def make_runner(artifacts, name: str, engine: str, options: EngineOptions, backend: Backend,
                n_classes: int | None, max_batch: int, precision: str = "fp32") -> GraphRunner:
    """A runner for graph `name` of an artifacts folder, fp32, fp16 or int8 (the fp16 and int8 graphs keep
    fp32 inputs and outputs): its session on `engine` (proven to run there), with TensorRT profiles for batch
    1..max_batch."""
    spec = artifacts.spec(name)   # the family's contract (with or without a text input)
    profiles = profile_shapes(spec, artifacts.dims, max_batch, n_classes) if engine == "trt" else None
    path = artifacts.check_graph(name, precision)
    sess = create_session(path, engine, options, profiles)
    check_session_io(sess, spec, {**artifacts.dims, "H": artifacts.input_size, "W": artifacts.input_size}, path)
    return GraphRunner(sess, spec, backend, artifacts.dims, options.device_id,
                       max_batch=max_batch if engine == "trt" else None)
