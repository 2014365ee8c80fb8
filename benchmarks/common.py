"""Shared helpers of the benchmarks: timers, statistics, memory, machine description, output, images.

    Stopwatch / stats           wall-clock laps (GPU synchronised by the caller) and p50/p90/p99 in ms
    rss_mb / peak_rss_mb        current (VmRSS) and peak (VmHWM) host memory of this process, from
    RssSampler                  /proc/self/status; a background thread that samples VmRSS, per label
    device_memory_mb            GPU memory in use (whole device), where a GPU exists
    machine_info                CPU model, cores, GPU, versions, the exact command line
    write_json / format_table   the two outputs every benchmark writes: JSON and a readable table
    photo_like / image_folder   deterministic photo-like test images (no dataset can be downloaded here)
    load_torch_model            the torch model an artifacts folder was exported from (eager reference)

Nothing here imports torch at module level: the throughput mode measures the torch-free runtime.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------------------------------
# Time

def stats_ms(seconds: Sequence[float]) -> dict:
    """Seconds -> {p50, p90, p99, mean, min, max} in ms, plus n (linear-interpolated percentiles)."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def median_stages_ms(runs: Sequence[dict]) -> dict:
    """[{stage: seconds}, ...] -> {stage: median ms} over the runs (stages in first-seen order)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r if k not in keys]
    return {k: float(np.median([r.get(k, 0.0) for r in runs]) * 1e3) for k in keys}


# ----------------------------------------------------------------------------------------------------
# Host memory

def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MiB (VmRSS)."""
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB (VmHWM; getrusage where /proc is missing)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return kb / 1024.0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS every `interval` s in a daemon thread; each sample is filed under the current label.

        with RssSampler() as s:
            s.label = "cpu"; ...            # samples now count for "cpu"
            with s.segment("cpu"): ...      # the same, sampled at its start and end too
        s.peak("cpu"), s.samples            # MiB; [(t, label, MiB), ...]
    """

    def __init__(self, interval: float = 0.02):
        self.interval = float(interval)
        self.label: str | None = None
        self.samples: list[tuple[float, str | None, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.perf_counter()

    def sample(self) -> float:
        v = rss_mb()
        self.samples.append((time.perf_counter() - self.t0, self.label, v))
        return v

    @contextlib.contextmanager
    def segment(self, label: str | None):
        """File samples under `label` meanwhile, with one sample at the start and one at the end, so a
        segment shorter than `interval` still has values."""
        previous, self.label = self.label, label
        self.sample()
        try:
            yield self
        finally:
            self.sample()
            self.label = previous

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def values(self, label: str | None = None) -> list[float]:
        return [v for _, lab, v in self.samples if label is None or lab == label]

    def peak(self, label: str | None = None) -> float | None:
        vals = self.values(label)
        return max(vals) if vals else None


# ----------------------------------------------------------------------------------------------------
# Device

def synchronize_torch() -> None:
    """torch.cuda.synchronize() when torch is loaded and sees a GPU (a no-op otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def device_memory_mb(device_id: int = 0) -> float | None:
    """GPU memory in use on the device (total - free, every process), MiB; None without a GPU."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(device_id)
            return (total - free) / MB
        import cupy

        with cupy.cuda.Device(device_id):
            free, total = cupy.cuda.runtime.memGetInfo()
        return (total - free) / MB
    except Exception:  # no cupy, no driver, no device: no GPU memory to report
        return None


# ----------------------------------------------------------------------------------------------------
# Machine and versions

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Instruction-set flags that matter for ONNX Runtime's and OpenCV's kernels (x86 and Arm names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp",
             "asimddp", "sve", "sve2", "bf16", "i8mm")


def cpu_flags() -> list[str]:
    """The ``ISA_FLAGS`` this CPU reports in /proc/cpuinfo ('flags' on x86, 'Features' on Arm); [] elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


def gpu_name(device_id: int = 0) -> str | None:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(device_id)
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(device_id)["name"].decode()
    except Exception:  # no GPU
        return None


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on; torch only if this process loaded it."""
    import cv2
    import onnxruntime as ort

    out = {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__,
           "opencv": cv2.__version__}
    torch = sys.modules.get("torch")
    out["torch"] = torch.__version__ if torch is not None else None
    oc = sys.modules.get("open_clip")
    out["open_clip"] = getattr(oc, "__version__", None) if oc is not None else None
    cupy = sys.modules.get("cupy")
    out["cupy"] = cupy.__version__ if cupy is not None else None
    return out


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The exact command: `python -m MODULE ARGS` (argv as parsed; sys.argv[1:] by default)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *args])


def machine_info(threads: int | None = None) -> dict:
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
        "isa": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpu_name(),
        "os": platform.platform(),
        "providers": list(ort.get_available_providers()),
        "versions": versions(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (a shared machine's neighbours show up here)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_machine(info: dict) -> str:
    v = info["versions"]
    vs = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "onnxruntime", "numpy", "opencv") if v.get(k))
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    thr = f", {info['threads']} threads" if info.get("threads") else ""
    load = info.get("load_average") or {}
    la = f"; load average {load['start'][0]} at start, {load['end'][0]} at end" if load.get("start") and load.get("end") else ""
    return f"{info['cpu']} ({info['cores']} cores{thr}{gpu}); {vs}{la}"


# ----------------------------------------------------------------------------------------------------
# Output

def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None  # JSON has no NaN / inf
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, Path):
        return str(o)
    return o


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from runtime.fsutil import atomic_write

    atomic_write(path, json.dumps(_jsonable(data), indent=2) + "\n")


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    f = float(v)
    if not math.isfinite(f):
        return "-"
    return f"{f:.{digits}f}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A Markdown pipe table (readable as plain text too). Cells are printed as given (use `fmt`)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------------------------
# Images

def photo_like(index: int, seed: int = 0, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """One deterministic photo-like uint8 RGB image [H, W, 3]: a smooth colour field, soft shadows, a few
    filled and textured shapes, fine noise. Image `index` does not depend on how many are drawn."""
    import cv2

    h, w = size
    rng = np.random.default_rng([seed, index, zlib.crc32(b"benchmarks")])
    low = rng.random((3, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * 180 + 30                  # [H, W, 3]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    img *= (1.0 - 0.35 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.2 * w * h)))[:, :, None]  # a soft shadow
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(float(v) for v in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        r = int(rng.integers(min(h, w) // 10, min(h, w) // 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(img, centre, r, colour, -1, lineType=cv2.LINE_AA)
        elif kind == 1:
            axes = (r, int(r * rng.uniform(0.4, 1.0)))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
        else:
            pts = (np.array(centre) + rng.normal(0, r, (int(rng.integers(3, 7)), 2))).astype(np.int32)
            cv2.fillPoly(img, [cv2.convexHull(pts)], colour, lineType=cv2.LINE_AA)
    stripes = 12.0 * np.sin(xx * rng.uniform(0.05, 0.3) + yy * rng.uniform(0.05, 0.3))       # texture
    img = img + stripes[:, :, None] * rng.random() + rng.normal(0, 4, img.shape)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo_like_batch(n: int, seed: int = 0, size: tuple[int, int] = (240, 320)) -> list[np.ndarray]:
    return [photo_like(i, seed, size) for i in range(n)]


def image_folder(folder: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (240, 320),
                 quality: int = 90) -> list[Path]:
    """The first n image files of `folder` (sorted, recursive), writing generated JPEGs
    `bench_{i:05d}.jpg` (photo_like, 320 x 240) for whatever is missing. Existing files are kept."""
    import cv2

    from runtime.inputs import expand_inputs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    found, _ = expand_inputs([str(folder)])
    ours = {p.name for p in found}
    others = [p for p in found if not (p.name.startswith("bench_") and p.suffix == ".jpg")]
    i = 0
    generated: list[Path] = []
    while len(others) + len(generated) < n:
        p = folder / f"bench_{i:05d}.jpg"
        if p.name not in ours:
            rgb = photo_like(i, seed, size)
            if not cv2.imwrite(str(p), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise OSError(f"{p}: could not write a JPEG")
        generated.append(p)
        i += 1
    return (others + generated)[:n]


# ----------------------------------------------------------------------------------------------------
# The eager reference's model

def load_torch_model(manifest: dict, pretrained: str | None = None):
    """The torch model an export came from (export.models.load_exported_model)."""
    from export.models import load_exported_model

    return load_exported_model(manifest, pretrained)


class ModelMismatch(RuntimeError):
    """The torch model of the eager reference is not the model the graphs were exported from."""


def check_same_model(artifacts, lm, seed: int = 0, min_cosine: float = 0.999) -> float:
    """Run classify.onnx (ORT, CPU) and the torch model on one generated image; raise ModelMismatch when
    their logits disagree (e.g. an export made by an older version of the seeded random init, whose
    manifest still says "none:seed=S"). Returns the cosine of the two logit vectors."""
    import onnxruntime as ort
    import torch


    x = artifacts.preprocess_image(photo_like(0, seed))[0][None]
    text = artifacts.load_class_set().embeddings   # None for a fixed-class model (no text input)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(artifacts.graph_path("classify")), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": x, **({"text": text} if text is not None else {})})[0][0].astype(np.float64)
    del sess
    model = lm.model
    dev = next(model.parameters()).device
    with torch.no_grad():
        if text is None:
            want = model(torch.from_numpy(x).to(dev))[0].double().cpu().numpy()
        else:
            feats = model.encode_image(torch.from_numpy(x).to(dev), normalize=True)
            want = (model.logit_scale.exp() * feats @ torch.from_numpy(text).to(dev).T)[0].double().cpu().numpy()
    cos = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    if not cos >= min_cosine:
        raise ModelMismatch(
            f"{artifacts.root}: the torch model loaded for the eager reference ({lm.name}, {lm.pretrained_id}) is "
            f"not the exported one (logit cosine {cos:.4f}); re-export the artifacts with this code, or pass "
            f"--pretrained with the checkpoint they were made from")
    return cos
