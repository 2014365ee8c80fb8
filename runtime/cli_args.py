"""Command-line argument groups shared by `python -m runtime.explain` and `python -m runtime.dataset` (and the
benchmarks): every value is checked at parse time, exit 2 with one line naming the valid range; the ranges
are runtime/settings.py's. `settings_from_args` turns parsed arguments into a Settings."""

from __future__ import annotations

import argparse
import math

from .names import one_line
from .settings import BLUR_SIGMA_MAX, ENGINES, INT_RANGES, MAX_ASPECT_MAX, PRECISIONS, RESIZES


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line on stderr (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo:,}, {hi:,}], got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:,}, {hi:,}], got {v:,}")
        return v
    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float, closed: bool = False):
    """A finite float in (lo, hi] ([lo, hi] when closed)."""
    def parse(text: str) -> float:
        rng = f"{'[' if closed else '('}{lo:g}, {hi:g}]"
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {rng}, got {text!r}") from None
        if not (math.isfinite(v) and (lo <= v if closed else lo < v) and v <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {rng}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def _int(name: str):
    return int_range(*INT_RANGES[name])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    g.add_argument("--engine", default="cpu", help=f"{', '.join(ENGINES)} (default cpu)")
    g.add_argument("--fp16", action="store_true", help="TensorRT fp16 (trt_fp16_enable); refused by cpu and cuda")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="graphs: fp32 (default), the export's fp16 graphs (export --precision fp16), fp16-masks "
                        "(fp16 for the masked forwards, fp32 for the activations and gradients) or its int8 "
                        "graphs (python -m export quantize; graphs without an int8 version run in fp32)")
    g.add_argument("--device-id", type=_int("device_id"), default=0, help="GPU ordinal for cuda/trt")
    g.add_argument("--threads", type=_int("threads"), default=None,
                   help="ORT intra-op threads, and the threads that preprocess and encode images, 1..1024 "
                        "(default: ORT's choice; one per CPU up to 8 for the images)")
    g.add_argument("--batch-size", type=_int("batch_size"), default=32,
                   help="images per graph call, 1..4096 (default 32)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="cuda only: capture each padded batch shape into a CUDA graph once and replay it")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="decomcam", help="saliency method (default decomcam); see --list-methods")
    g.add_argument("--classes", default=None, help="class set in the artifacts (default: the manifest's default)")
    g.add_argument("--target", default=None, help="class name or index to explain (default: each image's top-1)")
    g.add_argument("--top-p", type=_int("top_p"), default=10, help="Decom-CAM components p, 1..4096 (default 10)")
    g.add_argument("--blur-sigma", type=float_range(0.0, BLUR_SIGMA_MAX), default=None,
                   help="blur sigma in input pixels, in (0, 1000] (default 10*S/224)")
    g.add_argument("--ig-steps", type=_int("ig_steps"), default=16,
                   help="decomcam-ig: midpoints of the path alpha * A, 1..1024 (default 16; one head pass each)")
    g.add_argument("--resize", default=None, choices=RESIZES,
                   help="default: the export's policy (manifest); crop: shortest-side resize + centre crop; "
                        "stretch: whole image to S x S")


def add_limit_args(p: argparse.ArgumentParser, max_pixels: int | None = None, max_bytes: int | None = None) -> None:
    """The limit options; `max_pixels` / `max_bytes`: other defaults (the server's), None for the CLI's."""
    from .images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    g = p.add_argument_group("limits (each checked before decoding)")
    g.add_argument("--max-pixels", type=_int("max_pixels"), default=max_pixels,
                   help=f"refuse larger images (default {max_pixels:,})")
    g.add_argument("--max-bytes", type=_int("max_bytes"), default=max_bytes,
                   help=f"refuse larger files before reading them (default {max_bytes:,} = {_size(max_bytes)})")
    g.add_argument("--max-aspect", type=float_range(1.0, MAX_ASPECT_MAX, closed=True), default=DEFAULT_MAX_ASPECT,
                   help=f"refuse images whose long side is more than this many times the short side "
                        f"(default {DEFAULT_MAX_ASPECT:g}; bounds the memory of preprocessing)")


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n:,} bytes"


def settings_from_args(args):
    """The runtime.settings.Settings of parsed arguments (engine, method and limit groups)."""
    from .settings import Settings, parse_target

    return Settings(method=args.method, top_p=args.top_p, target=parse_target(args.target), class_set=args.classes,
                    resize=args.resize, ig_steps=args.ig_steps, blur_sigma=args.blur_sigma, engine=args.engine,
                    precision=args.precision, batch_size=args.batch_size, threads=args.threads,
                    device_id=args.device_id, fp16=args.fp16, cuda_graph=args.cuda_graph, max_pixels=args.max_pixels,
                    max_bytes=args.max_bytes, max_aspect=args.max_aspect)
