"""benchmarks/quality/pairs.py: paired differences between methods over a run's per-image records, for every
metric and tolerance, pooled runs resampled by image (and left out where they lack a method), merged runs of one
model (chunks, method sets), against hand-computed means and normal approximations."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quality import pairs as ss
from benchmarks.quality.__main__ import main as qmain


def test_paired_differences_from_a_runs_records(tmp_path, capsys):
    """`--pairs` on a run's JSON: the mean of the per-trial hit differences and of the per-image
    ins - del differences (correct images only), inside a bootstrap interval that widens with the spread."""
    import json

    rng = np.random.default_rng(0)
    hits_a, hits_b = rng.random(40) < 0.8, rng.random(40) < 0.6
    auc = rng.random((30, 4))
    correct = np.arange(30) % 3 != 0
    res = {"pointing_game": {"trials": [{"hits": {"x": bool(a), "layercam": bool(b)}}
                                        for a, b in zip(hits_a, hits_b)]},
           "deletion_insertion": {"images": [
               {"correct": bool(c), "auc": ({"x": {"insertion": v[0], "deletion": v[1]},
                                             "layercam": {"insertion": v[2], "deletion": v[3]}} if c else {})}
               for v, c in zip(auc, correct)]}}
    (row,) = ss.paired_metrics(res, [("x", "layercam")], resamples=2000)
    pt, ov = row["metrics"]["pointing@0"], row["metrics"]["ins_del"]
    assert pt["n"] == 40 and ov["n"] == int(correct.sum()) and set(row["metrics"]) == {
        "pointing@0", "insertion", "deletion", "ins_del"}
    assert pt["estimate"] == pytest.approx(100 * (hits_a.mean() - hits_b.mean()))
    d = 100 * ((auc[:, 0] - auc[:, 1]) - (auc[:, 2] - auc[:, 3]))[correct]
    assert ov["estimate"] == pytest.approx(d.mean())
    assert row["metrics"]["deletion"]["estimate"] == pytest.approx(100 * (auc[:, 1] - auc[:, 3])[correct].mean())
    for m in (pt, ov):
        assert m["lo"] < m["estimate"] < m["hi"]
    assert ss.paired_metrics(res, [("layercam", "x"), ("x", "layercam")], resamples=2000)[1] == row   # order-free
    (two,) = ss.paired_metrics([res, res], [("x", "layercam")], resamples=2000)                 # runs pooled
    t2, o2 = two["metrics"]["pointing@0"], two["metrics"]["ins_del"]
    assert t2["n"] == 80 and o2["n"] == 2 * int(correct.sum()) and two["runs"] == ["run 1", "run 2"]
    assert t2["estimate"] == pytest.approx(pt["estimate"]) and o2["estimate"] == pytest.approx(d.mean())
    assert o2["hi"] - o2["lo"] < ov["hi"] - ov["lo"]
    half = (ov["hi"] - ov["lo"]) / 2
    assert half == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(len(d)), rel=0.25)
    with pytest.raises(ValueError, match="no run holds both 'nope' and 'layercam' \\('nope' is missing\\)"):
        ss.paired_metrics(res, [("nope", "layercam")])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(res))
    assert qmain(["pairs", "--from-json", str(path), "--pairs", "x:layercam"]) == 0
    assert "| x - layercam | pointing @0 px |" in capsys.readouterr().out
    assert qmain(["pairs", "--from-json", str(path), "--pairs", "x"]) == 2
    assert "--pairs wants A:B" in capsys.readouterr().err
    assert qmain(["pairs", "--from-json", str(tmp_path / "missing.json"), "--pairs", "x:layercam"]) == 2
    assert "missing.json: cannot read" in capsys.readouterr().err


def test_paired_differences_from_a_real_data_run():
    """A real-data run's JSON (`benchmarks.quality real`): pointing at tolerance 0 over the photos both methods
    ran on (a slow method may cover a subset only), ins - del over the correctly classified ones."""
    rng = np.random.default_rng(1)
    n = 30
    hit = rng.random((n, 2, 2)) < 0.7                    # photo, method (ig, scorecam), tolerance (0, 15)
    auc = rng.random((n, 2, 2))
    correct = np.arange(n) % 4 != 0
    subset = np.arange(n) < 20                            # scorecam on the first 20 photos only
    images = []
    for i in range(n):
        methods = ["decomcam-ig", "scorecam"] if subset[i] else ["decomcam-ig"]
        images.append({
            "correct": bool(correct[i]),
            "pointing": {m: {"0": bool(hit[i, j, 0]), "15": bool(hit[i, j, 1])} for j, m in enumerate(methods)},
            "auc": ({m: {"insertion": auc[i, j, 0], "deletion": auc[i, j, 1]} for j, m in enumerate(methods)}
                    if correct[i] else {})})
    res = {"benchmark": "quality-real", "images": images}
    (row,) = ss.paired_metrics(res, [("decomcam-ig", "scorecam")], resamples=500)
    both, m = subset, row["metrics"]
    assert m["pointing@0"]["n"] == m["pointing@15"]["n"] == int(both.sum())
    assert m["ins_del"]["n"] == int((both & correct).sum())
    assert m["pointing@0"]["estimate"] == pytest.approx(100 * (hit[both, 0, 0].astype(float) - hit[both, 1, 0]).mean())
    assert m["pointing@15"]["estimate"] == pytest.approx(100 * (hit[both, 0, 1].astype(float) - hit[both, 1, 1]).mean())
    d = ((auc[:, 0, 0] - auc[:, 0, 1]) - (auc[:, 1, 0] - auc[:, 1, 1]))[both & correct]
    assert m["ins_del"]["estimate"] == pytest.approx(100 * d.mean())


def test_pooled_runs_resample_images_not_records():
    """Several models scored on the same photos pool into one paired difference whose bootstrap resamples
    photos, each with all its records: a run pooled with a copy of itself has the same interval as the run
    alone, and with correlated models the half-width follows the normal approximation over the photos'
    mean differences, not over the records (which would be narrower by about sqrt(models))."""
    rng = np.random.default_rng(2)
    n, models = 120, 3
    photo_effect = rng.normal(0.0, 0.3, n)                 # shared by every model: the photo's difficulty

    def run(k):
        images = []
        for i in range(n):
            d = photo_effect[i] + rng.normal(0.0, 0.05)
            hit_a, hit_b = bool(photo_effect[i] > -0.1), bool((photo_effect[i] + rng.normal(0, 0.2)) > 0.0)
            images.append({"file": f"images/{i:04d}.JPEG", "correct": True,
                           "pointing": {"a": {"0": hit_a}, "b": {"0": hit_b}},
                           "auc": {"a": {"insertion": 0.5 + d, "deletion": 0.0},
                                   "b": {"insertion": 0.5, "deletion": 0.0}}})
        return {"benchmark": "quality-real", "data": "/photos", "images": images}

    one = run(0)
    def units(rows, key="pointing@0"):
        return rows[0]["metrics"][key]["n_units"]

    (alone,) = ss.paired_metrics(one, [("a", "b")], resamples=1000)
    (twice,) = ss.paired_metrics([one, one], [("a", "b")], resamples=1000)
    tw, al = twice["metrics"], alone["metrics"]
    assert (tw["pointing@0"]["n"], tw["pointing@0"]["n_units"], tw["ins_del"]["n_units"]) == (2 * n, n, n)
    for key in ("pointing@0", "ins_del"):
        assert [tw[key][k] for k in ("estimate", "lo", "hi")] == pytest.approx([al[key][k] for k in ("estimate", "lo", "hi")])
    runs = [one] + [run(k) for k in range(1, models)]
    (pooled,) = ss.paired_metrics(runs, [("a", "b")], resamples=2000)
    per = np.array([[r["auc"]["a"]["insertion"] - r["auc"]["b"]["insertion"] for r in x["images"]] for x in runs])
    photo_mean = 100 * per.mean(0)
    po = pooled["metrics"]["ins_del"]
    assert po["estimate"] == pytest.approx(photo_mean.mean())
    half = (po["hi"] - po["lo"]) / 2
    assert half == pytest.approx(1.96 * photo_mean.std(ddof=1) / np.sqrt(n), rel=0.2)
    naive = 1.96 * (100 * per).ravel().std(ddof=1) / np.sqrt(per.size)
    assert half > 1.4 * naive
    table = ss.pairs_table([pooled])
    assert f"| {models * n} on {n} photos |" in table
    # records without an image name, or of runs that do not name their data, stay units of their own
    anon = {"benchmark": "quality-real", "data": "/photos", "images": [dict(r, file=None) for r in one["images"]]}
    assert units(ss.paired_metrics([anon, anon], [("a", "b")], resamples=10)) == 2 * n
    nodata = {k: v for k, v in one.items() if k != "data"}
    assert units(ss.paired_metrics([nodata, nodata], [("a", "b")], resamples=10)) == 2 * n
    # the same file names in another data folder are other photos; a trailing slash is the same folder
    assert units(ss.paired_metrics([one, dict(one, data="/other")], [("a", "b")], resamples=10)) == 2 * n
    assert units(ss.paired_metrics([one, dict(one, data="/photos/")], [("a", "b")], resamples=10)) == n
    # synthetic runs: the same image ids are the same images only under the same data settings
    spec = {"n_classes": 2, "image_size": 64, "seed": 0}
    syn = {"run": {"train": {"spec": spec, "seed": 0}, "n_val_per_class": 3, "n_point_per_class": 3, "seed": 0},
           "pointing_game": {"trials": [{"image": f"{i:06d}", "hits": {"a": True, "b": bool(i % 2)}}
                                        for i in range(6)]},
           "deletion_insertion": {"images": [{"path": "/x/imagefolder/disc/000000.png", "correct": True,
                                              "auc": {m: {"insertion": 0.5, "deletion": 0.1} for m in "ab"}}]}}
    retrained = {**syn, "run": {**syn["run"], "train": {"spec": spec, "seed": 1}}}
    regenerated = {**syn, "run": {**syn["run"], "train": {"spec": dict(spec, seed=1), "seed": 0}}}
    (same,) = ss.paired_metrics([syn, retrained], [("a", "b")], resamples=10)
    (other,) = ss.paired_metrics([syn, regenerated], [("a", "b")], resamples=10)
    got = [r["metrics"][k]["n_units"] for r in (same, other) for k in ("pointing@0", "ins_del")]
    assert got == [6, 1, 12, 2]


def test_merged_real_runs_pair_across_runs(tmp_path, capsys):
    """A+B merges two real-data runs of one model on the same photos (methods, then controls): a pair across
    them equals the pair computed on one run holding both; A~B separates names that carry a colon; runs of
    another model, other photos or a method run twice are refused."""
    import json

    rng = np.random.default_rng(3)
    n = 24
    hit, auc = rng.random((n, 3)) < 0.7, rng.random((n, 3, 2))
    correct = np.arange(n) % 5 != 0
    names = ["decomcam-ig", "gradcam", "gradcam:kernel=bicubic"]

    def images(cols):
        return [{"file": f"images/{i:03d}.JPEG", "correct": bool(correct[i]),
                 "pointing": {names[j]: {"0": bool(hit[i, j])} for j in cols} | {"center_point": {"0": True}},
                 "auc": ({names[j]: {"insertion": auc[i, j, 0], "deletion": auc[i, j, 1]} for j in cols}
                         if correct[i] else {})} for i in range(n)]

    head = {"benchmark": "quality-real", "data": "/photos", "artifacts": {"path": "a/lb", "model": "m", "pretrained": "p"}}
    whole, first, second = ({**head, "images": images(c)} for c in ((0, 1, 2), (0, 1), (2,)))
    files = {}
    for k, run in (("whole", whole), ("first", first), ("second", second)):
        files[k] = tmp_path / f"{k}.json"
        files[k].write_text(json.dumps(run))
    merged = ss.merge_real_runs([first, second], ["first", "second"])
    ref = ss.paired_metrics(whole, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300)
    assert ss.paired_metrics(merged, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300)[0]["metrics"] == \
        ref[0]["metrics"]
    assert qmain(["pairs", "--from-json", f"{files['first']}+{files['second']}",
                  "--pairs", "decomcam-ig~gradcam:kernel=bicubic,gradcam:kernel=bicubic~gradcam"]) == 0
    out = capsys.readouterr().out
    assert "| decomcam-ig - gradcam:kernel=bicubic |" in out and "| gradcam:kernel=bicubic - gradcam |" in out
    other = {**second, "artifacts": {**head["artifacts"], "path": "a/other"}}
    with pytest.raises(ValueError, match="artifacts.path is 'a/other'.*not the same model and photos"):
        ss.merge_real_runs([first, other], ["first", "other"])
    # chunks: the second run on part of the photos pairs over the photos both methods ran on
    short = ss.merge_real_runs([first, {**second, "images": second["images"][4:]}], ["first", "short"])
    (row,) = ss.paired_metrics(short, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300)
    assert row["metrics"]["pointing@0"]["n"] == n - 4
    assert row["metrics"]["pointing@0"]["estimate"] == pytest.approx(100 * (hit[4:, 0].astype(float) - hit[4:, 2]).mean())
    halves = ss.merge_real_runs([{**whole, "images": whole["images"][:10]}, {**whole, "images": whole["images"][10:]}],
                                ["a", "b"])
    assert [r["file"] for r in halves["images"]] == [r["file"] for r in whole["images"]]
    # a method scored in both runs counts once when the records agree photo by photo, and is refused otherwise
    both = ss.merge_real_runs([first, whole], ["first", "whole"])
    assert ss.paired_metrics(both, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300)[0]["metrics"] == \
        ref[0]["metrics"]
    moved = json.loads(json.dumps(whole))
    moved["images"][5]["pointing"]["decomcam-ig"]["0"] = not moved["images"][5]["pointing"]["decomcam-ig"]["0"]
    with pytest.raises(ValueError, match="method 'decomcam-ig' is in more than one of the merged runs and differs "
                                         "on images/005.JPEG"):
        ss.merge_real_runs([first, moved], ["first", "moved"])
    drift = json.loads(json.dumps(whole))
    drift["images"][1]["auc"]["gradcam"]["insertion"] += 1e-6
    with pytest.raises(ValueError, match="method 'gradcam' .* differs on images/001.JPEG"):
        ss.merge_real_runs([first, drift], ["first", "drift"])

