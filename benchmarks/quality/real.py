"""The paper's two evaluations, and the field's newer ones, on real labelled photos with boxes (``boxes_data``).

Every usable photo is read, stretched to the model input S x S (``runtime.images.preprocess``, mode
"stretch", the artifacts' mean / std) and classified (``Explainer.classify``, softmax over all L classes).
Then every method (``Explainer.explain_arrays``, explained class = the label) and baseline is scored on it,
one photo at a time; the photo's record (hits, shares, curves) is appended to the run's checkpoint
(``checkpoint.Checkpoint``) before the next photo, so a killed run resumes where it stopped.

Pointing game (Table 1)
    The saliency maximum is taken on the method's own [S, S] map (model-input coordinates); the label's
    boxes are scaled to the model input (``boxes_data.boxes_to_input``, tolerance grown in photo pixels
    first), so no map is resampled. Every photo counts, whatever the prediction. Baselines: the centre
    point and one uniformly random pixel per photo, on the photo's grid, and the two saliency baselines'
    maxima. Accuracy = hits / photos.
Energy-based pointing game (Table 1)
    The share of the map's positive mass inside the (grown) boxes (``protocol.energy_share``), for every
    method and the two saliency baselines (a point baseline has no mass to share).
Centre-miss subset (Table 1b)
    ImageNet photos are centred: the centre point hits 87-90% of them. At each tolerance, the photos whose
    grown boxes do not hold the photo's centre, where the centre point scores 0 by construction.
Deletion / insertion (Table 2)
    Correctly predicted photos only (top-1 == label), ``protocol.perturbation_curve``: deletion replaces
    the most salient pixels by its substrate (default 0 in normalised space = the mean colour), insertion
    starts from its substrate (default the blurred photo) and puts the most salient pixels back; ``steps``
    steps; softmax probability of the label; AUC by the trapezoid rule; then the accuracy-binned protocol.
ROAD (Table 3)
    Correctly predicted photos: ``protocol.road_curve`` removes the most (MoRF) or least (LeRF) salient
    10%, ..., 90% of the pixels and imputes them (noisy linear imputation), softmax probability of the
    label; MoRF and LeRF are the means over the fractions, combined = (LeRF - MoRF) / 2.
Baselines
    Random draws (random point, random saliency, ROAD's noise) are seeded by the photo's file name, so the
    same photo gets the same draws in any run, chunk or order.
Uncertainty
    A percentile bootstrap over photos (``protocol.bootstrap_ci``, seeded, the same resamples for every
    method on the same photos); ``pairs`` gives paired differences between methods for every metric.

Slow methods (``SLOW_METHODS``: one forward per channel) can run on the manifest's first N rows only
(``score_subset``); every method is then also scored on that subset, for a like-for-like comparison.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from runtime.images import load_image, preprocess

from .boxes_data import BoxedItem, boxes_to_input
from .evaluate import (
    POINT_BASELINES,
    SALIENCY_BASELINES,
    _softmax,
    _substrate,
    center_saliency,
    class_indices,
    explain_maps,
    log,
    parse_method_spec,
    random_saliency,
)
from .protocol import (
    ROAD_FRACTIONS,
    ROAD_NOISE,
    auc,
    binned_protocol,
    bootstrap_ci,
    center_point_hit,
    energy_share,
    perturbation_curve,
    pointing_game_summary,
    pointing_hit,
    random_point_hit,
    road_curve,
)

__all__ = ["SLOW_METHODS", "MAP_BASELINES", "RealConfig", "map_targets", "step_for", "pointing_hits",
           "energy_shares", "photo_seed", "score_photo", "summarise", "evaluate_real", "protocol_description",
           "RECORD_VERSION"]

#: Methods whose cost grows with the target layer's channel count: one forward per channel and image.
SLOW_METHODS = {
    "scorecam": "one classifier forward per live channel of the target layer (up to C per image)",
    "scorecam++": "one classifier forward per kept channel of the target layer (up to C per image)",
    "ablationcam": "one head forward per live channel of the target layer (up to C per image)",
}
#: Class-set sizes mapped by index in "auto" mode: an ImageNet-1k classifier in the standard class order.
IMAGENET_CLASSES = 1000
#: Baselines scored like a method's map (pointing, energy, curves, ROAD): saliency maps without a model.
MAP_BASELINES = SALIENCY_BASELINES
#: Version of a photo's record (bumped when what a record holds or how it is computed changes).
RECORD_VERSION = 2
_CURVES = ("insertion", "deletion")
_ROAD = ("morf", "lerf")


@dataclass
class RealConfig:
    """The protocol's settings (defaults: the command's)."""

    tolerances: tuple[float, ...] = (0.0, 15.0)  # pointing-game tolerances, photo pixels
    steps: int = 14                              # deletion / insertion steps
    substrates: dict = field(default_factory=lambda: {"deletion": "zero", "insertion": "blur"})
    score_subset: int | None = None              # SLOW_METHODS on the manifest's first N rows only (None: all)
    n_bootstrap: int = 1000                      # bootstrap resamples over images
    level: float = 0.95                          # confidence level of the intervals
    seed: int = 0                                # random baselines, ROAD's noise and the bootstrap
    bin_width: float = 0.1                       # accuracy bins of the binned protocol
    targets: str = "auto"                        # label -> class: "auto", "index" or "name"
    road_fractions: tuple[float, ...] = ROAD_FRACTIONS  # ROAD's removed fractions (empty: no ROAD)
    road_noise: float = ROAD_NOISE               # ROAD's imputation noise (normalised input space)
    road_subset: int | None = None               # ROAD on the manifest's first N rows only (None: all)

    def key(self) -> dict:
        """The settings a photo's record depends on (a checkpoint resumes only under the same)."""
        return {"tolerances": [float(t) for t in self.tolerances], "steps": int(self.steps),
                "substrates": dict(self.substrates), "score_subset": self.score_subset, "seed": int(self.seed),
                "targets": self.targets, "road_fractions": [float(q) for q in self.road_fractions],
                "road_noise": float(self.road_noise), "road_subset": self.road_subset,
                "record_version": RECORD_VERSION}


def config_from_key(key: dict, base: RealConfig) -> RealConfig:
    """``base`` (the aggregation's settings: bootstrap, level, bin width) with the record settings of a run's
    key (``RealConfig.key``): the settings its records were made with."""
    from dataclasses import replace

    return replace(base, tolerances=tuple(key["tolerances"]), steps=key["steps"], substrates=dict(key["substrates"]),
                   score_subset=key.get("score_subset"), seed=key["seed"], targets=key["targets"],
                   road_fractions=tuple(key["road_fractions"]), road_noise=key["road_noise"],
                   road_subset=key.get("road_subset"))


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

    In index mode the names are a check on the indices, not the labels: a manifest name equal to the class
    set's label at its index agrees; a name that the class set does not hold at all is a spelling of its own
    (WordNet's 'cash_machine' for 'automated teller machine': a note); a name that the class set holds at
    another index, and not at this one, may be a wrong index (``names_elsewhere``: a warning).
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
    where: dict[str, set[int]] = {}
    for i, lab in enumerate(labels):
        where.setdefault(_norm(lab), set()).add(i)
    agree, spelled, elsewhere = 0, {}, {}
    for t, it in zip(targets, items):
        name = _norm(it.class_name)
        if _norm(labels[t]) == name:
            agree += 1
        elif name in where:
            elsewhere.setdefault(it.class_name, (t, labels[t], sorted(where[name])))
        else:
            spelled.setdefault(it.class_name, labels[t])
    n_spelled = sum(1 for t, it in zip(targets, items) if _norm(it.class_name) not in where)
    n_elsewhere = len(items) - agree - n_spelled
    note = ("label = manifest class_index, used as the index into the class set" if mode == "index" else
            "label = manifest class_name, looked up by name in the class set (case, '_' and ' ' ignored)")
    return targets, {"mode": mode, "class_set": class_set, "n_classes": len(labels), "note": note,
                     "names_agree": int(agree), "names_spelled_differently": int(n_spelled),
                     "names_elsewhere": int(n_elsewhere), "n": len(items),
                     "spelling_examples": {k: v for k, v in list(sorted(spelled.items()))[:5]},
                     "elsewhere_examples": {k: {"index": v[0], "label": v[1], "name_at": v[2]}
                                            for k, v in list(sorted(elsewhere.items()))[:5]}}


def targets_message(m: dict) -> str:
    """One line on how labels were mapped: a note for spellings, a warning for names found at other indices."""
    line = (f"targets: {m['note']} (class set '{m['class_set']}', {m['n_classes']} classes; "
            f"{m['names_agree']}/{m['n']} manifest names equal the class set's label")
    if m["names_spelled_differently"]:
        ex = "; ".join(f"'{k}' is '{v}'" for k, v in list(m["spelling_examples"].items())[:2])
        line += (f"; note: {m['names_spelled_differently']} are spelled differently (the class set has no such "
                 f"name; the index decides: e.g. {ex})")
    line += ")"
    if m["names_elsewhere"]:
        k, v = next(iter(m["elsewhere_examples"].items()))
        line += (f"\nwarning: {m['names_elsewhere']} manifest name(s) are labels of other classes of the set (e.g. "
                 f"'{k}' at index {v['index']} is '{v['label']}', but '{k}' is class {v['name_at']}): check the "
                 f"class order, or use --targets name")
    return line


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


def energy_shares(saliency: np.ndarray, item: BoxedItem, tolerances: Sequence[float]) -> dict[str, float]:
    """Energy-based pointing game of one [S, S] model-input map, per tolerance: the share of its positive mass
    on the model-input pixels whose centres lie in the label's boxes grown by the tolerance (photo pixels)."""
    size = saliency.shape[-1]
    return {f"{t:g}": energy_share(saliency, boxes_to_input(item.boxes, item.width, item.height, size, t))
            for t in tolerances}


def photo_seed(file: str) -> int:
    """A photo's own seed (CRC-32 of its manifest file name): its random draws do not depend on the run."""
    return zlib.crc32(file.encode("utf-8"))


def _point_baselines(item: BoxedItem, seed: int, tolerances: Sequence[float]) -> dict[str, dict]:
    out = {"center_point": {}, "random_point": {}}
    for t in tolerances:
        out["center_point"][f"{t:g}"] = center_point_hit(item.height, item.width, item.boxes, t)
        rng = np.random.default_rng([seed, photo_seed(item.file), 0])  # the same point for every tolerance
        out["random_point"][f"{t:g}"] = random_point_hit(item.height, item.width, item.boxes, rng, t)
    return out


# --------------------------------------------------------------------------------------------------
# One photo
# --------------------------------------------------------------------------------------------------


def _is_slow(m: str) -> bool:
    return parse_method_spec(m)[0] in SLOW_METHODS


def load_photo(item: BoxedItem) -> np.ndarray:
    """The photo's uint8 RGB [H, W, 3]; ValueError / OSError when it cannot be read or its size disagrees
    with the manifest."""
    rgb = load_image(item.path)
    if rgb.shape[:2] != (item.height, item.width):
        raise ValueError(f"{item.path}: image is {rgb.shape[1]} x {rgb.shape[0]} but the manifest says "
                         f"{item.width} x {item.height}")
    return rgb


def score_photo(explainer, item: BoxedItem, rgb: np.ndarray, target: int, methods: Sequence[str],
                cfg: RealConfig) -> dict:
    """Classify and score one photo (``load_photo``) with every method and baseline -> its record (JSON-ready).

    The record: file, row, label, prediction, ``pointing`` {name: {tol: hit}} (methods, point and map
    baselines), ``energy`` {name: {tol: share}} (methods and map baselines), and on a correctly predicted
    photo ``auc`` {name: {insertion, deletion}}, ``curves`` {name: {insertion: [...], deletion: [...]}},
    ``road`` {name: {morf: [...], lerf: [...]}} (one score per fraction); ``seconds`` per method.
    A slow method outside ``cfg.score_subset`` is left out.
    """
    size = explainer.size
    art = explainer.artifacts
    be = explainer.backend
    labels = explainer.classes.labels
    step, _ = step_for(size, cfg.steps)
    tols = cfg.tolerances
    x = preprocess(rgb, size, art.mean, art.std, "stretch")[0]  # [3, S, S]

    def score(batch: np.ndarray) -> np.ndarray:
        logits = be.to_host(explainer.classify(be.asarray(np.ascontiguousarray(batch, np.float32))))
        return _softmax(logits)[:, target]

    t = time.perf_counter()
    probs = _softmax(be.to_host(explainer.classify(be.asarray(x[None]))))[0]  # [L]
    pred = int(np.argmax(probs))
    in_subset = cfg.score_subset is None or item.row < cfg.score_subset
    rec = {"row": int(item.row), "file": item.file, "class_index": int(item.class_index),
           "class_name": item.class_name, "target": int(target), "target_name": labels[target], "pred": pred,
           "pred_name": labels[pred], "correct": pred == int(target), "probability": float(probs[target]),
           "in_subset": bool(in_subset), "pointing": _point_baselines(item, cfg.seed, tols), "energy": {},
           "auc": {}, "curves": {}, "road": {}, "seconds": {"classify": time.perf_counter() - t}}
    subs = {mode: _substrate(x, cfg.substrates[mode]) for mode in _CURVES} if rec["correct"] else {}
    pseed = photo_seed(item.file)
    for m in [*methods, *MAP_BASELINES]:
        if _is_slow(m) and not in_subset:
            continue
        t = time.perf_counter()
        if m == "random_saliency":
            sal = random_saliency(size, cfg.seed, pseed)
        elif m == "center_saliency":
            sal = center_saliency(size)
        else:
            ((sal, _),) = explain_maps(explainer, [rgb], [target], m)
        t_explain = time.perf_counter() - t
        rec["pointing"][m] = pointing_hits(sal, item, tols)
        rec["energy"][m] = energy_shares(sal, item, tols)
        if rec["correct"]:
            curves = {mode: perturbation_curve(x, sal, score, mode, step, subs[mode]) for mode in _CURVES}
            rec["curves"][m] = {mode: [float(v) for v in c] for mode, c in curves.items()}
            rec["auc"][m] = {mode: auc(c) for mode, c in curves.items()}
            if cfg.road_fractions and (cfg.road_subset is None or item.row < cfg.road_subset):
                # the same noise for every method on this photo: the maps, not the draws, differ
                rec["road"][m] = {o: [float(v) for v in road_curve(
                    x, sal, score, o, cfg.road_fractions, cfg.road_noise,
                    np.random.default_rng([cfg.seed, pseed, 1 + k]))] for k, o in enumerate(_ROAD)}
        rec["seconds"][m] = {"explain": t_explain, "total": time.perf_counter() - t}
    return rec


# --------------------------------------------------------------------------------------------------
# Aggregation (from records alone: a run, a resumed run and merged chunks aggregate the same way)
# --------------------------------------------------------------------------------------------------


def _mean_ci(values: np.ndarray, cfg: RealConfig) -> dict:
    ci = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), cfg.n_bootstrap, cfg.seed, cfg.level)
    return {"mean": ci["estimate"], "ci": [ci["lo"], ci["hi"]], "n": len(values)}


def _pointing_summary(rows: list[dict], name: str, cfg: RealConfig) -> dict:
    out = {}
    for t in cfg.tolerances:
        key = f"{t:g}"
        hits = np.array([r["pointing"][name][key] for r in rows], dtype=np.float64)  # [n]
        if not len(hits):
            out[key] = None
            continue
        ci = bootstrap_ci(lambda idx: float(hits[idx].mean()), len(hits), cfg.n_bootstrap, cfg.seed, cfg.level)
        out[key] = {"accuracy": ci["estimate"], "ci": [ci["lo"], ci["hi"]], "n": len(hits),
                    "hits": int(hits.sum()),
                    "mean_over_classes": pointing_game_summary(
                        (r["class_name"], r["pointing"][name][key]) for r in rows)["mean_accuracy"],
                    "bootstrap": {k: ci[k] for k in ("level", "n_resamples", "n_valid", "seed")}}
    return out


def _energy_summary(rows: list[dict], name: str, cfg: RealConfig) -> dict:
    out = {}
    for t in cfg.tolerances:
        key = f"{t:g}"
        vals = np.array([r["energy"][name][key] for r in rows], dtype=np.float64)  # [n]
        out[key] = _mean_ci(vals, cfg) if len(vals) else None
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


def road_scores(rec: dict, name: str) -> dict | None:
    """A record's ROAD summary for one map: {morf, lerf, combined}, means over the fractions (None: no ROAD)."""
    r = rec.get("road", {}).get(name)
    if not r:
        return None
    morf, lerf = float(np.mean(r["morf"])), float(np.mean(r["lerf"]))
    return {"morf": morf, "lerf": lerf, "combined": (lerf - morf) / 2.0}


def _road_summary(rows: list[dict], name: str, cfg: RealConfig) -> dict | None:
    kept = [r for r in rows if r["correct"] and road_scores(r, name) is not None]
    if not kept:
        return None
    vals = {k: np.array([road_scores(r, name)[k] for r in kept]) for k in ("morf", "lerf", "combined")}
    return {"n_correct": len(kept), **{k: _mean_ci(v, cfg) for k, v in vals.items()},
            "curves": {o: np.mean([r["road"][name][o] for r in kept], axis=0).tolist() for o in _ROAD}}


def summarise(records: list[dict], methods: Sequence[str], cfg: RealConfig) -> dict:
    """Tables 1, 1b, 2 and 3 over the records (each method over the photos it ran on): pointing and energy per
    tolerance, the same on the centre-miss photos, deletion / insertion, ROAD; estimates, intervals, n."""
    def ran(m: str, rows: list[dict]) -> list[dict]:
        return [r for r in rows if m in r["pointing"]]

    maps = [*methods, *MAP_BASELINES]
    out = {
        "pointing_game": {
            "methods": {m: _pointing_summary(ran(m, records), m, cfg) for m in methods if ran(m, records)},
            "baselines": {b: _pointing_summary(records, b, cfg) for b in (*POINT_BASELINES, *MAP_BASELINES)},
        },
        "energy": {
            "methods": {m: _energy_summary(ran(m, records), m, cfg) for m in methods if ran(m, records)},
            "baselines": {b: _energy_summary(records, b, cfg) for b in MAP_BASELINES},
        },
        "center_miss": {},
        "deletion_insertion": {
            "methods": {m: _deletion_summary(ran(m, records), m, cfg) for m in methods if ran(m, records)},
            "baselines": {b: _deletion_summary(records, b, cfg) for b in MAP_BASELINES},
        },
        "road": None,
    }
    for t in cfg.tolerances:
        key = f"{t:g}"
        miss = [r for r in records if not r["pointing"]["center_point"][key]]
        part = {"n_images": len(miss), "n_classes": len({r["class_name"] for r in miss}), "methods": {},
                "baselines": {}}
        for m in maps:
            rows = ran(m, miss)
            if not rows:
                continue
            hits = np.array([r["pointing"][m][key] for r in rows], dtype=np.float64)
            energy = np.array([r["energy"][m][key] for r in rows], dtype=np.float64)
            entry = {"pointing": _mean_ci(hits, cfg), "energy": _mean_ci(energy, cfg)}
            (part["methods"] if m in methods else part["baselines"])[m] = entry
        for b in POINT_BASELINES:
            if miss:
                hits = np.array([r["pointing"][b][key] for r in miss], dtype=np.float64)
                part["baselines"][b] = {"pointing": _mean_ci(hits, cfg), "energy": None}
        out["center_miss"][key] = part
    if any(r.get("road") for r in records):
        out["road"] = {
            "methods": {m: _road_summary(ran(m, records), m, cfg) for m in methods if ran(m, records)},
            "baselines": {b: _road_summary(records, b, cfg) for b in MAP_BASELINES},
        }
    return out


def seconds_of(records: list[dict], methods: Sequence[str]) -> dict:
    """Seconds per method summed over the records (explanation, and everything for that map)."""
    out = {}
    for m in [*methods, *MAP_BASELINES]:
        s = [r["seconds"][m] for r in records if m in r.get("seconds", {})]
        out[m] = {"explain": float(sum(x["explain"] for x in s)), "total": float(sum(x["total"] for x in s)),
                  "images": len(s)}
    c = [r["seconds"]["classify"] for r in records if "classify" in r.get("seconds", {})]
    out["classify"] = {"total": float(sum(c)), "images": len(c)}
    return out


def protocol_description(size: int, cfg: RealConfig) -> dict:
    step, n_steps = step_for(size, cfg.steps)
    return {
        "resize": "stretch",
        "input_size": size,
        "pointing_game": {
            "tolerances_px": [float(t) for t in cfg.tolerances],
            "explained_class": "the label (every image, whatever the prediction)",
            "coordinates": "argmax (first, row-major) of the [S, S] model-input saliency; hit when the centre "
                           "of that pixel, mapped to the photo ((j + 0.5) * W / S, (i + 0.5) * H / S), lies "
                           "in a box of the label grown by the tolerance (photo pixels, boxes as written: "
                           "the photo spans [0, W] x [0, H]); computed by scaling the boxes to the model "
                           "input, the saliency map is not resampled",
            "accuracy": "hits / images; mean_over_classes is the mean of per-class accuracies",
            "baselines": "centre point and one uniform random pixel per image (seeded by the file name), on "
                         "the photo's grid; the saliency baselines' maxima on the model input",
            "energy": "share of the map's positive mass on the model-input pixels whose centres lie in the "
                      "label's boxes grown by the tolerance (Score-CAM's energy-based pointing game); a map "
                      "without positive mass scores 0",
            "center_miss": "per tolerance, the photos whose grown boxes do not hold the photo's centre "
                           "((W - 1) / 2, (H - 1) / 2): the centre point scores 0 there by construction",
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
            "baselines": "random saliency (seeded by the file name) and a centred Gaussian (sigma S / 4)",
        },
        "road": {
            "kept": "correctly predicted images only" + (
                f", on the manifest's first {cfg.road_subset} rows" if cfg.road_subset is not None else ""),
            "subset_rows": cfg.road_subset,
            "fractions": [float(q) for q in cfg.road_fractions],
            "imputation": "noisy linear imputation (Rong et al. 2022): removed pixels = weighted mean of their 8 "
                          "neighbours (1/6 edge, 1/12 diagonal), solved exactly, plus Gaussian noise of sd "
                          f"{cfg.road_noise:g} in normalised input space, seeded by the file name",
            "score": "softmax probability of the label over all classes",
            "morf": "mean score after removing the most salient fraction (lower is better)",
            "lerf": "mean score after removing the least salient fraction (higher is better)",
            "combined": "(LeRF - MoRF) / 2, as pytorch-grad-cam's ROADCombined (higher is better)",
        } if cfg.road_fractions else None,
        "bootstrap": {"n_resamples": cfg.n_bootstrap, "seed": cfg.seed, "level": cfg.level, "unit": "image",
                      "method": "percentile; each resample recomputes the statistic (for Table 2: per-class "
                                "accuracy, bins, kept images, binned AUC)"},
    }


def aggregate(records: list[dict], bad: list[dict], methods: Sequence[str], cfg: RealConfig, size: int,
              mapping: dict | None, n_rows: int) -> dict:
    """The run's results from its records (sorted by row): every table, the accuracy, seconds, the records."""
    if not records:
        raise ValueError("no image could be read")
    records = sorted(records, key=lambda r: r["row"])
    # Methods that ran on fewer photos than the run has (the slow ones on --score-subset, or methods of a
    # merged run that covered part of the photos): every method is also summarised where all of them ran.
    ran = {m: sum(m in r["pointing"] for r in records) for m in methods}
    partial = [m for m in methods if ran[m] < len(records)]
    common = [r for r in records if all(m in r["pointing"] for m in methods)]
    subset = None
    if partial and common:
        why = [f"{m}: {SLOW_METHODS[parse_method_spec(m)[0]]}" if _is_slow(m) else f"{m}: ran on {ran[m]} photos"
               for m in partial]
        subset = {"methods": partial, "n_first_rows": cfg.score_subset, "n_images": len(common),
                  "rows": sorted(r["row"] for r in common), "reason": "; ".join(why)}
    counts: dict[str, list[int]] = {}
    for r in records:
        c = counts.setdefault(r["class_name"], [0, 0])
        c[0] += int(r["correct"])
        c[1] += 1
    n_correct = sum(int(r["correct"]) for r in records)
    res = {
        "protocol": protocol_description(size, cfg),
        "targets": mapping,
        "subset": subset,
        "n_rows": n_rows,
        "n_images": len(records),
        "n_bad": len(bad),
        "bad": sorted(bad, key=lambda b: b.get("row", -1)),
        "accuracy": {"top1": n_correct / len(records), "n_correct": n_correct, "n": len(records),
                     "per_class": {k: a / t for k, (a, t) in sorted(counts.items())}},
        "methods": list(methods),
        **summarise(records, methods, cfg),
        "on_subset": None,
        "seconds": seconds_of(records, methods),
        "images": records,
    }
    if subset is not None:
        res["on_subset"] = {"n_images": len(common), **summarise(common, methods, cfg)}
    return res


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def check_config(cfg: RealConfig) -> None:
    """Settings errors before any work (one line each)."""
    if sorted(cfg.substrates) != sorted(_CURVES):
        raise ValueError(f"substrates must name deletion and insertion, got {', '.join(cfg.substrates)}")
    for kind in cfg.substrates.values():
        _substrate(np.zeros((3, 2, 2), np.float32), kind)  # an unknown substrate fails before any work
    if cfg.score_subset is not None and cfg.score_subset < 1:
        raise ValueError(f"--score-subset must be a positive number of images, got {cfg.score_subset}")
    if any(not 0.0 < q < 1.0 for q in cfg.road_fractions):
        raise ValueError(f"--road-fractions must lie in (0, 1), got {list(cfg.road_fractions)}")
    if cfg.road_subset is not None and cfg.road_subset < 1:
        raise ValueError(f"--road-subset must be a positive number of rows, got {cfg.road_subset}")
    if not (math.isfinite(cfg.road_noise) and cfg.road_noise >= 0):
        raise ValueError(f"--road-noise must be a number >= 0, got {cfg.road_noise}")
    step_for(8, cfg.steps)


def evaluate_real(explainer, items: Sequence[BoxedItem], methods: Sequence[str], cfg: RealConfig | None = None,
                  progress: bool = True, checkpoint=None, n_rows: int | None = None) -> dict:
    """Every evaluation over ``items`` (``boxes_data.read_boxes_manifest``) with every method and baseline.

    The Explainer must use the stretch resize. Rows with an ``error`` and images that cannot be read (or
    whose size disagrees with the manifest) are reported (stderr, ``bad`` in the result) and skipped.
    checkpoint: a ``checkpoint.Checkpoint`` (opened here): photos it already holds are not scored again,
    each new photo's record is appended to it as soon as it is scored.
    Returns a JSON-ready dict (``aggregate``): protocol, target mapping, accuracy, Tables 1, 1b, 2, 3 per
    method and baseline, ``on_subset``, ``seconds``, ``resumed`` (photos taken from the checkpoint) and
    ``images`` (one record per photo, with its curves).
    """
    cfg = cfg or RealConfig()
    if explainer.resize_mode != "stretch":
        raise ValueError(f"the real-data protocol stretches every photo to the model input; the Explainer "
                         f"uses resize mode '{explainer.resize_mode}'")
    check_config(cfg)
    labels = explainer.classes.labels
    bad = [{"row": it.row, "file": it.file, "error": it.error} for it in items if it.error]
    for b in bad:
        log(f"error: {b['error']}")
    usable = [it for it in items if it.error is None]
    if not usable:
        raise ValueError("no usable images in the manifest")
    class_set = getattr(explainer.classes, "name", "default")
    targets, mapping = map_targets(labels, class_set, usable, cfg.targets)
    log(targets_message(mapping))
    slow = [m for m in methods if _is_slow(m)]
    if cfg.score_subset is not None and slow:
        log(f"{', '.join(slow)} run on the manifest's first {cfg.score_subset} rows only "
            f"({'; '.join(f'{m}: {SLOW_METHODS[parse_method_spec(m)[0]]}' for m in slow)})")

    done = ({} if checkpoint is None else checkpoint.entries if checkpoint.is_open else checkpoint.open())
    try:
        records = [e["record"] for r, e in done.items() if "record" in e]
        bad += [e["bad"] for r, e in done.items() if "bad" in e]
        todo = [(it, tgt) for it, tgt in zip(usable, targets) if it.row not in done]
        if done:
            log(f"resuming from {checkpoint.path}: {len(done)} photo(s) done, {len(todo)} to go")
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(usable), initial=len(usable) - len(todo), desc="images", unit="img",
                       disable=not progress, dynamic_ncols=True)
        except ImportError:  # tqdm is a dev dependency: without it, no bar
            bar = None
        for it, tgt in todo:
            try:
                rgb = load_photo(it)
            except (ValueError, OSError) as e:
                msg = str(e) if str(it.path) in str(e) else f"{it.path}: {e}"
                entry = {"row": it.row, "file": it.file, "error": msg}
                log(f"error: {msg}")
                bad.append(entry)
                if checkpoint is not None:
                    checkpoint.append(it.row, bad=entry)
            else:
                rec = score_photo(explainer, it, rgb, tgt, methods, cfg)
                records.append(rec)
                if checkpoint is not None:
                    checkpoint.append(it.row, record=rec)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        if checkpoint is not None:
            checkpoint.close()
    res = aggregate(records, bad, methods, cfg, explainer.size, mapping,
                    len(items) if n_rows is None else n_rows)
    res["resumed"] = len(done)
    return res
