"""`python -m runtime.explain`: explain images with the exported graphs.

    python -m runtime.explain INPUTS... --artifacts DIR [--engine cpu|cuda|trt] [--precision fp32|fp16] [--method decomcam]
        [--classes SET] [--target NAME] [--top-p N] [--batch-size N] [--out DIR] [--overwrite]

INPUTS are files, folders (searched recursively) or globs. For each image it writes NAME.overlay.png,
NAME.components.png, NAME.json and NAME.npz into --out. Exit status: 0 when every input succeeded, 1 when
some failed (each failure is one line on stderr naming the file and the problem; the others are still
processed), 2 for a usage error (bad option, unknown target class, missing or mismatched artifacts).
Outputs that already exist are skipped unless --overwrite, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    g.add_argument("--engine", default="cpu", help="cpu (default), cuda or trt")
    g.add_argument("--fp16", action="store_true", help="TensorRT fp16 (trt_fp16_enable); refused by cpu and cuda")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="graphs: fp32 (default) or the export's fp16 graphs (export --precision fp16)")
    g.add_argument("--device-id", type=int, default=0, help="GPU ordinal for cuda/trt")
    g.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    g.add_argument("--batch-size", type=int, default=32, help="images per classify call (default 32)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="decomcam", help="saliency method (default decomcam); see --list-methods")
    g.add_argument("--classes", default=None, help="class set in the artifacts (default: the manifest's default)")
    g.add_argument("--target", default=None, help="class name or index to explain (default: each image's top-1)")
    g.add_argument("--top-p", type=int, default=10, help="Decom-CAM components p (default 10)")
    g.add_argument("--blur-sigma", type=float, default=None, help="blur sigma in input pixels (default 10*S/224)")
    g.add_argument("--blend-space", default="pixel", choices=("pixel", "normalized"))
    g.add_argument("--resize", default="crop", choices=("crop", "stretch"),
                   help="crop: CLIP's shortest-side resize + centre crop; stretch: whole image to S x S")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.explain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or globs")
    add_engine_args(p)
    add_method_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    o.add_argument("--max-pixels", type=int, default=None, help="refuse larger images before decoding (default 64e6)")
    o.add_argument("--group", type=int, default=None,
                   help="images explained together (default: batch-size // (p+1), at least 1)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    return p


@dataclass
class Item:
    path: Path
    stem: str          # output name


def expand_inputs(specs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursive, image extensions) and globs -> (paths, [(spec, problem)])."""
    paths, problems, seen = [], [], set()

    def add(p: Path):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append((spec, "folder holds no images"))
            for q in found:
                add(q)
        elif p.exists():
            add(p)
        elif glob.has_magic(spec):
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
            if not found:
                problems.append((spec, "glob matches no files"))
            for q in found:
                add(q)
        else:
            problems.append((spec, "no such file or folder"))
    return paths, problems


def output_stems(paths: list[Path]) -> list[Item]:
    """NAME = file stem; stems shared by several inputs get a short hash of the path."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    items = []
    for p in paths:
        stem = p.stem
        if counts[stem] > 1:
            stem = f"{stem}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
        items.append(Item(p, stem))
    return items


class Progress:
    """A one-line progress bar on stderr (only when there is more than one image)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and total > 1
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        line = f"[{bar:<30}] {self.done}/{self.total} {rate:.2f} img/s {note[:40]}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def run(args) -> int:
    from .artifacts import ArtifactsError
    from .config import DecomCamConfig
    from .engines import EngineError, EngineOptions, probe_engine
    from .explainer import Explainer, TargetError
    from .images import DEFAULT_MAX_PIXELS, ImageError, load_image
    from .methods import list_methods
    from .render import OUTPUT_SUFFIXES, write_outputs

    if args.list_methods:
        print("\n".join(list_methods()))
        return 0
    if not args.inputs:
        error("no inputs given (files, folders or globs)")
        return 2
    if args.method not in list_methods():
        error(f"unknown method '{args.method}'; valid methods: {', '.join(list_methods())}")
        return 2
    try:
        config = DecomCamConfig(top_p=args.top_p, blur_sigma=args.blur_sigma, blend_space=args.blend_space)
        opts = EngineOptions(device_id=args.device_id, fp16=args.fp16, intra_op_threads=args.threads)
        # the engine proven before anything else: a provider that lists itself but fails to load is a usage error
        reason = probe_engine(args.engine, args.device_id) if args.engine in ("cuda", "trt") else None
        if reason:
            raise EngineError(reason)
        ex = Explainer.from_artifacts(args.artifacts, engine=args.engine, class_set=args.classes,
                                      batch_size=args.batch_size, engine_options=opts, resize_mode=args.resize,
                                      config=config, precision=args.precision)
        target = args.target
        if target is not None and target.lstrip("-").isdigit():
            target = int(target)
        ex.resolve_target(target)
    except (ArtifactsError, EngineError, TargetError, ValueError) as e:
        error(str(e))
        return 2

    paths, problems = expand_inputs(args.inputs)
    failed = 0
    for spec, problem in problems:
        error(f"{spec}: {problem}")
        failed += 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = output_stems(paths)
    todo, skipped = [], 0
    for it in items:
        if not args.overwrite and all((out_dir / f"{it.stem}{s}").exists() for s in OUTPUT_SUFFIXES):
            skipped += 1
        else:
            todo.append(it)
    if ex.artifacts.random_weights:
        print(f"note: {args.artifacts} holds random weights (exported with --pretrained none): "
              f"the maps show the method, not a trained model", file=sys.stderr)

    p = config.effective_p(ex.artifacts.dims["C"], ex.artifacts.dims["h"] * ex.artifacts.dims["w"])
    group = args.group or max(1, args.batch_size // (p + 1))
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    progress = Progress(len(todo), not args.quiet)
    t0 = time.perf_counter()
    ok = 0
    for start in range(0, len(todo), group):
        chunk = todo[start:start + group]
        loaded = []
        for it in chunk:
            try:
                loaded.append((it, load_image(it.path, max_pixels=max_pixels)))
            except ImageError as e:
                error(str(e))
                failed += 1
                progress.step(1, it.path.name)
        if not loaded:
            continue
        try:
            exps = ex.explain_arrays([rgb for _, rgb in loaded], [str(it.path) for it, _ in loaded],
                                     target=target, method=args.method)
        except EngineError as e:  # the engine itself failed: no point in trying the other images
            error(str(e))
            return 2
        except Exception as e:  # one bad group must not stop the run; report each file
            for it, _ in loaded:
                error(f"{it.path}: explanation failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                failed += 1
                progress.step(1, it.path.name)
            continue
        for (it, rgb), e in zip(loaded, exps):
            try:
                write_outputs(out_dir, it.stem, rgb, e, extra={"engine": args.engine, "artifacts": str(args.artifacts)})
                ok += 1
            except OSError as err:
                error(f"{it.path}: could not write outputs ({err})")
                failed += 1
            progress.step(1, it.path.name)
    dt = time.perf_counter() - t0
    per = f" ({dt / ok:.3f} s/image)" if ok else ""
    print(f"explained {ok} of {len(items) + len(problems)} inputs with {args.method} on {args.engine}: "
          f"{failed} failed, {skipped} skipped (outputs exist) in {dt:.1f} s{per} -> {out_dir}")
    return 1 if failed else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
