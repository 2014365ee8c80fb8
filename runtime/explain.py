"""`python -m runtime.explain`: explain images with the exported graphs.

    python -m runtime.explain INPUTS... --artifacts DIR [--engine cpu|cuda|trt] [--precision fp32|fp16|fp16-masks|int8]
        [--method decomcam] [--classes SET] [--target NAME] [--top-p N] [--batch-size N] [--out DIR] [--overwrite]
        [--report]

INPUTS are files, folders (searched recursively) or globs (quote them; `**` matches any depth). For each
image it writes NAME.overlay.png, NAME.components.png, NAME.json and NAME.npz into --out, and with --report
an index.html showing them all. Images are explained in groups; while the graphs run on one group, the next
is decoded and preprocessed and the previous one written in worker threads (runtime/pipeline.py: bounded
queues, input order kept; --no-pipeline does all of it in one thread). Exit status: 0 when every input succeeded, 1 when some failed (each failure
is one line on stderr naming the file and the problem; the others are still processed), 2 for a usage error
(an option out of range, unknown target class, missing or mismatched artifacts, an --out that cannot be
written), 130 when interrupted (Ctrl-C) and 143 on SIGTERM. Outputs that already exist are skipped unless
--overwrite, so an interrupted run resumes where it stopped; temporaries left by a killed run are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import hashlib
import math
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MAX_WALK_ENTRIES = 1_000_000  # folder and glob walks stop (with an error) past this many directory entries
MAX_WALK_DEPTH = 64           # and never go deeper than this
NAME_MAX = 255                # bytes in a file name (Linux, macOS, Windows)
LONGEST_SUFFIX = len(".components.png")


# ----------------------------------------------------------------------------------------------------
# Options: every value is checked at parse time (exit 2 naming the valid range)

class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors as one line on stderr (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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


def float_range(lo: float, hi: float):
    """A finite float in (lo, hi]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in ({lo:g}, {hi:g}], got {text!r}") from None
        if not (math.isfinite(v) and lo < v <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in ({lo:g}, {hi:g}], got {text}")
        return v
    parse.__name__ = "number"
    return parse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    g.add_argument("--engine", default="cpu", help="cpu (default), cuda or trt")
    g.add_argument("--fp16", action="store_true", help="TensorRT fp16 (trt_fp16_enable); refused by cpu and cuda")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "fp16-masks", "int8"),
                   help="graphs: fp32 (default), the export's fp16 graphs (export --precision fp16), fp16-masks "
                        "(fp16 for the masked forwards, fp32 for the activations and gradients) or its int8 "
                        "graphs (python -m export quantize; graphs without an int8 version run in fp32)")
    g.add_argument("--device-id", type=int_range(0, 1023), default=0, help="GPU ordinal for cuda/trt")
    g.add_argument("--threads", type=int_range(1, 1024), default=None,
                   help="ORT intra-op threads, and the threads that preprocess and encode images, 1..1024 "
                        "(default: ORT's choice; one per CPU up to 8 for the images)")
    g.add_argument("--batch-size", type=int_range(1, 4096), default=32,
                   help="images per classify call, 1..4096 (default 32)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="decomcam", help="saliency method (default decomcam); see --list-methods")
    g.add_argument("--classes", default=None, help="class set in the artifacts (default: the manifest's default)")
    g.add_argument("--target", default=None, help="class name or index to explain (default: each image's top-1)")
    g.add_argument("--top-p", type=int_range(1, 4096), default=10, help="Decom-CAM components p, 1..4096 (default 10)")
    g.add_argument("--blur-sigma", type=float_range(0.0, 1000.0), default=None,
                   help="blur sigma in input pixels, in (0, 1000] (default 10*S/224)")
    g.add_argument("--blend-space", default="pixel", choices=("pixel", "normalized"))
    g.add_argument("--ig-steps", type=int_range(1, 1024), default=16,
                   help="decomcam-ig: midpoints of the path alpha * A, 1..1024 (default 16; one head pass each)")
    g.add_argument("--ig-baseline", default="zero", choices=("zero", "blur", "mean"),
                   help="decomcam-ig: where the path starts: the zero activation (default), or the activations of "
                        "the blurred image blur(P) or of the mean-colour image (one more trunk pass)")
    g.add_argument("--resize", default=None, choices=("crop", "stretch"),
                   help="default: the export's policy (manifest); crop: shortest-side resize + centre crop; "
                        "stretch: whole image to S x S")


def build_parser() -> argparse.ArgumentParser:
    from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

    p = OneLineParser(prog="python -m runtime.explain", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or globs")
    add_engine_args(p)
    add_method_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    o.add_argument("--report", action="store_true", help="also write index.html: every image's pictures and numbers")
    o.add_argument("--max-pixels", type=int_range(1, 1 << 40), default=DEFAULT_MAX_PIXELS,
                   help=f"refuse larger images before decoding (default {DEFAULT_MAX_PIXELS:,})")
    o.add_argument("--max-bytes", type=int_range(1, 1 << 40), default=DEFAULT_MAX_BYTES,
                   help=f"refuse larger files before reading them (default {DEFAULT_MAX_BYTES:,} = 1 GiB)")
    o.add_argument("--group", type=int_range(1, 4096), default=None,
                   help="images explained together, 1..4096 (default: batch-size // (p+1), at least 1)")
    o.add_argument("--no-pipeline", action="store_true",
                   help="decode, explain and write in one thread (default: the next group is decoded and the "
                        "previous one written in worker threads while the graphs run)")
    o.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    o.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    return p


# ----------------------------------------------------------------------------------------------------
# Inputs

@dataclass
class Item:
    path: Path
    stem: str          # output name


class WalkLimit(RuntimeError):
    pass


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def walk_files(root: Path, skip: set | frozenset = frozenset(), descend=None):
    """Yield (relative parts, path) of the regular files under `root`, in name order.

    Directory symlinks are followed, but no folder is entered twice (by device and inode), so a symlink
    loop ends; folders in `skip` (device, inode) are not entered; `descend(parts)` may prune. At most
    MAX_WALK_ENTRIES entries are looked at and MAX_WALK_DEPTH levels entered, else WalkLimit."""
    try:
        seen = {_key(os.stat(root))}
    except OSError:
        return
    stack, count = [(root, ())], 0
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            count += 1
            if count > MAX_WALK_ENTRIES:
                raise WalkLimit(f"stopped after {MAX_WALK_ENTRIES:,} entries; give a narrower folder or pattern")
            try:
                st = os.stat(e.path)  # follows symlinks; a dangling link is skipped
            except OSError:
                continue
            parts = rel + (e.name,)
            if stat.S_ISDIR(st.st_mode):
                k = _key(st)
                if k in seen or k in skip or (descend is not None and not descend(parts)):
                    continue
                if len(parts) > MAX_WALK_DEPTH:
                    raise WalkLimit(f"more than {MAX_WALK_DEPTH} folder levels; give a narrower folder or pattern")
                seen.add(k)
                subdirs.append((Path(e.path), parts))
            elif stat.S_ISREG(st.st_mode):
                yield parts, Path(e.path)
        stack.extend(reversed(subdirs))


def _match(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Glob semantics per path component: `**` is zero or more folders; `*`, `?` and `[...]` do not match a
    leading dot unless the pattern component starts with one."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not pats[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def _glob(spec: str, skip) -> list[Path]:
    parts = Path(spec).parts
    n = next(i for i, s in enumerate(parts) if glob.has_magic(s))
    base, pats = Path(*parts[:n]) if n else Path("."), tuple(parts[n:])
    if "**" not in pats and not base.is_dir():
        return []
    if "**" in pats:
        descend = None
    else:
        descend = lambda rel: len(rel) < len(pats) and _match_prefix(rel, pats)  # noqa: E731
    found = [p if n else Path(os.path.relpath(p)) for rel, p in walk_files(base, skip, descend) if _match(rel, pats)]
    return sorted(found)


def _match_prefix(rel: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    return all(fnmatch.fnmatchcase(r, p) and not (r.startswith(".") and not p.startswith("."))
               for r, p in zip(rel, pats))


def expand_inputs(specs: list[str], exclude: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (recursive, image extensions) and globs -> (paths, [(spec, problem)]).

    Folders and globs never enter `exclude` (the output folder), so a rerun does not explain its own outputs."""
    paths, problems, seen = [], [], set()
    skip = set()
    if exclude is not None:
        try:
            skip.add(_key(os.stat(exclude)))
        except OSError:
            pass

    def add(p: Path):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for spec in specs:
        p = Path(spec)
        try:
            if p.is_dir():
                found = [q for _, q in walk_files(p, skip) if q.suffix.lower() in IMAGE_EXTENSIONS]
                if not found:
                    problems.append((spec, "folder holds no images"))
                for q in found:
                    add(q)
            elif p.exists() or p.is_symlink():
                add(p)
            elif glob.has_magic(spec):
                found = _glob(spec, skip)
                if not found:
                    problems.append((spec, "glob matches no files"))
                for q in found:
                    add(q)
            else:
                problems.append((spec, "no such file or folder"))
        except WalkLimit as e:
            problems.append((spec, str(e)))
    return paths, problems


def _shorten(stem: str, tag: str) -> str:
    """`stem` cut (on a UTF-8 boundary) so that stem-tag plus the longest output suffix fits NAME_MAX."""
    room = NAME_MAX - LONGEST_SUFFIX - len(tag) - 1
    return stem.encode("utf-8")[:room].decode("utf-8", "ignore") + "-" + tag


def output_stems(paths: list[Path]) -> list[Item]:
    """NAME = file stem; stems shared by several inputs, or too long for the output names, get a short hash
    of the path."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    items = []
    for p in paths:
        stem = p.stem
        tag = hashlib.sha1(str(p.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        if len(stem.encode("utf-8", "surrogateescape")) + LONGEST_SUFFIX > NAME_MAX:
            stem = _shorten(stem, tag)
        elif counts[stem] > 1:
            stem = f"{stem}-{tag}"
        items.append(Item(p, stem))
    return items


# ----------------------------------------------------------------------------------------------------
# Output folder, progress, interrupts

def error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def prepare_out(out_dir: Path) -> str | None:
    """Create --out and prove it is writable; the problem in one line, or None."""
    from .fsutil import check_writable, remove_stale_temporaries

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out {out_dir}: cannot create the output folder ({e.strerror or type(e).__name__})"
    try:
        check_writable(out_dir)
    except OSError as e:
        return f"--out {out_dir}: cannot write in the output folder ({e.strerror or type(e).__name__})"
    remove_stale_temporaries(out_dir)
    return None


def progress_bar(total: int, quiet: bool):
    """tqdm on stderr, only on a terminal, not with --quiet, and only for more than one image."""
    from tqdm import tqdm

    enabled = not quiet and total > 1 and sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="img", dynamic_ncols=True, leave=True)


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt."""


def _NL() -> str:
    """A newline ending a progress bar on a terminal; nothing otherwise (the message stays one line)."""
    return "\n" if sys.stderr.isatty() else ""


def _on_sigterm(signum, frame):
    raise Interrupted()


# ----------------------------------------------------------------------------------------------------
# The run

def run(args) -> int:
    from .artifacts import ArtifactsError
    from .config import DecomCamConfig
    from .engines import EngineError, EngineOptions, probe_engine
    from .explainer import Explainer, TargetError
    from .images import ImageError, load_image
    from .methods import list_methods
    from .pipeline import run_pipeline
    from .render import OUTPUT_SUFFIXES, render_many, write_payloads

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
        config = DecomCamConfig(top_p=args.top_p, blur_sigma=args.blur_sigma, blend_space=args.blend_space,
                                ig_steps=args.ig_steps, ig_baseline=args.ig_baseline)
        # with the pipeline, ORT's idle intra-op threads do not spin: the loader and writer threads need the cores
        opts = EngineOptions(device_id=args.device_id, fp16=args.fp16, intra_op_threads=args.threads,
                             allow_spinning=args.no_pipeline)
        # the engine proven before anything else: a provider that lists itself but fails to load is a usage error
        reason = probe_engine(args.engine, args.device_id) if args.engine in ("cuda", "trt") else None
        if reason:
            raise EngineError(reason)
        ex = Explainer.from_artifacts(args.artifacts, engine=args.engine, class_set=args.classes,
                                      batch_size=args.batch_size, engine_options=opts, resize_mode=args.resize,
                                      config=config, precision=args.precision)
        ex.check_graphs(args.method)  # every graph the method runs, checked before any image
        target = args.target
        if target is not None and target.lstrip("-").isdigit():
            target = int(target)
        ex.resolve_target(target)
    except (ArtifactsError, EngineError, TargetError, ValueError) as e:
        error(str(e))
        return 2

    out_dir = Path(args.out)
    problem = prepare_out(out_dir)
    if problem:
        error(problem)
        return 2
    paths, problems = expand_inputs(args.inputs, exclude=out_dir)
    failures: dict[str, str] = {}
    for spec, problem in problems:
        error(f"{spec}: {problem}")
        failures[spec] = problem
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
    t0 = time.perf_counter()

    def fail(it, msg: str):
        error(f"{it.path}: {msg}")
        failures[str(it.path)] = msg

    def load(chunk: list[Item]):
        """Loader stage: decode (refusing bad files) and preprocess one group."""
        loaded, bad, decode_s = [], [], []
        for it in chunk:
            t = time.perf_counter()
            try:
                loaded.append((it, load_image(it.path, max_pixels=args.max_pixels, max_bytes=args.max_bytes)))
                decode_s.append(time.perf_counter() - t)
            except ImageError as e:
                bad.append((it, str(e)))
        if not loaded:
            return loaded, bad, None, (decode_s, 0.0)
        t = time.perf_counter()
        try:
            prepared = ex.preprocess([rgb for _, rgb in loaded])
        except Exception as e:  # reported by the writer like a failed explanation of the group
            prepared = e
        return loaded, bad, prepared, (decode_s, (time.perf_counter() - t) / len(loaded))

    def compute(group):
        """Engine stage: one explanation call per group; an EngineError ends the run (exit 2)."""
        loaded, bad, prepared, _ = group
        if not loaded:
            return group, None, None
        if isinstance(prepared, Exception):
            return group, None, prepared
        try:
            exps = ex.explain_arrays([rgb for _, rgb in loaded], [str(it.path) for it, _ in loaded],
                                     target=target, method=args.method, prepared=prepared)
        except EngineError:
            raise
        except Exception as e:  # one bad group must not stop the run; each of its files is reported
            return group, None, e
        return group, exps, None

    done = {"ok": 0}

    def emit(result):
        """Writer stage: report and write one group, in input order (every per-image line comes from here)."""
        (loaded, bad, _, (decode_s, preprocess_s)), exps, exc = result
        for it, msg in bad:
            error(msg)
            failures[str(it.path)] = msg.removeprefix(f"{it.path}: ")
            bar.update(1)
        if exc is not None:
            first = (str(exc).splitlines() or [""])[0][:200]
            for it, _ in loaded:
                fail(it, f"explanation failed ({type(exc).__name__}: {first})")
                bar.update(1)
            return
        jobs = list(zip(loaded, exps or (), decode_s))
        for _, e, load_s in jobs:
            e.timings.update(load=load_s, preprocess=preprocess_s)  # the loader's share of this image
        # the group's pictures are encoded in the image pool, then written and reported in input order
        extra = {"engine": args.engine, "artifacts": str(args.artifacts),
                 "precision": dict(ex.graph_precisions)}  # graph_precisions: the graphs run so far
        with contextlib.closing(render_many([(rgb, e) for (_, rgb), e, _ in jobs], extra, args.threads)) as rendered:
            for ((it, _), _, _), payloads in zip(jobs, rendered):
                try:
                    if isinstance(payloads, OSError):
                        raise payloads
                    write_payloads(out_dir, it.stem, payloads)
                    done["ok"] += 1
                except OSError as err:
                    fail(it, f"could not write outputs ({err})")
                bar.update(1)

    groups = [todo[i:i + group] for i in range(0, len(todo), group)]
    with progress_bar(len(todo), args.quiet) as bar:
        try:
            run_pipeline(groups, load, compute, emit, depth=2, threaded=not args.no_pipeline)
        except EngineError as e:  # the engine itself failed: no point in trying the other images
            error(str(e))
            return 2
    ok = done["ok"]
    dt = time.perf_counter() - t0
    failed = len(failures)
    if args.report:
        from .report import write_report

        try:
            write_report(out_dir, items, failures, title=f"{args.method} on {args.engine}")
        except OSError as err:
            error(f"{out_dir / 'index.html'}: could not write the report ({err})")
            failed += 1
    per = f" ({dt / ok:.3f} s/image)" if ok else ""
    print(f"explained {ok} of {len(items) + len(problems)} inputs with {args.method} on {args.engine}: "
          f"{failed} failed, {skipped} skipped (outputs exist) in {dt:.1f} s{per} -> {out_dir}")
    return 1 if failed else 0


def main(argv=None) -> int:
    """Parse, run; Ctrl-C ends with one line and exit 130, SIGTERM with one line and exit 143."""
    previous = None
    try:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        args = build_parser().parse_args(argv)
        return run(args)
    except KeyboardInterrupt:
        print(_NL() + "interrupted (Ctrl-C): finished outputs are kept; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    except Interrupted:
        print(_NL() + "terminated (SIGTERM): finished outputs are kept; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
