"""One runner per graph: checks the feed against the graph's declaration, then runs it.

How a graph runs follows the session, not the engine name:

- host back end (numpy): `session.run` on host arrays.
- device back end (CuPy) and a session with a GPU provider: CuPy buffers bound both ways with ORT's
  IOBinding, on the back end's GPU (`cupy.cuda.Device(device_id)`), so inputs and outputs stay there;
  output buffers are allocated per call (CuPy's pool makes that cheap) and handed out as they are.
- device back end and a session without a GPU provider (a CPU onnxruntime on a GPU machine): a host
  round trip, inputs copied to the host and outputs back, each copy logged; this is how the CuPy
  numerics are tested where no onnxruntime-gpu is installed.
- CUDA graphs (EngineOptions.cuda_graph, a GPU session): the batch is padded to the next power of two (at
  most the Explainer's batch size), and per padded input shape the runner keeps device buffers bound once
  and a graph id (ORT's `gpu_graph_id`): the first call of a shape is captured, later ones copy their
  inputs into the same buffers and replay; outputs are copied out of the fixed buffers (the next replay
  overwrites them). Calls on one runner are serialised (a captured graph is one stream's).

`make_runner` creates the session for a graph (with TensorRT optimisation profiles covering batch
1..max_batch and the class count L, so one TensorRT engine serves every batch the runtime sends).
"""

from __future__ import annotations

import numpy as np

import threading

import onnxruntime as ort

from .artifacts import ArtifactsError
from .backend import Backend
from .engines import EngineError, EngineOptions, create_session, session_on_gpu
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


class _Captured:
    """One input shape's CUDA graph: its id, the bound buffers and the binding."""

    def __init__(self, graph_id: int, io, inputs: dict, outputs: dict):
        self.graph_id, self.io, self.inputs, self.outputs = graph_id, io, inputs, outputs
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))


def padded_batch(n: int, cap: int | None) -> int:
    """The batch a CUDA-graph call runs at: the next power of two >= n, at most `cap` (and at least n)."""
    p = 1 << max(0, (int(n) - 1).bit_length())
    return max(int(n), min(p, cap)) if cap else p


class GraphRunner:
    def __init__(self, session, spec: GraphSpec, backend: Backend, dims: dict[str, int], device_id: int = 0,
                 max_batch: int | None = None, cuda_graph: bool = False, graph_batch: int | None = None):
        self.session = session
        self.spec = spec
        self.backend = backend
        self.dims = dims                 # fixed axes of this model (C, h, w, D, H, W)
        self.device_id = device_id
        self.max_batch = max_batch       # the TensorRT profile's largest batch (None: any)
        self.bound = backend.on_device and session_on_gpu(session)     # device buffers bound to the session
        self.round_trip = backend.on_device and not self.bound          # device arrays through a host session
        if cuda_graph and not self.bound:
            raise EngineError(f"{spec.filename}: cuda_graph needs a CuPy back end and a session on the GPU")
        self.cuda_graph = bool(cuda_graph)
        self.graph_batch = graph_batch   # CUDA graphs: the largest padded batch (the Explainer's batch size)
        self._captured: dict[tuple, _Captured] = {}
        self._lock = threading.Lock()

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
        if self.cuda_graph:
            res = self._run_graph(feed, names)
        elif self.bound:
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


    def _run_graph(self, feed: dict, names: list[str]) -> dict:
        """The CUDA-graph path (module docstring): pad to the shape's bucket, copy into its bound buffers,
        replay (the first call of a shape captures), copy the requested outputs out."""
        be, g = self.backend, self.spec.name
        cp = be.module
        first = self.spec.inputs[0].name
        n = feed[first].shape[0]
        b = padded_batch(n, self.graph_batch)
        with self._lock, cp.cuda.Device(self.device_id):
            arrays = {}
            for t in self.spec.inputs:
                arr = be.asarray(feed[t.name], dtype=t.dtype, name=f"{g}.{t.name}")
                if t.axes and t.axes[0] == "batch" and arr.shape[0] < b:
                    arr = be.xp.concatenate([arr, be.xp.zeros((b - arr.shape[0],) + tuple(arr.shape[1:]), arr.dtype)])
                arrays[t.name] = arr
            key = tuple((k, tuple(v.shape)) for k, v in arrays.items())
            cap = self._captured.get(key)
            if cap is None:
                cap = self._captured[key] = self._capture(arrays, len(self._captured))
            for k, v in arrays.items():
                cp.copyto(cap.inputs[k], v)       # in place: the captured graph reads these addresses
            cap.io.synchronize_inputs()
            try:
                self.session.run_with_iobinding(cap.io, cap.run_options)
            except Exception as e:  # noqa: BLE001 (a capture ORT refuses: a node off the CUDA provider, ...)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise EngineError(f"{self.spec.filename}: CUDA graph capture or replay failed ({first}); run "
                                  f"without cuda_graph") from None
            cap.io.synchronize_outputs()
            return {o: cap.outputs[o][:n].copy() for o in names}

    def _capture(self, arrays: dict, graph_id: int) -> _Captured:
        """Bind fixed device buffers for one input shape (every output of the graph bound)."""
        cp = self.backend.module
        io = self.session.io_binding()
        inputs = {k: cp.empty(v.shape, dtype=v.dtype) for k, v in arrays.items()}
        for k, buf in inputs.items():
            io.bind_input(k, "cuda", self.device_id, np.dtype(buf.dtype), list(buf.shape), buf.data.ptr)
        sizes = {**self.dims, "batch": next(iter(arrays.values())).shape[0]}
        if "text" in arrays:
            sizes["L"] = arrays["text"].shape[0]
        outputs = {}
        for t in self.spec.outputs:
            buf = outputs[t.name] = cp.empty(t.shape(sizes), dtype=t.dtype)
            io.bind_output(t.name, "cuda", self.device_id, np.dtype(buf.dtype), list(buf.shape), buf.data.ptr)
        return _Captured(graph_id, io, inputs, outputs)

    @property
    def captured_shapes(self) -> list[tuple]:
        """The input shapes captured so far (CUDA graphs), in capture order."""
        return [k for k, _ in sorted(self._captured.items(), key=lambda kv: kv[1].graph_id)]


def make_runner(artifacts, name: str, engine: str, options: EngineOptions, backend: Backend,
                n_classes: int | None, max_batch: int, precision: str = "fp32") -> GraphRunner:
    """A runner for graph `name` of an artifacts folder, fp32, fp16 or int8 (the fp16 and int8 graphs keep
    fp32 inputs and outputs): its session on `engine` (proven to run there), with TensorRT profiles for batch
    1..max_batch."""
    spec = artifacts.spec(name)   # the family's contract (with or without a text input)
    profiles = profile_shapes(spec, artifacts.dims, max_batch, n_classes) if engine == "trt" else None
    path = artifacts.check_graph(name, precision)
    sess = create_session(path, engine, options, profiles, precision)
    check_session_io(sess, spec, {**artifacts.dims, "H": artifacts.input_size, "W": artifacts.input_size}, path)
    return GraphRunner(sess, spec, backend, artifacts.dims, options.device_id,
                       max_batch=max_batch if engine == "trt" else None, cuda_graph=options.cuda_graph,
                       graph_batch=max_batch)
