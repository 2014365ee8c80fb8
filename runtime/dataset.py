"""Datasets that outgrow one process: the same runtime on Ray Data.

    python -m runtime.dataset INPUTS... --artifacts DIR --out DIR [--address ADDRESS] [--workers N]
        [--gpus-per-worker G] [--engine cpu|cuda|trt] [--method ...] [--target ...] [--images-per-batch N]

    from runtime.dataset import explain_dataset
    summary = explain_dataset(["photos/", "s3://bucket/photos/"], "artifacts/RN50", "outputs", workers=4)

No scheduler of our own: Ray Data splits the work, and a stateful actor class (`ExplainActor`) holds one
`Explainer` per worker, so the ONNX Runtime sessions are created once per actor. `workers` actors run at
once (`concurrency=`), each with `gpus_per_worker` GPUs (`num_gpus=`, for the cuda/trt engines).

Inputs: local files, folders (recursive) and globs, as the CLI takes them, or any URI a pyarrow filesystem
reads (s3://, gs://, hdfs://, file://; a folder URI is listed recursively). The driver lists the images;
each actor reads the bytes itself (capped at `max_bytes`) and decodes them with the runtime's own decoder
(runtime.images.decode_image), so a dataset sees exactly the CLI's decoding and limits.

Outputs, per image, in --out (a local or shared folder): the CLI's NAME.json, NAME.overlay.png,
NAME.components.png and NAME.npz, written atomically, with the CLI's names, by the CLI's runner
(runtime/batch.py): an image whose outputs exist for the same input, export and settings is not explained
again (its row is rebuilt from NAME.json and NAME.npz) unless `overwrite`; the output folder is never
listed as input. Plus one Parquet
table, `explanations.parquet` (written to a temporary name and renamed): one row per input with source,
stem, status (ok, skipped, failed), error (one line), target index and name, top-5 classes and
probabilities, weights, explained variance, timings (JSON), and the saliency at model resolution (float32,
flattened, with its side). Analytics tools read it directly.

Failures: a bad image is one row with status "failed" and its one-line error, never a dead job. A worker
that dies (out of memory, a killed process, a lost node) is restarted by Ray (`max_restarts`) and its
batch retried (`max_task_retries`); outputs are written atomically, so a retried batch finds the images the
dead worker had finished complete, does not explain them again, and the table gets each image once. Their
rows say "ok", not "skipped": the driver lists the images finished before the run, and "skipped" is kept for
those; the summary's `recovered` counts the rows relabelled so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .names import one_line, show
from .settings import Settings

PARQUET_NAME = "explanations.parquet"


class DatasetError(ValueError):
    """A usage error of explain_dataset (bad inputs, options or cluster address): one line."""


# ----------------------------------------------------------------------------------------------------
# The actor

@dataclass
class Job:
    """Everything a worker needs (plain data: it travels to the actors)."""
    artifacts: str
    out_dir: str
    settings: Settings = field(default_factory=Settings)   # method, target, engine, limits, ...
    overwrite: bool = False


def _row(source, stem, status, error="", exp_json=None, saliency=None):
    j = exp_json or {}
    top5 = j.get("top5") or []
    sal = np.asarray(saliency, np.float32) if saliency is not None else np.zeros((0, 0), np.float32)
    return {
        "source": source, "stem": stem, "status": status, "error": error,
        "target": int(j["target"]["index"]) if j.get("target") else -1,
        "target_name": j["target"]["name"] if j.get("target") else "",
        "top5_classes": [t["class"] for t in top5], "top5_probabilities": [float(t["probability"]) for t in top5],
        "weights": [float(v) for v in (j.get("weights") or [])],
        "explained_variance": [float(v) for v in (j.get("explained_variance") or [])],
        "timings_ms": json.dumps(j.get("timings_ms") or {}),
        "saliency_side": int(sal.shape[-1]) if sal.size else 0,
        "saliency": sal.ravel().tolist(),
    }


class ExplainActor:
    """One Explainer and one BatchRunner per actor; __call__ explains one Ray Data batch ({"source": [...],
    "stem": [...]}) with the CLI's runner (runtime/batch.py): the same files, names, resume rule and errors.

    Ray Data constructs it without arguments: `bound(job)` makes a subclass carrying the job as a class
    attribute (shipped with the class, not through the object store, so a restarted actor always finds it)."""

    JOB: Job | None = None

    def __init__(self, job: Job | None = None):
        from .batch import BatchRunner
        from .explainer import Explainer

        job = job or self.JOB
        self.job = job
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        self.ex = Explainer.from_artifacts(job.artifacts, job.settings)
        self.runner = BatchRunner(self.ex, job.out_dir, overwrite=job.overwrite)

    def __call__(self, batch: dict) -> dict:
        from .inputs import Item

        items = [Item(str(src), str(stem)) for src, stem in zip(batch["source"], batch["stem"])]
        rows = []
        for o in self.runner.run(items):
            sal = o.saliency if o.status == "ok" else (self.runner.saliency_of(o.stem) if o.status == "skipped" else None)
            rows.append(_row(o.item.source, o.stem, o.status, o.error, o.summary, sal))
        return _columns(rows)


def _finished_stems(out_dir: Path) -> set[str]:
    """Stems whose four output files are all in `out_dir` (one listing of the folder)."""
    from .render import OUTPUT_SUFFIXES

    try:
        names = {e.name for e in os.scandir(out_dir)}
    except OSError:
        return set()
    stems = {n[: -len(".json")] for n in names if n.endswith(".json")}
    return {s for s in stems if all(f"{s}{x}" in names for x in OUTPUT_SUFFIXES)}


def _relabel_recovered(batch, finished_before: set[str]):
    """(batch with "skipped" rows of images not finished before the run relabelled "ok", their count)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    status = batch.column("status").to_pylist()
    stems = batch.column("stem").to_pylist()
    new = ["ok" if st == "skipped" and stem not in finished_before else st for st, stem in zip(status, stems)]
    n = sum(a != b for a, b in zip(status, new))
    if not n:
        return batch, 0
    i = batch.schema.get_field_index("status")
    col = pc.cast(pa.array(new), batch.schema.field(i).type)
    return batch.set_column(i, batch.schema.field(i), col), n


def bound(job: Job, actor: type | None = None) -> type:
    """A subclass of `actor` (default ExplainActor) that carries `job`."""
    base = actor or ExplainActor
    return type(base.__name__, (base,), {"JOB": job, "__module__": base.__module__})


def _columns(rows: list[dict]) -> dict:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=_schema())


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("source", pa.string()), ("stem", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("target", pa.int64()), ("target_name", pa.string()),
        ("top5_classes", pa.list_(pa.string())), ("top5_probabilities", pa.list_(pa.float64())),
        ("weights", pa.list_(pa.float64())), ("explained_variance", pa.list_(pa.float64())),
        ("timings_ms", pa.string()), ("saliency_side", pa.int64()), ("saliency", pa.list_(pa.float32())),
    ])


# ----------------------------------------------------------------------------------------------------
# The driver

@contextmanager
def ray_session(address: str | None = None):
    """Ray for the length of a `with`: joins the running instance, or starts one (`address` None: local;
    "auto" or "ray://host:10001": a cluster) and shuts it down at the end. ray.init installs its own SIGTERM
    handler (sys.exit) and keeps it after ray.shutdown; the handlers that were in place before are put back,
    so that the caller's Ctrl-C / SIGTERM handling is the same after a dataset run as before it."""
    import ray

    if ray.is_initialized():
        yield
        return
    saved = ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
             if threading.current_thread() is threading.main_thread() else {})
    try:
        with _core_lines_to_a_log():
            # (ray.init installs its handler before it connects: a failed init is cleaned up too)
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     logging_level=logging.ERROR)
            try:
                yield
            finally:
                ray.shutdown()
    finally:
        for s, h in saved.items():
            if h is not None:  # None: set outside Python; cannot be put back from here
                signal.signal(s, h)


@contextmanager
def _core_lines_to_a_log():
    """Ray's C++ core writes its own lines (log-level notices, actor warnings) straight to file descriptor 2;
    Ray keeps them in its session's log files too (python-core-driver-*.log). Meanwhile descriptor 2 goes to
    /dev/null and Python's sys.stderr to a copy of the original descriptor, so that every line of this
    program (errors, progress, Ctrl-C) still reaches the terminal and none of Ray's does."""
    try:
        sys.stderr.flush()
        keep = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded, captured): leave it as it is
        yield
        return
    old_stderr = sys.stderr
    sys.stderr = os.fdopen(keep, "w", buffering=1, closefd=False, errors="backslashreplace")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(keep, 2)
        os.close(keep)
        sys.stderr = old_stderr


def explain_dataset(inputs: list[str] | str, artifacts: str | os.PathLike, out_dir: str | os.PathLike,
                    settings: Settings | None = None, *, address: str | None = None, workers: int = 2,
                    gpus_per_worker: float = 0.0, images_per_batch: int = 4, max_restarts: int = 3,
                    max_task_retries: int = 3, parquet: str = PARQUET_NAME, progress: bool = False,
                    actor: type | None = None, overwrite: bool = False, **fields) -> dict:
    """Explain every image of `inputs` on Ray Data; returns a summary (counts, seconds, the table's path).

    settings: a runtime.settings.Settings (method, target, engine, limits, ...); keyword arguments named
    like its fields override it (`explain_dataset(..., method="gradcam", top_p=5)`).
    address: None starts (or joins) a local Ray instance; "auto" or "ray://host:10001" joins a cluster.
    actor: a subclass of ExplainActor to run instead (extra outputs per image, instrumentation)."""
    import ray

    from .artifacts import load_artifacts
    from .explainer import Explainer
    from .inputs import list_sources, output_items

    settings = (settings or Settings()).with_(**fields) if fields else (settings or Settings())
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise DatasetError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if actor is not None and not (isinstance(actor, type) and issubclass(actor, ExplainActor)):
        raise DatasetError(f"actor must be a subclass of ExplainActor, got {actor!r}")
    if images_per_batch < 1:
        raise DatasetError(f"images_per_batch must be >= 1, got {images_per_batch}")
    if settings.engine in ("cuda", "trt") and gpus_per_worker == 0:
        raise DatasetError(f"engine '{settings.engine}' needs gpus_per_worker > 0 (e.g. 1)")
    job = Job(artifacts=str(Path(artifacts).resolve()), out_dir=str(Path(out_dir).resolve()), settings=settings,
              overwrite=overwrite)
    # a missing, tampered or contradictory export, a bad engine or an unknown target fails here, once, not in
    # every actor
    probe = Explainer(load_artifacts(job.artifacts), settings)
    probe.check_graphs(settings.method)
    probe.resolve_target(settings.target)
    del probe
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(s) for s in inputs]
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    # the output folder is never listed as input (a rerun does not explain its own outputs)
    sources, problems = list_sources(specs, exclude=Path(job.out_dir))
    items = output_items(sources)
    # the images finished before this run: a row an actor reports "skipped" for any other image was written
    # by an earlier attempt of this run (a worker that died after writing it, its batch retried): "ok"
    finished_before = set() if overwrite else _finished_stems(Path(job.out_dir))

    with ray_session(address):
        return _run(ray, job, items, problems, finished_before, workers, gpus_per_worker,
                    images_per_batch, max_restarts, max_task_retries, parquet, progress, actor)


def _run(ray, job, items, problems, finished_before, workers, gpus_per_worker, images_per_batch,
         max_restarts, max_task_retries, parquet, progress, actor) -> dict:
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    ds = ray.data.from_items([{"source": it.source, "stem": it.stem} for it in items],
                             override_num_blocks=max(1, min(len(items), workers * 4))) if items else None
    table_rows = 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .fsutil import atomic_open

    counts = {"ok": 0, "skipped": 0, "failed": 0, "recovered": 0}
    errors = [f"{show(spec)}: {problem}" for spec, problem in problems]
    # written to a private temporary next to the table and renamed when complete (runtime/fsutil.py)
    with atomic_open(Path(job.out_dir) / parquet) as f, pq.ParquetWriter(f, _schema()) as writer:
        for spec, problem in problems:
            writer.write_table(pa.Table.from_pylist([_row(spec, "", "failed", f"{show(spec)}: {problem}")],
                                                    schema=_schema()))
            counts["failed"] += 1
            table_rows += 1
        if ds is not None:
            with warnings.catch_warnings():
                # Ray 2.60 documents max_restarts / max_task_retries as map_batches' extra keywords (its
                # own defaults retry forever, which a photo that crashes its worker would never end) and
                # warns that extra keywords are deprecated, without a named replacement yet
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
                out = ds.map_batches(bound(job, actor), batch_size=images_per_batch,
                                     batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                                     num_gpus=gpus_per_worker,
                                     num_cpus=1 if gpus_per_worker == 0 else 0,
                                     max_restarts=max_restarts, max_task_retries=max_task_retries)
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                batch = batch.select(_schema().names).cast(_schema())
                batch, recovered = _relabel_recovered(batch, finished_before)
                counts["recovered"] += recovered
                writer.write_table(batch)
                table_rows += batch.num_rows
                for status, err in zip(batch.column("status").to_pylist(), batch.column("error").to_pylist()):
                    counts[status] = counts.get(status, 0) + 1
                    if status == "failed":
                        errors.append(err)
    return {"inputs": len(items) + len(problems), **counts, "errors": errors, "rows": table_rows,
            "seconds": time.perf_counter() - t0, "parquet": str(Path(job.out_dir) / parquet),
            "workers": workers, "gpus_per_worker": gpus_per_worker}


def build_parser() -> argparse.ArgumentParser:
    from .cli_args import OneLineParser, add_engine_args, add_limit_args, add_method_args

    p = OneLineParser(prog="python -m runtime.dataset", description="Explain a dataset on Ray Data (local or a cluster).")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs or filesystem URIs")
    add_engine_args(p)
    add_method_args(p)
    add_limit_args(p)
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster: auto, ray://HOST:10001 (default: a local instance)")
    r.add_argument("--workers", type=int, default=2, help="actors explaining at once (default 2)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (cuda/trt engines)")
    r.add_argument("--images-per-batch", type=int, default=4, help="images per Ray Data batch (default 4)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="output folder (local or shared; default ./outputs)")
    o.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist")
    o.add_argument("--progress", action="store_true", help="Ray Data's progress bars")
    return p


def main(argv=None) -> int:
    from .artifacts import ArtifactsError
    from .engines import EngineError
    from .cli_args import settings_from_args
    from .explainer import TargetError

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        s = explain_dataset(args.inputs, args.artifacts, args.out, settings, address=args.address,
                            workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                            images_per_batch=args.images_per_batch, progress=args.progress, overwrite=args.overwrite)
    except TargetError as e:
        print(f"error: --target {show(args.target)}: {one_line(e)}", file=sys.stderr)
        return 2
    except (DatasetError, ArtifactsError, EngineError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    for err in s["errors"]:
        print(f"error: {one_line(err)}", file=sys.stderr)
    print(f"explained {s['ok']} of {s['inputs']} inputs on Ray ({s['workers']} workers): {s['failed']} failed, "
          f"{s['skipped']} skipped (outputs exist) in {s['seconds']:.1f} s -> {show(args.out)}; table {show(s['parquet'])}"
          + (f"; {s['recovered']} images finished by a worker that died were kept" if s["recovered"] else ""))
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
