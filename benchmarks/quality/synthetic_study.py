"""The integration study's variants on the synthetic benchmark (the CLIP-architecture model).

    python -m benchmarks.quality.synthetic_study [--variants all|name,...] [--baselines name,...]
        [--out DIR] [--json FILE] [--quick] [--ig-steps 16] [--train-seed 0]

benchmarks/quality/integration_study.py measures every integration of Decom-CAM's components on a real
ImageNet CNN (a global-average-pool head, so the gradient is constant over positions). Part of the question
is whether a variant holds on the synthetic benchmark too, where the model is a CLIP ModifiedResNet with an
attention pool and the gradient varies over positions. This runs the same variants there:

- each variant is registered, for this process only, as a runtime method `study-<name>`, which computes the
  shared pieces from the runtime's own decomposition (runtime.decomcam.decompose, the paper's choices in
  runtime/config.py), the p masks kept and the p complements removed (runtime.decomcam.build_masks with H and
  1 - H), the p equal-mass masks kept (integration_study.equal_mass), the blurred image, and the p masks of
  the rectified map's decomposition kept (the `rect-*` variants) and the k masks of its non-negative parts
  for each k of PARTS_K (the `parts*` variants), and the image multiplied by the p component masks of S*
  and of S+* and by the 3 and 10 part masks (Score-CAM's masking, the `cic-*` variants), in
  5p + 1 + sum(PARTS_K) + cic_forwards(p) forwards through the exported classify graph; the map is
  integration_study.variant_saliency of those pieces, the very function the real-data study uses;
- the pieces are computed once per image and target and shared by every variant;
- the protocol, the trained model and the data are the synthetic benchmark's (benchmarks/quality/synthetic.py,
  with the cached checkpoint when there is one): the pointing game at tolerance 0 and deletion / insertion
  under the accuracy-binned protocol.

`contrast-share` is not run here: it needs the gradient of every class's logit, which the exported graphs
give one target at a time. The ig-* variants need dy/dA at activations other than the image's own (the path
from 0 to A), which the exported graphs do not give: they take it from the trained model's head by torch
autograd (`head_gradient_of`), 2p more forwards for their masks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from .integration_study import (CIC_SETS, IG, IG_STEPS, PARTS_K, VARIANTS, cic_forwards, equal_mass,
                                ig_gradient, nmf_parts, parts_sub, variant_saliency)

PREFIX = "study-"
SKIP = ("contrast-share",)
DEFAULT_BASELINES = ("gradcam", "gradcam++", "layercam", "scorecam", "ablationcam", "decomcam",
                     "decomcam-gain-share")


def pieces(ctx, head_gradient=None, ig_steps: int = IG_STEPS) -> list[dict]:
    """The shared pieces of integration_study.decompose_and_mask, per image of the batch, from the runtime's
    decomposition and masks and 5p + 1 + sum(PARTS_K) + cic_forwards(p) forwards of the exported classify graph;
    with `head_gradient` also the components of S_IG = A * ig_gradient(...) (ig_steps midpoints), their masks
    kept and x * H_IG (2p more forwards), under "ig"."""
    import runtime.decomcam as dc

    be, xp = ctx.backend, ctx.backend.xp
    cfg = ctx.config.with_(variant="paper", integration="paper")
    act, grad = ctx.activations, ctx.gradients
    b, c, h, w = act.shape
    size = ctx.x.shape[-1]
    dec = dc.decompose(be, act, grad, cfg)
    up = dc.upsample(be, dec, h, w, size, cfg)                              # [B, p, S, S] signed, bilinear
    hmap = dc.normalise_components(be, up, dec.null)                       # H
    keep, blurred = dc.build_masks(be, ctx.x, hmap, ctx.mean, ctx.std, cfg)
    remove, _ = dc.build_masks(be, ctx.x, 1 - hmap, ctx.mean, ctx.std, cfg)
    null_h = be.to_host(dec.null)
    eq = xp.asarray(np.stack([equal_mass(m, n) for m, n in zip(be.to_host(hmap), null_h)]))
    keep_eq, _ = dc.build_masks(be, ctx.x, eq, ctx.mean, ctx.std, cfg)
    dec_r = dc.decompose(be, act, xp.maximum(grad, 0), cfg)                 # the rectified map S+* (rect-*)
    up_r = dc.upsample(be, dec_r, h, w, size, cfg)
    hmap_r = dc.normalise_components(be, up_r, dec_r.null)
    keep_r, _ = dc.build_masks(be, ctx.x, hmap_r, ctx.mean, ctx.std, cfg)
    p = hmap.shape[1]
    s_pos = np.maximum(be.to_host(act).astype(np.float64) * be.to_host(grad).astype(np.float64), 0)
    facts, keep_p = {}, []
    for k in PARTS_K:                                                       # the parts-* variants
        f = [nmf_parts(s_pos[i].reshape(c, -1), k) for i in range(b)]
        dec_k = dc.Decomposition(feature_maps=xp.asarray(np.stack([v[0] for v in f])),
                                 singular_values=xp.asarray(np.stack([v[2] for v in f])),
                                 explained_variance=xp.asarray(np.stack([v[2] for v in f])),
                                 null=xp.asarray(np.stack([v[3] for v in f])))
        hm_k = dc.normalise_components(be, dc.upsample(be, dec_k, h, w, size, cfg), dec_k.null)
        facts[k] = (f, be.to_host(hm_k), hm_k)
        keep_k, _ = dc.build_masks(be, ctx.x, hm_k, ctx.mean, ctx.std, cfg)
        keep_p.append(keep_k.reshape(b * k, 3, size, size))
    cic_masks = {"svd": hmap, "rect": hmap_r, **{k: facts[k][2] for k in PARTS_K}}
    ig_batch = []
    if head_gradient is not None:                                           # the ig-* variants
        text_h, tgt = be.to_host(ctx.text), np.asarray(ctx.target)
        grad_ig = ig_gradient(lambda a: head_gradient(a, text_h, tgt), be.to_host(act), ig_steps)
        dec_g = dc.decompose(be, act, xp.asarray(grad_ig.astype(np.float32)), cfg)
        up_g = dc.upsample(be, dec_g, h, w, size, cfg)
        hmap_g = dc.normalise_components(be, up_g, dec_g.null)
        keep_g, _ = dc.build_masks(be, ctx.x, hmap_g, ctx.mean, ctx.std, cfg)
        ig_batch = [keep_g.reshape(b * p, 3, size, size),
                    (ctx.x[:, None] * hmap_g[:, :, None]).reshape(b * p, 3, size, size)]
    batch = xp.concatenate([keep.reshape(b * p, 3, size, size), remove.reshape(b * p, 3, size, size),
                            keep_eq.reshape(b * p, 3, size, size), blurred,
                            keep_r.reshape(b * p, 3, size, size), *keep_p,
                            *[(ctx.x[:, None] * cic_masks[k][:, :, None]).reshape(-1, 3, size, size)
                              for k in CIC_SETS], *ig_batch])                   # Score-CAM's masking (cic-*)
    z = be.to_host(ctx.classify(batch)).astype(np.float64)
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    host = be.to_host
    fm, sigma, evr, null = host(dec.feature_maps), host(dec.singular_values), host(dec.explained_variance), \
        host(dec.null)
    a64, g64 = host(act).astype(np.float64).reshape(b, c, -1), host(grad).astype(np.float64).reshape(b, c, -1)
    up_h, hmap_h = host(up), host(hmap)
    fm_r, sigma_r, evr_r, null_r = host(dec_r.feature_maps), host(dec_r.singular_values), \
        host(dec_r.explained_variance), host(dec_r.null)
    up_rh, hmap_rh = host(up_r), host(hmap_r)
    out = []
    for k in range(b):
        t = int(ctx.target[k])
        rows_keep = np.arange(k * p, (k + 1) * p)
        rows_remove = b * p + rows_keep
        rows_eq = 2 * b * p + rows_keep
        row_blur = 3 * b * p + k
        g = (a64[k] * g64[k]).sum(0)
        g_pos = (a64[k] * np.maximum(g64[k], 0)).sum(0)
        sv2 = sigma[k] ** 2
        div = np.where(sv2 > 0, sv2, 1.0)
        sv2_r = sigma_r[k] ** 2
        rows_rect = 3 * b * p + b + rows_keep
        out.append({
            "up": up_h[k], "H": hmap_h[k], "null": null[k], "evr": evr[k], "sigma": sigma[k],
            "y_keep": z[rows_keep, t], "y_remove": z[rows_remove, t], "y_blur": float(z[row_blur, t]),
            "p_keep": prob[rows_keep, t], "p_remove": prob[rows_remove, t], "p_blur": float(prob[row_blur, t]),
            "y_eq": z[rows_eq, t],
            "mass": hmap_h[k].mean((1, 2)),
            "fm": fm[k].reshape(-1, h, w),
            "share": np.where(null[k], 0.0, fm[k] @ g / div),
            "share_pos": np.where(null[k], 0.0, fm[k] @ g_pos / div),
            "share_con": None,
            "rect": {"up": up_rh[k], "H": hmap_rh[k], "null": null_r[k], "evr": evr_r[k], "sigma": sigma_r[k],
                     "fm": fm_r[k].reshape(-1, h, w),
                     "share": np.where(null_r[k], 0.0, fm_r[k] @ g_pos / np.where(sv2_r > 0, sv2_r, 1.0)),
                     "y_keep": z[rows_rect, t], "mass": hmap_rh[k].mean((1, 2))},
            "parts": {},
        })
        row = 4 * b * p + b
        for kp in PARTS_K:
            (pm, pw, pfrac, pnull), hm = facts[kp][0][k], facts[kp][1][k]
            out[-1]["parts"][kp] = parts_sub(pm, pw, pfrac, pnull, hm, z[row + k * kp:row + (k + 1) * kp, t], h, w)
            row += b * kp
        out[-1]["cic"] = {}
        for kc in CIC_SETS:
            kk = p if isinstance(kc, str) else kc
            rows = slice(row + k * kk, row + (k + 1) * kk)
            out[-1]["cic"][kc] = {"y": z[rows, t], "prob": prob[rows, t]}
            row += b * kk
        if head_gradient is not None:
            fm_g, null_g = host(dec_g.feature_maps)[k], host(dec_g.null)[k]
            sigma_g = host(dec_g.singular_values)[k]
            g_ig = (a64[k] * grad_ig[k].reshape(c, -1)).sum(0)
            sv2_g = sigma_g ** 2
            rows_g, rows_c = row + k * p + np.arange(p), row + b * p + k * p + np.arange(p)
            out[-1]["ig"] = {
                "up": host(up_g)[k], "H": host(hmap_g)[k], "null": null_g, "sigma": sigma_g,
                "evr": host(dec_g.explained_variance)[k], "fm": fm_g.reshape(-1, h, w),
                "share": np.where(null_g, 0.0, fm_g @ g_ig / np.where(sv2_g > 0, sv2_g, 1.0)),
                "y_keep": z[rows_g, t], "mass": host(hmap_g)[k].mean((1, 2)),
                "cic": {"svd": {"y": z[rows_c, t], "prob": prob[rows_c, t]}}}
    return out


class Registration(list):
    """The names registered by `registered` (a list), and the pieces they share (`cache`)."""

    def __init__(self, names):
        super().__init__(names)
        self.cache: dict = {}


def piece_key(x: np.ndarray, logits: np.ndarray, target: int, config) -> tuple:
    """What the pieces of one image depend on: the model input, the model (through the image's logits), the
    target and the Decom-CAM configuration."""
    h = hashlib.sha1()
    for a in (x, logits):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest(), int(target), repr(config)


def study_method(variant: str, cache: dict, head_gradient=None, ig_steps: int = IG_STEPS):
    """A runtime Method class computing integration_study.variant_saliency(variant, ...), its pieces kept in
    `cache` (not registered). The ig-* variants need `head_gradient(acts [B, C, h, w], text [L, D], target [B])
    -> dy/dA at those activations` (`head_gradient_of`)."""
    from runtime.methods.base import Method, MethodOutput

    if variant in IG and head_gradient is None:
        raise ValueError(f"variant '{variant}' needs the model's head gradient (registered(..., head_gradient=))")
    extra = 2 if head_gradient is not None else 0

    class StudyVariant(Method):
        name = PREFIX + variant
        doc = VARIANTS[variant]

        def __call__(self, ctx) -> MethodOutput:
            xs, lg = ctx.backend.to_host(ctx.x), ctx.backend.to_host(ctx.logits)
            keys = [piece_key(xs[k], lg[k], ctx.target[k], ctx.config) for k in range(xs.shape[0])]
            if any(k not in cache for k in keys):
                for k, d in zip(keys, pieces(ctx, head_gradient, ig_steps)):
                    cache[k] = d
            sal = np.stack([variant_saliency(variant, cache[k]) for k in keys]).astype(np.float32)
            return MethodOutput(sal, forwards=(5 + extra) * (p := cache[keys[0]]["H"].shape[0]) + 1
                                + sum(PARTS_K) + cic_forwards(p))

    StudyVariant.__name__ = f"Study_{variant.replace('-', '_')}"
    return StudyVariant


def head_gradient_of(clip_model):
    """head_gradient(acts, text, target) for study_method: dy_target/dA of the CLIP model's head after layer4
    (attention pool, L2 normalisation, scaled cosine logits; export.baselines_reference.head_logits) at the
    given activations, by torch autograd."""
    import torch

    from export.baselines_reference import head_logits

    def head_gradient(acts, text, target):
        a = torch.from_numpy(np.ascontiguousarray(acts, np.float32)).requires_grad_(True)
        with torch.enable_grad():
            y = head_logits(clip_model, a, torch.from_numpy(np.ascontiguousarray(text, np.float32)))
            (g,) = torch.autograd.grad(y[torch.arange(len(a)), torch.as_tensor(np.asarray(target))].sum(), a)
        return g.numpy()

    return head_gradient


def registered(variants, head_gradient=None, ig_steps: int = IG_STEPS):
    """Context: the variants registered as runtime methods `study-<name>` within the block; it yields a
    `Registration` (the names, and the pieces computed in the block, which are dropped at its end).
    `head_gradient` (`head_gradient_of`) is needed by the ig-* variants, which integrate it over `ig_steps`
    midpoints."""
    import contextlib

    from runtime.methods.base import METHODS

    @contextlib.contextmanager
    def ctx():
        reg = Registration(PREFIX + v for v in variants)
        added = []
        try:
            for v in variants:
                cls = study_method(v, reg.cache, head_gradient, ig_steps)
                if cls.name in METHODS:
                    raise ValueError(f"method '{cls.name}' is already registered")
                METHODS[cls.name] = cls
                added.append(cls.name)
            yield reg
        finally:
            for n in added:
                METHODS.pop(n, None)
            reg.cache.clear()

    return ctx()


def component_diagnostics(explainer, items) -> dict:
    """Pointing-game trials of the synthetic VOC items (one per image and class present), component by
    component: how often each H_i alone points into the box, how often any does (the best any selection of
    one component could reach), and how often the component with the largest gain does, for the paper's
    gains C_i, the gains per unit of mask mass C_i / m_i and the equal-mass gains E_i."""
    from runtime.images import load_image

    from .evaluate import class_indices
    from .protocol import pointing_hit

    present = sorted({c for it in items for c in it.objects})
    idx = class_indices(explainer.classes.labels, present, explainer.classes.name, "VOC")
    hits, picks = [], {"C": [], "C/m": [], "E": []}
    name = PREFIX + "diagnostics-top1"
    with contextlib.ExitStack() as stack:
        from runtime.methods.base import METHODS

        cache: dict = {}
        if name in METHODS:
            raise ValueError(f"method '{name}' is already registered")
        cls = study_method("top1", cache)
        cls.name = name
        METHODS[name] = cls
        stack.callback(METHODS.pop, name, None)
        for it in items:
            rgb = load_image(it.image_path)
            for c in sorted(it.objects):
                e = explainer.explain_arrays([rgb], target=[idx[c]], method=name)[0]
                (d,) = [v for k, v in cache.items() if k[1] == idx[c]]
                cache.clear()
                valid = ~d["null"]
                h = np.array([v and pointing_hit(e.geometry.to_original(m), it.objects[c], 0.0)
                              for m, v in zip(d["H"], valid)])
                hits.append(h)
                if not valid.any():
                    continue                                 # no component: no pick (as report's analysis)
                for key, g in (("C", d["y_keep"] - d["y_blur"]),
                               ("C/m", (d["y_keep"] - d["y_blur"]) / np.maximum(d["mass"], 1e-6)),
                               ("E", d["y_eq"] - d["y_blur"])):
                    picks[key].append(bool(h[int(np.argmax(np.where(valid, g, -np.inf)))]))
    hits = np.array(hits)
    return {"n_trials": int(hits.shape[0]), "per_component": hits.mean(0).tolist(),
            "any_component": float(hits.any(1).mean()),
            "largest_gain": {k: (float(np.mean(v)) if v else None) for k, v in picks.items()},
            "largest_gain_n": {k: len(v) for k, v in picks.items()}}


def parse_variants(spec: str) -> list[str]:
    if spec == "all":
        return [v for v in VARIANTS if v not in SKIP]
    names = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS or v in SKIP]
    if bad:
        raise ValueError(f"unknown or unsupported variant(s) {', '.join(bad)}; valid: "
                         f"{', '.join(v for v in VARIANTS if v not in SKIP)}")
    return names


def table(res: dict) -> str:
    rows = ["| method | pointing tol 0 (%) | insertion / deletion / ins - del (%), mean | Table-2 overall |",
            "|:--|--:|--:|--:|"]
    di = res["deletion_insertion"]["methods"]
    for m, v in res["pointing_game"]["methods"].items():
        mean = di[m]["mean"]
        rows.append(f"| {m} | {100 * v['mean_accuracy']:.1f} | {100 * mean['insertion']:.1f} / "
                    f"{100 * mean['deletion']:.1f} / {100 * mean['overall']:.1f} | "
                    f"{100 * di[m]['binned']['auc']['overall']:.2f} |")
    return "\n".join(rows)


def run_records(run: dict) -> tuple[list[dict], list[dict]]:
    """(pointing trials as {"hits": {method: hit}}, correctly predicted images as {"auc": {method: {insertion,
    deletion}}}) of a synthetic run's JSON, or of a real-data run's (`python -m benchmarks.quality real`:
    pointing at tolerance 0; a method run on a subset only has no entry on the other photos)."""
    if run.get("benchmark") == "quality-real":
        images = run["images"]
        trials = [{"hits": {m: h["0"] for m, h in r["pointing"].items()}, "file": r.get("file")} for r in images]
        return trials, [r for r in images if r["correct"]]
    return run["pointing_game"]["trials"], [r for r in run["deletion_insertion"]["images"] if r["correct"]]


def _same_record(a, b) -> bool:
    """One photo's pointing hits or AUCs of one method in two runs: equal (floats within 1e-9)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_record(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9
    return a == b


def merge_real_runs(runs: list[dict], names: list[str]) -> dict:
    """Several real-data runs of one model on the same photos (e.g. the methods, then controls run later) as
    one run: each photo's record gets every run's methods, so that pairs may cross runs. The runs must share
    the model export (path and weights), the data folder and the photo list. A method in two runs counts once
    when both runs scored it the same on every photo (the same hits, AUCs within 1e-9: a deterministic
    re-run, e.g. a reference method run beside each batch of new ones); otherwise it is an error (which one
    would count?). The model-free baselines are taken from the first."""
    base = json.loads(json.dumps(runs[0]))
    for run, name in zip(runs[1:], names[1:]):
        if run.get("benchmark") != "quality-real" or base.get("benchmark") != "quality-real":
            raise ValueError(f"{name}: only real-data runs (python -m benchmarks.quality real) merge with '+'")
        same = [(k, base.get(k), run.get(k)) for k in ("data",)] + \
            [(f"artifacts.{k}", base["artifacts"].get(k), run["artifacts"].get(k)) for k in ("path", "model", "pretrained")]
        for what, a, b in same:
            if a != b:
                raise ValueError(f"{name}: {what} is {b!r}, the first run's is {a!r}: not the same model and photos")
        if [r["file"] for r in run["images"]] != [r["file"] for r in base["images"]]:
            raise ValueError(f"{name}: not the same photos, in the same order, as {names[0]}")
        for mine, other in zip(base["images"], run["images"]):
            for field in ("pointing", "auc"):
                for m, v in other.get(field, {}).items():
                    if m in ("center_point", "random_point", "random_saliency", "center_saliency"):
                        continue
                    if m in mine[field]:
                        if not _same_record(mine[field][m], v):
                            raise ValueError(f"{name}: method '{m}' is in more than one of the merged runs and "
                                             f"differs on {mine['file']}")
                        continue
                    mine[field][m] = v
    return base


def _dataset(run: dict) -> str | None:
    """What a run's images are, so that records of different image sets never share a unit: a real run's
    data folder (as a path: a trailing slash does not matter), a synthetic run's generated-data settings
    (the dataset spec, the images per class and the evaluation seed; not the model's training seed)."""
    if run.get("benchmark") == "quality-real":
        return str(Path(run["data"])) if run.get("data") else None
    cfg = run.get("run") or {}
    spec = (cfg.get("train") or {}).get("spec")
    if spec is None:
        return None
    return json.dumps([spec, cfg.get("n_val_per_class"), cfg.get("n_point_per_class"), cfg.get("seed")],
                      sort_keys=True)


def _unit(run: dict, rec: dict, kind: str, fallback: int) -> tuple:
    """The image a record was scored on, the unit the pooled bootstrap resamples: the photo's file in the
    run's data folder for a real run, the generated image of the run's data settings for a synthetic one
    (every trained synthetic model is scored on the same generated set, and models explaining the same
    photos make correlated errors). A record with no name, or of a run that does not say what its images
    are, is a unit of its own."""
    data = _dataset(run)
    if run.get("benchmark") == "quality-real":
        name = rec.get("file")
    else:
        name = rec.get("image") if kind == "trials" else "/".join(Path(rec.get("path") or "").parts[-2:])
    return (kind, data, name) if name and data else ("record", fallback)


def cluster_bootstrap(values: np.ndarray, units: list, kind: str, resamples: int,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean of `values`, resampling the distinct `units` (percentile bootstrap
    over clusters: several records of one image are drawn together). With every unit distinct this is the
    plain bootstrap over records, with the same resamples."""
    from .integration_study import bootstrap, resample_indices

    names = list(dict.fromkeys(units))                 # in order of first appearance
    if len(names) == len(units):
        return bootstrap(values, resample_indices(kind, range(len(values)), resamples, seed))
    where = {u: i for i, u in enumerate(names)}
    ids = np.array([where[u] for u in units])
    sums = np.bincount(ids, weights=values, minlength=len(names))
    counts = np.bincount(ids, minlength=len(names)).astype(float)
    idx = resample_indices(kind, range(len(names)), resamples, seed)
    means = sums[idx].sum(1) / counts[idx].sum(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(res: dict | list[dict], pairs: list[tuple[str, str]], resamples: int = 1000,
           seed: int = 0) -> list[dict]:
    """Paired bootstrap (percentile, 95%) of A - B on a run's per-image records (synthetic, or real photos:
    run_records): pointing hits over the trials (points of hit rate) and insertion - deletion AUC over the
    correctly predicted images (points of AUC), over the trials and images both methods ran on. A name is a
    method of the run, `study-` optional. A list of runs (models trained with different seeds, or several
    real models on the same photos) pools their trials and their correct images; the bootstrap then
    resamples images, each with all its records (`_unit`), so that n models on one set of photos do not
    count as n times the photos. `n_units` / `n_correct_units` are the distinct images."""
    runs = res if isinstance(res, list) else [res]

    def key(name, have):
        for k in (name, PREFIX + name):
            if k in have:
                return k
        raise ValueError(f"'{name}' is not a method of this run; it has {', '.join(sorted(have))}")

    out = []
    for a, b in pairs:
        pv, ov, pu, ou = [], [], [], []
        for run in runs:
            trials, images = run_records(run)
            every = set().union(*(t["hits"] for t in trials))
            ka, kb = key(a, every), key(b, every)
            trials = [t for t in trials if ka in t["hits"] and kb in t["hits"]]
            pv += [float(t["hits"][ka]) - float(t["hits"][kb]) for t in trials]
            pu += [_unit(run, t, "trials", len(pu) + i) for i, t in enumerate(trials)]
            every = set().union(*(r["auc"] for r in images))
            ia, ib = key(a, every), key(b, every)
            images = [r for r in images if ia in r["auc"] and ib in r["auc"]]
            ov += [(r["auc"][ia]["insertion"] - r["auc"][ia]["deletion"])
                   - (r["auc"][ib]["insertion"] - r["auc"][ib]["deletion"]) for r in images]
            ou += [_unit(run, r, "correct", len(ou) + i) for i, r in enumerate(images)]
        pv, ov = np.array(pv) * 100, np.array(ov) * 100
        out.append({"a": a, "b": b, "n_trials": len(pv), "n_correct": len(ov),
                    "n_units": len(set(pu)), "n_correct_units": len(set(ou)),
                    "pointing": cluster_bootstrap(pv, pu, "trials", resamples, seed),
                    "overall": cluster_bootstrap(ov, ou, "correct", resamples, seed)})
    return out


def pairs_table(rows: list[dict]) -> str:
    lines = ["| pair | pointing tol 0, points (n trials) | ins - del, points (n correct) |", "|:--|--:|--:|"]
    for r in rows:
        p, o = r["pointing"], r["overall"]
        nt, nc = (str(r["n_trials"]), str(r["n_correct"]))
        if r.get("n_units", r["n_trials"]) != r["n_trials"]:
            nt += f" on {r['n_units']} images"
        if r.get("n_correct_units", r["n_correct"]) != r["n_correct"]:
            nc += f" on {r['n_correct_units']} images"
        lines.append(f"| {r['a']} - {r['b']} | {p[0]:+.1f} [{p[1]:.1f}, {p[2]:.1f}] ({nt}) | "
                     f"{o[0]:+.2f} [{o[1]:.2f}, {o[2]:.2f}] ({nc}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .synthetic import FULL, QUICK, run_synthetic

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.synthetic_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all", help="integration_study variants, comma-separated, or all")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help="runtime methods run beside them (default: %(default)s)")
    p.add_argument("--out", default="outputs/synthetic-study", help="work folder (default outputs/synthetic-study)")
    p.add_argument("--json", default=None, help="write the synthetic benchmark's JSON here")
    p.add_argument("--quick", action="store_true", help="the tiny synthetic run (measures nothing)")
    p.add_argument("--components", action="store_true",
                   help="also report the pointing game of each component alone and of the largest-gain one")
    p.add_argument("--pairs", default="",
                   help="A:B,... paired bootstrap differences (pointing, ins - del) printed after the run; "
                        "A~B where a name has a colon (gradcam:kernel=bicubic)")
    p.add_argument("--ig-steps", type=int, default=IG_STEPS,
                   help="midpoints of the path integral of the ig-* variants (default %(default)s)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="train the benchmark model with this seed (init and batch order) instead of the recipe's "
                        "(a second, independently trained model; cached like the first)")
    p.add_argument("--from-json", default=None,
                   help="no run: read a run's --json (or several, comma-separated, pooled; a real-data run's "
                        "`python -m benchmarks.quality real --json` too) and print --pairs; A.json+B.json "
                        "merges two real-data runs of one model on the same photos into one run")
    args = p.parse_args(argv)
    try:
        # A~B when a name has a colon itself (a benchmark method option, gradcam:kernel=bicubic)
        pairs = [tuple(x.split("~", 1) if "~" in x else x.split(":", 1)) for x in args.pairs.split(",") if x.strip()]
        if any(len(x) != 2 for x in pairs):
            raise ValueError(f"--pairs wants A:B,... (or A~B); got '{args.pairs}'")
        if args.from_json:
            if not pairs:
                raise ValueError("--from-json needs --pairs")
            runs = []
            for entry in (f.strip() for f in args.from_json.split(",") if f.strip()):
                names = [x.strip() for x in entry.split("+")]
                parts = [json.loads(Path(x).read_text()) for x in names]
                runs.append(parts[0] if len(parts) == 1 else merge_real_runs(parts, names))
            print(pairs_table(paired(runs if len(runs) > 1 else runs[0], pairs)))
            return 0
        variants = parse_variants(args.variants)
        if args.ig_steps < 1:
            raise ValueError(f"--ig-steps must be at least 1, got {args.ig_steps}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    run = QUICK if args.quick else FULL
    if args.train_seed is not None:
        from dataclasses import replace

        run = replace(run, train=replace(run.train, seed=args.train_seed))
    head_gradient = None
    if any(v in IG for v in variants):                     # the trained model's head, for S_IG
        from .train import load_checkpoint, train_or_load

        head_gradient = head_gradient_of(load_checkpoint(train_or_load(run.train).checkpoint)[0])
    with registered(variants, head_gradient, args.ig_steps) as names:
        res = run_synthetic(run, Path(args.out), [*names, *baselines], plot=False)
    print(table(res))
    if args.components:
        from runtime.engines import EngineOptions
        from runtime.explainer import Explainer

        from .voc import read_voc

        ex = Explainer.from_artifacts(res["model"]["artifacts"], resize_mode="stretch",
                                      engine_options=EngineOptions(intra_op_threads=1, allow_spinning=False))
        diag = component_diagnostics(ex, read_voc(Path(args.out) / "voc", "val"))
        res["components"] = diag
        print(f"\nComponents alone, pointing tol 0 over {diag['n_trials']} trials (%): "
              + ", ".join(f"H_{i + 1} {100 * v:.1f}" for i, v in enumerate(diag["per_component"])))
        print(f"any component: {100 * diag['any_component']:.1f}; the largest gain's component: "
              + ", ".join(f"{k} {100 * v:.1f}" for k, v in diag["largest_gain"].items()))
    if pairs:
        try:
            res["pairs"] = paired(res, pairs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("\n" + pairs_table(res["pairs"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
