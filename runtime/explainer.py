"""The Python API: `Explainer.from_artifacts(dir).explain(images)`.

One explanation of B images:
    preprocess (runtime.images)          -> x [B, 3, S, S]
    explain.onnx (x, text, target)       -> logits [B, L], activations, gradients [B, C, h, w]
    method (e.g. Decom-CAM)              -> decompose, masks, classify.onnx on (p+1)B images, integrate
    Explanation per image                -> maps in model-input and original coordinates, top-5, timings
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .artifacts import Artifacts, ArtifactsError, image_pool, load_artifacts
from .backend import Backend, get_backend
from .config import DecomCamConfig
from .engines import EngineOptions, providers_for
from .images import Geometry, load_image, preprocess_on, to_original_on, unnormalize
from .methods import Method, MethodContext, get_method
from .numerics import chunks, fixed_shape, softmax
from .runner import GraphRunner, make_runner
from .settings import Settings
from .stages import Stages


class TargetError(ValueError):
    """An unknown or out-of-range target class."""


@dataclass
class Explanation:
    source: str | None                 # file path, or None for an array input
    method: str
    target: int                        # explained class index
    target_name: str
    saliency: np.ndarray               # [S, S] float32 in [0, 1], model-input coordinates
    saliency_original: np.ndarray      # [H0, W0] float32, original image coordinates
    components: np.ndarray | None      # [p, S, S] feature-level maps (Decom-CAM), model-input coordinates
    weights: np.ndarray | None         # [p]
    scores: np.ndarray | None          # [p] gains C_i
    explained_variance: np.ndarray | None  # [p]
    singular_values: np.ndarray | None     # [p]
    logits: np.ndarray                 # [L]
    top5: list[tuple[str, float]]      # (class, softmax probability over the class set)
    geometry: Geometry
    input_rgb: np.ndarray              # [S, S, 3] uint8, the model input as pixels
    timings: dict = field(default_factory=dict)  # stage -> seconds, per image (batch stages are shared)
    random_weights: bool = False       # the model carries random weights (maps show the method only)
    transfers: list = field(default_factory=list)  # host<->device copies of the call (shared by its images)

    def components_original(self) -> np.ndarray | None:
        """[p, H0, W0] component maps in original image coordinates (computed on demand)."""
        if self.components is None:
            return None
        return np.stack([self.geometry.to_original(c) for c in self.components])

    def summary(self) -> dict:
        """JSON-ready numbers (no maps)."""

        def lst(a):
            return None if a is None else [float(v) for v in np.asarray(a).ravel()]

        return {
            "source": self.source,
            "method": self.method,
            "target": {"index": self.target, "name": self.target_name},
            "top5": [{"class": n, "probability": p} for n, p in self.top5],
            "weights": lst(self.weights),
            "scores": lst(self.scores),
            "explained_variance": lst(self.explained_variance),
            "singular_values": lst(self.singular_values),
            "input_size": int(self.saliency.shape[-1]),
            "original_size": [int(self.geometry.orig_h), int(self.geometry.orig_w)],
            "timings_ms": {k: 1e3 * v for k, v in self.timings.items()},
            "random_weights": self.random_weights,
        }


class Explainer:
    """Sessions are created once per Explainer and reused for every call.

    settings: a runtime.settings.Settings (method, p, target, engine, precision, batch size, threads,
    limits, ...); keyword arguments named like its fields override it (`Explainer(art, engine="cpu",
    top_p=5)`). engine_options / config / backend: lower-level overrides (ORT options such as tf32 or
    fixed_chunks, DecomCamConfig fields such as authors_top_k, an array back end)."""

    def __init__(self, artifacts: Artifacts, settings: Settings | None = None, *,
                 engine_options: EngineOptions | None = None, backend: Backend | str | None = None,
                 config: DecomCamConfig | None = None, **fields):
        settings = settings or Settings()
        if fields:
            settings = settings.with_(**fields)   # an unknown field is a TypeError naming it
        self.settings = settings
        self.artifacts = artifacts
        # "fp16": the export's fp16 graphs; "fp16-masks": its fp16 classify and head graphs, fp32 explain and
        # features (Artifacts.precision_for); "int8": its int8 graphs where it has them, fp32 for the others
        self.precision = settings.precision
        artifacts.graph_entries(self.precision)  # an export without them fails here, in one line
        self.graph_precisions: dict[str, str] = {}   # graph -> the precision it runs at
        self.engine = settings.engine
        self.batch_size = settings.batch_size
        self.options = engine_options or settings.engine_options()
        if self.engine == "trt" and self.options.trt_cache_dir is None:
            self.options.trt_cache_dir = str(artifacts.root / "trt-cache")
        providers_for(self.engine, self.options)  # an engine this machine cannot run fails here, in one line
        if backend is None:
            backend = "cupy" if self.engine in ("cuda", "trt") else "numpy"
        self.backend = get_backend(backend, self.options.device_id) if isinstance(backend, str) else backend
        pre = artifacts.preprocess  # resize policy, size, interpolation: images are preprocessed as exported
        self.resize_mode = settings.resize or pre["resize"]   # None: the export's own policy (manifest)
        # images preprocessed where the graphs run: on a device back end, by default
        self.device_images = self.backend.on_device if settings.device_images is None else settings.device_images
        if self.device_images and not hasattr(self.backend, "cache"):
            raise ValueError("device_images needs a matrix back end (MatrixBackend, e.g. CuPy)")
        self.config = config or settings.config()
        class_set = settings.class_set
        if class_set is not None and not artifacts.text_input:
            raise ArtifactsError(
                f"{artifacts.root}: {artifacts.model} has a fixed class set ('{artifacts.manifest.get('default_class_set')}'"
                f", {artifacts.dims.get('K')} classes); choosing a class set applies to CLIP exports only")
        self.classes = artifacts.load_class_set(class_set)
        # [L, D] class embeddings fed to every graph of a CLIP export; None for a fixed-class model
        self.text = self.backend.asarray(self.classes.embeddings) if artifacts.text_input else None
        self.size = artifacts.input_size
        self._sessions: dict[str, GraphRunner] = {}

    @classmethod
    def from_artifacts(cls, root: str | os.PathLike, settings: Settings | None = None, verify: bool = True,
                       **kw) -> "Explainer":
        return cls(load_artifacts(root, verify=verify), settings, **kw)

    # -- graphs -----------------------------------------------------------------------------------------
    def runner(self, name: str) -> GraphRunner:
        r = self._sessions.get(name)
        if r is None:
            precision = self.artifacts.precision_for(name, self.precision)
            self.graph_precisions[name] = precision
            r = self._sessions[name] = make_runner(self.artifacts, name, self.engine, self.options, self.backend,
                                                   len(self.classes.labels), self.batch_size, precision)
        return r

    def feed(self, **arrays) -> dict:
        """A graph feed: the given arrays plus the class embeddings when the family takes a `text` input."""
        return {**arrays, "text": self.text} if self.text is not None else arrays

    def graphs_for(self, method: "str | Method") -> list[str]:
        """The graphs `method` runs (what explain_arrays opens for it), to check them all up front."""
        meth = method if isinstance(method, Method) else get_method(method)
        names = ["classify"]
        if meth.needs_gradients or (meth.needs_activations and "features" not in self.artifacts.manifest["graphs"]):
            names.append("explain")
        elif meth.needs_activations:
            names.append("features")
        if meth.needs_head:
            names.append("head")
        if meth.needs_head_grad:
            names.append("head_grad")
        return names

    def check_graphs(self, method: "str | Method") -> None:
        """Check every graph `method` runs, at this precision, before any image: listed, present, of the
        contract, its sha256, and its own declared inputs and outputs against the manifest (the sessions are
        created here; they are the ones the explanations use)."""
        for name in self.graphs_for(method):
            self.artifacts.check_graph(name, self.artifacts.precision_for(name, self.precision))
            self.runner(name)

    @property
    def fixed_chunks(self) -> bool:
        """Pad the last chunk of a multi-chunk graph call to the batch size (EngineOptions.fixed_chunks)."""
        flag = self.options.fixed_chunks
        return self.engine in ("cuda", "trt") if flag is None else bool(flag)

    def _chunked(self, graph: str, name: str, arrays) -> object:
        """Run a (batch[, text]) -> logits graph over `arrays` in chunks of batch_size; logits [N, L]."""
        return self._rows(graph, {name: arrays}, ["logits"])["logits"]

    def _rows(self, graph: str, rows: dict, outputs: list[str]) -> dict:
        """Run `graph` over per-row inputs `rows` ({input: [N, ...]}, the same N; the class embeddings are
        added) in chunks of batch_size -> {output: [N, ...]}.

        With fixed_chunks, a call over more than batch_size rows runs chunks of exactly batch_size (the
        last padded with zeros, its padded rows dropped), so the graph sees one shape whatever N is."""
        r = self.runner(graph)
        n = next(iter(rows.values())).shape[0]
        if any(a.shape[0] != n for a in rows.values()):
            raise ValueError(f"{graph}: per-row inputs of different lengths "
                             f"{ {k: a.shape[0] for k, a in rows.items()} }")
        bs, xp = self.batch_size, self.backend.xp
        outs: dict[str, list] = {o: [] for o in outputs}
        for i, j in chunks(n, bs):
            feed = {}
            for name, arrays in rows.items():
                part = arrays[i:j]
                if self.fixed_chunks and n > bs and j - i < bs:
                    part = self.backend.asarray(part)   # a host array is uploaded here (the runner would have)
                feed[name] = fixed_shape(xp, part, bs, n, self.fixed_chunks)
            res = r.run(self.feed(**feed), outputs=outputs)
            for o in outputs:
                outs[o].append(res[o][:j - i])
        return {o: v[0] if len(v) == 1 else xp.concatenate(v) for o, v in outs.items()}

    def classify(self, images) -> object:
        """images [N, 3, S, S] -> logits [N, L], through classify.onnx in chunks of batch_size."""
        return self._chunked("classify", "image", images)

    def head(self, acts) -> object:
        """activations [N, C, h, w] -> logits [N, L], through head.onnx in chunks of batch_size."""
        return self._chunked("head", "activations", acts)

    def features(self, images, target=None) -> object:
        """images [N, 3, S, S] -> activations of the target layer [N, C, h, w], through features.onnx in chunks
        of batch_size (explain.onnx, with `target` or top-1, in an export without features.onnx)."""
        if "features" in self.artifacts.manifest["graphs"]:
            return self._rows("features", {"image": images}, ["activations"])["activations"]
        n = images.shape[0]
        tgt = self.backend.asarray(np.full(n, -1, np.int64) if target is None else target, dtype=np.int64)
        return self._rows("explain", {"image": images, "target": tgt}, ["activations"])["activations"]

    def head_gradient(self, acts, target) -> object:
        """activations [N, C, h, w], target [N] int64 -> d logits[n, target[n]] / d activations [N, C, h, w] at
        those activations, through head_grad.onnx in chunks of batch_size."""
        tgt = self.backend.asarray(target, dtype=np.int64)
        return self._rows("head_grad", {"activations": acts, "target": tgt}, ["gradients"])["gradients"]

    # -- targets ----------------------------------------------------------------------------------------
    def resolve_target(self, target) -> int:
        """A class name or index -> index; -1 for None (top-1)."""
        labels = self.classes.labels
        if target is None:
            return -1
        if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer, str)):
            raise TargetError(f"target must be a class index, a class name or None, got {target!r}")
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < len(labels):
                raise TargetError(f"target index {target} is out of range for class set "
                                  f"'{self.classes.name}' ({len(labels)} classes)")
            return int(target)
        name = str(target)
        if name in labels:
            return labels.index(name)
        low = {lab.lower(): i for i, lab in enumerate(labels)}
        if name.lower() in low:
            return low[name.lower()]
        close = difflib.get_close_matches(name, labels, n=3, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise TargetError(f"unknown target class '{name}' in class set '{self.classes.name}'{hint}")

    # -- explanation ------------------------------------------------------------------------------------
    def load(self, item) -> tuple[np.ndarray, str | None]:
        if isinstance(item, np.ndarray):
            return item, None
        s = self.settings
        return load_image(item, s.max_pixels, s.max_bytes, s.max_aspect), str(item)

    def explain(self, inputs, target=None, top_p: int | None = None, method: "str | Method | None" = None,
                config: DecomCamConfig | None = None):
        """Explain one image (path or uint8 RGB array) or a list of them.

        target: None (the settings' target: by default each image's top-1 class), a class name, or an
        index; or a list, one per image. method / top_p: None for the settings'.
        Returns an Explanation for a single input, a list for a list."""
        single = isinstance(inputs, (str, os.PathLike, np.ndarray))
        items = [inputs] if single else list(inputs)
        t0 = time.perf_counter()
        rgbs, sources = zip(*(self.load(it) for it in items)) if items else ((), ())
        load_s = time.perf_counter() - t0
        res = self.explain_arrays(list(rgbs), list(sources), target=target, top_p=top_p, method=method,
                                  config=config)
        for e in res:
            e.timings["load"] = load_s / max(len(res), 1)
        return res[0] if single else res

    def _preprocess_on_device(self, rgbs: list[np.ndarray]):
        """(x [B, 3, S, S] on the device, the model inputs as uint8 [B, S, S, 3] there, geometries): each
        image's uint8 pixels uploaded (a quarter of its float32 bytes) and preprocessed on the device."""
        be, pre = self.backend, self.artifacts.preprocess
        xs, pixs, geoms = [], [], []
        for rgb in rgbs:
            dev = be.asarray(np.ascontiguousarray(rgb), name="image.uint8")
            x, pix, g = preprocess_on(be.xp, dev, self.size, self.artifacts.mean, self.artifacts.std,
                                      self.resize_mode, resize_size=int(pre["resize_size"]),
                                      interpolation=pre["interpolation"], max_aspect=self.settings.max_aspect,
                                      cache=be.cache)
            xs.append(x)
            pixs.append(pix)
            geoms.append(g)
        return be.xp.stack(xs), be.xp.stack(pixs), geoms

    def preprocess(self, rgbs: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """Decoded uint8 RGB images [H, W, 3] -> (x [B, 3, S, S] float32 on the host, geometries), as the
        export was made; `explain_arrays(prepared=...)` takes it (the CLI's loader thread runs this)."""
        return self.artifacts.preprocess_images(rgbs, self.resize_mode, self.options.intra_op_threads,
                                                max_aspect=self.settings.max_aspect)

    def explain_arrays(self, rgbs: list[np.ndarray], sources: list[str | None] | None = None, target=None,
                       top_p: int | None = None, method: "str | Method | None" = None,
                       config: DecomCamConfig | None = None,
                       prepared: tuple[np.ndarray, list] | None = None,
                       components: bool = True, original: bool = True) -> list[Explanation]:
        """Explain decoded uint8 RGB images [H, W, 3]; images in one call share the graph batches.

        prepared: `self.preprocess(rgbs)`, when already computed on the host (its time is then not in the
        timings). Without it, a device back end with device_images uploads the uint8 pixels and resizes,
        crops and normalises there (runtime.images.preprocess_on: the host's numbers, bit for bit).
        components: bring the method's component maps to the host (Decom-CAM: p maps of S x S per image,
        10x the bytes of the saliency map at p = 10); False leaves Explanation.components None, so that
        on a GPU back end only the saliency maps and the numbers come down.
        original: the saliency in original image coordinates (Explanation.saliency_original, H0 x W0
        float32; made on the device with device_images); False leaves it None."""
        if not rgbs:
            return []
        cfg = config or self.config
        if top_p is not None:
            cfg = cfg.with_(top_p=top_p)
        method = self.settings.method if method is None else method
        if target is None:
            target = self.settings.target
        meth = method if isinstance(method, Method) else get_method(method)
        be = self.backend
        n = len(rgbs)
        sources = sources or [None] * n
        targets = list(target) if isinstance(target, (list, tuple)) else [target] * n
        if len(targets) != n:
            raise TargetError(f"{len(targets)} targets given for {n} images")
        tgt = np.array([self.resolve_target(t) for t in targets], dtype=np.int64)

        stage = Stages(be)
        be.transfers.take()  # what crossed before this call (class embeddings) is not this call's
        pix_dev = None
        if prepared is None and self.device_images:
            with stage("preprocess"):
                x_host, pix_dev, geoms = self._preprocess_on_device(rgbs)
        elif prepared is None:
            with stage("preprocess"):
                x_host, geoms = self.preprocess(rgbs)
        else:
            x_host, geoms = prepared
            if len(x_host) != n or len(geoms) != n:
                raise ValueError(f"prepared holds {len(x_host)} images for {n} given")

        with stage("explain"):
            x = be.asarray(x_host)
            acts = grads = None
            if meth.needs_gradients:
                out = self.runner("explain").run(self.feed(image=x, target=be.asarray(tgt)))
                logits, acts, grads = out["logits"], out["activations"], out["gradients"]
            elif meth.needs_activations and "features" in self.artifacts.manifest["graphs"]:
                out = self.runner("features").run(self.feed(image=x))  # forward only, no backward
                logits, acts = out["logits"], out["activations"]
            elif meth.needs_activations:  # an export without features.onnx: explain.onnx, which also runs its backward
                out = self.runner("explain").run(self.feed(image=x, target=be.asarray(tgt)),
                                                 outputs=["logits", "activations"])
                logits, acts = out["logits"], out["activations"]
            else:
                logits = self.classify(x)
        logits_host = be.to_host(logits)
        tgt = np.where(tgt < 0, logits_host.argmax(1), tgt).astype(np.int64)

        ctx = MethodContext(
            backend=be, x=x, text=self.text, target=tgt, logits=logits, activations=acts, gradients=grads,
            classify=self.classify, head=self.head if meth.needs_head else None,
            head_gradient=self.head_gradient if meth.needs_head_grad else None,
            features=self.features if meth.needs_activations else None,
            mean=self.artifacts.mean, std=self.artifacts.std, logit_scale=self.artifacts.logit_scale, config=cfg,
            stage=stage, batch_size=self.batch_size, fixed_chunks=self.fixed_chunks,
        )
        mo = meth(ctx)

        with stage("postprocess"):
            def host(a):
                return None if a is None else be.to_host(a)

            sal = host(mo.saliency)
            comps = host(mo.components) if components else None
            wts, scores = host(mo.weights), host(mo.scores)
            evr, sv = host(mo.explained_variance), host(mo.singular_values)
            probs = softmax(np, logits_host.astype(np.float64))
            mean, std = self.artifacts.mean, self.artifacts.std

            def finish(i):  # per image, on the host: the input as pixels, the saliency in original coordinates
                if pix_dev is not None:   # computed on the device: only the uint8 pixels and maps come down
                    orig = (be.to_host(to_original_on(be.xp, geoms[i], mo.saliency[i], be.cache),
                                       name="saliency_original") if original else None)
                    return be.to_host(pix_dev[i], name="input_rgb"), orig
                pix = (unnormalize(x_host[i], mean, std) * 255).round().astype(np.uint8)
                return (np.ascontiguousarray(pix.transpose(1, 2, 0)),
                        geoms[i].to_original(sal[i]) if original else None)

            pool = image_pool(self.options.intra_op_threads) if n > 1 and pix_dev is None else None
            finished = list(pool.map(finish, range(n))) if pool is not None else [finish(i) for i in range(n)]
            results = []
            for i in range(n):
                top = np.argsort(-probs[i], kind="stable")[:5]
                results.append(Explanation(
                    source=sources[i], method=meth.name, target=int(tgt[i]), target_name=self.classes.labels[tgt[i]],
                    saliency=sal[i], saliency_original=finished[i][1],
                    components=None if comps is None else comps[i],
                    weights=None if wts is None else wts[i].astype(np.float32),
                    scores=None if scores is None else scores[i].astype(np.float32),
                    explained_variance=None if evr is None else evr[i].astype(np.float32),
                    singular_values=None if sv is None else sv[i].astype(np.float32),
                    logits=logits_host[i], top5=[(self.classes.labels[j], float(probs[i, j])) for j in top],
                    geometry=geoms[i], input_rgb=finished[i][0], random_weights=self.artifacts.random_weights,
                ))
        timings = stage.times
        transfers = be.transfers.take()
        for e in results:  # batch stages are shared: report each image's share
            e.timings = {k: v / n for k, v in timings.items()}
            e.transfers = transfers
        return results
