"""Paired differences between saliency methods, with bootstrap intervals, over the per-image records of
quality runs (`python -m benchmarks.quality real|synthetic --json`).

    python -m benchmarks.quality pairs --from-json RUN.json[+MORE.json][,OTHER.json] --pairs A:B[,C~D]

A pair A:B is the mean of A - B over the images both methods were scored on: pointing hits (points of hit
rate, tolerance 0) and insertion - deletion AUC (points of AUC, correctly predicted images), with a 95%
percentile bootstrap interval. Runs joined with '+' are one model's runs on the same photos (merged record
by record); runs separated by ',' are pooled (several models or seeds), the bootstrap then resampling images
with all their records. Bootstrap draws are seeded by the image ids, so an interval does not depend on which
other pairs a report computes.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np


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
    method of the run. A list of runs (models trained with different seeds, or several
    real models on the same photos) pools their trials and their correct images; the bootstrap then
    resamples images, each with all its records (`_unit`), so that n models on one set of photos do not
    count as n times the photos. `n_units` / `n_correct_units` are the distinct images."""
    runs = res if isinstance(res, list) else [res]

    def key(name, have):
        if name in have:
            return name
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


def parse_pairs(spec: str) -> list[tuple[str, str]]:
    """'A:B,C~D' -> [(A, B), (C, D)]; A~B where a name has a colon itself (gradcam:kernel=bicubic)."""
    pairs = [tuple(x.split("~", 1) if "~" in x else x.split(":", 1)) for x in spec.split(",") if x.strip()]
    if not pairs or any(len(x) != 2 or not all(x) for x in pairs):
        raise ValueError(f"--pairs wants A:B,... (or A~B); got '{spec}'")
    return pairs


def load_runs(spec: str) -> dict | list[dict]:
    """--from-json: 'a.json+b.json,c.json' -> one run, or the list of pooled runs ('+' merges one model's runs)."""
    runs = []
    for entry in (f.strip() for f in spec.split(",") if f.strip()):
        names = [x.strip() for x in entry.split("+")]
        parts = []
        for x in names:
            try:
                parts.append(json.loads(Path(x).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise ValueError(f"{x}: cannot read a run's JSON ({e})") from None
        runs.append(parts[0] if len(parts) == 1 else merge_real_runs(parts, names))
    if not runs:
        raise ValueError("--from-json names no file")
    return runs if len(runs) > 1 else runs[0]


def add_parser(sub) -> None:
    p = sub.add_parser("pairs", help="paired differences between methods of earlier runs, with bootstrap intervals")
    p.add_argument("--from-json", required=True,
                   help="a run's --json; several comma-separated are pooled; A.json+B.json merges two real-data "
                        "runs of one model on the same photos")
    p.add_argument("--pairs", required=True, help="A:B,... (A~B where a name has a colon)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")


def main(args) -> int:
    try:
        rows = paired(load_runs(args.from_json), parse_pairs(args.pairs), resamples=args.bootstrap)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(pairs_table(rows))
    return 0
