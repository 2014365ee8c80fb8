"""Engines: short names for ONNX Runtime execution providers, and session creation.

`providers_for(engine)` is the one place where `cpu`, `cuda` and `trt` expand to ORT provider lists (each
ending in CPU), with ORT's own option names. Asking for an engine whose provider this onnxruntime build
lacks is a one-line `EngineError` listing the providers that are available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnxruntime as ort

ENGINES = ("cpu", "cuda", "trt")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}


class EngineError(RuntimeError):
    """An engine that this machine cannot run."""


@dataclass
class EngineOptions:
    device_id: int = 0                      # GPU ordinal (cuda, trt)
    fp16: bool = False                      # trt_fp16_enable
    trt_cache_dir: str | None = None        # engine + timing cache folder (trt); None = <artifacts>/trt-cache
    intra_op_threads: int | None = None     # None = ORT's default (one per physical core)
    allow_spinning: bool = True             # False when sharing the CPU with another runtime (torch)
    cuda_graph: bool = False                # enable_cuda_graph (cuda; fixed shapes, IOBinding only)
    extra: dict = field(default_factory=dict)  # further ORT provider options, by ORT's names


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def providers_for(engine: str, options: EngineOptions | None = None) -> list:
    """ORT provider list for an engine name; the list always ends with the CPU provider."""
    opts = options or EngineOptions()
    if engine not in ENGINES:
        raise EngineError(f"unknown engine '{engine}'; valid engines: {', '.join(ENGINES)}")
    have = available_providers()
    need = _PROVIDER[engine]
    if need not in have:
        raise EngineError(
            f"engine '{engine}' needs {need}, which this onnxruntime does not have; available providers: {', '.join(have)}"
        )
    cpu = "CPUExecutionProvider"
    cuda_opts = {"device_id": opts.device_id}
    if opts.cuda_graph:
        cuda_opts["enable_cuda_graph"] = "1"
    if engine == "cpu":
        return [cpu]
    if engine == "cuda":
        return [("CUDAExecutionProvider", {**cuda_opts, **opts.extra}), cpu]
    cache = opts.trt_cache_dir or "trt-cache"
    trt_opts = {
        "device_id": opts.device_id,
        "trt_fp16_enable": bool(opts.fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
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


def create_session(path: str | os.PathLike, engine: str = "cpu", options: EngineOptions | None = None):
    opts = options or EngineOptions()
    providers = providers_for(engine, opts)
    if engine == "trt":
        cache = dict(providers[0][1])["trt_engine_cache_path"]
        os.makedirs(cache, exist_ok=True)
    return ort.InferenceSession(str(path), session_options(opts), providers=providers)
