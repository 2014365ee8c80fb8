"""The paper's two evaluations (section 4) of saliency methods over an exported model, on ONNX Runtime.

``pointing_game``       PASCAL-VOC layout (Table 1): one trial per (image, class present in it), that class
                        as the target; a hit when the saliency maximum, in original image coordinates
                        (``Explanation.saliency_original``), lies in a box of the class. Centre-point and
                        random-point baselines. Mean accuracy over classes.
``deletion_insertion``  ImageFolder layout (Table 2 / Figure 4): every image is classified over the
                        artifacts' class set; for the correctly predicted ones each method explains the true
                        class and pixels are inserted / deleted in saliency order (model-input coordinates,
                        ``Explanation.saliency``) with ``protocol.perturbation_curve``; the score is the
                        softmax probability of the target over the class set (classify.onnx). AUC by the
                        trapezoid rule, then the accuracy-binned protocol (``protocol.binned_protocol``).
                        Random-saliency and centre-saliency (a centred Gaussian) baselines run the same way.

Both read images with the runtime's decoder and preprocess them with the Explainer's resize mode, so the
numbers describe what the toolkit computes. A ``SaliencyCache`` lets one run explain an image once for both
evaluations (the synthetic benchmark writes the same images in both layouts).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from runtime.images import Geometry, load_image

from .protocol import (
    METRICS,
    accuracy_bins,
    auc,
    binned_protocol,
    center_point_hit,
    perturbation_curve,
    pointing_game_summary,
    pointing_hit,
    random_point_hit,
)
from .voc import VocItem

__all__ = [
    "DEFAULT_METHODS",
    "METHOD_ALIASES",
    "METHOD_OPTIONS",
    "parse_method_spec",
    "method_call",
    "POINT_BASELINES",
    "SALIENCY_BASELINES",
    "PAPER_STEP",
    "SUBSTRATES",
    "ClassMismatchError",
    "SaliencyCache",
    "resolve_methods",
    "class_indices",
    "scaled_step",
    "pointing_game",
    "deletion_insertion",
    "center_saliency",
    "random_saliency",
]

#: The paper's methods (section 4.1), in its table order; those registered at run time are used.
DEFAULT_METHODS = ("gradcam", "gradcam++", "wgradcam", "scorecam", "scorecam++", "ablationcam", "decomcam")
#: Spellings accepted by --methods for the registered names.
METHOD_ALIASES = {"gradcampp": "gradcam++", "scorecampp": "scorecam++", "decom-cam": "decomcam",
                  "grad-cam": "gradcam", "score-cam": "scorecam", "ablation-cam": "ablationcam"}
#: Pointing-game baselines (no model involved).
POINT_BASELINES = ("center_point", "random_point")
#: Deletion / insertion baselines: saliency maps that ignore the model.
SALIENCY_BASELINES = ("random_saliency", "center_saliency")
#: The authors' deletion / insertion step: 4928 pixels, 11 steps at 224 x 224.
PAPER_STEP = 4928
SUBSTRATES = ("zero", "blur")

# Images per explain_arrays call. Bounded so that Decom-CAM's B * p upsampled maps stay within what one
# OpenCV resize call takes (OpenCV 5 allows at most 128 channels per call).
_GROUP = 8


class ClassMismatchError(ValueError):
    """A dataset class that the artifacts' class set does not contain."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Methods and classes
# --------------------------------------------------------------------------------------------------


#: Options a --methods entry may carry after its name, "NAME:key=value[:key=value]" (benchmark controls):
#: kernel   the CAM family's final upsampling, bilinear (default) or bicubic (Decom-CAM's kernel)
#: top_p    the Decom-CAM methods' number of components (an integer >= 1)
METHOD_OPTIONS = {"kernel": ("bilinear", "bicubic"), "top_p": int}


def parse_method_spec(spec: str, registered: Sequence[str] | None = None) -> tuple[str, dict]:
    """"gradcam:kernel=bicubic" -> ("gradcam", {"kernel": "bicubic"}); a bare name has no options, and an
    option at its default (kernel=bilinear) is dropped so that it names the same run as the bare name. An
    unknown name (when `registered` is given), unknown or repeated keys, bad values and options the method
    does not take are ValueErrors naming the entry."""
    name, *opts = spec.split(":")
    name = METHOD_ALIASES.get(name, name)
    if registered is not None and name not in registered:
        raise ValueError(f"unknown method '{spec}'; registered methods: {', '.join(registered)}")
    out: dict = {}
    for o in opts:
        key, sep, val = o.partition("=")
        if not sep or key not in METHOD_OPTIONS:
            raise ValueError(f"method '{spec}': option '{o}' is not key=value with a key among "
                             f"{', '.join(METHOD_OPTIONS)}")
        if key in out:
            raise ValueError(f"method '{spec}': {key} is given twice")
        allowed = METHOD_OPTIONS[key]
        if allowed is int:
            if not (val.isascii() and val.isdigit()) or int(val) < 1:
                raise ValueError(f"method '{spec}': {key} must be an integer >= 1, got '{val}'")
            out[key] = int(val)
        elif val not in allowed:
            raise ValueError(f"method '{spec}': {key} must be one of {', '.join(allowed)}, got '{val}'")
        else:
            out[key] = val
    decom = name.startswith("decomcam")
    if "top_p" in out and not decom:
        raise ValueError(f"method '{spec}': top_p applies to the Decom-CAM methods only")
    if "kernel" in out and decom:
        raise ValueError(f"method '{spec}': kernel applies to the CAM baselines (Decom-CAM's kernel is fixed)")
    if out.get("kernel") == "bilinear":
        del out["kernel"]
    return name, out


def method_call(explainer, spec: str):
    """(method for Explainer.explain_arrays, its config or None) for a --methods entry."""
    name, opts = parse_method_spec(spec)
    if not opts:
        return name, None
    from runtime.methods import get_method

    meth = get_method(name)
    if "kernel" in opts:
        if not hasattr(meth, "kernel"):
            raise ValueError(f"method '{spec}': {name} has no upsampling kernel to choose")
        meth.kernel = opts["kernel"]
    over = {k: opts[k] for k in ("top_p",) if k in opts}
    cfg = explainer.config.with_(**over) if over else None
    return meth, cfg


def resolve_methods(spec: str | Sequence[str] | None, registered: Sequence[str] | None = None) -> list[str]:
    """Method names to evaluate: ``spec`` (comma-separated or a list; aliases as ``METHOD_ALIASES``; options
    as ``METHOD_OPTIONS``), or the registered ones among ``DEFAULT_METHODS`` when None. An unknown name lists
    the registered ones."""
    if registered is None:
        from runtime.methods import list_methods

        registered = list_methods()
    if spec is None:
        return [m for m in DEFAULT_METHODS if m in registered]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        base, opts = parse_method_spec(name, registered)
        name = ":".join([base, *(f"{k}={opts[k]}" for k in METHOD_OPTIONS if k in opts)])   # one name per run
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no methods given")
    return out


def class_indices(labels: Sequence[str], names: Sequence[str], class_set: str, what: str) -> dict[str, int]:
    """Map dataset class names to indices of the class set by label (exact, then case-insensitive).

    Raises ClassMismatchError listing every missing name and the class set's labels."""
    exact = {lab: i for i, lab in enumerate(labels)}
    lower = {lab.lower(): i for i, lab in enumerate(labels)}
    out, missing = {}, []
    for n in names:
        i = exact.get(n, lower.get(n.lower()))
        if i is None:
            missing.append(n)
        else:
            out[n] = i
    if missing:
        shown = ", ".join(labels[:25]) + (f", ... ({len(labels)} in all)" if len(labels) > 25 else "")
        raise ClassMismatchError(
            f"class set '{class_set}' of the artifacts lacks {len(missing)} {what} class(es): "
            f"{', '.join(missing)}; its labels: {shown}. Export with a class set that names them "
            f"(python -m export classes --artifacts DIR --names ...)"
        )
    return out


def scaled_step(size: int, step_224: int = PAPER_STEP) -> int:
    """The paper's step rescaled to an S x S input: same fraction of the image per step (11 steps)."""
    return max(1, int(round(step_224 * size * size / (224 * 224))))


# --------------------------------------------------------------------------------------------------
# Explaining, with an optional cache
# --------------------------------------------------------------------------------------------------


@dataclass
class SaliencyCache:
    """Saliency maps [S, S] (model-input coordinates) and their Geometry, keyed by (image digest, target,
    method, resize mode). Use one cache per Explainer (the key does not name the model)."""

    maps: dict = field(default_factory=dict)
    hits: int = 0

    @staticmethod
    def key(rgb: np.ndarray, target: int, method: str, mode: str) -> tuple:
        digest = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).hexdigest()
        return (digest, rgb.shape, int(target), method, mode)


def explain_maps(explainer, rgbs: list[np.ndarray], targets: list[int], method: str,
                 cache: SaliencyCache | None = None) -> list[tuple[np.ndarray, Geometry]]:
    """(saliency [S, S] float32, Geometry) per image, explaining ``targets`` with ``method``."""
    out: list = [None] * len(rgbs)
    keys = [SaliencyCache.key(im, t, method, explainer.resize_mode) for im, t in zip(rgbs, targets)] \
        if cache is not None else [None] * len(rgbs)
    todo = []
    for i, k in enumerate(keys):
        if cache is not None and k in cache.maps:
            out[i] = cache.maps[k]
            cache.hits += 1
        else:
            todo.append(i)
    for s in range(0, len(todo), _GROUP):
        idx = todo[s:s + _GROUP]
        meth, cfg = method_call(explainer, method)
        res = explainer.explain_arrays([rgbs[i] for i in idx], target=[int(targets[i]) for i in idx],
                                       method=meth, **({} if cfg is None else {"config": cfg}))
        for i, e in zip(idx, res):
            sal = np.asarray(e.saliency, np.float32)
            if not np.all(np.isfinite(sal)):
                raise ValueError(f"method '{method}' returned a saliency map with NaN or inf")
            out[i] = (sal, e.geometry)
            if cache is not None:
                cache.maps[keys[i]] = out[i]
    return out


class _Progress:
    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every = what, total, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every or done == self.total:
            self.last = now
            log(f"[{self.what}] {done}/{self.total} images, {now - self.t0:.0f} s")


# --------------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------------


def pointing_game(explainer, items: Sequence[VocItem], methods: Sequence[str], tolerance: float = 0.0,
                  seed: int = 0, cache: SaliencyCache | None = None, progress: bool = True) -> dict:
    """Pointing game over VOC items (``voc.read_voc``) with every method and the two baselines.

    One trial per (image, class present); the target is that class (by label name in the Explainer's
    class set). The saliency maximum is taken in original image coordinates. ``seed`` drives the
    random-point baseline (one draw per trial, in trial order).

    Returns ``{"tolerance", "n_images", "n_trials", "classes", "resize", "methods": {name: summary},
    "baselines": {"center_point": summary, "random_point": summary}, "seconds": {name: s}, "trials": [...]}``
    where a summary is ``protocol.pointing_game_summary`` (per_class, mean_accuracy, n).
    """
    if not items:
        raise ValueError("pointing game: no images")
    present = sorted({c for it in items for c in it.objects})
    idx = class_indices(explainer.classes.labels, present, explainer.classes.name, "VOC")
    rng = np.random.default_rng(seed)
    records: dict[str, list[tuple[str, bool]]] = {m: [] for m in [*methods, *POINT_BASELINES]}
    seconds = {m: 0.0 for m in methods}
    trials = []
    prog = _Progress("pointing game", len(items)) if progress else None
    for start in range(0, len(items), _GROUP):
        chunk = list(items[start:start + _GROUP])
        rgbs = []
        for it in chunk:
            rgb = load_image(it.image_path)
            if rgb.shape[:2] != (it.height, it.width):
                raise ValueError(f"{it.image_path}: image is {rgb.shape[1]} x {rgb.shape[0]} but its annotation "
                                 f"says {it.width} x {it.height}")
            rgbs.append(rgb)
        pairs = [(j, c) for j, it in enumerate(chunk) for c in sorted(it.objects)]
        rows = [{"image": chunk[j].image_id, "class": c, "hits": {}} for j, c in pairs]
        for m in methods:
            t = time.perf_counter()
            maps = explain_maps(explainer, [rgbs[j] for j, _ in pairs], [idx[c] for _, c in pairs], m, cache)
            for row, (j, c), (sal, geom) in zip(rows, pairs, maps):
                hit = pointing_hit(geom.to_original(sal), chunk[j].objects[c], tolerance)
                records[m].append((c, hit))
                row["hits"][m] = hit
            seconds[m] += time.perf_counter() - t
        for row, (j, c) in zip(rows, pairs):
            boxes = chunk[j].objects[c]
            h, w = rgbs[j].shape[:2]
            for name, hit in (("center_point", center_point_hit(h, w, boxes, tolerance)),
                              ("random_point", random_point_hit(h, w, boxes, rng, tolerance))):
                records[name].append((c, hit))
                row["hits"][name] = hit
        trials.extend(rows)
        if prog:
            prog.update(start + len(chunk))
    return {
        "tolerance": float(tolerance),
        "resize": explainer.resize_mode,
        "n_images": len(items),
        "n_trials": len(trials),
        "classes": present,
        "methods": {m: pointing_game_summary(records[m]) for m in methods},
        "baselines": {b: pointing_game_summary(records[b]) for b in POINT_BASELINES},
        "seconds": seconds,
        "trials": trials,
    }


# --------------------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------------------


def center_saliency(size: int, sigma_frac: float = 0.25) -> np.ndarray:
    """Centre-saliency baseline [S, S] float32: a centred Gaussian, sigma = sigma_frac * S, peak 1."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    g = np.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2.0 * (sigma_frac * size) ** 2))
    return g.astype(np.float32)


def random_saliency(size: int, seed: int, index: int) -> np.ndarray:
    """Random-saliency baseline [S, S] float32: i.i.d. uniform, seeded per image (seed, index)."""
    return np.random.default_rng([seed, index]).random((size, size), dtype=np.float32)


def _substrate(x: np.ndarray, kind: str) -> np.ndarray:
    """What removed pixels become: zeros in normalised space (the dataset mean colour), or x blurred with a
    Gaussian of sigma 5 * S / 224 (RISE's 11-tap, sigma-5 kernel at 224), reflect-101 borders."""
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "blur":
        s = x.shape[-1]
        sigma = 5.0 * s / 224.0
        hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
        return cv2.GaussianBlur(hwc, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT_101).transpose(2, 0, 1).astype(x.dtype)
    raise ValueError(f"unknown substrate '{kind}'; valid: {', '.join(SUBSTRATES)}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def deletion_insertion(explainer, classes: Sequence[str], items: Sequence[tuple[Path, int]],
                       methods: Sequence[str], step: int = PAPER_STEP, substrate: str = "zero",
                       width: float = 0.1, seed: int = 0, cache: SaliencyCache | None = None,
                       progress: bool = True) -> dict:
    """Deletion / insertion over an ImageFolder (``voc.read_imagefolder``) and the binned protocol.

    classes : the folder's class names (``read_imagefolder``'s first result); items: (path, folder index).
    Every image is classified over the Explainer's class set (argmax of classify.onnx); per-class
    accuracy = share of a class's images predicted as that class. Only correctly predicted images get
    curves: each method (and each baseline in ``SALIENCY_BASELINES``) explains the true class, and
    ``protocol.perturbation_curve`` runs insertion and deletion with ``step`` pixels per step on the
    given substrate, scoring softmax(logits)[target]. The binned protocol drops the incorrect images
    anyway, so computing their curves would change nothing.

    Returns ``{"step", "n_steps", "substrate", "resize", "input_size", "n_images", "n_correct",
    "accuracy", "per_class_accuracy", "bins" (classes per accuracy bin), "methods": {name: result},
    "baselines": {name: result}, "seconds", "images": [...]}`` where a result is
    ``{"binned": binned_protocol(...), "mean": {insertion, deletion, overall} over the kept images,
    "curves": {"insertion": mean curve, "deletion": mean curve}}``.
    """
    if not items:
        raise ValueError("deletion/insertion: no images")
    if substrate not in SUBSTRATES:
        raise ValueError(f"unknown substrate '{substrate}'; valid: {', '.join(SUBSTRATES)}")
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer, got {step}")
    art = explainer.artifacts
    size = explainer.size
    used = sorted({classes[c] for _, c in items})
    idx = class_indices(explainer.classes.labels, used, explainer.classes.name, "image folder")
    names = [*methods, *SALIENCY_BASELINES]
    per_image: list[dict] = []
    curve_sums = {m: {"insertion": 0.0, "deletion": 0.0} for m in names}
    seconds = {m: 0.0 for m in names}
    seconds["classify"] = 0.0
    center = center_saliency(size)
    be = explainer.backend
    prog = _Progress("deletion/insertion", len(items)) if progress else None

    def score_fn_for(target: int):
        def score(batch: np.ndarray) -> np.ndarray:
            logits = be.to_host(explainer.classify(be.asarray(np.ascontiguousarray(batch, np.float32))))
            return _softmax(logits)[:, target]
        return score

    for start in range(0, len(items), _GROUP):
        chunk = list(items[start:start + _GROUP])
        rgbs = [load_image(p) for p, _ in chunk]
        x = np.stack([art.preprocess_image(im, explainer.resize_mode)[0] for im in rgbs])
        t = time.perf_counter()
        probs = _softmax(be.to_host(explainer.classify(be.asarray(x))))  # [G, L]
        seconds["classify"] += time.perf_counter() - t
        rows = []
        for j, (path, c) in enumerate(chunk):
            name = classes[c]
            tgt = idx[name]
            pred = int(np.argmax(probs[j]))
            rows.append({"path": str(path), "class": name, "target": tgt, "pred": pred,
                         "pred_name": explainer.classes.labels[pred], "correct": pred == tgt,
                         "probability": float(probs[j, tgt]), "auc": {}})
        kept = [j for j, r in enumerate(rows) if r["correct"]]
        if kept:
            subs = {j: _substrate(x[j], substrate) for j in kept}
            for m in names:
                t = time.perf_counter()
                if m == "random_saliency":
                    sals = [random_saliency(size, seed, start + j) for j in kept]
                elif m == "center_saliency":
                    sals = [center for _ in kept]
                else:
                    sals = [s for s, _ in explain_maps(explainer, [rgbs[j] for j in kept],
                                                       [rows[j]["target"] for j in kept], m, cache)]
                for j, sal in zip(kept, sals):
                    fn = score_fn_for(rows[j]["target"])
                    res = {}
                    for mode in ("insertion", "deletion"):
                        curve = perturbation_curve(x[j], sal, fn, mode, step, subs[j])
                        curve_sums[m][mode] = curve_sums[m][mode] + curve
                        res[mode] = auc(curve)
                    rows[j]["auc"][m] = res
                seconds[m] += time.perf_counter() - t
        per_image.extend(rows)
        if prog:
            prog.update(start + len(chunk))

    counts: dict[str, list[int]] = {}
    for r in per_image:
        counts.setdefault(r["class"], [0, 0])
        counts[r["class"]][0] += int(r["correct"])
        counts[r["class"]][1] += 1
    per_class_acc = {n: k / t for n, (k, t) in sorted(counts.items())}
    n_correct = sum(int(r["correct"]) for r in per_image)

    results = {}
    for m in names:
        rows = [{"class": r["class"], "correct": r["correct"],
                 "insertion": r["auc"][m]["insertion"] if r["correct"] else math.nan,
                 "deletion": r["auc"][m]["deletion"] if r["correct"] else math.nan} for r in per_image]
        if n_correct:
            kept_rows = [r for r in rows if r["correct"]]
            mean = {k: float(np.mean([r[k] for r in kept_rows])) for k in ("insertion", "deletion")}
            mean["overall"] = mean["insertion"] - mean["deletion"]
            results[m] = {
                "binned": binned_protocol(rows, per_class_acc, width),
                "mean": mean,
                "curves": {k: (np.asarray(curve_sums[m][k]) / n_correct).tolist() for k in ("insertion", "deletion")},
            }
        else:
            results[m] = {"binned": None, "mean": None, "curves": None}
    n_pix = size * size
    return {
        "step": int(step),
        "n_steps": math.ceil(n_pix / step),
        "substrate": substrate,
        "resize": explainer.resize_mode,
        "input_size": size,
        "bin_width": width,
        "n_images": len(per_image),
        "n_correct": n_correct,
        "accuracy": n_correct / len(per_image),
        "per_class_accuracy": per_class_acc,
        "bins": {str(b): v for b, v in accuracy_bins(per_class_acc, width).items()},
        "metrics": list(METRICS),
        "methods": {m: results[m] for m in methods},
        "baselines": {b: results[b] for b in SALIENCY_BASELINES},
        "seconds": seconds,
        "images": per_image,
    }
