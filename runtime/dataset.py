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

Outputs, per image, in --out (a local or shared folder): the CLI's NAME.overlay.png, NAME.components.png,
NAME.json and NAME.npz, written atomically, with the CLI's names; images whose four files exist are not
explained again (their row is rebuilt from NAME.json and NAME.npz) unless `overwrite`. Plus one Parquet
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARQUET_NAME = "explanations.parquet"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024   # read cap per image file


class DatasetError(ValueError):
    """A usage error of explain_dataset (bad inputs, options or cluster address): one line."""


# ----------------------------------------------------------------------------------------------------
# Listing

def _is_uri(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def list_inputs(specs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Local files/folders/globs (as the CLI) and filesystem URIs -> (image paths or URIs, [(spec, problem)])."""
    from .explain import IMAGE_EXTENSIONS, expand_inputs

    local = [s[len("file://"):] if s.startswith("file://") else s for s in specs if not _is_uri(s)]
    paths, problems = expand_inputs(local) if local else ([], [])
    out = [str(p) for p in paths]
    for spec in (s for s in specs if _is_uri(s)):
        try:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(spec)
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                files = sorted(f.path for f in found if f.type == pafs.FileType.File
                               and os.path.splitext(f.path)[1].lower() in IMAGE_EXTENSIONS)
                scheme = spec.split("://", 1)[0]
                if not files:
                    problems.append((spec, "folder holds no images"))
                out.extend(f"{scheme}://{f}" for f in files)
            elif info.type == pafs.FileType.File:
                out.append(spec)
            else:
                problems.append((spec, "no such file or folder"))
        except Exception as e:  # pyarrow raises OSError, ValueError, ArrowInvalid... per filesystem
            problems.append((spec, f"cannot list ({type(e).__name__}: {str(e).splitlines()[0][:200]})"))
    return out, problems


def output_stems(sources: list[str]) -> list[str]:
    """The CLI's output names (runtime.explain.output_stems), for paths and URIs alike."""
    from .explain import output_stems as cli_stems

    return [it.stem for it in cli_stems([Path(s) for s in sources])]


def read_bytes(source: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, refusing non-regular files and files over max_bytes (ImageError, one line)."""
    from .images import ImageError

    if _is_uri(source):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ImageError(f"{source}: not a regular file")
        if info.size is not None and info.size > max_bytes:
            raise ImageError(f"{source}: {info.size:,} bytes is over the limit max_bytes={max_bytes:,}")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    else:
        import stat

        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ImageError(f"{source}: no such file") from None
        except OSError as e:
            raise ImageError(f"{source}: cannot read ({e.strerror or type(e).__name__})") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError(f"{source}: not a regular file")
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"{source}: over the limit max_bytes={max_bytes:,}")
    return data


# ----------------------------------------------------------------------------------------------------
# The actor

@dataclass
class Job:
    """Everything a worker needs (plain data: it travels to the actors)."""
    artifacts: str
    out_dir: str
    engine: str = "cpu"
    method: str = "decomcam"
    target: object = None            # None (top-1), a class name or an index
    top_p: int = 10
    blur_sigma: float | None = None
    blend_space: str = "pixel"
    ig_steps: int = 16               # decomcam-ig's path midpoints
    ig_baseline: str = "zero"        # decomcam-ig's path start (zero, blur, mean)
    resize: str | None = None
    class_set: str | None = None
    batch_size: int = 32             # images per graph call inside an explanation
    threads: int | None = None       # ORT intra-op threads per actor, and its image pool's (None: up to 8)
    device_id: int = 0
    precision: str = "fp32"
    overwrite: bool = False
    max_pixels: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES


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
    """One Explainer per actor; __call__ explains one Ray Data batch ({"source": [...], "stem": [...]}).

    Ray Data constructs it without arguments: `bound(job)` makes a subclass carrying the job as a class
    attribute (shipped with the class, not through the object store, so a restarted actor always finds it)."""

    JOB: Job | None = None

    def __init__(self, job: Job | None = None):
        job = job or self.JOB
        from .config import DecomCamConfig
        from .engines import EngineOptions
        from .explainer import Explainer

        self.job = job
        self.out_dir = Path(job.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = DecomCamConfig(top_p=job.top_p, blur_sigma=job.blur_sigma, blend_space=job.blend_space,
                                ig_steps=job.ig_steps, ig_baseline=job.ig_baseline)
        opts = EngineOptions(device_id=job.device_id, intra_op_threads=job.threads)
        self.ex = Explainer.from_artifacts(job.artifacts, engine=job.engine, class_set=job.class_set,
                                           batch_size=job.batch_size, engine_options=opts, resize_mode=job.resize,
                                           config=config, precision=job.precision)

    def _done(self, stem: str) -> bool:
        from .render import OUTPUT_SUFFIXES

        return all((self.out_dir / f"{stem}{s}").exists() for s in OUTPUT_SUFFIXES)

    def _existing(self, source: str, stem: str) -> dict:
        j = json.loads((self.out_dir / f"{stem}.json").read_text(encoding="utf-8"))
        with np.load(self.out_dir / f"{stem}.npz") as z:
            sal = z["saliency"]
        return _row(source, stem, "skipped", "", j, sal)

    def __call__(self, batch: dict) -> dict:
        from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
        from .render import render_many, write_payloads

        job = self.job
        rows: list[dict | None] = []
        todo = []  # (index in rows, source, stem, rgb)
        for source, stem in zip(batch["source"], batch["stem"]):
            source, stem = str(source), str(stem)
            if not job.overwrite and self._done(stem):
                try:
                    rows.append(self._existing(source, stem))
                    continue
                except (OSError, ValueError, KeyError):  # unreadable previous outputs: explain again
                    pass
            try:
                rgb = decode_image(read_bytes(source, job.max_bytes), source, job.max_pixels or DEFAULT_MAX_PIXELS)
            except ImageError as e:
                rows.append(_row(source, stem, "failed", str(e)))
                continue
            rows.append(None)
            todo.append((len(rows) - 1, source, stem, rgb))
        if todo:
            try:
                exps = self.ex.explain_arrays([t[3] for t in todo], [t[1] for t in todo], target=job.target,
                                              method=job.method)
            except Exception as e:  # one bad group must not stop the job: each image gets the one line
                msg = f"explanation failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                for i, source, stem, _ in todo:
                    rows[i] = _row(source, stem, "failed", f"{source}: {msg}")
                exps = []
            extra = {"engine": job.engine, "artifacts": str(job.artifacts),
                     "precision": dict(self.ex.graph_precisions)}
            done = list(zip(todo, exps))
            # the pictures are encoded in the image pool, then written in order
            with contextlib.closing(render_many([(t[3], e) for t, e in done], extra, job.threads)) as rendered:
                for ((i, source, stem, rgb), e), payloads in zip(done, rendered):
                    try:
                        if isinstance(payloads, OSError):
                            raise payloads
                        write_payloads(self.out_dir, stem, payloads)
                        j = {**e.summary(), **extra}
                        rows[i] = _row(source, stem, "ok", "", j, e.saliency)
                    except OSError as err:
                        rows[i] = _row(source, stem, "failed", f"{source}: could not write outputs ({err})")
        return _columns(rows)


def _finished_stems(out_dir: Path) -> set[str]:
    """Stems whose four output files are all in `out_dir` (one listing of the folder)."""
    from .render import OUTPUT_SUFFIXES

    try:
        names = {e.name for e in os.scandir(out_dir)}
    except OSError:
        return set()
    first = OUTPUT_SUFFIXES[0]
    stems = {n[: -len(first)] for n in names if n.endswith(first)}
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
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ core logs to stderr otherwise
    try:
        # (ray.init installs its handler before it connects: a failed init is cleaned up too)
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING)
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            for s, h in saved.items():
                if h is not None:  # None: set outside Python; cannot be put back from here
                    signal.signal(s, h)


def explain_dataset(inputs: list[str] | str, artifacts: str | os.PathLike, out_dir: str | os.PathLike, *,
                    address: str | None = None, workers: int = 2, gpus_per_worker: float = 0.0,
                    images_per_batch: int = 4, max_restarts: int = 3, max_task_retries: int = 3,
                    parquet: str = PARQUET_NAME, progress: bool = False, actor: type | None = None,
                    **job_options) -> dict:
    """Explain every image of `inputs` on Ray Data; returns a summary (counts, seconds, the table's path).

    address: None starts (or joins) a local Ray instance; "auto" or "ray://host:10001" joins a cluster.
    job_options: the fields of `Job` (engine, method, target, top_p, overwrite, ...).
    actor: a subclass of ExplainActor to run instead (extra outputs per image, instrumentation)."""
    import ray

    from .artifacts import load_artifacts
    from .methods import list_methods

    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise DatasetError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if actor is not None and not (isinstance(actor, type) and issubclass(actor, ExplainActor)):
        raise DatasetError(f"actor must be a subclass of ExplainActor, got {actor!r}")
    if images_per_batch < 1:
        raise DatasetError(f"images_per_batch must be >= 1, got {images_per_batch}")
    job = Job(artifacts=str(Path(artifacts).resolve()), out_dir=str(Path(out_dir).resolve()), **job_options)
    if job.method not in list_methods():
        raise DatasetError(f"unknown method '{job.method}'; valid methods: {', '.join(list_methods())}")
    if job.engine in ("cuda", "trt") and gpus_per_worker == 0:
        raise DatasetError(f"engine '{job.engine}' needs gpus_per_worker > 0 (e.g. 1)")
    # a missing or tampered export, a bad engine or an unknown target fails here, once, not in every actor
    from .explainer import Explainer

    probe = Explainer(load_artifacts(job.artifacts), engine=job.engine, class_set=job.class_set,
                      precision=job.precision)
    probe.resolve_target(job.target)
    del probe
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(s) for s in inputs]
    sources, problems = list_inputs(specs)
    stems = output_stems(sources)
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    # the images finished before this run: a row an actor reports "skipped" for any other image was written
    # by an earlier attempt of this run (a worker that died after writing it, its batch retried): "ok"
    finished_before = set() if job.overwrite else _finished_stems(Path(job.out_dir))

    with ray_session(address):
        return _run(ray, job, sources, problems, stems, finished_before, workers, gpus_per_worker,
                    images_per_batch, max_restarts, max_task_retries, parquet, progress, actor)


def _run(ray, job, sources, problems, stems, finished_before, workers, gpus_per_worker, images_per_batch,
         max_restarts, max_task_retries, parquet, progress, actor) -> dict:
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    ds = ray.data.from_items([{"source": s, "stem": t} for s, t in zip(sources, stems)],
                             override_num_blocks=max(1, min(len(sources), workers * 4))) if sources else None
    table_rows = 0
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .fsutil import atomic_open

    counts = {"ok": 0, "skipped": 0, "failed": 0, "recovered": 0}
    errors = [f"{spec}: {problem}" for spec, problem in problems]
    # written to a private temporary next to the table and renamed when complete (runtime/fsutil.py)
    with atomic_open(Path(job.out_dir) / parquet) as f, pq.ParquetWriter(f, _schema()) as writer:
        for spec, problem in problems:
            writer.write_table(pa.Table.from_pylist([_row(spec, "", "failed", f"{spec}: {problem}")],
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
    return {"inputs": len(sources) + len(problems), **counts, "errors": errors, "rows": table_rows,
            "seconds": time.perf_counter() - t0, "parquet": str(Path(job.out_dir) / parquet),
            "workers": workers, "gpus_per_worker": gpus_per_worker}


def build_parser() -> argparse.ArgumentParser:
    from .explain import add_engine_args, add_method_args

    p = argparse.ArgumentParser(prog="python -m runtime.dataset",
                                description="Explain a dataset on Ray Data (local or a cluster).")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs or filesystem URIs")
    add_engine_args(p)
    add_method_args(p)
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster: auto, ray://HOST:10001 (default: a local instance)")
    r.add_argument("--workers", type=int, default=2, help="actors explaining at once (default 2)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (cuda/trt engines)")
    r.add_argument("--images-per-batch", type=int, default=4, help="images per Ray Data batch (default 4)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="outputs", help="output folder (local or shared; default ./outputs)")
    o.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    o.add_argument("--progress", action="store_true", help="Ray Data's progress bars")
    return p


def main(argv=None) -> int:
    from .artifacts import ArtifactsError
    from .engines import EngineError
    from .explainer import TargetError

    args = build_parser().parse_args(argv)
    target = args.target
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    try:
        s = explain_dataset(args.inputs, args.artifacts, args.out, address=args.address, workers=args.workers,
                            gpus_per_worker=args.gpus_per_worker, images_per_batch=args.images_per_batch,
                            progress=args.progress, engine=args.engine, method=args.method, target=target,
                            top_p=args.top_p, blur_sigma=args.blur_sigma, blend_space=args.blend_space,
                            ig_steps=args.ig_steps, ig_baseline=args.ig_baseline, resize=args.resize,
                            class_set=args.classes, batch_size=args.batch_size, threads=args.threads,
                            device_id=args.device_id, precision=args.precision, overwrite=args.overwrite)
    except (DatasetError, ArtifactsError, EngineError, TargetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for err in s["errors"]:
        print(f"error: {err}", file=sys.stderr)
    print(f"explained {s['ok']} of {s['inputs']} inputs on Ray ({s['workers']} workers): {s['failed']} failed, "
          f"{s['skipped']} skipped (outputs exist) in {s['seconds']:.1f} s -> {args.out}; table {s['parquet']}"
          + (f"; {s['recovered']} images finished by a worker that died were kept" if s["recovered"] else ""))
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
