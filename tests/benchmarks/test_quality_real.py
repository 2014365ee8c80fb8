"""`python -m benchmarks.quality real`: labelled photos with boxes (ImageNet-val layout) on a tiny generated
folder, the box scaling of the pointing game against an independent computation, the bootstrap, errors."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.quality.__main__ import main as quality_main
from benchmarks.quality.__main__ import resolve_methods_all
from benchmarks.quality.boxes_data import COLUMNS, BoxedItem, boxes_to_input, read_boxes_manifest
from benchmarks.quality.evaluate import POINT_BASELINES, SALIENCY_BASELINES
from benchmarks.quality.protocol import bootstrap_ci, bootstrap_indices
from benchmarks.quality.real import SLOW_METHODS, map_targets, pointing_hits, step_for
from benchmarks.quality.voc import VOC_CLASSES
from runtime.images import preprocess
from runtime.methods import list_methods
from tests.benchmarks.test_quality_run import finite_numbers
from tests.conftest import make_images

N_IMAGES = 6


def write_dataset(root: Path, rgbs, labels, boxes) -> Path:
    """The data set's layout: root/manifest.csv, root/boxes.csv, root/images/*.png; boxes as written
    (continuous coordinates, the photo spans [0, W] x [0, H])."""
    (root / "images").mkdir(parents=True)
    with open(root / "manifest.csv", "w", newline="") as f, open(root / "boxes.csv", "w", newline="") as g:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        wb = csv.writer(g)
        wb.writerow(["file", "class_index", "x0", "y0", "x1", "y1"])
        for i, (rgb, lab, bxs) in enumerate(zip(rgbs, labels, boxes)):
            file = f"images/img_{i:03d}.png"
            cv2.imwrite(str(root / file), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            h, wd = rgb.shape[:2]
            w.writerow([file, lab, f"n{lab:08d}", VOC_CLASSES[lab], wd, h, wd, h, len(bxs),
                        ";".join(" ".join(f"{v:.1f}" for v in b) for b in bxs)])
            for b in bxs:
                wb.writerow([file, lab, *b])
    return root


@pytest.fixture(scope="module")
def dataset(tiny_artifacts, tmp_path_factory):
    """Six generated photos (non-square), each with a drawn white rectangle and its box; labels are indices of
    the tiny export's VOC class set: the model's own prediction for even images (correct: curves are computed),
    the next class for odd ones (incorrect)."""
    from runtime.explainer import Explainer

    rgbs = make_images(N_IMAGES, seed=3)
    boxes = []
    for i, im in enumerate(rgbs):
        h, w = im.shape[:2]
        x0, y0 = (w // 5) * (1 + i % 3), (h // 6) * (1 + i % 2)
        x1, y1 = x0 + w // 4, y0 + h // 3
        cv2.rectangle(im, (x0, y0), (x1, y1), (255, 255, 255), -1)  # pixels x0..x1, y0..y1 inclusive
        boxes.append([[float(x0), float(y0), float(x1 + 1), float(y1 + 1)]])
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, resize="stretch")
    x = np.stack([preprocess(im, ex.size, ex.artifacts.mean, ex.artifacts.std, "stretch")[0] for im in rgbs])
    pred = np.asarray(ex.classify(x)).argmax(1)
    labels = [int(p) if i % 2 == 0 else (int(p) + 1) % len(VOC_CLASSES) for i, p in enumerate(pred)]
    return write_dataset(tmp_path_factory.mktemp("boxes"), rgbs, labels, boxes)


def run_cli(args, capsys):
    code = quality_main(["real", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# The command on the tiny export
# --------------------------------------------------------------------------------------------------


def test_real_cli_json_and_tables(tiny_artifacts, dataset, tmp_path, capsys):
    out, png = tmp_path / "real.json", tmp_path / "fig4.png"
    code, stdout, err = run_cli(["--data", dataset, "--artifacts", tiny_artifacts.out_dir, "--json", out,
                                 "--methods", "gradcam,decomcam,ablationcam", "--score-subset", "2", "--steps", "7",
                                 "--bootstrap", "200", "--plot", png, "--road-fractions", "0.25,0.75"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    finite_numbers(res)
    assert res["benchmark"] == "quality-real" and res["command"].startswith("python -m benchmarks.quality real --data")
    assert {"cpu", "isa", "cores", "versions", "load_average"} <= set(res["machine"])
    assert res["n_images"] == N_IMAGES and res["n_bad"] == 0 and len(res["images"]) == N_IMAGES
    assert res["targets"]["mode"] == "name" and res["targets"]["names_agree"] == N_IMAGES  # 20 classes: by name
    assert not (tmp_path / "real.checkpoint.jsonl").exists()  # removed once the JSON is written
    assert res["accuracy"]["n_correct"] == 3 and res["accuracy"]["top1"] == 0.5
    di_proto = res["protocol"]["deletion_insertion"]
    assert di_proto["n_steps"] == 7 and di_proto["step_px"] == math.ceil(128 * 128 / 7)
    assert di_proto["substrates"] == {"deletion": "zero", "insertion": "blur"}
    assert res["protocol"]["pointing_game"]["tolerances_px"] == [0.0, 15.0]
    assert res["subset"]["methods"] == ["ablationcam"] and res["subset"]["n_first_rows"] == 2
    assert "ablationcam: one head forward per live channel" in res["subset"]["reason"]

    pg, di = res["pointing_game"], res["deletion_insertion"]
    assert list(pg["methods"]) == ["gradcam", "decomcam", "ablationcam"]
    assert list(pg["baselines"]) == [*POINT_BASELINES, *SALIENCY_BASELINES]
    assert list(di["baselines"]) == list(SALIENCY_BASELINES)
    for name, s in [*pg["methods"].items(), *pg["baselines"].items()]:
        n = 2 if name == "ablationcam" else N_IMAGES
        for tol in ("0", "15"):
            hits = [row["pointing"][name][tol] for row in res["images"] if name in row["pointing"]]
            assert s[tol]["n"] == n == len(hits) and s[tol]["hits"] == sum(hits)
            assert s[tol]["accuracy"] == pytest.approx(sum(hits) / n)
            lo, hi = s[tol]["ci"]
            assert lo <= s[tol]["accuracy"] <= hi
        assert s["0"]["hits"] <= s["15"]["hits"]  # a grown box holds every point the box holds
    for name, r in [*di["methods"].items(), *di["baselines"].items()]:
        rows = [row for row in res["images"] if name in row["auc"]]
        assert r["n_correct"] == len(rows) and all(row["correct"] for row in rows)
        assert r["n_images"] == (2 if name == "ablationcam" else N_IMAGES)
        assert r["mean"]["insertion"] == pytest.approx(np.mean([row["auc"][name]["insertion"] for row in rows]))
        for metric in ("insertion", "deletion", "overall"):
            lo, hi = r["ci"][metric]
            assert lo <= r["binned"]["auc"][metric] <= hi
        assert len(r["curves"]["insertion"]) == 8 and len(r["curves"]["deletion"]) == 8
        road = (res["road"]["methods"] | res["road"]["baselines"])[name]
        assert road["n_correct"] == len(rows) and len(road["curves"]["morf"]) == 2
        for k in ("morf", "lerf"):
            want = np.mean([np.mean(row["road"][name][k]) for row in rows])
            assert road[k]["mean"] == pytest.approx(want) and road[k]["ci"][0] <= want <= road[k]["ci"][1]
        assert road["combined"]["mean"] == pytest.approx((road["lerf"]["mean"] - road["morf"]["mean"]) / 2)
        assert all(len(row["curves"][name]["insertion"]) == 8 for row in rows)  # records keep their curves
    for name, e in [*res["energy"]["methods"].items(), *res["energy"]["baselines"].items()]:
        vals = [row["energy"][name]["15"] for row in res["images"] if name in row["energy"]]
        assert e["15"]["n"] == len(vals) and e["15"]["mean"] == pytest.approx(np.mean(vals))
        assert all(0 <= v <= 1 for v in vals)
    for tol in ("0", "15"):
        miss = [row for row in res["images"] if not row["pointing"]["center_point"][tol]]
        cm = res["center_miss"][tol]
        assert cm["n_images"] == len(miss) and cm["baselines"]["center_point"]["pointing"]["mean"] == 0.0
        assert cm["methods"]["gradcam"]["pointing"]["n"] == len(miss)
    assert [p["b"] for p in res["pairs"]] == ["decomcam", "ablationcam", "center_point", *SALIENCY_BASELINES]
    misses = {f"pointing_cm@{t}" for t in ("0", "15") if res["center_miss"][t]["n_images"]}
    assert set(res["pairs"][2]["metrics"]) == {"pointing@0", "pointing@15", *misses} and "pointing_cm@0" in misses
    assert {"pointing@0", "energy@15", "ins_del", "road", "morf"} <= set(res["pairs"][0]["metrics"])
    assert res["on_subset"]["n_images"] == 2
    assert set(res["on_subset"]["pointing_game"]["methods"]) == {"gradcam", "decomcam", "ablationcam"}
    assert [row["in_subset"] for row in res["images"]] == [True, True, False, False, False, False]
    assert png.is_file()
    assert "Table 1" in stdout and "Acc@15px(%)" in stdout and "Table 2" in stdout and "Overall(%)" in stdout
    assert "first 2 rows" in stdout and "AblationCAM" in stdout and "Table 1b" in stdout and "Table 3" in stdout
    assert "ablationcam run on the manifest's first 2 rows only" in err


def test_real_default_methods_are_all_registered():
    assert resolve_methods_all(None, list_methods()) == list_methods()
    assert {"scorecam", "ablationcam", "decomcam"} <= set(list_methods()) and set(SLOW_METHODS) <= set(list_methods())
    assert resolve_methods_all("Score-CAM,decom-cam", list_methods()) == ["scorecam", "decomcam"]


def test_real_index_targets_substrates_tolerances(tiny_artifacts, dataset, tmp_path, capsys):
    out = tmp_path / "real.json"
    code, _, err = run_cli(["--data", dataset, "--artifacts", tiny_artifacts.out_dir, "--json", out, "--limit", "2",
                            "--targets", "index", "--bootstrap", "20", "--steps", "3", "--methods", "decomcam",
                            "--substrates", "blur,zero", "--tolerances", "0", "--no-progress",
                            "--road-fractions", "none"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["methods"] == ["decomcam"] and res["subset"] is None and res["on_subset"] is None
    assert res["targets"]["mode"] == "index" and res["targets"]["names_agree"] == 2
    assert res["protocol"]["deletion_insertion"]["substrates"] == {"deletion": "blur", "insertion": "zero"}
    assert set(res["pointing_game"]["methods"]["decomcam"]) == {"0"}
    assert [r["target"] for r in res["images"]] == [r["class_index"] for r in res["images"]]


def test_bad_images_are_reported_and_skipped(tiny_artifacts, dataset, tmp_path, capsys):
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(dataset / "manifest.csv")))[:3]
    for r in rows:
        (data / r["file"]).write_bytes((dataset / r["file"]).read_bytes())
    (data / rows[1]["file"]).write_bytes(b"not an image")
    rows.append({**rows[0], "file": "images/missing.png"})
    rows.append({**rows[0], "file": "images/x.png", "boxes_xyxy": "1 2 3"})
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "r.json"
    code, _, err = run_cli(["--data", data, "--artifacts", tiny_artifacts.out_dir, "--json", out,
                            "--methods", "gradcam", "--bootstrap", "10", "--no-progress", "--road-fractions",
                            "none"], capsys)
    assert code == 1
    res = json.loads(out.read_text())
    assert res["n_rows"] == 5 and res["n_images"] == 2 and res["n_bad"] == 3
    assert {b["file"] for b in res["bad"]} == {rows[1]["file"], "images/missing.png", "images/x.png"}
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3 and any("img_001.png" in ln for ln in lines) and any("missing.png" in ln for ln in lines)
    assert any("box '1 2 3' is not 4" in ln for ln in lines)


# --------------------------------------------------------------------------------------------------
# Errors: one line, exit 2
# --------------------------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_folder_manifest_column_and_unknown_method(tiny_artifacts, dataset, tmp_path, capsys):
    base = ["--artifacts", tiny_artifacts.out_dir, "--json", tmp_path / "x.json", "--no-progress",
            "--road-fractions", "none"]
    code, _, err = run_cli(["--data", tmp_path / "nope", *base], capsys)
    assert code == 2 and "data folder not found" in _one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["--data", tmp_path / "empty", *base], capsys)
    assert code == 2 and "manifest not found" in _one_error_line(err)
    (tmp_path / "cols").mkdir()
    (tmp_path / "cols" / "manifest.csv").write_text("file,class_index,class_name\nimages/a.png,1,cat\n")
    code, _, err = run_cli(["--data", tmp_path / "cols", *base], capsys)
    assert code == 2 and "missing column(s) synset, width, height" in _one_error_line(err)
    code, _, err = run_cli(["--data", dataset, *base, "--methods", "gradcam,nosuchcam"], capsys)
    assert code == 2 and "unknown method 'nosuchcam'" in _one_error_line(err)
    code, _, err = run_cli(["--data", dataset, *base, "--methods", "gradcam", "--substrates", "deletion=grey"], capsys)
    assert code == 2 and "--substrates" in _one_error_line(err)
    code, _, err = run_cli(["--data", dataset, *base, "--methods", "gradcam", "--resize", "crop"], capsys)
    assert code == 2 and "stretch" in _one_error_line(err)
    assert not (tmp_path / "x.json").exists()


def test_export_without_a_methods_graph_fails_before_any_photo(tiny_artifacts, dataset, tmp_path, capsys):
    """An export written before head_grad.onnx: `real` with every registered method (decomcam-ig among them)
    stops in one line before it explains anything, and writes no JSON."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_artifacts.out_dir, old)
    man = json.loads((old / "manifest.json").read_text())
    del man["graphs"]["head_grad"]
    (old / "manifest.json").write_text(json.dumps(man))
    code, out, err = run_cli(["--data", dataset, "--artifacts", old, "--json", tmp_path / "x.json",
                              "--no-progress", "--road-fractions", "none"], capsys)
    assert code == 2 and "no 'head_grad' graph listed; re-export" in _one_error_line(err)
    assert "Table 1" not in out and not (tmp_path / "x.json").exists()


def test_label_missing_from_class_set_is_exit_2(tiny_artifacts, tmp_path, capsys):
    rgbs = make_images(1, seed=1)
    data = write_dataset(tmp_path / "d", rgbs, [0], [[[1.0, 1.0, 20.0, 20.0]]])
    text = (data / "manifest.csv").read_text().replace(",aeroplane,", ",tiger_cat,")
    (data / "manifest.csv").write_text(text)
    code, _, err = run_cli(["--data", data, "--artifacts", tiny_artifacts.out_dir, "--json", tmp_path / "x.json",
                            "--methods", "gradcam", "--no-progress", "--road-fractions", "none"], capsys)
    assert code == 2 and "lacks 1 data set class(es): tiger cat" in _one_error_line(err)
    code, _, err = run_cli(["--data", data, "--artifacts", tiny_artifacts.out_dir, "--json", tmp_path / "x.json",
                            "--methods", "gradcam", "--no-progress", "--targets", "index", "--road-fractions",
                            "none"], capsys)
    assert code == 0, err  # by index the label is class 0 of the class set


# --------------------------------------------------------------------------------------------------
# Scoring, independent of the model
# --------------------------------------------------------------------------------------------------


def _item(boxes_written, w, h) -> BoxedItem:
    return BoxedItem(path=Path("x"), file="x", class_index=0, class_name="c", synset="", width=w, height=h,
                     boxes=np.asarray(boxes_written, np.float64).reshape(-1, 4) - 0.5)  # as read_boxes_manifest


@pytest.mark.parametrize("w,h,s", [(227, 227, 224), (300, 150, 128), (100, 180, 224)])
def test_pointing_hits_match_an_independent_mapping(w, h, s):
    """Peaks all over the [S, S] map against boxes written in photo coordinates: hit <=> the peak pixel's
    centre, mapped to the photo ((j + 0.5) W / S, (i + 0.5) H / S), lies in the box grown by the tolerance."""
    rng = np.random.default_rng(7)
    boxes = [[0.3 * w, 0.2 * h, 0.55 * w, 0.7 * h], [0.75 * w, 0.05 * h, 0.9 * w, 0.3 * h]]
    item = _item(boxes, w, h)
    n_hits = {0.0: 0, 15.0: 0}
    for _ in range(300):
        i, j = int(rng.integers(0, s)), int(rng.integers(0, s))
        sal = rng.random((s, s)).astype(np.float32) * 0.5
        sal[i, j] = 1.0
        got = pointing_hits(sal, item, (0.0, 15.0))
        px, py = (j + 0.5) * w / s, (i + 0.5) * h / s
        for t in (0.0, 15.0):
            want = any(x0 - t <= px <= x1 + t and y0 - t <= py <= y1 + t for x0, y0, x1, y1 in boxes)
            assert got[f"{t:g}"] == want, (i, j, t)
            n_hits[t] += want
    assert 0 < n_hits[0.0] < n_hits[15.0] < 300  # both outcomes were exercised


def test_boxes_to_input_by_hand():
    # 227 -> 224: a box written as [0, 0, 227, 227] covers every model pixel centre, and no more.
    b = _item([[0, 0, 227, 227]], 227, 227).boxes
    np.testing.assert_allclose(boxes_to_input(b, 227, 227, 224), [[-0.5, -0.5, 223.5, 223.5]], atol=1e-12)
    # 200 x 100 -> 100: x halves, y stays; written box [20, 10, 60, 30] -> pixel-index [9.5, 9.5, 29.5, 29.5].
    b = _item([[20, 10, 60, 30]], 200, 100).boxes
    np.testing.assert_allclose(boxes_to_input(b, 200, 100, 100), [[9.5, 9.5, 29.5, 29.5]], atol=1e-12)
    # Tolerance 10 photo px: 5 model px in x, 10 in y.
    np.testing.assert_allclose(boxes_to_input(b, 200, 100, 100, 10), [[4.5, -0.5, 34.5, 39.5]], atol=1e-12)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        boxes_to_input(b, 200, 100, 100, -1)


def test_read_boxes_manifest_converts_to_pixel_index(tmp_path):
    boxes = [[[10, 20, 30, 40]], [[1, 2, 3, 4], [5, 6, 7, 8]]]
    data = write_dataset(tmp_path / "d", make_images(2, seed=0), [3, 7], boxes)
    items = read_boxes_manifest(data)
    assert [it.class_index for it in items] == [3, 7] and [it.class_name for it in items] == ["boat", "cat"]
    np.testing.assert_array_equal(items[1].boxes, [[0.5, 1.5, 2.5, 3.5], [4.5, 5.5, 6.5, 7.5]])
    assert items[0].path == data / "images/img_000.png" and items[0].error is None
    assert len(read_boxes_manifest(data, limit=1)) == 1


def test_map_targets_and_step():
    items = [_item([[0, 0, 1, 1]], 4, 4)]
    items = [replace(it, class_index=2, class_name="Tiger_Cat") for it in items]
    labels = ["a", "b", "tiger cat"]
    assert map_targets(labels, "s", items, "name")[0] == [2]
    t, info = map_targets(labels, "s", items, "auto")
    assert t == [2] and info["mode"] == "name" and info["names_agree"] == 1
    t, info = map_targets([f"c{i}" for i in range(1000)], "imagenet", items, "auto")
    assert t == [2] and info["mode"] == "index" and info["names_agree"] == 0
    with pytest.raises(ValueError, match="outside class set 's' \\(2 classes\\)"):
        map_targets(["a", "b"], "s", items, "index")
    assert step_for(224, 14) == (3584, 14) and step_for(128, 14) == (1171, 14)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        step_for(224, 0)


def test_class_name_check_compares_indices():
    """By index, the manifest's names only check the indices: another spelling of a class is a note, a name
    that the class set holds at another index a warning, and neither changes a target."""
    from benchmarks.quality.real import targets_message

    labels = ["tench", "automated teller machine", "tiger cat", "crane", "crane"]
    base = _item([[0, 0, 1, 1]], 4, 4)
    items = [replace(base, class_index=i, class_name=n)
             for i, n in ((1, "cash_machine"), (2, "tiger_cat"), (0, "tiger_cat"), (4, "crane"), (1, "cash_machine"))]
    t, info = map_targets(labels, "s", items, "index")
    assert t == [1, 2, 0, 4, 1]
    assert (info["names_agree"], info["names_spelled_differently"], info["names_elsewhere"]) == (2, 2, 1)
    assert info["spelling_examples"] == {"cash_machine": "automated teller machine"}
    assert info["elsewhere_examples"]["tiger_cat"] == {"index": 0, "label": "tench", "name_at": [2]}
    msg = targets_message(info)
    assert "2/5 manifest names equal" in msg and "note: 2 are spelled differently" in msg
    assert "'cash_machine' is 'automated teller machine'" in msg
    assert msg.splitlines()[1].startswith("warning: 1 manifest name(s) are labels of other classes")
    clean = targets_message(map_targets(labels, "s", items[:2], "index")[1])
    assert "warning" not in clean and len(clean.splitlines()) == 1


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 80, 320):
        hits = (rng.random(n) < 0.6).astype(np.float64)
        ci = bootstrap_ci(lambda idx: hits[idx].mean(), n, n_resamples=1000, seed=1)
        assert ci["estimate"] == pytest.approx(hits.mean()) and ci["lo"] <= ci["estimate"] <= ci["hi"]
        assert ci["n"] == n and ci["n_valid"] == 1000
        # Against the normal approximation of a proportion's interval (loose: 1000 resamples).
        se = math.sqrt(hits.mean() * (1 - hits.mean()) / n)
        assert ci["hi"] - ci["lo"] == pytest.approx(2 * 1.96 * se, rel=0.25)
        widths.append(ci["hi"] - ci["lo"])
    assert widths[0] > widths[1] > widths[2]
    # Seeded and paired: the same indices for the same (n, resamples, seed).
    np.testing.assert_array_equal(bootstrap_indices(10, 5, 3), bootstrap_indices(10, 5, 3))
    # A dict statistic is resampled jointly; NaN resamples are left out and counted.
    x = np.arange(10.0)
    ci = bootstrap_ci(lambda idx: {"m": x[idx].mean(), "nan": math.nan if 0 in idx else 1.0}, 10, 200, 0)
    assert ci["m"]["lo"] <= 4.5 <= ci["m"]["hi"] and 0 < ci["nan"]["n_valid"] < 200
    with pytest.raises(ValueError, match="level must lie in"):
        bootstrap_ci(lambda idx: 0.0, 3, level=1.0)
