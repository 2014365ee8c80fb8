"""Sanity check of saliency methods by cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018).

A method whose maps barely change when the model's top layers are re-initialised explains the image, not the
model. For every method and photo, the map of the trained model is compared with the map of the same model
whose classifier (level ``head``), or classifier and last k blocks (level ``k``), carry random weights, by
Spearman's rank correlation over the [S, S] model-input pixels. The explained class is the photo's label.

Randomised models are exported, not patched: ``randomized_export`` loads the registry model with its
weights (``export.models.load_model``), re-initialises the chosen units with fixed seeds and writes the five
graphs with ``export.onnx_export.export_model`` into a cache folder, reused while its manifest names the same
randomisation. A unit is one of the model's top-level blocks in forward order (``model_units``): the
classifier is the last; a BatchNorm joins the unit before it. Re-initialisation is each module's own
``reset_parameters`` (PyTorch's default initialisers) drawn from a generator seeded by (seed, unit name), so
a unit gets the same random weights at every level (the cascade grows, it does not redraw); BatchNorm layers
of a re-initialised unit get the identity affine map and running statistics measured on generated images
(as ``--pretrained none`` exports do).

    python -m benchmarks.quality sanity --data DIR --model efficientnet-lite0 --pretrained package \
        --cache DIR --json FILE [--levels head,1,2,3] [--methods ...] [--limit N] [--score-subset N]

Per photo, each record is appended to FILE.checkpoint.jsonl (``checkpoint.Checkpoint``): the same command
resumes a killed run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .evaluate import explain_maps, log, parse_method_spec

__all__ = ["model_units", "parse_levels", "level_units", "randomized_export", "spearman", "evaluate_sanity",
           "sanity_table", "add_parser", "main"]

_BN = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm")


# --------------------------------------------------------------------------------------------------
# Randomised models
# --------------------------------------------------------------------------------------------------


def _module_to_randomize(lm):
    """The nn.Module whose units are randomised: a pooled-linear model's classifier, a CLIP model's image tower."""
    return lm.model.model if lm.family == "pooled-linear" else lm.model.visual


def model_units(module) -> list[tuple[str, list]]:
    """[(name, [modules])] in forward (definition) order: every top-level child with parameters, containers
    (plain ``nn.Sequential`` / ``nn.ModuleList``) expanded into their items recursively; a normalisation layer
    joins the unit before it. The last unit is the classifier."""
    import torch.nn as nn

    out: list[tuple[str, list]] = []

    def walk(mod, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if not any(True for _ in child.parameters()):
                continue
            if type(child) in (nn.Sequential, nn.ModuleList):
                walk(child, full + ".")
            elif type(child).__name__ in _BN and out:
                out[-1] = (f"{out[-1][0]}+{full}", out[-1][1] + [child])
            else:
                out.append((full, [child]))

    walk(module, "")
    return out


def parse_levels(spec: str) -> list[str]:
    """'head,1,2,3' -> ["head", "1", "2", "3"]: the classifier alone, then with its last k blocks."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part != "head" and not (part.isdigit() and int(part) >= 1):
            raise ValueError(f"--levels: '{part}' is neither 'head' nor a number of blocks >= 1")
        if part not in out:
            out.append(part)
    if not out:
        raise ValueError("--levels names no level")
    return out


def level_units(units: list[tuple[str, list]], level: str) -> list[tuple[str, list]]:
    """The units a level re-initialises: the last (the classifier) and the ``k`` before it."""
    k = 0 if level == "head" else int(level)
    if k + 1 > len(units):
        raise ValueError(f"level {level}: the model has only {len(units) - 1} blocks before its classifier")
    return units[len(units) - 1 - k:]


def _unit_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2 ** 63)


def randomize_units(lm, units: list[tuple[str, list]], seed: int) -> None:
    """Re-initialise ``units`` of the loaded model in place (module docstring), then remeasure the running
    statistics of their BatchNorm layers."""
    import torch
    import torch.nn as nn

    from export.models import _calibration_images

    bns = []
    for name, mods in units:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_unit_seed(seed, name))
            for mod in mods:
                for sub in mod.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.reset_parameters()  # weight 1, bias 0, running mean 0, var 1
                        bns.append(sub)
                    elif hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
    if bns:
        top = _module_to_randomize(lm)
        g = torch.Generator().manual_seed(_unit_seed(seed, "calibration"))
        for bn in bns:
            bn.momentum = None  # cumulative average over the calibration batches
        top.eval()
        for bn in bns:
            bn.train()
        with torch.no_grad():
            for _ in range(3):
                lm.model(_calibration_images(4, lm.image_size, g, lm.mean, lm.std))
        for bn in bns:
            bn.eval()
            bn.momentum = 0.1


def randomized_export(model: str, pretrained: str, level: str, seed: int, cache) -> Path:
    """The artifacts folder of ``model`` with ``level``'s units re-initialised (``level`` "none": the trained
    model itself), exported into ``cache`` unless a valid export of the same randomisation is there."""
    from dataclasses import replace

    from export.models import load_model
    from export.onnx_export import export_model
    from runtime.artifacts import load_artifacts

    lm = load_model(model, pretrained)
    tag = "trained" if level == "none" else f"random-{level}-seed{seed}"
    out = Path(cache) / f"{model}-{tag}"
    if level != "none":
        units = level_units(model_units(_module_to_randomize(lm)), level)
        randomize_units(lm, units, seed)
        names = [n for n, _ in units]
        pid = f"{lm.pretrained_id}+randomized({','.join(names)};seed={seed})"
        if lm.family == "pooled-linear":
            from export.pooled import PooledModel

            pm = PooledModel(lm.model.model, lm.model.parts).eval()
            lm = replace(lm, model=pm)
        lm = replace(lm, pretrained_id=pid, random_weights=True)
    try:
        man = json.loads((out / "manifest.json").read_text())
        if man.get("pretrained_id") == lm.pretrained_id and man.get("model") == lm.name:
            load_artifacts(out, verify=True, graphs=tuple(man.get("graphs", {})))
            log(f"[sanity] reusing {out}")
            return out
    except (OSError, ValueError, KeyError):
        pass
    except Exception as e:  # a tampered or partial export: export again
        log(f"[sanity] {out}: {e}; exporting again")
    log(f"[sanity] exporting {model} ({tag}) to {out}")
    export_model(lm, [], out)
    return out


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(v, kind="stable")
    s = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(v)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b - 1) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two maps over their pixels (average ranks for ties); None when either
    map is constant (no ranking to compare)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps of different sizes: {np.shape(a)} and {np.shape(b)}")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _slow(m: str) -> bool:
    from .real import SLOW_METHODS

    return parse_method_spec(m)[0] in SLOW_METHODS


def evaluate_sanity(explainers: dict, items, methods: Sequence[str], score_subset: int | None = None,
                    checkpoint=None, progress: bool = True, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Spearman correlations per photo, method and level. explainers: {"none": trained, level: randomised}.

    Each photo's record: {"row", "file", "spearman": {method: {level: rho or None}}, "seconds": {method: s}}.
    Returns the summary per method and level (mean rho over the photos where it is defined, 95% bootstrap
    interval, n, n_constant: photos where a map was constant) and the records."""
    from .protocol import bootstrap_ci
    from .real import load_photo

    levels = [k for k in explainers if k != "none"]
    done = ({} if checkpoint is None else checkpoint.entries if checkpoint.is_open else checkpoint.open())
    records = [e["record"] for e in done.values() if "record" in e]
    bad = [e["bad"] for e in done.values() if "bad" in e]
    todo = [it for it in items if it.row not in done and it.error is None]
    bad += [{"row": it.row, "file": it.file, "error": it.error} for it in items if it.error and it.row not in done]
    if done:
        log(f"resuming from {checkpoint.path}: {len(done)} photo(s) done, {len(todo)} to go")
    t_last = time.perf_counter()
    try:
        for i, it in enumerate(todo):
            try:
                rgb = load_photo(it)
            except (ValueError, OSError) as e:
                entry = {"row": it.row, "file": it.file, "error": str(e)}
                log(f"error: {e}")
                bad.append(entry)
                if checkpoint is not None:
                    checkpoint.append(it.row, bad=entry)
                continue
            rec = {"row": it.row, "file": it.file, "spearman": {}, "seconds": {}}
            for m in methods:
                if _slow(m) and score_subset is not None and it.row >= score_subset:
                    continue
                t = time.perf_counter()
                ((ref, _),) = explain_maps(explainers["none"], [rgb], [it.class_index], m)
                rec["spearman"][m] = {}
                for lv in levels:
                    ((sal, _),) = explain_maps(explainers[lv], [rgb], [it.class_index], m)
                    rec["spearman"][m][lv] = spearman(ref, sal)
                rec["seconds"][m] = time.perf_counter() - t
            records.append(rec)
            if checkpoint is not None:
                checkpoint.append(it.row, record=rec)
            if progress and (time.perf_counter() - t_last > 30 or i + 1 == len(todo)):
                t_last = time.perf_counter()
                log(f"[sanity] {len(records)}/{len(records) + len(todo) - i - 1} photos")
    finally:
        if checkpoint is not None:
            checkpoint.close()
    records.sort(key=lambda r: r["row"])
    summary: dict = {}
    for m in methods:
        summary[m] = {}
        for lv in levels:
            vals = [r["spearman"][m][lv] for r in records if m in r["spearman"]]
            defined = np.array([v for v in vals if v is not None], dtype=np.float64)
            entry = {"n": len(defined), "n_constant": len(vals) - len(defined), "mean": None, "ci": None}
            if len(defined):
                ci = bootstrap_ci(lambda idx: float(defined[idx].mean()), len(defined), n_bootstrap, seed)
                entry.update(mean=ci["estimate"], ci=[ci["lo"], ci["hi"]],
                             median=float(np.median(defined)))
            summary[m][lv] = entry
    return {"levels": levels, "summary": summary, "n_images": len(records), "n_bad": len(bad), "bad": bad,
            "resumed": len(done), "images": records}


def sanity_table(res: dict) -> str:
    """Mean Spearman rank correlation between each method's maps before and after randomisation (95% CI, n):
    near 1 = the map ignores the randomised layers (fails the check), near 0 = it depends on them."""
    from .report import _table, display_name

    levels = res["levels"]
    names = res.get("level_units", {})
    head = ["Method"]
    for lv in levels:
        head += [f"{lv}: rho", "95% CI", "n"]
    rows = []
    for m, per in res["summary"].items():
        row = [display_name(m)]
        for lv in levels:
            e = per[lv]
            if e["mean"] is None:
                row += ["-", "-", f"0 (+{e['n_constant']} constant)"]
            else:
                n = str(e["n"]) + (f" (+{e['n_constant']} constant)" if e["n_constant"] else "")
                row += [f"{e['mean']:.3f}", f"[{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]", n]
        rows.append(row)
    what = "; ".join(f"{lv} = {' '.join(names[lv])}" for lv in levels if lv in names)
    title = (f"Sanity check - Spearman rank correlation of each method's maps, trained vs randomised model "
             f"(cascading: {what}; lower = the map depends on the model)")
    return _table(head, rows, title)


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def add_parser(sub) -> None:
    from runtime.cli_args import add_engine_args

    p = sub.add_parser("sanity", help="sanity check by cascading randomisation of the model's top layers "
                                      "(Adebayo et al. 2018): Spearman correlation of maps before and after")
    p.add_argument("--data", required=True, help="folder with manifest.csv and the photos (as `real`)")
    p.add_argument("--model", required=True, help="registry model (python -m export list), e.g. efficientnet-lite0")
    p.add_argument("--pretrained", default="package", help="its weights, as `python -m export --pretrained`")
    p.add_argument("--cache", required=True, help="folder for the trained and randomised exports (reused)")
    p.add_argument("--json", required=True, help="write the results here (and FILE.checkpoint.jsonl while it runs)")
    p.add_argument("--levels", default="head,1,2,3",
                   help="randomised levels: head (the classifier), k (the classifier and the last k blocks); "
                        "default head,1,2,3")
    p.add_argument("--methods", default=None, help="comma-separated methods (default every registered one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation (default 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of manifest.csv")
    p.add_argument("--score-subset", type=int, default=None,
                   help="Score-CAM, Score-CAM++ and Ablation-CAM on the manifest's first N rows only")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    add_engine_args(p)
    for action in p._actions:  # the exports come from --model and --cache
        if action.dest == "artifacts":
            action.required = False
            action.help = "the trained model's export (default: exported into --cache)"


def main(args, argv=None) -> int:
    from benchmarks.common import command_line, load_average, machine_info
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer
    from runtime.methods import list_methods

    from .__main__ import resolve_methods_all, write_json
    from .boxes_data import read_boxes_manifest
    from .checkpoint import Checkpoint, checkpoint_path

    levels = parse_levels(args.levels)
    methods = resolve_methods_all(args.methods, list_methods())
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    items = read_boxes_manifest(args.data, limit=args.limit)
    load_start = load_average()
    folders = {"none": Path(args.artifacts) if args.artifacts else randomized_export(
        args.model, args.pretrained, "none", args.seed, args.cache)}
    from export.models import load_model

    lm = load_model(args.model, args.pretrained)
    units = model_units(_module_to_randomize(lm))
    unit_names = {lv: [n for n, _ in level_units(units, lv)] for lv in levels}
    for lv in levels:
        folders[lv] = randomized_export(args.model, args.pretrained, lv, args.seed, args.cache)
    opts = EngineOptions(device_id=args.device_id, fp16=args.fp16, intra_op_threads=args.threads)
    explainers = {k: Explainer.from_artifacts(f, engine=args.engine, resize="stretch", engine_options=opts,
                                              batch_size=args.batch_size) for k, f in folders.items()}
    trained = explainers["none"].artifacts.manifest
    if trained.get("model") != lm.name or trained.get("pretrained_id") != lm.pretrained_id:
        raise ValueError(f"{folders['none']}: artifacts of {trained.get('model')} ({trained.get('pretrained_id')}), "
                         f"not of --model {lm.name} --pretrained {args.pretrained} ({lm.pretrained_id})")
    if explainers["none"].classes.labels and any(not 0 <= it.class_index < len(explainers["none"].classes.labels)
                                                 for it in items if it.error is None):
        raise ValueError("sanity: a manifest class_index lies outside the model's classes")
    key = {"data": str(Path(args.data).resolve()), "limit": args.limit, "model": lm.name,
           "pretrained_id": lm.pretrained_id, "levels": levels, "seed": args.seed, "methods": list(methods),
           "score_subset": args.score_subset, "engine": args.engine,
           "graphs": {k: {g: v.get("sha256") for g, v in sorted(e.artifacts.manifest["graphs"].items())}
                      for k, e in explainers.items()}}
    ckpt = Checkpoint(checkpoint_path(args.json), "sanity", key)
    ckpt.open()
    try:
        res = evaluate_sanity(explainers, items, methods, args.score_subset, ckpt, not args.no_progress,
                              args.bootstrap, args.seed)
    except KeyboardInterrupt:
        print(f"interrupted: the photos scored so far are in {ckpt.path}; the same command resumes", file=sys.stderr)
        return 130
    finally:
        ckpt.close()
    machine = machine_info(args.threads)
    machine["load_average"] = {"start": load_start, "end": load_average()}
    out = {"benchmark": "quality-sanity", "command": command_line("benchmarks.quality", argv), "machine": machine,
           "data": str(args.data), "model": lm.name, "pretrained_id": lm.pretrained_id, "seed": args.seed,
           "methods": list(methods), "score_subset": args.score_subset, "level_units": unit_names,
           "exports": {k: str(v) for k, v in folders.items()}, **res}
    print(sanity_table(out))
    write_json(args.json, out)
    ckpt.remove()
    return 1 if res["n_bad"] else 0
