"""Engines: short names for ONNX Runtime execution providers, session creation, and the engine probe.

`providers_for(engine)` is the one place where `cpu`, `cuda` and `trt` expand to ORT provider lists (each
ending in CPU), with ORT's own option names. Asking for an engine whose provider this onnxruntime build
lacks is a one-line `EngineError` listing the providers that are available.

Being listed is not being loaded: onnxruntime-gpu lists CUDA and TensorRT even when libcublasLt, cuDNN or
libnvinfer cannot load, and then quietly builds a session on the providers that did load. So
`create_session` preloads the CUDA/cuDNN libraries (`onnxruntime.preload_dlls`) before a GPU session and
checks the created session's `get_providers()`: a session without the requested provider is an
`EngineError`, never a silent CPU (or CUDA-instead-of-TensorRT) run. `probe_engine` is the same check on a
one-node graph, for the tests and benchmarks that must decide whether an engine can run at all.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field

import onnxruntime as ort

ENGINES = ("cpu", "cuda", "trt")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class EngineError(RuntimeError):
    """An engine that this machine cannot run."""


CONV_ALGOS = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


@dataclass
class EngineOptions:
    device_id: int = 0                      # GPU ordinal (cuda, trt)
    fp16: bool = False                      # trt_fp16_enable (trt only; cuda refuses it, see providers_for)
    trt_cache_dir: str | None = None        # engine + timing cache folder (trt); None = <artifacts>/trt-cache
    intra_op_threads: int | None = None     # None = ORT's default (one per physical core)
    allow_spinning: bool = True             # False when sharing the CPU with another runtime (torch)
    # CUDA graphs (cuda only): each input shape is captured once into a graph and replayed, from device
    # buffers the runner keeps per shape (runtime/runner.py); needs a CuPy back end, every node on the CUDA
    # provider and one call at a time per session (the runner serialises them)
    cuda_graph: bool = False
    tf32: bool = True                       # CUDA provider's use_tf32 (its default); parity runs set False. False
                                            # also sets NVIDIA_TF32_OVERRIDE=0 before CUDA starts: the cuDNN
                                            # frontend's convolutions ignore use_tf32
    # NHWC convolutions (the CUDA provider's prefer_nhwc, ORT >= 1.20 with cuDNN 9): None = on for fp16 graphs
    # (the tensor cores' layout), off for fp32
    nhwc: bool | None = None
    # cuDNN's convolution algorithm search: EXHAUSTIVE (measured once per shape: best with the fixed shapes of
    # fixed_chunks, after a warm-up), HEURISTIC (no search: where shapes vary) or DEFAULT; None = EXHAUSTIVE
    # when the calls have fixed shapes (fixed_chunks on), else HEURISTIC
    conv_algo: str | None = None
    max_workspace: bool = True              # cudnn_conv_use_max_workspace: let cuDNN use the faster algorithms
    # Graph calls over more images than the batch size go in chunks of exactly the batch size, the last
    # padded: the graph then sees one input shape per run. None = on for cuda and trt, where ORT's CUDA
    # convolutions re-plan on every change of shape (docs/implementation.md), off for cpu (padding would
    # cost compute for nothing)
    fixed_chunks: bool | None = None
    extra: dict = field(default_factory=dict)  # further ORT provider options, by ORT's names

    def cuda_provider_options(self, precision: str = "fp32") -> dict:
        """The CUDA provider's options for graphs of `precision` (ORT's names); what the benchmarks record."""
        nhwc = self.nhwc if self.nhwc is not None else precision in ("fp16", "fp16-masks")
        fixed = self.fixed_chunks is not False          # None (auto) is on for cuda
        algo = self.conv_algo or ("EXHAUSTIVE" if fixed else "HEURISTIC")
        if algo not in CONV_ALGOS:
            raise EngineError(f"unknown cuDNN algorithm search '{algo}'; valid: {', '.join(CONV_ALGOS)}")
        opts = {"device_id": self.device_id, "use_tf32": int(bool(self.tf32)), "prefer_nhwc": int(bool(nhwc)),
                "cudnn_conv_algo_search": algo, "cudnn_conv_use_max_workspace": int(bool(self.max_workspace))}
        if self.cuda_graph:
            opts["enable_cuda_graph"] = 1
        return {**opts, **self.extra}

    def describe(self, engine: str, precision: str = "fp32") -> dict:
        """Everything that sets how the graphs run, for a benchmark's JSON: the engine's provider options,
        threads, spinning, fixed chunks, CUDA graphs, TF32 and its override."""
        out = {"engine": engine, "precision": precision, "intra_op_threads": self.intra_op_threads,
               "allow_spinning": self.allow_spinning, "fixed_chunks": self.fixed_chunks,
               "cuda_graph": self.cuda_graph}
        if engine in ("cuda", "trt"):
            out["cuda_provider"] = self.cuda_provider_options(precision)
            out["NVIDIA_TF32_OVERRIDE"] = os.environ.get("NVIDIA_TF32_OVERRIDE")
        if engine == "trt":
            out["trt_fp16"] = self.fp16
        return out


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def trt_version() -> str:
    """TensorRT's version as libnvinfer reports it ('10.8.0'), or 'unknown' when it cannot be loaded."""
    try:
        import tensorrt  # noqa: PLC0415 (optional; the pip wheel of TensorRT)

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001 (not installed or broken: ask the library itself)
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            v = int(ctypes.CDLL(name).getInferLibVersion())  # TensorRT 10: major*10000 + minor*100 + patch
        except (OSError, AttributeError):
            continue
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return "unknown"


def trt_cache_path(cache_dir: str) -> str:
    """The engine-cache folder for this ORT and TensorRT: an engine built by other versions is never reused."""
    return os.path.join(cache_dir, f"ort-{ort.__version__}-trt-{trt_version()}")


def trt_profile_options(profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]) -> dict:
    """{input: (min shape, opt shape, max shape)} -> ORT's trt_profile_{min,opt,max}_shapes strings
    ("image:1x3x224x224,text:20x1024"): one TensorRT engine serves every shape in the range."""
    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        out[key] = ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[i])}" for name, shapes in profiles.items())
    return out


def providers_for(engine: str, options: EngineOptions | None = None, profiles: dict | None = None,
                  precision: str = "fp32") -> list:
    """ORT provider list for an engine name; the list always ends with the CPU provider.

    profiles: {input: (min, opt, max) shapes} for TensorRT's optimisation profile (see trt_profile_options).
    precision: the graphs' ("fp16" turns NHWC convolutions on where EngineOptions.nhwc is None)."""
    opts = options or EngineOptions()
    if engine not in ENGINES:
        raise EngineError(f"unknown engine '{engine}'; valid engines: {', '.join(ENGINES)}")
    if opts.cuda_graph and engine != "cuda":
        raise EngineError(f"cuda_graph needs --engine cuda (engine '{engine}' has no CUDA graphs here)")
    if opts.cuda_graph and opts.fixed_chunks is False:
        raise EngineError("cuda_graph needs fixed_chunks (one captured graph per input shape)")
    if opts.fp16 and engine != "trt":
        raise EngineError(f"engine '{engine}' has no fp16 mode of its own: use fp16 graphs "
                          f"(--precision fp16, from an export with --precision fp16) or --engine trt --fp16")
    have = available_providers()
    need = _PROVIDER[engine]
    if need not in have:
        raise EngineError(
            f"engine '{engine}' needs {need}, which this onnxruntime does not have; available providers: {', '.join(have)}"
        )
    cpu = "CPUExecutionProvider"
    if engine == "cpu":
        return [cpu]
    cuda_opts = opts.cuda_provider_options(precision)
    if engine == "cuda":
        return [("CUDAExecutionProvider", cuda_opts), cpu]
    cuda_opts = {k: v for k, v in cuda_opts.items() if k != "enable_cuda_graph" and k not in opts.extra}
    cache = trt_cache_path(opts.trt_cache_dir or "trt-cache")
    trt_opts = {
        "device_id": opts.device_id,
        "trt_fp16_enable": bool(opts.fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        **(trt_profile_options(profiles) if profiles else {}),
        **opts.extra,
    }
    return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", cuda_opts), cpu]


def session_options(options: EngineOptions | None = None) -> ort.SessionOptions:
    opts = options or EngineOptions()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opts.intra_op_threads:
        so.intra_op_num_threads = int(opts.intra_op_threads)
    so.inter_op_num_threads = 1
    if not opts.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


@functools.lru_cache(maxsize=1)
def preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu was built for (from the nvidia-* wheels that
    its [cuda,cudnn] extras install), once, before the first GPU session. A CPU onnxruntime has nothing
    to preload (preload_dlls returns at once); an onnxruntime older than 1.21 lacks the function."""
    fn = getattr(ort, "preload_dlls", None)
    if fn is not None:
        fn()


def check_session(sess, engine: str) -> list[str]:
    """The session's providers; EngineError unless the engine's provider is among them (ORT builds a
    session on whatever providers did load, and only logs a warning for the rest)."""
    got = list(sess.get_providers())
    need = _PROVIDER[engine]
    if need not in got:
        raise EngineError(f"engine '{engine}': {need} failed to load (the session got {', '.join(got)}); "
                          f"see ONNX Runtime's warning above for the missing library")
    return got


def session_on_gpu(sess) -> bool:
    """Whether a session has a GPU provider, i.e. whether device buffers can be bound to it."""
    return any(p in GPU_PROVIDERS for p in sess.get_providers())


def create_session(path, engine: str = "cpu", options: EngineOptions | None = None, profiles: dict | None = None,
                   precision: str = "fp32"):
    """An InferenceSession on `engine`, proven: its providers include the engine's (else EngineError).
    `path` is a file path or the model's bytes."""
    opts = options or EngineOptions()
    providers = providers_for(engine, opts, profiles, precision)
    if engine != "cpu":
        if not opts.tf32:  # before CUDA starts in this process; the cuDNN frontend ignores use_tf32
            os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
        preload_gpu_libraries()
    if engine == "trt":
        os.makedirs(dict(providers[0][1])["trt_engine_cache_path"], exist_ok=True)
    model = path if isinstance(path, bytes) else str(path)
    try:
        sess = ort.InferenceSession(model, session_options(opts), providers=providers)
    except Exception as e:  # noqa: BLE001 (ORT's own exception types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if opts.cuda_graph:  # e.g. "not all nodes are assigned to the CUDA EP" or control flow
            raise EngineError(f"cuda_graph cannot be used with {path if isinstance(path, str) else 'this graph'}: "
                              f"{first}") from None
        raise
    check_session(sess, engine)
    return sess


# ----------------------------------------------------------------------------------------------------
# The probe: one tiny session per engine, the same check as create_session

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload) -> bytes:
    """One protobuf field: an int is a varint (wire type 0), bytes/str are length-delimited (wire type 2)."""
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(num << 3 | 2) + _varint(len(data)) + data


@functools.lru_cache(maxsize=1)
def probe_model() -> bytes:
    """A serialized ONNX model y = Relu(x), x and y float32 [2] (opset 17): enough to create a session on
    any provider without the onnx package (runtime/ does not depend on it)."""
    def value_info(name: str) -> bytes:
        dim = _field(1, _field(1, 2))                           # TensorShapeProto.Dimension dim_value 2
        tensor = _field(1, 1) + _field(2, dim)                  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))   # ValueInfoProto name, type.tensor_type

    node = _field(1, "x") + _field(2, "y") + _field(4, "Relu")
    graph = _field(1, node) + _field(2, "probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(1, "") + _field(2, 17))  # ir_version 8, opset 17


@functools.lru_cache(maxsize=8)
def probe_engine(engine: str, device_id: int = 0) -> str | None:
    """None when `engine` can run here (a session on it is created and its provider is live), else the
    reason, in one line. What the tests' gpu/trt markers and the benchmarks use, so a run that fell back
    to CUDA is never labelled TensorRT and a CPU fallback never labelled CUDA."""
    import tempfile  # noqa: PLC0415

    try:
        opts = EngineOptions(device_id=device_id)
        if engine == "trt":
            opts.trt_cache_dir = os.path.join(tempfile.gettempdir(), "decomcam-probe-trt")
        sess = create_session(probe_model(), engine, opts)
        import numpy as np  # noqa: PLC0415

        y = sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0]
        if y.tolist() != [0.0, 2.0]:
            return f"engine '{engine}': the probe graph computed {y.tolist()}, not [0.0, 2.0]"
    except EngineError as e:
        return str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 (ORT raises its own types for load failures)
        return f"engine '{engine}': session creation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None
