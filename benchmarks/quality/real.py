"""The paper's two evaluations on real labelled photos with ground-truth boxes (``boxes_data`` layout).

Every usable image is read, stretched to the model input S x S (``runtime.images.preprocess``, mode
"stretch", the artifacts' mean / std) and classified once (``Explainer.classify``, softmax over all L
classes). Then for every method (``Explainer.explain_arrays``, explained class = the label) and baseline:

Pointing game (Table 1)
    The saliency maximum is taken on the method's own [S, S] map (model-input coordinates); the label's
    boxes are scaled to the model input (``boxes_data.boxes_to_input``, tolerance grown in photo pixels
    first), so no map is resampled. Every image counts, whatever the prediction. Baselines: the centre
    point and one uniformly random pixel per image (seeded per image), scored on the photo's grid.
    Accuracy = hits / images (the mean over classes is in the JSON too).

Deletion / insertion (Table 2, Figure 4)
    Only correctly predicted images (top-1 == label) get curves (``protocol.perturbation_curve``):
    deletion replaces the most salient pixels by its substrate (default 0 in normalised space = the
    mean colour), insertion starts from its substrate (default the blurred photo) and puts the most
    salient pixels back; ``steps`` steps of ceil(S * S / steps) pixels; the score is the softmax
    probability of the label over all classes. AUC by the trapezoid rule; then the accuracy-binned
    protocol (``protocol.binned_protocol``: classes binned by the model's accuracy on these images).
    Baselines: random saliency (seeded per image) and a centred Gaussian.

Uncertainty
    A percentile bootstrap over images (``protocol.bootstrap_ci``, seeded, the same resamples for every
    method on the same images): each resample recomputes the statistic from scratch (pointing accuracy;
    for Table 2 the per-class accuracies, bins, kept images and binned AUCs).

Slow methods (``SLOW_METHODS``: one forward per channel) can run on the first N images only
(``score_subset``); every method is then also scored on that subset, for a like-for-like comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from runtime.images import load_image, preprocess

from .boxes_data import BoxedItem, boxes_to_input
from .evaluate import (
    POINT_BASELINES,
    SALIENCY_BASELINES,
    _GROUP,
    _softmax,
    _substrate,
    center_saliency,
    class_indices,
    explain_maps,
    parse_method_spec,
    log,
    random_saliency,
)
from .protocol import (
    auc,
    binned_protocol,
    bootstrap_ci,
    center_point_hit,
    perturbation_curve,
    pointing_game_summary,
    pointing_hit,
    random_point_hit,
)

__all__ = ["SLOW_METHODS", "RealConfig", "map_targets", "step_for", "pointing_hits", "evaluate_real"]

#: Methods whose cost grows with the target layer's channel count: one forward per channel and image.
SLOW_METHODS = {
    "scorecam": "one classifier forward per live channel of the target layer (up to C per image)",
    "scorecam++": "one classifier forward per kept channel of the target layer (up to C per image)",
    "ablationcam": "one head forward per live channel of the target layer (up to C per image)",
}
#: Class-set sizes mapped by index in "auto" mode: an ImageNet-1k classifier in the standard class order.
IMAGENET_CLASSES = 1000
_CURVES = ("insertion", "deletion")


@dataclass
class RealConfig:
    """The protocol's settings (defaults: the command's)."""

    tolerances: tuple[float, ...] = (0.0, 15.0)  # pointing-game tolerances, photo pixels
    steps: int = 14                              # deletion / insertion steps
    substrates: dict = field(default_factory=lambda: {"deletion": "zero", "insertion": "blur"})
    score_subset: int | None = None              # SLOW_METHODS on the first N images only (None: all)
    n_bootstrap: int = 1000                      # bootstrap resamples over images
    level: float = 0.95                          # confidence level of the intervals
    seed: int = 0                                # random baselines and bootstrap
    bin_width: float = 0.1                       # accuracy bins of the binned protocol
    targets: str = "auto"                        # label -> class: "auto", "index" or "name"


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def map_targets(labels: Sequence[str], class_set: str, items: Sequence[BoxedItem], mode: str = "auto"
                ) -> tuple[list[int], dict]:
    """The class index to explain and score for each item, and a record of how it was found.

    mode "index": the manifest's class_index is the index in the class set (a classifier with the data
    set's classes in the data set's order, e.g. ImageNet-1k). "name": class_name is looked up among the
    labels (case, '_' and ' ' ignored; a missing name is a ClassMismatchError listing them). "auto":
    "index" when the class set has 1000 labels (ImageNet-1k order: the fixed-class ImageNet models and
    open_clip's ImageNet class names use it), "name" otherwise.
    """
    if mode == "auto":
        mode = "index" if len(labels) == IMAGENET_CLASSES else "name"
    if mode == "index":
        bad = [it for it in items if not 0 <= it.class_index < len(labels)]
        if bad:
            raise ValueError(f"{len(bad)} image(s) have a class_index outside class set '{class_set}' "
                             f"({len(labels)} classes), e.g. {bad[0].file}: {bad[0].class_index}; "
                             f"use --targets name to map by class name")
        targets = [it.class_index for it in items]
    elif mode == "name":
        idx = class_indices([_norm(lab) for lab in labels], sorted({_norm(it.class_name) for it in items}),
                            class_set, "data set")
        targets = [idx[_norm(it.class_name)] for it in items]
    else:
        raise ValueError(f"unknown target mapping '{mode}'; valid: auto, index, name")
    agree = sum(_norm(labels[t]) == _norm(it.class_name) for t, it in zip(targets, items))
    note = ("label = manifest class_index, used as the index into the class set" if mode == "index" else
            "label = manifest class_name, looked up by name in the class set (case, '_' and ' ' ignored)")
    return targets, {"mode": mode, "class_set": class_set, "n_classes": len(labels), "note": note,
                     "names_agree": int(agree), "n": len(items)}


def step_for(size: int, steps: int) -> tuple[int, int]:
    """(pixels per step, number of steps) for ``steps`` steps over an S x S input."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    step = math.ceil(size * size / steps)
    return step, math.ceil(size * size / step)


def pointing_hits(saliency: np.ndarray, item: BoxedItem, tolerances: Sequence[float]) -> dict[str, bool]:
    """Pointing-game hits of one [S, S] model-input map against the item's boxes, per tolerance ("0", "15")."""
    size = saliency.shape[-1]
    return {f"{t:g}": pointing_hit(saliency, boxes_to_input(item.boxes, item.width, item.height, size, t))
            for t in tolerances}


def _baseline_hits(item: BoxedItem, number: int, seed: int, tolerances: Sequence[float]) -> dict[str, dict]:
    out = {"center_point": {}, "random_point": {}}
    for t in tolerances:
        out["center_point"][f"{t:g}"] = center_point_hit(item.height, item.width, item.boxes, t)
        rng = np.random.default_rng([seed, number])  # the same point for every tolerance
        out["random_point"][f"{t:g}"] = random_point_hit(item.height, item.width, item.boxes, rng, t)
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def _pointing_summary(rows: list[dict], name: str, cfg: RealConfig) -> dict:
    out = {}
    for t in cfg.tolerances:
        key = f"{t:g}"
        hits = np.array([r["pointing"][name][key] for r in rows], dtype=np.float64)  # [n]
        ci = bootstrap_ci(lambda idx: float(hits[idx].mean()), len(hits), cfg.n_bootstrap, cfg.seed, cfg.level)
        out[key] = {"accuracy": ci["estimate"], "ci": [ci["lo"], ci["hi"]], "n": len(hits),
                    "hits": int(hits.sum()),
                    "mean_over_classes": pointing_game_summary(
                        (r["class_name"], r["pointing"][name][key]) for r in rows)["mean_accuracy"],
                    "bootstrap": {k: ci[k] for k in ("level", "n_resamples", "n_valid", "seed")}}
    return out


def _table2_stats(rows: list[dict], name: str, width: float):
    """statistic(idx) -> binned AUCs and unbinned means over the images rows[idx] (NaN where undefined)."""
    cls = [r["class_name"] for r in rows]
    correct = np.array([r["correct"] for r in rows], dtype=bool)  # [n]
    ins = np.array([r["auc"].get(name, {}).get("insertion", math.nan) for r in rows])  # [n]
    dele = np.array([r["auc"].get(name, {}).get("deletion", math.nan) for r in rows])  # [n]
    nan = {k: math.nan for k in ("insertion", "deletion", "overall", "insertion_mean", "deletion_mean",
                                 "overall_mean")}

    def stat(idx: np.ndarray) -> dict:
        if not correct[idx].any():
            return nan
        counts: dict[str, list[int]] = {}
        for i in idx:
            c = counts.setdefault(cls[i], [0, 0])
            c[0] += int(correct[i])
            c[1] += 1
        acc = {k: a / t for k, (a, t) in counts.items()}
        binned = binned_protocol([{"class": cls[i], "correct": correct[i], "insertion": ins[i],
                                   "deletion": dele[i]} for i in idx], acc, width)
        kept = idx[correct[idx]]
        mi, md = float(ins[kept].mean()), float(dele[kept].mean())
        return {**binned["auc"], "insertion_mean": mi, "deletion_mean": md, "overall_mean": mi - md}

    return stat


def _deletion_summary(rows: list[dict], name: str, cfg: RealConfig) -> dict:
    correct = [r for r in rows if r["correct"]]
    if not correct:
        return {"n_images": len(rows), "n_correct": 0, "binned": None, "mean": None, "ci": None, "curves": None}
    stat = _table2_stats(rows, name, cfg.bin_width)
    ci = bootstrap_ci(stat, len(rows), cfg.n_bootstrap, cfg.seed, cfg.level)
    counts: dict[str, list[int]] = {}
    for r in rows:
        c = counts.setdefault(r["class_name"], [0, 0])
        c[0] += int(r["correct"])
        c[1] += 1
    binned = binned_protocol([{"class": r["class_name"], "correct": r["correct"],
                               "insertion": r["auc"][name]["insertion"] if r["correct"] else math.nan,
                               "deletion": r["auc"][name]["deletion"] if r["correct"] else math.nan}
                              for r in rows], {k: a / t for k, (a, t) in counts.items()}, cfg.bin_width)
    curves = {m: np.mean([r["curves"][name][m] for r in correct], axis=0).tolist() for m in _CURVES}
    return {
        "n_images": len(rows), "n_correct": len(correct), "binned": binned,
        "mean": {m: ci[f"{m}_mean"]["estimate"] for m in ("insertion", "deletion", "overall")},
        "ci": {k: [v["lo"], v["hi"]] for k, v in ci.items()},
        "bootstrap": {k: ci["overall"][k] for k in ("level", "n_resamples", "n_valid", "seed")},
        "curves": curves,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def evaluate_real(explainer, items: Sequence[BoxedItem], methods: Sequence[str], cfg: RealConfig | None = None,
                  progress: bool = True) -> dict:
    """Both evaluations over ``items`` (``boxes_data.read_boxes_manifest``) with every method and baseline.

    The Explainer must use the stretch resize. Rows with an ``error`` and images that cannot be read (or
    whose size disagrees with the manifest) are reported (stderr, ``bad`` in the result) and skipped.
    Returns a JSON-ready dict: protocol settings, target mapping, model accuracy, ``pointing_game`` and
    ``deletion_insertion`` summaries per method and baseline (estimates, CIs, n), ``on_subset`` (every
    method on the slow methods' subset, when one is used), ``seconds`` per method and ``images`` (one
    record per evaluated image: label, prediction, hits, AUCs).
    """
    cfg = cfg or RealConfig()
    if explainer.resize_mode != "stretch":
        raise ValueError(f"the real-data protocol stretches every photo to the model input; the Explainer "
                         f"uses resize mode '{explainer.resize_mode}'")
    if sorted(cfg.substrates) != sorted(_CURVES):
        raise ValueError(f"substrates must name deletion and insertion, got {', '.join(cfg.substrates)}")
    for kind in cfg.substrates.values():
        _substrate(np.zeros((3, 2, 2), np.float32), kind)  # an unknown substrate fails before any work
    if cfg.score_subset is not None and cfg.score_subset < 1:
        raise ValueError(f"--score-subset must be a positive number of images, got {cfg.score_subset}")
    size = explainer.size
    art = explainer.artifacts
    be = explainer.backend
    labels = explainer.classes.labels
    step, n_steps = step_for(size, cfg.steps)

    bad = [{"file": it.file, "error": it.error} for it in items if it.error]
    for b in bad:
        log(f"error: {b['error']}")
    usable = [it for it in items if it.error is None]
    if not usable:
        raise ValueError("no usable images in the manifest")
    class_set = getattr(explainer.classes, "name", "default")
    targets, mapping = map_targets(labels, class_set, usable, cfg.targets)
    log(f"targets: {mapping['note']} (class set '{mapping['class_set']}', {mapping['n_classes']} classes; "
        f"{mapping['names_agree']}/{mapping['n']} manifest names equal the class set's label)")
    def is_slow(m: str) -> bool:
        return parse_method_spec(m)[0] in SLOW_METHODS

    slow = [m for m in methods if is_slow(m)]
    subset = None
    if cfg.score_subset is not None and slow:
        subset = {"methods": slow, "n_first_images": int(cfg.score_subset),
                  "reason": "; ".join(f"{m}: {SLOW_METHODS[parse_method_spec(m)[0]]}" for m in slow)}
        log(f"{', '.join(slow)} run on the first {cfg.score_subset} images only ({subset['reason']})")
    names = [*methods, *SALIENCY_BASELINES]
    seconds = {m: {"explain": 0.0, "pointing": 0.0, "curves": 0.0, "images": 0} for m in methods}
    seconds["classify"] = {"total": 0.0, "images": 0}
    center = center_saliency(size)
    tols = cfg.tolerances

    def score_fn(target: int):
        def score(batch: np.ndarray) -> np.ndarray:
            logits = be.to_host(explainer.classify(be.asarray(np.ascontiguousarray(batch, np.float32))))
            return _softmax(logits)[:, target]
        return score

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(usable), desc="images", unit="img", disable=not progress, dynamic_ncols=True)
    except ImportError:  # tqdm is a dev dependency: without it, no bar
        bar = None
    records: list[dict] = []
    for start in range(0, len(usable), _GROUP):
        chunk = list(zip(usable[start:start + _GROUP], targets[start:start + _GROUP]))
        loaded = []
        for it, tgt in chunk:
            try:
                rgb = load_image(it.path)
                if rgb.shape[:2] != (it.height, it.width):
                    raise ValueError(f"{it.path}: image is {rgb.shape[1]} x {rgb.shape[0]} but the manifest "
                                     f"says {it.width} x {it.height}")
            except (ValueError, OSError) as e:
                msg = str(e) if str(it.path) in str(e) else f"{it.path}: {e}"
                bad.append({"file": it.file, "error": msg})
                log(f"error: {msg}")
                continue
            loaded.append((it, tgt, rgb))
        if bar is not None:
            bar.update(len(chunk) - len(loaded))
        if not loaded:
            continue
        x = np.stack([preprocess(rgb, size, art.mean, art.std, "stretch")[0] for _, _, rgb in loaded])  # [G, 3, S, S]
        t = time.perf_counter()
        probs = _softmax(be.to_host(explainer.classify(be.asarray(x))))  # [G, L]
        seconds["classify"]["total"] += time.perf_counter() - t
        seconds["classify"]["images"] += len(loaded)
        rows = []
        for j, (it, tgt, _) in enumerate(loaded):
            number = len(records) + j  # 0-based position among the evaluated images
            pred = int(np.argmax(probs[j]))
            rows.append({"file": it.file, "class_index": it.class_index, "class_name": it.class_name,
                         "target": int(tgt), "target_name": labels[tgt], "pred": pred, "pred_name": labels[pred],
                         "correct": pred == tgt, "probability": float(probs[j, tgt]),
                         "in_subset": cfg.score_subset is None or number < cfg.score_subset,
                         "pointing": _baseline_hits(it, number, cfg.seed, tols), "auc": {}, "curves": {}})
        subs = {(j, mode): _substrate(x[j], cfg.substrates[mode])
                for j, r in enumerate(rows) if r["correct"] for mode in _CURVES}
        for m in names:
            sel = [j for j, r in enumerate(rows) if r["in_subset"] or not is_slow(m) or subset is None]
            if not sel:
                continue
            if bar is not None:
                bar.set_postfix_str(m)
            t = time.perf_counter()
            if m == "random_saliency":
                sals = [random_saliency(size, cfg.seed, len(records) + j) for j in sel]
            elif m == "center_saliency":
                sals = [center for _ in sel]
            else:
                sals = [s for s, _ in explain_maps(explainer, [loaded[j][2] for j in sel],
                                                   [rows[j]["target"] for j in sel], m)]
                seconds[m]["explain"] += time.perf_counter() - t
                seconds[m]["images"] += len(sel)
                t = time.perf_counter()
                for j, sal in zip(sel, sals):
                    rows[j]["pointing"][m] = pointing_hits(sal, loaded[j][0], tols)
                seconds[m]["pointing"] += time.perf_counter() - t
            t = time.perf_counter()
            for j, sal in zip(sel, sals):
                if not rows[j]["correct"]:
                    continue
                fn = score_fn(rows[j]["target"])
                curves = {mode: perturbation_curve(x[j], sal, fn, mode, step, subs[(j, mode)]) for mode in _CURVES}
                rows[j]["curves"][m] = {mode: c.tolist() for mode, c in curves.items()}
                rows[j]["auc"][m] = {mode: auc(c) for mode, c in curves.items()}
            if m in seconds:
                seconds[m]["curves"] += time.perf_counter() - t
        records.extend(rows)
        if bar is not None:
            bar.update(len(loaded))
    if bar is not None:
        bar.close()
    if not records:
        raise ValueError("no image could be read")

    def runs(m: str, rows: list[dict]) -> list[dict]:
        return [r for r in rows if not is_slow(m) or subset is None or r["in_subset"]]

    def summarise(rows: list[dict]) -> dict:
        return {
            "pointing_game": {
                "methods": {m: _pointing_summary(runs(m, rows), m, cfg) for m in methods if runs(m, rows)},
                "baselines": {b: _pointing_summary(rows, b, cfg) for b in POINT_BASELINES},
            },
            "deletion_insertion": {
                "methods": {m: _deletion_summary(runs(m, rows), m, cfg) for m in methods if runs(m, rows)},
                "baselines": {b: _deletion_summary(rows, b, cfg) for b in SALIENCY_BASELINES},
            },
        }

    counts: dict[str, list[int]] = {}
    for r in records:
        c = counts.setdefault(r["class_name"], [0, 0])
        c[0] += int(r["correct"])
        c[1] += 1
    n_correct = sum(int(r["correct"]) for r in records)
    res = {
        "protocol": {
            "resize": "stretch",
            "input_size": size,
            "pointing_game": {
                "tolerances_px": [float(t) for t in tols],
                "explained_class": "the label (every image, whatever the prediction)",
                "coordinates": "argmax (first, row-major) of the [S, S] model-input saliency; hit when the centre "
                               "of that pixel, mapped to the photo ((j + 0.5) * W / S, (i + 0.5) * H / S), lies "
                               "in a box of the label grown by the tolerance (photo pixels, boxes as written: "
                               "the photo spans [0, W] x [0, H]); computed by scaling the boxes to the model "
                               "input, the saliency map is not resampled",
                "accuracy": "hits / images; mean_over_classes is the mean of per-class accuracies",
                "baselines": "centre point and one seeded uniform random pixel per image, on the photo's grid",
            },
            "deletion_insertion": {
                "kept": "correctly predicted images only (top-1 over all classes == label)",
                "steps": int(cfg.steps), "n_steps": n_steps, "step_px": step,
                "substrates": {"deletion": cfg.substrates["deletion"], "insertion": cfg.substrates["insertion"]},
                "substrate_meaning": {"zero": "0 in normalised space (the normalisation mean colour)",
                                      "blur": "the photo blurred with a Gaussian of sigma 5 * S / 224, reflect-101"},
                "score": "softmax probability of the label over all classes",
                "auc": "trapezoid rule over the n_steps + 1 points, x in [0, 1]",
                "binned": "classes binned by the model's accuracy on these images (bin width "
                          f"{cfg.bin_width:g}); area under the per-bin means versus bin centre, over its span",
                "baselines": "random saliency (seeded per image) and a centred Gaussian (sigma S / 4)",
            },
            "bootstrap": {"n_resamples": cfg.n_bootstrap, "seed": cfg.seed, "level": cfg.level, "unit": "image",
                          "method": "percentile; each resample recomputes the statistic (for Table 2: per-class "
                                    "accuracy, bins, kept images, binned AUC)"},
        },
        "targets": mapping,
        "subset": subset,
        "n_rows": len(items),
        "n_images": len(records),
        "n_bad": len(bad),
        "bad": bad,
        "accuracy": {"top1": n_correct / len(records), "n_correct": n_correct, "n": len(records),
                     "per_class": {k: a / t for k, (a, t) in sorted(counts.items())}},
        "methods": list(methods),
        **summarise(records),
        "on_subset": None,
        "seconds": seconds,
        "images": records,
    }
    if subset is not None:
        sub_rows = [r for r in records if r["in_subset"]]
        res["on_subset"] = {"n_images": len(sub_rows), **summarise(sub_rows)}
    for r in records:  # per-image curves are summarised (mean curves); keep the AUCs
        r.pop("curves")
    return res
