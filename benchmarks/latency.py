"""Latency and throughput of the explanation, each engine against the eager PyTorch reference.

Latency (default): every engine in one process, interleaved after warm-up (engine A rep i, engine B rep i,
...), per stage and end to end:

    python -m benchmarks.latency --artifacts DIR --engines torch,cpu[,cuda,trt,torch-fp16,trt-fp16]
        --batch 1,8 --top-p 10 [--methods decomcam,...] [--repeat N] [--warmup N] [--threads N] --json FILE

Throughput (--folder): N images in a folder (generated 320 x 240 photo-like JPEGs where the folder has too
few) explained end to end through the CLI's own code path (`runtime.explain.main`, in process, --quiet,
outputs written to a temporary folder), with host memory sampled in the background:

    python -m benchmarks.latency --artifacts DIR --folder DIR [--n 100,1000] [--engines cpu,cpu-int8]
        [--modes serial,pipeline,ray-1,ray-2] --json FILE

Modes: `pipeline` is the CLI as shipped (the next group decoded and the previous one written in worker
threads while the graphs run), `serial` the same with --no-pipeline, `ray-K` runtime.dataset with K actors.

Engines:
    torch        the eager reference export.reference.decomcam_reference on the export's own torch model:
                 fp32, autograd for the gradient, no_grad for the masked forwards, which are batched like the
                 runtime's (--classify-batch); decomcam-ig: autograd through the unmodified head at each
                 alpha_k A. On the GPU when a GPU engine is asked for (--torch-device).
    torch-fp16   the same under torch.autocast(float16) on the GPU.
    cpu, cuda    ONNX Runtime through runtime.explainer.Explainer (the library path), fp32 graphs.
    cuda-fp16    the cuda engine on the export's fp16 graphs (python -m export --precision fp16).
    cuda-fp16m   the cuda engine at precision fp16-masks: fp16 classify graph (the masked forwards), fp32
                 explain graph (activations and gradients).
    cpu-int8     the cpu engine on the export's int8 graphs (python -m export quantize).
    trt          ONNX Runtime's TensorRT provider, fp32; trt-fp16 with trt_fp16_enable.
A GPU engine runs only when runtime.engines.probe_engine proves its provider loads, and its sessions are
checked again when created (a TensorRT request that fell back to CUDA is skipped, never labelled trt); an
engine this machine cannot run is skipped with its reason (in the table and the JSON). Each row records
the session's providers and the host<->device copies of one explanation call (`transfers`).

Fairness: torch and ORT get the same number of threads (torch.set_num_threads(n), intra_op_num_threads=n,
default n = os.cpu_count()); ORT's worker threads do not spin while torch shares the process
(session.intra_op.allow_spinning = 0); both preprocess with runtime.images and explain the top-1 class of
one forward pass; GPU timers are synchronised (torch.cuda.synchronize, Backend.synchronize).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from . import common

TORCH_ENGINES = ("torch", "torch-fp16")
ORT_ENGINES = ("cpu", "cpu-int8", "cuda", "cuda-fp16", "cuda-fp16m", "trt", "trt-fp16")
ENGINES = TORCH_ENGINES + ORT_ENGINES
# the Decom-CAM methods the eager reference runs (export/reference.py)
TORCH_METHODS_DECOMCAM = ("decomcam", "decomcam-authors", "decomcam-ig")
# stage columns of the table, in pipeline order ("masks": the perturbation baselines' modified inputs)
STAGES = ("preprocess", "explain", "head_grad", "decompose", "weights", "upsample", "blur", "blend", "masks",
          "classify", "head", "integrate", "postprocess")


class Skip(Exception):
    """An engine or method this run cannot measure; the message is the reason."""


# ----------------------------------------------------------------------------------------------------
# Engines: one interface, `run(rgbs, method) -> (stage seconds, saliency)`, synchronised on return

@dataclass
class Engine:
    name: str
    precision: str = "fp32"
    device: str = "cpu"
    provider: str = ""
    rss_label: str = ""
    device_peak: list = field(default_factory=list)
    providers: list = field(default_factory=list)      # the session's, as ORT reports them
    transfers: list = field(default_factory=list)      # host<->device copies of the last call

    def run(self, rgbs: list[np.ndarray], method: str) -> tuple[dict, np.ndarray]:
        raise NotImplementedError

    def check_method(self, method: str) -> None:
        pass

    def device_memory(self) -> float | None:
        return None


# ORT engine options a name may carry after a colon, "cuda-fp16:nhwc=0:graph=1" (runtime.engines.EngineOptions)
ENGINE_OPTIONS = {"nhwc": "nhwc", "graph": "cuda_graph", "algo": "conv_algo", "tf32": "tf32", "devimg": "device_images"}


def engine_options_of(name: str) -> tuple[str, dict]:
    """'cuda-fp16:nhwc=0:graph=1' -> ('cuda-fp16', {'nhwc': False, 'cuda_graph': True}); unknown keys refused."""
    base, *opts = name.split(":")
    out: dict = {}
    for o in opts:
        key, sep, val = o.partition("=")
        if not sep or key not in ENGINE_OPTIONS:
            raise SystemExit(f"error: engine '{name}': option '{o}' is not key=value with a key among "
                             f"{', '.join(ENGINE_OPTIONS)}")
        out[ENGINE_OPTIONS[key]] = val.upper() if key == "algo" else val not in ("0", "false", "off")
    return base, out


class OrtEngine(Engine):
    def __init__(self, name: str, artifacts: str, args, shares_with_torch: bool):
        from runtime.engines import EngineError, EngineOptions, probe_engine
        from runtime.explainer import Explainer

        base, extra = engine_options_of(name)
        engine = base.split("-")[0]
        fp16 = base.endswith("-fp16")
        int8 = base.endswith("-int8")
        reason = probe_engine(engine, args.device_id) if engine != "cpu" else None
        if reason:
            raise Skip(reason)
        device_images = extra.pop("device_images", None)
        opts = EngineOptions(device_id=args.device_id, fp16=fp16 and engine == "trt", intra_op_threads=args.threads,
                             allow_spinning=not shares_with_torch, **extra)
        kw = ({"precision": "fp16"} if fp16 and engine == "cuda" else {"precision": "int8"} if int8 else
              {"precision": "fp16-masks"} if base == "cuda-fp16m" else {})
        try:
            self.ex = Explainer.from_artifacts(artifacts, engine=engine, engine_options=opts,
                                               batch_size=args.classify_batch, class_set=args.classes,
                                               device_images=device_images, cuda_graph=opts.cuda_graph, **kw)
            for g in ("explain", "classify"):
                self.ex.runner(g)  # the sessions now, each checked for its provider (create_session)
        except (EngineError, ValueError, RuntimeError, TypeError) as e:
            raise Skip(str(e).splitlines()[0]) from e
        providers = self.ex.runner("classify").session.get_providers()
        precision = ("int8" if int8 else "fp16-masks" if base == "cuda-fp16m" else "fp16-graphs" if kw else
                     "fp16-trt" if fp16 else "fp32")
        super().__init__(name, precision, "cpu" if engine == "cpu" else "cuda", providers[0])
        self.providers = providers
        self.engine_options = {**opts.describe(engine, kw.get("precision", "fp32")),
                               "device_images": self.ex.device_images}
        self.top_p = args.top_p

    def check_method(self, method: str) -> None:
        from runtime.methods import list_methods

        if method not in list_methods():
            raise Skip(f"unknown method '{method}'; valid: {', '.join(list_methods())}")

    def run(self, rgbs, method):
        # the saliency maps and the numbers come to the host, as from the eager reference; the component
        # maps stay where they were computed (the CLI, which draws them, brings them down)
        res = self.ex.explain_arrays(rgbs, target=None, top_p=self.top_p, method=method, components=False)
        self.ex.backend.synchronize()
        self.transfers = res[0].transfers if res else []
        timings: dict[str, float] = {}
        for e in res:  # each Explanation holds its share of the batch's stages
            for k, v in e.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        return timings, np.stack([e.saliency for e in res])

    def device_memory(self):
        return common.device_memory_mb(self.ex.options.device_id) if self.device == "cuda" else None


class TorchEngine(Engine):
    def __init__(self, name: str, lm, artifacts, args, device: str):
        import torch

        fp16 = name == "torch-fp16"
        if fp16 and not torch.cuda.is_available():
            raise Skip("torch-fp16 is autocast float16 on a CUDA GPU; torch sees no GPU here")
        if device == "cuda" and not torch.cuda.is_available():
            raise Skip("--torch-device cuda: torch sees no GPU here")
        dev = "cuda" if fp16 else device
        super().__init__(name, "fp16-autocast" if fp16 else "fp32", dev, f"torch {torch.__version__} eager ({dev})")
        self.torch = torch
        # the model stays where it was loaded (CPU); a GPU engine gets its own copy, so torch (CPU) and
        # torch-fp16 (GPU) can run side by side
        self.model = (lm.model if dev == "cpu" else copy.deepcopy(lm.model).to(dev)).eval()
        cs = artifacts.load_class_set(args.classes)
        self.text = None if cs.embeddings is None else torch.from_numpy(cs.embeddings).to(dev)  # None: fixed classes
        self.mean, self.std, self.size = artifacts.mean, artifacts.std, artifacts.input_size
        self.artifacts = artifacts
        self.top_p = args.top_p
        self.batch_size = args.classify_batch
        self.fp16 = fp16

    def check_method(self, method: str) -> None:
        from export.baselines_reference import REFERENCES

        if method not in TORCH_METHODS_DECOMCAM and method not in REFERENCES:
            raise Skip(f"no eager reference for '{method}' (have: "
                       f"{', '.join([*TORCH_METHODS_DECOMCAM, *REFERENCES])})")

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, rgbs, method):
        from export.reference import decomcam_reference
        from runtime.config import DecomCamConfig

        torch = self.torch
        timings: dict[str, float] = {}
        t = time.perf_counter()
        x = self.artifacts.preprocess_images(rgbs)[0]   # the runtime's own preprocessing, as the ORT engines
        xt = torch.from_numpy(x).to(self.device)
        self._sync()
        timings["preprocess"] = time.perf_counter() - t
        amp = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()
        with amp:
            if method in TORCH_METHODS_DECOMCAM:
                cfg = DecomCamConfig(top_p=self.top_p)
                res = decomcam_reference(self.model, xt, self.text, self.mean, self.std, target=None, config=cfg,
                                         method=method,
                                         batch_size=self.batch_size, timings=timings)
                sal = res.saliency
            else:  # a CAM baseline: one autograd pass for the top-1 class (as explain.onnx), then the method
                from export.baselines_reference import cam_reference
                from export.graphs import autograd_reference

                t = time.perf_counter()
                want = torch.full((len(rgbs),), -1, dtype=torch.long, device=self.device)
                grads = autograd_reference(self.model, xt, self.text, want)
                target = grads[0].argmax(1)
                self._sync()
                timings["explain"] = time.perf_counter() - t
                t = time.perf_counter()
                sal = cam_reference(method, self.model, xt, self.text, self.mean, self.std, target=target,
                                    config=DecomCamConfig(top_p=self.top_p), batch_size=self.batch_size,
                                    grads=grads)
                self._sync()
                timings["method"] = time.perf_counter() - t
        return timings, sal

    def device_memory(self):
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / common.MB

    def reset_device_peak(self):
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------
# Latency mode

def transfer_totals(records: list) -> dict:
    from runtime.backend import TransferLog

    return TransferLog.totals(records)


def parse_list(text: str, kind=str) -> list:
    return [kind(v.strip()) for v in str(text).split(",") if v.strip()]


def build_engines(names: list[str], args, artifacts) -> tuple[list[Engine], list[dict]]:
    """Engines in the order asked for, and [{engine, reason}] for those skipped."""
    engines, skipped = [], []
    wants_torch = any(n in TORCH_ENGINES for n in names)
    lm = None
    if wants_torch:
        import torch

        torch.set_num_threads(args.threads)
        try:
            lm = common.load_torch_model(artifacts.manifest, args.pretrained)
        except Exception as e:  # no weights for the eager reference: skip the torch engines, say why
            skipped += [{"engine": n, "reason": f"cannot load the torch model: {e}"} for n in names if n in TORCH_ENGINES]
            names = [n for n in names if n not in TORCH_ENGINES]
        else:
            try:
                common.check_same_model(artifacts, lm, seed=args.seed)
            except common.ModelMismatch as e:
                raise SystemExit(f"error: {e}") from None
        device = args.torch_device
        if device == "auto":
            gpu_asked = any(n.split(":")[0] in ("cuda", "cuda-fp16", "cuda-fp16m", "trt", "trt-fp16", "torch-fp16")
                            for n in names)
            device = "cuda" if gpu_asked and torch.cuda.is_available() else "cpu"
    for n in names:
        try:
            if n in TORCH_ENGINES:
                eng = TorchEngine(n, lm, artifacts, args, device)
            elif n.split(":")[0] in ORT_ENGINES:
                eng = OrtEngine(n, args.artifacts, args, shares_with_torch=wants_torch)
            else:
                raise Skip(f"unknown engine '{n}'; valid engines: {', '.join(ENGINES)}")
        except Skip as e:
            skipped.append({"engine": n, "reason": str(e)})
            continue
        eng.rss_label = n
        engines.append(eng)
    return engines, skipped


def run_latency(args) -> dict:
    from runtime.artifacts import load_artifacts

    artifacts = load_artifacts(args.artifacts)
    names = parse_list(args.engines)
    batches = parse_list(args.batch, int)
    methods = parse_list(args.methods)
    sampler = common.RssSampler()
    results, skipped = [], []
    with sampler:
        engines, skipped = build_engines(names, args, artifacts)
        if not engines:
            raise SystemExit("no engine could run: " + "; ".join(f"{s['engine']}: {s['reason']}" for s in skipped))
        for method in methods:
            active = []
            for eng in engines:
                try:
                    eng.check_method(method)
                    active.append(eng)
                except Skip as e:
                    skipped.append({"engine": eng.name, "method": method, "reason": str(e)})
            for b in batches:
                rgbs = common.photo_like_batch(b, seed=args.seed)
                runs: dict[str, list] = {e.name: [] for e in active}
                totals: dict[str, list] = {e.name: [] for e in active}
                cpu: dict[str, list] = {e.name: [] for e in active}        # process CPU seconds (all threads)
                for eng in active:
                    eng.device_peak = []
                for eng in active:  # warm-up: sessions, arenas, caches, lazy initialisation
                    with sampler.segment(eng.rss_label):
                        if hasattr(eng, "reset_device_peak"):
                            eng.reset_device_peak()
                        for _ in range(args.warmup):
                            eng.run(rgbs, method)
                for rep in range(args.repeat):
                    for eng in active:  # interleaved: drift and neighbours hit every engine alike
                        with sampler.segment(eng.rss_label):  # sampled at start and end: never empty
                            c, t = time.process_time(), time.perf_counter()
                            timings, _ = eng.run(rgbs, method)
                            totals[eng.name].append(time.perf_counter() - t)
                            cpu[eng.name].append(time.process_time() - c)
                        runs[eng.name].append(timings)
                        dm = eng.device_memory()
                        if dm is not None:
                            eng.device_peak.append(dm)
                    log(f"{method} batch {b}: rep {rep + 1}/{args.repeat} "
                        + "  ".join(f"{e.name} {totals[e.name][-1] * 1e3:.0f} ms" for e in active))
                sampler.label = None
                flops = method_flops(artifacts, method, args.top_p)   # per image, the fp32 graphs' count
                ref = next((e for e in active if e.name == "torch"), None)
                ref_p50 = common.stats_ms(totals[ref.name])["p50"] if ref else None
                ref_mean = common.stats_ms(totals[ref.name])["mean"] if ref else None
                for eng in active:
                    e2e = common.stats_ms(totals[eng.name])
                    results.append({
                        "method": method, "batch": b, "engine": eng.name, "precision": eng.precision,
                        "device": eng.device, "provider": eng.provider, "providers": eng.providers,
                        "engine_options": getattr(eng, "engine_options", None),
                        "transfers": {"totals": transfer_totals(eng.transfers), "copies": eng.transfers},
                        "stages_ms": common.median_stages_ms(runs[eng.name]),
                        "end_to_end_ms": e2e,
                        "end_to_end_runs_ms": [1e3 * v for v in totals[eng.name]],
                        "cpu_time_ms": common.stats_ms(cpu[eng.name]),
                        "images_per_s": b / (e2e["p50"] / 1e3),
                        "gflop_per_image": flops / 1e9 if flops else None,
                        "gflop_per_s": flops * b / (e2e["p50"] / 1e3) / 1e9 if flops else None,
                        "speedup_vs_torch": (ref_p50 / e2e["p50"]) if ref_p50 else None,
                        "speedup_vs_torch_mean": (ref_mean / e2e["mean"]) if ref_mean else None,
                        "cpu_time_ratio_vs_torch": (common.stats_ms(cpu[ref.name])["p50"]
                                                    / common.stats_ms(cpu[eng.name])["p50"]) if ref else None,
                        "peak_rss_mb": sampler.peak(eng.rss_label),      # process VmRSS, sampled while this engine ran
                        "rss_mb": (sampler.values(eng.rss_label) or [None])[-1],
                        "peak_device_mb": max(eng.device_peak) if eng.device_peak else None,
                    })
    return {
        "results": results,
        "skipped": skipped,
        "process": {"peak_rss_mb": common.peak_rss_mb(), "rss_mb": common.rss_mb()},
        "settings": {
            "artifacts": str(args.artifacts), "model": artifacts.model,
            "pretrained_id": artifacts.manifest.get("pretrained_id"), "input_size": artifacts.input_size,
            "class_set": args.classes or artifacts.manifest.get("default_class_set"),
            "engines": names, "batches": batches, "methods": methods, "top_p": args.top_p, "repeat": args.repeat,
            "warmup": args.warmup, "threads": args.threads, "classify_batch": args.classify_batch,
            "torch_device": args.torch_device, "images": "benchmarks.common.photo_like 320x240, seed "
                                                        f"{args.seed}; top-1 class of each",
        },
    }


def method_flops(artifacts, method: str, top_p: int) -> float | None:
    """FLOPs of one explanation (benchmarks.flops: explain.onnx + the classifier forwards) for the Decom-CAM
    methods (p + 1 forwards; decomcam-ig: features.onnx + ig_steps head_grad.onnx passes); None for the
    others, whose forward count depends on the image."""
    if not method.startswith("decomcam"):
        return None
    from .flops import explanation_flops, graph_flops

    c, n = artifacts.dims["C"], artifacts.dims["h"] * artifacts.dims["w"]
    try:
        if method == "decomcam-ig":
            from runtime.config import DecomCamConfig

            L = len(artifacts.load_class_set().labels) if artifacts.text_input else None
            return float(graph_flops(artifacts.graph_path("features"), 1, L)["total"]
                         + DecomCamConfig().ig_steps * graph_flops(artifacts.graph_path("head_grad"), 1, L)["total"])
        return float(explanation_flops(artifacts, min(top_p, c, n) + 1)["total"])
    except Exception as e:  # shape inference can fail on an unusual graph: the column is then empty
        log(f"FLOP count unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        return None


def latency_tables(report: dict) -> str:
    out = []
    res = report["results"]
    gpu = any(r["peak_device_mb"] is not None for r in res)
    for method in dict.fromkeys(r["method"] for r in res):
        rows = [r for r in res if r["method"] == method]
        stages = [s for s in STAGES if any(s in r["stages_ms"] for r in rows)]
        extra = sorted({k for r in rows for k in r["stages_ms"]} - set(STAGES))
        headers = (["engine", "prec", "B"] + [f"{s} ms" for s in stages + extra]
                   + ["p50 ms", "p90 ms", "p99 ms", "img/s", "GFLOP/s", "speed-up", "CPU s", "CPU ratio", "peak RSS MB"]
                   + (["peak dev MB", "H2D KB", "D2H KB"] if gpu else []))
        body = []
        for r in rows:
            st = r["stages_ms"]
            e2e = r["end_to_end_ms"]
            body.append([r["engine"], r["precision"], r["batch"]]
                        + [common.fmt(st.get(s)) for s in stages + extra]
                        + [common.fmt(e2e["p50"]), common.fmt(e2e["p90"]), common.fmt(e2e["p99"]),
                           common.fmt(r["images_per_s"], 2), common.fmt(r.get("gflop_per_s"), 0),
                           (common.fmt(r["speedup_vs_torch"], 2) + "x") if r["speedup_vs_torch"] else "-",
                           common.fmt(r["cpu_time_ms"]["p50"] / 1e3, 2),
                           (common.fmt(r["cpu_time_ratio_vs_torch"], 2) + "x") if r["cpu_time_ratio_vs_torch"] else "-",
                           common.fmt(r["peak_rss_mb"], 0)]
                        + ([common.fmt(r["peak_device_mb"], 0),
                            common.fmt(r["transfers"]["totals"]["h2d"]["bytes"] / 1024, 1),
                            common.fmt(r["transfers"]["totals"]["d2h"]["bytes"] / 1024, 1)] if gpu else []))
        out.append(f"method {method} (stages: median ms per batch; end to end over {rows[0]['end_to_end_ms']['n']} "
                   f"reps)\n" + common.format_table(headers, body, "llr" + "r" * (len(headers) - 3)))
    for s in report["skipped"]:
        out.append(f"skipped {s['engine']}" + (f" for {s['method']}" if s.get("method") else "") + f": {s['reason']}")
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------------
# Throughput mode

# the CLI's summary: explained OK of N inputs ... in T s (T/OK s/image); T has one decimal, T/OK four
# significant digits, so the loop time is OK x the per-image time (a fast run's T reads 0.0)
_CLI_SECONDS = re.compile(r"explained (\d+) of (\d+) inputs .* in ([0-9.]+) s(?: \(([0-9.e+-]+) s/image\))?")


THROUGHPUT_MODES = ("pipeline", "serial", "ray-1", "ray-2", "ray-4")


def _cli_engine_args(eng: str) -> list[str]:
    """The CLI options of a benchmark engine name (cpu-int8 = --engine cpu --precision int8, ...; of its
    options only graph=1, as --cuda-graph: the CLI runs NHWC and the cuDNN search at their defaults)."""
    eng, opts = engine_options_of(eng)
    base = ["--engine", eng.split("-")[0]] + (["--cuda-graph"] if opts.get("cuda_graph") else [])
    if eng == "trt-fp16":
        base.append("--fp16")
    elif eng == "cuda-fp16":
        base += ["--precision", "fp16"]
    elif eng == "cuda-fp16m":
        base += ["--precision", "fp16-masks"]
    elif eng == "cpu-int8":
        base += ["--precision", "int8"]
    return base


def _run_cli_mode(args, eng: str, mode: str, paths, out_dir: str) -> tuple[int, float | None, str]:
    """runtime.explain.main in process: (explained, loop seconds as the CLI reports them, stderr tail)."""
    from runtime.explain import main as explain_main

    cli = [*map(str, paths), "--artifacts", str(args.artifacts), *_cli_engine_args(eng), "--top-p", str(args.top_p),
           "--method", args.methods.split(",")[0], "--batch-size", str(args.classify_batch),
           "--threads", str(args.threads), "--quiet", "--overwrite", "--out", out_dir]
    if mode == "serial":
        cli.append("--no-pipeline")
    if args.classes:
        cli += ["--classes", args.classes]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = explain_main(cli)
    if rc != 0:
        raise SystemExit(f"runtime.explain failed (exit {rc}):\n{stderr.getvalue()[-2000:]}")
    m = _CLI_SECONDS.search(stdout.getvalue())
    if not m:
        return len(paths), None, ""
    ok = int(m.group(1))
    return ok, (ok * float(m.group(4)) if m.group(4) else float(m.group(3))), ""


def _run_ray_mode(args, eng: str, workers: int, paths, out_dir: str) -> tuple[int, float | None, str]:
    """runtime.dataset.explain_dataset on a local Ray instance with `workers` actors, the machine's threads
    shared between them; batches of the CLI's group size."""
    from runtime.dataset import explain_dataset

    precision = {"cpu-int8": "int8", "cuda-fp16": "fp16", "cuda-fp16m": "fp16-masks"}.get(eng, "fp32")
    engine = eng.split("-")[0]
    group = max(1, args.classify_batch // (args.top_p + 1))
    s = explain_dataset([str(p) for p in paths], args.artifacts, out_dir, workers=workers,
                        gpus_per_worker=1.0 / workers if engine in ("cuda", "trt") else 0.0,
                        images_per_batch=group, engine=engine, precision=precision, method=args.methods.split(",")[0],
                        top_p=args.top_p, batch_size=args.classify_batch, threads=max(1, args.threads // workers),
                        class_set=args.classes, overwrite=True)
    if s["failed"]:
        raise SystemExit(f"runtime.dataset: {s['failed']} images failed: {s['errors'][:3]}")
    return s["ok"], s["seconds"], f"recovered {s['recovered']}" if s["recovered"] else ""


def run_throughput(args) -> dict:
    from runtime.artifacts import load_artifacts

    artifacts = load_artifacts(args.artifacts)
    ns = parse_list(args.n, int)
    modes = parse_list(args.modes)
    bad = [m for m in modes if m not in THROUGHPUT_MODES]
    if bad:
        raise SystemExit(f"unknown --modes {bad}; valid: {', '.join(THROUGHPUT_MODES)}")
    from runtime.engines import probe_engine

    names = [n for n in parse_list(args.engines) if n.split(":")[0] in ORT_ENGINES]
    skipped = [{"engine": n, "reason": "throughput mode runs the CLI (ONNX Runtime engines only)"}
               for n in parse_list(args.engines) if n.split(":")[0] not in ORT_ENGINES]
    for n in list(names):  # a GPU engine this machine cannot run is skipped with its reason
        reason = probe_engine(n.split("-")[0], args.device_id) if n.split("-")[0] in ("cuda", "trt") else None
        if reason:
            skipped.append({"engine": n, "reason": reason})
            names.remove(n)
    t = time.perf_counter()
    paths = common.image_folder(args.folder, max(ns), seed=args.seed)
    gen_s = time.perf_counter() - t
    results = []
    sampler = common.RssSampler(interval=0.05)
    ray_started = False
    with contextlib.ExitStack() as stack, sampler:
        for eng in names:
            for n in ns:
                for mode in modes:  # modes interleaved per engine and N: their ratio is one run's
                    label = f"{eng}/{mode}/N={n}"
                    out_dir = tempfile.mkdtemp(prefix="bench-out-")
                    try:
                        reset = common.reset_peak_rss()
                        rss0 = common.rss_mb()
                        t0 = time.perf_counter()
                        with sampler.segment(label):
                            if mode.startswith("ray-"):
                                if not ray_started:  # Ray itself started once, outside Ray's own clock
                                    from runtime.dataset import ray_session

                                    stack.enter_context(ray_session())
                                    ray_started = True
                                ok, loop_s, note = _run_ray_mode(args, eng, int(mode[4:]), paths[:n], out_dir)
                            else:
                                ok, loop_s, note = _run_cli_mode(args, eng, mode, paths[:n], out_dir)
                        wall = time.perf_counter() - t0
                        sampler.label = None
                        rates = stage_rates(out_dir)
                    finally:
                        shutil.rmtree(out_dir, ignore_errors=True)
                    samp = [(tt, v) for tt, lab, v in sampler.samples if lab == label]
                    ts = np.array([tt for tt, _ in samp])
                    vs = np.array([v for _, v in samp])

                    def window(lo: float, hi: float) -> float | None:  # median RSS over a fraction of the run
                        if not len(vs):
                            return None
                        t_lo, t_hi = ts[0] + lo * (ts[-1] - ts[0]), ts[0] + hi * (ts[-1] - ts[0])
                        sel = vs[(ts >= t_lo) & (ts <= t_hi)]
                        return float(np.median(sel)) if len(sel) else float(vs[-1])

                    early, late = window(0.1, 0.2), window(0.9, 1.0)  # sessions made, first images through / the end
                    in_process = not mode.startswith("ray-")  # Ray's actors are other processes
                    results.append({
                        "engine": eng, "mode": mode, "n": n, "explained": ok, "wall_s": wall, "loop_s": loop_s,
                        "images_per_s": (ok / loop_s) if loop_s else None, "images_per_s_wall": ok / wall,
                        "rss_start_mb": rss0, "rss_10_20pct_mb": early if in_process else None,
                        "rss_last_10pct_mb": late if in_process else None,
                        "peak_rss_mb": float(vs.max()) if len(vs) and in_process else None,
                        "rss_growth_mb": (late - early) if early is not None and in_process else None,
                        "rss_after_mb": common.rss_mb(),  # main() returned: the sessions are freed
                        "vmhwm_mb": common.peak_rss_mb() if reset and in_process else None,
                        "rss_samples": len(vs), "note": note, **rates,
                        "overlap_vs_stage_sum": ((ok / loop_s) / rates["stage_sum_images_per_s"])
                        if loop_s and rates.get("stage_sum_images_per_s") else None,
                        "share_of_graph_ceiling": ((ok / loop_s) / rates["graph_bound_images_per_s"])
                        if loop_s and rates.get("graph_bound_images_per_s") else None,
                    })
                    log(f"throughput {label}: {ok} images in {wall:.1f} s ({ok / wall:.2f} img/s wall)")
    return {
        "results": results, "skipped": skipped,
        "process": {"peak_rss_mb": common.peak_rss_mb(), "rss_mb": common.rss_mb()},
        "settings": {
            "artifacts": str(args.artifacts), "model": artifacts.model,
            "pretrained_id": artifacts.manifest.get("pretrained_id"), "input_size": artifacts.input_size,
            "folder": str(args.folder), "n": ns, "engines": names, "modes": modes, "top_p": args.top_p,
            "method": args.methods.split(",")[0], "threads": args.threads, "batch_size": args.classify_batch,
            "images": "first N image files of the folder (sorted; generated bench_*.jpg, photo-like 320x240 JPEG "
                      f"q90, seed {args.seed}, where it holds fewer); generation took {gen_s:.1f} s, not counted",
            "path": "pipeline/serial: runtime.explain.main in process (serial = --no-pipeline): load, preprocess, "
                    "explain, write overlay/components PNG, JSON and NPZ per image; ray-K: runtime.dataset."
                    "explain_dataset on a local Ray instance, K actors with threads // K ORT threads each, the "
                    "same files plus the Parquet table (img/s from its own clock, after Ray started)",
        },
    }


GRAPH_STAGES = ("explain", "classify", "head", "head_grad")   # the stages that are graph calls


def stage_rates(out_dir: str) -> dict:
    """From the run's NAME.json files: the mean per-image sum of every recorded stage (load, preprocess, the
    graphs, the numerics; not the writing) and of the graph stages alone, as images/s: what the run would
    reach with its stages one after another, and the graph-bound ceiling the overlap can at best reach."""
    import json

    total, graphs, n = 0.0, 0.0, 0
    for f in Path(out_dir).glob("*.json"):
        try:
            t = json.loads(f.read_text()).get("timings_ms") or {}
        except (OSError, ValueError):
            continue
        total += sum(float(v) for v in t.values())
        graphs += sum(float(v) for k, v in t.items() if k in GRAPH_STAGES)
        n += 1
    if not n:
        return {}
    return {"stage_sum_ms": total / n, "graph_ms": graphs / n,
            "stage_sum_images_per_s": 1e3 * n / total if total else None,
            "graph_bound_images_per_s": 1e3 * n / graphs if graphs else None}


def throughput_table(report: dict) -> str:
    headers = ["engine", "mode", "N", "img/s", "img/s (wall)", "stage-sum img/s", "graph-bound img/s",
               "of ceiling", "wall s", "RSS before MB", "RSS 10-20% MB",
               "RSS last 10% MB", "growth MB", "peak RSS MB", "VmHWM MB"]
    rows = [[r["engine"], r.get("mode", "pipeline"), r["n"], common.fmt(r["images_per_s"], 2), common.fmt(r["images_per_s_wall"], 2),
             common.fmt(r.get("stage_sum_images_per_s"), 2), common.fmt(r.get("graph_bound_images_per_s"), 2),
             common.fmt(r.get("share_of_graph_ceiling"), 2),
             common.fmt(r["wall_s"]), common.fmt(r["rss_start_mb"], 0), common.fmt(r["rss_10_20pct_mb"], 0),
             common.fmt(r["rss_last_10pct_mb"], 0), common.fmt(r["rss_growth_mb"], 0), common.fmt(r["peak_rss_mb"], 0),
             common.fmt(r["vmhwm_mb"], 0)] for r in report["results"]]
    skipped = "".join(f"\nskipped {s['engine']}: {s['reason']}" for s in report["skipped"])
    return f"model {report['settings']['model']}, method {report['settings']['method']}, p={report['settings']['top_p']}\n" \
        + common.format_table(headers, rows, "llr" + "r" * (len(headers) - 3)) + skipped \
        + "".join(f"\n{r['engine']}/{r['mode']}/N={r['n']}: {r['note']}" for r in report["results"] if r.get("note"))


# ----------------------------------------------------------------------------------------------------
# CLI

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    p.add_argument("--engines", default="torch,cpu", help=f"comma list of {', '.join(ENGINES)} (default torch,cpu)")
    p.add_argument("--batch", default="1", help="images per explanation call, comma list (default 1)")
    p.add_argument("--top-p", type=int, default=10, help="Decom-CAM components p (default 10)")
    p.add_argument("--methods", default="decomcam", help="comma list of runtime.methods names (default decomcam)")
    p.add_argument("--repeat", type=int, default=10, help="timed repetitions per engine (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine first (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads = ORT intra-op threads (default os.cpu_count())")
    p.add_argument("--classify-batch", type=int, default=32,
                   help="images per classifier call, ORT and eager alike (default 32)")
    p.add_argument("--classes", default=None, help="class set (default: the export's default)")
    p.add_argument("--pretrained", default=None, help="checkpoint path, for an export made from a checkpoint")
    p.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device of the `torch` engine (auto: cuda when a GPU engine is benchmarked)")
    p.add_argument("--device-id", type=int, default=0, help="GPU ordinal")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    t = p.add_argument_group("throughput mode")
    t.add_argument("--folder", default=None, help="explain the images of this folder through the CLI "
                                                  "(generated where it holds fewer than N)")
    t.add_argument("--n", default="100,1000", help="image counts, comma list (default 100,1000)")
    t.add_argument("--modes", default="pipeline",
                   help=f"comma list of {', '.join(THROUGHPUT_MODES)} (default pipeline): the CLI with and without "
                        "its pipeline (--no-pipeline), and runtime.dataset on a local Ray instance with K workers")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or args.warmup < 0 or args.classify_batch < 1:
        raise SystemExit("--threads, --repeat and --classify-batch must be >= 1, --warmup >= 0")
    load_start = common.load_average()
    if args.folder:
        report = {"benchmark": "throughput", **run_throughput(args)}
        table = throughput_table(report)
    else:
        report = {"benchmark": "latency", **run_latency(args)}
        table = latency_tables(report)
    report["machine"] = common.machine_info(args.threads)
    report["machine"]["load_average"] = {"start": load_start, "end": common.load_average()}
    report["command"] = common.command_line("benchmarks.latency", argv)
    report["table"] = table
    common.write_json(args.json, report)
    print(f"{report['benchmark']}: {common.describe_machine(report['machine'])}")
    print(f"command: {report['command']}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
