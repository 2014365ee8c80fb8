"""`python -m runtime.explain`: explain images with the exported graphs.

    python -m runtime.explain INPUTS... --artifacts DIR [--engine cpu|cuda|trt] [--method decomcam]
        [--target NAME] [--top-p N] [--out DIR] [--overwrite] [--report]

INPUTS are files, folders (searched recursively) or globs (quote them; `**` matches any depth). For each
image it writes NAME.json, NAME.overlay.png, NAME.components.png and NAME.npz into --out, and with --report
an index.html showing them all. Exit status: 0 when every input succeeded, 1 when some failed (one line
each on stderr naming the file; the others are still processed), 2 for a usage error (an option out of
range, unknown target class, missing or mismatched artifacts, an --out that cannot be written), 130 when
interrupted (Ctrl-C) and 143 on SIGTERM. Outputs of the same input, export and settings are skipped
unless --overwrite, so an interrupted run resumes where it stopped (runtime/batch.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from .cli_args import OneLineParser, _int, add_engine_args, add_limit_args, add_method_args, settings_from_args
from .names import one_line, show


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m runtime.explain", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or globs")
    add_engine_args(p)
    add_method_args(p)
    add_limit_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    o.add_argument("--report", action="store_true", help="also write index.html: every image's pictures and numbers")
    o.add_argument("--group", type=_int("batch_size"), default=None,
                   help="images explained together, 1..4096 (default: batch-size // (p+1), at least 1)")
    o.add_argument("--no-pipeline", action="store_true",
                   help="decode, explain and write in one thread (default: the next group is decoded and the "
                        "previous one written in worker threads while the graphs run)")
    o.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    o.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    return p


# ----------------------------------------------------------------------------------------------------
# Output, progress, interrupts

_PRINT_LOCK = threading.Lock()


def error(msg: str) -> None:
    """One `error:` line on stderr (control characters escaped: one problem is one line)."""
    with _PRINT_LOCK:
        print(f"error: {one_line(msg)}", file=sys.stderr, flush=True)


def prepare_out(out_dir: Path) -> str | None:
    """Create --out and prove it is writable; the problem in one line, or None."""
    from .fsutil import check_writable, remove_stale_temporaries

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out {show(out_dir)}: cannot create the output folder ({e.strerror or type(e).__name__})"
    try:
        check_writable(out_dir)
    except OSError as e:
        return f"--out {show(out_dir)}: cannot write in the output folder ({e.strerror or type(e).__name__})"
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

def _setup(args):
    """Settings, the Explainer and the graphs checked before any image; (explainer, None) or (None, problem)."""
    from .artifacts import ArtifactsError
    from .engines import EngineError, probe_engine
    from .explainer import Explainer, TargetError

    try:
        settings = settings_from_args(args)
        # the engine proven before anything else: a provider that lists itself but fails to load is a usage error
        reason = probe_engine(settings.engine, settings.device_id) if settings.engine in ("cuda", "trt") else None
        if reason:
            raise EngineError(reason)
        # with the pipeline, ORT's idle intra-op threads do not spin: the loader and writer threads need the cores
        ex = Explainer.from_artifacts(args.artifacts, settings,
                                      engine_options=settings.engine_options(allow_spinning=args.no_pipeline))
        ex.check_graphs(settings.method)  # every graph the method runs, checked before any image
    except (ArtifactsError, EngineError, ValueError) as e:
        return None, str(e)
    try:
        ex.resolve_target(settings.target)
    except TargetError as e:
        return None, f"--target {show(args.target)}: {e}"
    return ex, None


def run(args) -> int:
    from .batch import BatchRunner
    from .inputs import expand_inputs, output_items
    from .methods import list_methods
    from .pipeline import run_pipeline

    if args.list_methods:
        print("\n".join(list_methods()))
        return 0
    if not args.inputs:
        error("no inputs given (files, folders or globs)")
        return 2
    ex, problem = _setup(args)
    if problem:
        error(problem)
        return 2
    out_dir = Path(args.out)
    problem = prepare_out(out_dir)
    if problem:
        error(problem)
        return 2
    paths, problems = expand_inputs(args.inputs, exclude=out_dir)
    for spec, msg in problems:
        error(f"{show(spec)}: {msg}")
    items = output_items(paths)
    if ex.artifacts.random_weights:
        print(f"note: {show(args.artifacts)} holds random weights (exported with --pretrained none): "
              f"the maps show the method, not a trained model", file=sys.stderr)

    runner = BatchRunner(ex, out_dir, overwrite=args.overwrite, workers=args.threads)
    a = ex.artifacts
    p = ex.config.effective_p(a.dims["C"], a.dims["h"] * a.dims["w"])
    group = args.group or max(1, args.batch_size // (p + 1))
    outcomes = []
    t0 = time.perf_counter()

    with progress_bar(len(items), args.quiet) as bar:
        def emit(g):
            for o in runner.emit(g):
                outcomes.append(o)
                if o.status == "failed":
                    with _PRINT_LOCK:
                        bar.clear()
                    error(o.error)
                bar.update(1)

        groups = [items[i:i + group] for i in range(0, len(items), group)]
        from .engines import EngineError
        try:
            run_pipeline(groups, runner.load, runner.compute, emit, depth=2, threaded=not args.no_pipeline)
        except EngineError as e:  # the engine itself failed: no point in trying the other images
            error(str(e))
            return 2
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "skipped", "failed")}
    failed = counts["failed"] + len(problems)
    dt = time.perf_counter() - t0
    if args.report:
        from .report import write_report

        try:
            write_report(out_dir, outcomes, problems, title=f"{args.method} on {args.engine}")
        except OSError as err:
            error(f"{show(out_dir / 'index.html')}: could not write the report ({err})")
            failed += 1
    ok = counts["ok"]
    per = f" ({dt / ok:.4g} s/image)" if ok else ""   # significant digits: never 0 on a fast machine
    print(f"explained {ok} of {len(items) + len(problems)} inputs with {args.method} on {args.engine}: "
          f"{failed} failed, {counts['skipped']} skipped (outputs exist) in {dt:.1f} s{per} -> {show(out_dir)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    """Parse, run; Ctrl-C ends with one line and exit 130, SIGTERM with one line and exit 143."""
    previous = None
    try:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        if "--list-methods" in argv:   # needs no artifacts
            from .methods import list_methods

            print("\n".join(list_methods()))
            return 0
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
