"""Reading an artifacts folder written by `python -m export`: manifest, graph integrity, class sets."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import ManifestError, validate_manifest
from .spec import MANIFEST_NAME, Family, GraphSpec, family

# precisions that run some graphs of another precision: name -> (that precision, the graphs run at it)
MIXED = {"fp16-masks": ("fp16", ("classify", "head"))}


class ArtifactsError(ValueError):
    """A missing, incomplete or tampered artifacts folder (one-line message naming the file)."""


def sha256_path(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass
class ClassSetData:
    name: str
    labels: list[str]
    embeddings: np.ndarray | None  # [L, D] float32, unit rows; None for a fixed-class model (no text input)


@dataclass
class Artifacts:
    root: Path
    manifest: dict
    verify: bool = True                          # check each graph's sha256 before it is used
    checked: set = field(default_factory=set)    # graphs already checked

    def graph_entries(self, precision: str = "fp32") -> dict:
        """The manifest's graph entries of a precision: "fp32" (`graphs`), "fp16" (`precisions.fp16.graphs`,
        written by export/precision.py) or "int8" (`precisions.int8.graphs`, export/quantize.py);
        "fp16-masks" runs some of the fp16 graphs (see precision_for)."""
        if precision in MIXED:
            precision = MIXED[precision][0]
        if precision == "fp32":
            return self.manifest["graphs"]
        entry = (self.manifest.get("precisions") or {}).get(precision)
        if entry is None:
            how = (f"python -m export quantize --artifacts {self.root}" if precision == "int8" else
                   f"export with --precision {precision} (or python -m export.precision --artifacts {self.root})")
            raise ArtifactsError(f"{self.root / MANIFEST_NAME}: no {precision} graphs; {how}")
        return entry["graphs"]

    def precision_for(self, name: str, precision: str) -> str:
        """The precision graph `name` runs at when `precision` is asked for: that one where the export has
        the graph in it (fp16 has every graph; int8 those quantized), else fp32. "fp16-masks": the fp16
        classify and head graphs (the perturbation forwards: Decom-CAM's masked images, Score-CAM's,
        Ablation-CAM's), the fp32 explain and features graphs (the activations and gradients that the
        decomposition and the CAMs read)."""
        if precision in MIXED:
            base, graphs = MIXED[precision]
            return base if name in graphs and name in self.graph_entries(base) else "fp32"
        if precision == "fp32" or name not in self.graph_entries(precision):
            return "fp32"
        return precision

    def check_graph(self, name: str, precision: str = "fp32") -> Path:
        """The graph's path, after checking it is listed, present, of this runtime's contract and (when
        `verify`) that its sha256 matches the manifest. Each graph is checked once."""
        mpath = self.root / MANIFEST_NAME
        entry = self.graph_entries(precision).get(name)
        if entry is None:
            raise ArtifactsError(f"{mpath}: no '{name}' graph listed; re-export with this version")
        path = self.root / entry["file"]
        if (name, precision) in self.checked:
            return path
        if not path.is_file():
            raise ArtifactsError(f"{path}: graph file missing")
        if entry.get("inputs") != self.spec(name).to_json()["inputs"]:
            raise ArtifactsError(f"{path}: graph inputs differ from this runtime's contract; re-export")
        if self.verify:
            digest = sha256_path(path)
            if digest != entry["sha256"]:
                raise ArtifactsError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...; "
                    f"the graph was modified or belongs to another export"
                )
        self.checked.add((name, precision))
        return path

    @property
    def family(self) -> Family:
        """The model family (runtime/spec.py): which graph contracts apply and whether classes are data."""
        return family(self.manifest.get("family"))

    @property
    def text_input(self) -> bool:
        return self.family.text_input

    def spec(self, name: str) -> GraphSpec:
        return self.family.graphs[name]

    @property
    def preprocess(self) -> dict:
        """Resize policy: {"resize": "crop"|"stretch", "resize_size": int, "interpolation": "bicubic"|"bilinear"}."""
        pre = {"resize": "crop", "resize_size": self.input_size, "interpolation": "bicubic"}
        pre.update(self.manifest.get("preprocess") or {})
        return pre

    def preprocess_image(self, rgb: np.ndarray, mode: str | None = None, max_aspect: float | None = None):
        """uint8 RGB [H, W, 3] -> (x [3, S, S] float32, Geometry) with this export's policy (`mode` overrides
        the resize: "crop" or "stretch"); an empty image or one past max_aspect is a ValueError."""
        from .images import DEFAULT_MAX_ASPECT, preprocess

        pre = self.preprocess
        return preprocess(rgb, self.input_size, self.mean, self.std, mode or pre["resize"],
                          resize_size=int(pre["resize_size"]), interpolation=pre["interpolation"],
                          max_aspect=DEFAULT_MAX_ASPECT if max_aspect is None else max_aspect)

    def preprocess_images(self, rgbs, mode: str | None = None, workers: int | None = None,
                          max_aspect: float | None = None) -> tuple[np.ndarray, list]:
        """Several images -> (x [B, 3, S, S] float32, geometries), as preprocess_image. More than one image
        run in a shared thread pool (Pillow's resize and numpy release the GIL) of `workers` threads
        (None: one per CPU, at most 8; 1: in the calling thread)."""
        pool = None if len(rgbs) <= 1 else image_pool(workers)
        if pool is None:
            pre = [self.preprocess_image(im, mode, max_aspect) for im in rgbs]
        else:
            pre = list(pool.map(lambda im: self.preprocess_image(im, mode, max_aspect), rgbs))
        if not pre:
            return np.zeros((0, 3, self.input_size, self.input_size), np.float32), []
        return np.stack([p[0] for p in pre]), [p[1] for p in pre]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def input_size(self) -> int:
        return int(self.manifest["input_size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["std"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest["dims"])

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("random_weights", False))

    def graph_path(self, name: str) -> Path:
        return self.root / self.manifest["graphs"][name]["file"]

    def load_class_set(self, name: str | None = None) -> ClassSetData:
        """A class set, checked before use: labels against the manifest's count (and `labels_sha256` when
        recorded), the embeddings' .npy header (float dtype, shape [count, D], file size) before anything
        is loaded, and (when `verify`) their sha256 against the manifest. Fixed-class families may have
        labels only (embeddings None)."""
        sets = self.manifest.get("class_sets") or {}
        name = name or self.manifest.get("default_class_set")
        if not name or name not in sets:
            raise ArtifactsError(
                f"{self.root / MANIFEST_NAME}: no class set '{name}'; available: {', '.join(sets) or 'none'}"
            )
        entry = sets[name]
        lab_path = self.root / entry["labels"]
        emb_path = self.root / entry["embeddings"] if "embeddings" in entry else None
        for p in (lab_path, emb_path):
            if p is not None and not p.is_file():
                raise ArtifactsError(f"{p}: class set file missing")
        raw = lab_path.read_bytes()
        if "labels_sha256" in entry and hashlib.sha256(raw).hexdigest() != entry["labels_sha256"]:
            raise ArtifactsError(f"{lab_path}: sha256 does not match the manifest's labels_sha256; "
                                 f"the labels were modified or belong to another export")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactsError(f"{lab_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        labels = text.split("\n")
        if labels and labels[-1] == "":
            labels.pop()
        if len(labels) != entry["count"] or any(not lab or not lab.isprintable() for lab in labels):
            raise ArtifactsError(f"{lab_path}: expected {entry['count']} non-empty printable labels, one per line "
                                 f"(found {len(labels)} lines)")
        if not self.text_input:  # fixed classes: labels only, in the classifier's output order
            k = self.dims.get("K")
            if k is not None and len(labels) != int(k):
                raise ArtifactsError(f"{lab_path}: {len(labels)} labels for a classifier with {k} classes")
            return ClassSetData(name, labels, None)
        if emb_path is None:
            raise ArtifactsError(f"{self.root / MANIFEST_NAME}: class set '{name}' has no embeddings, which a "
                                 f"{self.family.name} export needs")
        emb = _load_embeddings(emb_path, (len(labels), self.dims["D"]), entry["sha256"] if self.verify else None)
        return ClassSetData(name, labels, emb)




def _load_embeddings(path: Path, shape: tuple[int, int], sha256: str | None) -> np.ndarray:
    """A float .npy of exactly `shape`, checked from its header (and `sha256`) before it is read: [L, D] float32."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            got_shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise ArtifactsError(f"{path}: not a readable .npy file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if dtype.kind != "f" or dtype.hasobject:
        raise ArtifactsError(f"{path}: embeddings have dtype {dtype}, expected a float type")
    if tuple(got_shape) != shape:
        raise ArtifactsError(f"{path}: embeddings have shape {tuple(got_shape)}, expected {shape}")
    if path.stat().st_size != offset + shape[0] * shape[1] * dtype.itemsize:
        raise ArtifactsError(f"{path}: file size does not match its header (truncated or padded)")
    if sha256 is not None:
        digest = sha256_path(path)
        if digest != sha256:
            raise ArtifactsError(f"{path}: sha256 {digest[:12]}... does not match the manifest's {sha256[:12]}...; "
                                 f"the embeddings were modified or belong to another export")
    emb = np.load(path, allow_pickle=False).astype(np.float32)
    if not np.all(np.isfinite(emb)):
        raise ArtifactsError(f"{path}: embeddings hold non-finite values")
    return np.ascontiguousarray(emb)


def load_artifacts(root: str | os.PathLike, verify: bool = True, graphs=("explain", "classify")) -> Artifacts:
    """Read and check an artifacts folder; `verify` checks each needed graph's sha256 against the manifest."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactsError(f"{root}: artifacts folder not found (create it with `python -m export ... --out {root}`)")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactsError(f"{mpath}: manifest missing; not an artifacts folder written by `python -m export`")
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, too deep
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ArtifactsError(f"{mpath}: not valid JSON ({first})") from None
    except OSError as e:
        raise ArtifactsError(f"{mpath}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        validate_manifest(manifest, mpath)
    except ManifestError as e:
        raise ArtifactsError(str(e)) from None
    art = Artifacts(root, manifest, verify=verify)
    for name in graphs:
        art.check_graph(name)
    return art


_POOL_PREFIX = "decomcam-images"
_pools: dict = {}
_pools_lock = threading.Lock()


def image_pool(workers: int | None = None):
    """A shared thread pool for per-image host work, or None where the work should stay in the calling
    thread: workers == 1, or a call from one of the pool's own threads (which would otherwise wait on
    itself). One pool per (process, size): a forked child gets its own, not its parent's threads, which do
    not exist there."""
    n = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    if n <= 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
        return None
    key = (os.getpid(), n)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ImagePool(n)
    return pool


class ImagePool:
    """A minimal thread pool of daemon threads (submit -> concurrent.futures.Future, ordered map).

    Its work is pure computation (resizing, PNG encoding), never a write, so the process need not wait for
    it at exit: with ThreadPoolExecutor, whose threads Python joins at exit, a second Ctrl-C would wait for
    every queued job. An exception (BaseException too) raised by a job is re-raised by its result()."""

    def __init__(self, size: int):
        import queue

        self.size = int(size)
        self._jobs = queue.SimpleQueue()
        for i in range(self.size):
            threading.Thread(target=self._work, name=f"{_POOL_PREFIX}_{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():   # cancelled while queued
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 (handed to the caller through the future)
                future.set_exception(e)

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        self._jobs.put((future, fn, args))
        return future

    def map(self, fn, items) -> list:
        """[fn(x) for x in items], run in the pool, in order (every job submitted at once)."""
        futures = [self.submit(fn, x) for x in items]
        return [f.result() for f in futures]
