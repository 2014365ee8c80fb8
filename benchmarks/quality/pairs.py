"""Paired differences between saliency methods, with bootstrap intervals, over the per-image records of
quality runs (`python -m benchmarks.quality real|synthetic --json`), and the merging of real-data runs.

    python -m benchmarks.quality pairs --from-json RUN.json[+MORE.json][,OTHER.json] --pairs A:B[,C~D]

A pair A:B is the mean of A - B, in points, over the photos both methods were scored on, for every metric
the runs hold and every tolerance: pointing hits and the energy-based pointing game (every photo, and the
centre-miss photos), insertion, deletion and insertion - deletion AUC, ROAD's MoRF, LeRF and (LeRF - MoRF) / 2
(correctly predicted photos), each with a 95% percentile bootstrap interval and its n. Runs joined with '+'
are one model's runs on one data folder (chunks of the photos, or other methods on the same photos: merged
photo by photo, ``merge_real_runs``); runs separated by ',' are pooled (several models or seeds): a pair
uses the runs that hold both methods (and says which), the bootstrap resampling photos with all their
records. Bootstrap draws are seeded by the photo ids, so an interval does not depend on which other pairs a
report computes.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MAP_BASELINES", "POINT_BASELINES", "resample_indices", "bootstrap", "cluster_bootstrap",
           "record_metrics", "run_units", "merge_real_runs", "paired_metrics", "parse_pairs", "load_json",
           "load_runs", "pairs_table"]

#: Baselines without a model (benchmarks/quality/evaluate.py): points, and maps scored like a method's.
POINT_BASELINES = ("center_point", "random_point")
MAP_BASELINES = ("random_saliency", "center_saliency")
_BASELINES = (*POINT_BASELINES, *MAP_BASELINES)
_PER_METHOD = ("pointing", "energy", "auc", "curves", "road", "seconds")


def resample_indices(kind: str, ids, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, len(ids)] bootstrap indices into `ids`, drawn from a generator seeded by `seed`, `kind` and
    the ids themselves: every score over the same photos (or trials) uses the same resamples, so an interval
    does not depend on which other methods or pairs a report computes, or in which order, and the interval
    of a difference A - B is the same whether it is asked for as a pair or read from a table."""
    ids = list(ids)
    key = zlib.crc32(repr((kind, len(ids), ids)).encode())
    return np.random.default_rng([seed, key]).integers(0, len(ids), size=(resamples, len(ids)))


def bootstrap(values: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """values [n], idx [R, n] resample indices -> (mean, 2.5 %, 97.5 %)."""
    means = values[idx].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def cluster_bootstrap(values: np.ndarray, units: list, kind: str, resamples: int,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean of `values`, resampling the distinct `units` (percentile bootstrap
    over clusters: several records of one image are drawn together). With every unit distinct this is the
    plain bootstrap over records, with the same resamples."""
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


# --------------------------------------------------------------------------------------------------
# Per-photo metrics
# --------------------------------------------------------------------------------------------------


def record_metrics(rec: dict, name: str) -> dict[str, float]:
    """Every metric of one map on one photo of a real-data run, in [0, 1] units: ``pointing@T`` and ``energy@T``
    per tolerance T, ``pointing_cm@T`` / ``energy_cm@T`` when the photo is a centre miss at T, and on a
    correctly predicted photo ``insertion``, ``deletion``, ``ins_del`` and (where ROAD ran) ``morf``, ``lerf``,
    ``road`` = (LeRF - MoRF) / 2. A metric the record lacks (the method did not run, an older run) is absent."""
    out: dict[str, float] = {}
    hits = rec.get("pointing", {}).get(name)
    center = rec.get("pointing", {}).get("center_point", {})
    energy = rec.get("energy", {}).get(name)
    for t, hit in (hits or {}).items():
        out[f"pointing@{t}"] = float(hit)
        miss = t in center and not center[t]
        if miss:
            out[f"pointing_cm@{t}"] = float(hit)
        if energy and t in energy:
            out[f"energy@{t}"] = float(energy[t])
            if miss:
                out[f"energy_cm@{t}"] = float(energy[t])
    if rec.get("correct"):
        a = rec.get("auc", {}).get(name)
        if a:
            out["insertion"], out["deletion"] = float(a["insertion"]), float(a["deletion"])
            out["ins_del"] = out["insertion"] - out["deletion"]
        r = rec.get("road", {}).get(name)
        if r:
            out["morf"], out["lerf"] = float(np.mean(r["morf"])), float(np.mean(r["lerf"]))
            out["road"] = (out["lerf"] - out["morf"]) / 2.0
    return out


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


def run_units(run: dict, tag=0) -> list[tuple[tuple, callable]]:
    """[(unit, metrics(name) -> {metric: value})] of a run: one entry per photo of a real-data run; for a
    synthetic run one per pointing trial (``pointing@0``) and one per correctly predicted image (``insertion``,
    ``deletion``, ``ins_del``). The unit is the image the bootstrap resamples: the photo's file in the run's data
    folder for a real run, the generated image of the run's data settings for a synthetic one (every trained
    synthetic model is scored on the same generated set, and models explaining the same photos make correlated
    errors). A record with no name, or of a run that does not say what its images are, is a unit of its own
    (``tag`` tells the runs of a pooled list apart)."""
    data = _dataset(run)
    out = []
    if run.get("benchmark") == "quality-real":
        for i, rec in enumerate(run["images"]):
            name = rec.get("file")
            unit = ("photo", data, name) if name and data else ("record", tag, i)
            out.append((unit, lambda m, rec=rec: record_metrics(rec, m)))
        return out
    for i, t in enumerate(run["pointing_game"]["trials"]):
        name = t.get("image")
        unit = ("trial", data, name) if name and data else ("record", tag, "t", i)
        out.append((unit, lambda m, t=t: {"pointing@0": float(t["hits"][m])} if m in t["hits"] else {}))
    for i, r in enumerate(run["deletion_insertion"]["images"]):
        if not r["correct"]:
            continue
        name = "/".join(Path(r.get("path") or "").parts[-2:])
        unit = ("image", data, name) if name and data else ("record", tag, "c", i)

        def metrics(m, r=r):
            a = r["auc"].get(m)
            if not a:
                return {}
            return {"insertion": a["insertion"], "deletion": a["deletion"], "ins_del": a["insertion"] - a["deletion"]}
        out.append((unit, metrics))
    return out


def _methods_of(run: dict) -> set[str]:
    if run.get("benchmark") == "quality-real":
        return set().union(*(r.get("pointing", {}) for r in run["images"])) if run["images"] else set()
    return set().union(*(t["hits"] for t in run["pointing_game"]["trials"]))


def _metric_order(key: str) -> tuple:
    base, _, tol = key.partition("@")
    order = ["pointing", "energy", "pointing_cm", "energy_cm", "insertion", "deletion", "ins_del", "morf", "lerf",
             "road"]
    return (order.index(base) if base in order else len(order), float(tol) if tol else -1.0, key)


def paired_metrics(res: dict | list[dict], pairs: list[tuple[str, str]], resamples: int = 1000,
                   seed: int = 0) -> list[dict]:
    """Paired bootstrap (percentile, 95%) of A - B, in points (x 100), for every metric both methods have on a
    photo (``record_metrics``; a synthetic run: pointing at 0 and the AUCs), over the photos where both ran.

    A list of runs (several models, or seeds) pools their records; a run that lacks A or B is left out of
    that pair (``runs`` names the runs used, ``skipped`` the others), and a pair that no run holds is a
    ValueError naming each run's file and methods. The bootstrap resamples images, each with all its
    records (``cluster_bootstrap``): n models on one set of photos do not count as n times the photos.
    Each row: {"a", "b", "runs", "skipped", "metrics": {key: {"estimate", "lo", "hi", "n", "n_units"}}}.
    """
    runs = res if isinstance(res, list) else [res]
    out = []
    for a, b in pairs:
        used, skipped = [], []
        values: dict[str, list[float]] = {}
        units: dict[str, list] = {}
        for k, run in enumerate(runs):
            name = run.get("_file") or f"run {k + 1}"
            have = _methods_of(run)
            if a not in have or b not in have:
                skipped.append(name)
                continue
            used.append(name)
            for unit, metrics in run_units(run, k):
                ma, mb = metrics(a), metrics(b)
                for key in ma.keys() & mb.keys():
                    values.setdefault(key, []).append(100.0 * (ma[key] - mb[key]))
                    units.setdefault(key, []).append(unit)
        if not used:
            listed = "; ".join(f"{run.get('_file') or f'run {k + 1}'} has "
                               f"{', '.join(sorted(_methods_of(run) - set(_BASELINES))) or 'no method'}"
                               for k, run in enumerate(runs))
            missing = a if all(a not in _methods_of(r) for r in runs) else b if all(
                b not in _methods_of(r) for r in runs) else f"{a} and {b}"
            hint = ("" if len(runs) == 1 else " (runs of one model on one data folder with other methods merge "
                    "with '+': A.json+B.json)")
            raise ValueError(f"no run holds both '{a}' and '{b}' ('{missing}' is missing): {listed}{hint}")
        metrics_out = {}
        for key in sorted(values, key=_metric_order):
            v = np.array(values[key])
            est, lo, hi = cluster_bootstrap(v, units[key], key, resamples, seed)
            metrics_out[key] = {"estimate": est, "lo": lo, "hi": hi, "n": len(v), "n_units": len(set(units[key]))}
        out.append({"a": a, "b": b, "runs": used, "skipped": skipped, "metrics": metrics_out})
    return out


# --------------------------------------------------------------------------------------------------
# Merging real-data runs of one model
# --------------------------------------------------------------------------------------------------


def _same_record(a, b) -> bool:
    """One photo's values of one method in two runs: equal (floats within 1e-9)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_record(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_record(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-9
    return a == b


_PROTOCOL_FREE = ("score_subset", "road_subset")  # they change which records hold a method, not its numbers


def merge_real_runs(runs: list[dict], names: list[str]) -> dict:
    """Real-data runs of one model on one data folder as one run: chunks of the photos (``--start`` /
    ``--limit``), runs of other methods on the same photos, or both. The runs must share the data folder,
    the model export (path, weights) and, where recorded, the protocol settings (tolerances, steps,
    substrates, seed, ROAD; not the subsets). Photos are matched by file; each photo's record gets every
    run's methods. A method scored on a photo by two runs counts once when both scored it the same (hits,
    AUCs, curves within 1e-9: a deterministic re-run), otherwise it is an error (which one would count?).
    The model-free baselines are the first run's that has the photo. Records are ordered by manifest row
    (by first appearance where a run has no rows). Returns the merged run with ``merged_from``."""
    for run, name in zip(runs, names):
        if run.get("benchmark") != "quality-real":
            raise ValueError(f"{name}: only real-data runs (python -m benchmarks.quality real) merge")
    first = runs[0]
    base_key = (first.get("run_key") or {}).get("protocol")
    for run, name in zip(runs[1:], names[1:]):
        same = [("data", str(Path(first["data"]).resolve()) if first.get("data") else None,
                 str(Path(run["data"]).resolve()) if run.get("data") else None)] + \
            [(f"artifacts.{k}", first["artifacts"].get(k), run["artifacts"].get(k))
             for k in ("path", "model", "pretrained", "pretrained_id")]
        for what, a, b in same:
            if a != b and a is not None and b is not None:   # a checkpoint does not record every field
                raise ValueError(f"{name}: {what} is {b!r}, {names[0]}'s is {a!r}: not the same model and photos")
        key = (run.get("run_key") or {}).get("protocol")
        if base_key is not None and key is not None:
            diff = [k for k in sorted(set(base_key) | set(key))
                    if k not in _PROTOCOL_FREE and base_key.get(k) != key.get(k)]
            if diff:
                raise ValueError(f"{name}: protocol settings {', '.join(diff)} differ from {names[0]}'s")
    merged: dict[str, dict] = {}
    owner: dict[tuple[str, str], str] = {}
    order: list[str] = []
    methods: list[str] = []
    bad: dict[str, dict] = {}
    for run, name in zip(runs, names):
        for m in run.get("methods") or sorted(_methods_of(run) - set(_BASELINES)):
            if m not in methods:
                methods.append(m)
        for b in run.get("bad", []):
            bad.setdefault(b["file"], b)
        for rec in run["images"]:
            f = rec["file"]
            if f not in merged:
                merged[f] = json.loads(json.dumps(rec))
                order.append(f)
                for field in _PER_METHOD:
                    for m in rec.get(field, {}):
                        owner[(f, m)] = name
                continue
            mine = merged[f]
            for field in ("correct", "target", "pred", "class_name"):
                if field in rec and field in mine and rec[field] != mine[field]:
                    raise ValueError(f"{name}: {f} has {field} {rec[field]!r}, {owner.get((f, '_photo'), names[0])} "
                                     f"says {mine[field]!r}: not the same model and photos")
            for m in {m for field in ("pointing", "auc", "energy", "road") for m in rec.get(field, {})}:
                if m in _BASELINES:
                    continue
                if m in mine.get("pointing", {}) or m in mine.get("auc", {}):
                    for field in ("pointing", "energy", "auc", "road"):
                        if not _same_record(mine.get(field, {}).get(m), rec.get(field, {}).get(m)):
                            raise ValueError(f"{name}: method '{m}' is in more than one of the merged runs and "
                                             f"differs on {f} ({field}; also in {owner.get((f, m), names[0])})")
                    continue
                for field in _PER_METHOD:
                    if m in rec.get(field, {}):
                        mine.setdefault(field, {})[m] = rec[field][m]
                owner[(f, m)] = name
    records = [merged[f] for f in order]
    if all("row" in r for r in records):
        records.sort(key=lambda r: r["row"])
    out = json.loads(json.dumps({k: v for k, v in first.items() if k not in ("images", "bad")}))
    out.update({"images": records, "bad": [b for f, b in bad.items() if f not in merged], "methods": methods,
                "merged_from": list(names), "n_rows": len(records) + len([f for f in bad if f not in merged]),
                "_file": "+".join(names)})
    rows = [r["row"] for r in records if "row" in r]
    if rows:
        out["rows"] = [min(rows), max(rows) + 1]
    return out


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'A:B,C~D' -> [(A, B), (C, D)]; A~B where a name has a colon itself (gradcam:kernel=bicubic)."""
    pairs = [tuple(x.split("~", 1) if "~" in x else x.split(":", 1)) for x in spec.split(",") if x.strip()]
    if not pairs or any(len(x) != 2 or not all(x) for x in pairs):
        raise ValueError(f"--pairs wants A:B,... (or A~B); got '{spec}'")
    return pairs


def load_checkpoint_run(path: str) -> dict:
    """The photos a real-data run has scored so far, from its checkpoint (FILE.checkpoint.jsonl of a running or
    killed run), as a run's JSON: a partial run (``partial``: true) that reports and merges like a finished one."""
    from .checkpoint import read_checkpoint

    key, entries = read_checkpoint(path, "real")
    art = dict(key["artifacts"])
    try:
        art["input_size"] = json.loads((Path(art["path"]) / "manifest.json").read_text())["input_size"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot read the input size from its export {art['path']} ({e})") from None
    art.update(class_set=key.get("class_set"))
    rows = [e for _, e in sorted(entries.items())]
    return {"benchmark": "quality-real", "partial": True, "data": key["data"], "artifacts": art,
            "engine": key.get("engine"), "run_key": key, "methods": list(key["methods"]),
            "images": [e["record"] for e in rows if "record" in e], "bad": [e["bad"] for e in rows if "bad" in e],
            "n_rows": len(rows), "_file": path}


def load_json(path: str) -> dict:
    """A run's JSON (or a running run's checkpoint, FILE.checkpoint.jsonl: ``load_checkpoint_run``), with
    ``_file`` set to the name it was read from; one-line ValueError otherwise."""
    if str(path).endswith(".checkpoint.jsonl"):
        return load_checkpoint_run(path)
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a run's JSON ({e})") from None
    if not isinstance(run, dict) or not ("images" in run or "pointing_game" in run):
        raise ValueError(f"{path}: not the JSON of a quality run (no per-image records)")
    run["_file"] = path
    return run


def load_runs(spec: str) -> dict | list[dict]:
    """--from-json: 'a.json+b.json,c.json' -> one run, or the list of pooled runs ('+' merges one model's runs)."""
    runs = []
    for entry in (f.strip() for f in spec.split(",") if f.strip()):
        names = [x.strip() for x in entry.split("+")]
        parts = [load_json(x) for x in names]
        runs.append(parts[0] if len(parts) == 1 else merge_real_runs(parts, names))
    if not runs:
        raise ValueError("--from-json names no file")
    return runs if len(runs) > 1 else runs[0]


def pairs_table(rows: list[dict]) -> str:
    """The paired differences as a Markdown table (``report.real_pairs_table``), with the runs each pair used."""
    from .report import real_pairs_table

    text = real_pairs_table(rows)
    notes = [f"{r['a']} - {r['b']}: {len(r['runs'])} run(s) hold both ({', '.join(r['runs'])}); left out: "
             f"{', '.join(r['skipped'])}" for r in rows if r["skipped"]]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="paired differences between methods of earlier runs, with bootstrap intervals")
    p.add_argument("--from-json", required=True,
                   help="a run's --json; several comma-separated are pooled (a pair uses the runs that hold both "
                        "methods); A.json+B.json merges real-data runs of one model on one data folder (chunks, "
                        "or other methods)")
    p.add_argument("--pairs", required=True, help="A:B,... (A~B where a name has a colon)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")


def main(args) -> int:
    try:
        rows = paired_metrics(load_runs(args.from_json), parse_pairs(args.pairs), resamples=args.bootstrap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pairs_table(rows))
    return 0
