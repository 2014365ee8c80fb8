"""Tests for benchmarks.quality: pointing game, deletion/insertion, binned protocol, VOC/ImageFolder
readers and the synthetic dataset generator. Hand-made cases with answers computed by hand."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from benchmarks.quality.protocol import (
    accuracy_bins,
    auc,
    binned_protocol,
    center_point_hit,
    perturbation_curve,
    plot_binned,
    pointing_game_summary,
    pointing_hit,
    random_point_hit,
)
from benchmarks.quality.synthetic_data import (
    SyntheticSpec,
    class_names,
    generate,
    to_arrays,
    write_imagefolder_layout,
    write_voc_layout,
)
from benchmarks.quality.voc import VOC_CLASSES, read_imagefolder, read_voc

# ------------------------------------------------------------------------------------------------
# Pointing game
# ------------------------------------------------------------------------------------------------


def _peak(h, w, y, x):
    s = np.zeros((h, w), np.float32)
    s[y, x] = 1.0
    return s


def test_pointing_hit_inside_and_outside():
    sal = _peak(10, 12, y=2, x=3)
    assert pointing_hit(sal, np.array([[2, 1, 4, 3]]))  # x in 2..4, y in 1..3
    assert pointing_hit(sal, np.array([[3, 2, 3, 2]]))  # inclusive one-pixel box
    assert not pointing_hit(sal, np.array([[5, 5, 8, 8]]))
    assert not pointing_hit(sal, np.array([[4, 0, 9, 9]]))  # x = 3 just left of xmin = 4
    # Any of several boxes counts.
    assert pointing_hit(sal, np.array([[5, 5, 8, 8], [0, 0, 3, 2]]))
    # No boxes: always a miss.
    assert not pointing_hit(sal, np.zeros((0, 4)))


def test_pointing_hit_uses_x_for_columns():
    sal = _peak(20, 20, y=15, x=2)
    assert pointing_hit(sal, np.array([[0, 10, 5, 19]]))
    assert not pointing_hit(sal, np.array([[10, 0, 19, 5]]))  # transposed box


def test_pointing_tolerance_turns_near_miss_into_hit():
    sal = _peak(20, 20, y=5, x=10)
    box = np.array([[0, 0, 7, 7]])  # 3 px right of the box
    assert not pointing_hit(sal, box)
    assert not pointing_hit(sal, box, tolerance=2)
    assert pointing_hit(sal, box, tolerance=3)
    assert pointing_hit(sal, box, tolerance=15)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_hit(sal, box, tolerance=-1)


def test_pointing_ties_take_first_row_major_argmax():
    sal = np.zeros((5, 5))
    assert pointing_hit(sal, np.array([[0, 0, 0, 0]]))  # constant map points at (0, 0)
    sal[1, 4] = sal[3, 0] = 2.0  # tie: (y=1, x=4) comes first in row-major order
    assert pointing_hit(sal, np.array([[4, 1, 4, 1]]))
    assert not pointing_hit(sal, np.array([[0, 3, 0, 3]]))


def test_pointing_bad_inputs():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        pointing_hit(np.zeros((3, 4, 4)), np.array([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        pointing_hit(np.full((4, 4), np.nan), np.array([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        pointing_hit(np.zeros((4, 4)), np.zeros((2, 3)))


def test_center_point_baseline():
    # Odd size: the centre is pixel (5, 5).
    assert center_point_hit(11, 11, np.array([[5, 5, 6, 6]]))
    assert not center_point_hit(11, 11, np.array([[6, 6, 9, 9]]))
    assert center_point_hit(11, 11, np.array([[6, 6, 9, 9]]), tolerance=1)
    # Even size: the centre (4.5, 4.5) lies between pixels 4 and 5.
    assert not center_point_hit(10, 10, np.array([[4, 4, 4, 4]]))
    assert center_point_hit(10, 10, np.array([[4, 4, 5, 5]]))
    # h and w are not swapped: a wide image's centre is (x=9.5, y=2).
    assert center_point_hit(5, 20, np.array([[9, 2, 10, 2]]))


def test_random_point_baseline():
    box = np.array([[0, 0, 9, 4]])  # top half of a 10 x 10 image
    hits = [random_point_hit(10, 10, box, np.random.default_rng(0)) for _ in range(3)]
    assert len(set(hits)) == 1  # same seed, same draw
    rng = np.random.default_rng(123)
    rate = np.mean([random_point_hit(10, 10, box, rng) for _ in range(4000)])
    assert abs(rate - 0.5) < 0.04
    assert all(random_point_hit(7, 9, np.array([[0, 0, 8, 6]]), rng) for _ in range(50))


def test_pointing_game_summary_means_over_classes():
    records = [("cat", True), ("cat", True), ("cat", True), ("cat", False), ("dog", False)]
    out = pointing_game_summary(records)
    assert out["per_class"] == {"cat": 0.75, "dog": 0.0}
    assert out["mean_accuracy"] == pytest.approx(0.375)  # not 3 / 5 over images
    assert out["n"] == 5
    with pytest.raises(ValueError, match="no records"):
        pointing_game_summary([])


# ------------------------------------------------------------------------------------------------
# Deletion / insertion
# ------------------------------------------------------------------------------------------------

# A 4 x 4 toy: 4 "important" pixels; the score is the fraction of them still showing x's value 1.
_MASK = np.zeros((4, 4), bool)
_MASK[[0, 1, 2, 3], [1, 3, 0, 2]] = True


def _toy_score(batch):  # [N, 3, 4, 4] -> [N]
    return batch[:, 0][:, _MASK].mean(axis=1)


def _toy():
    x = np.ones((3, 4, 4), np.float32)
    substrate = np.zeros((3, 4, 4), np.float32)
    return x, substrate


def test_deletion_perfect_ordering_hand_computed():
    x, sub = _toy()
    curve = perturbation_curve(x, _MASK.astype(np.float32), _toy_score, "deletion", step=2, substrate=sub)
    # 16 px, step 2 -> 8 steps, 9 points; the 4 important pixels go in the first two steps.
    np.testing.assert_allclose(curve, [1, 0.5, 0, 0, 0, 0, 0, 0, 0])
    assert auc(curve) == pytest.approx(1 / 8)  # (1.5 - 0.5) / 8
    # The worst ordering removes them last.
    worst = perturbation_curve(x, (~_MASK).astype(np.float32), _toy_score, "deletion", 2, sub)
    np.testing.assert_allclose(worst, [1, 1, 1, 1, 1, 1, 1, 0.5, 0])
    assert auc(worst) == pytest.approx(7 / 8)  # (7.5 - 0.5) / 8


def test_insertion_perfect_ordering_hand_computed():
    x, sub = _toy()
    curve = perturbation_curve(x, _MASK.astype(np.float32), _toy_score, "insertion", step=2, substrate=sub)
    np.testing.assert_allclose(curve, [0, 0.5, 1, 1, 1, 1, 1, 1, 1])
    assert auc(curve) == pytest.approx(7 / 8)  # (7.5 - 0.5) / 8


def test_perturbation_batching_partial_step_and_ties():
    x, sub = _toy()
    calls = []

    def score(batch):
        calls.append(len(batch))
        return _toy_score(batch)

    # 16 px, step 5 -> ceil(16 / 5) = 4 steps (5, 5, 5, 1 px), 5 points, in batches of 2.
    sal = _MASK.astype(np.float32)
    curve = perturbation_curve(x, sal, score, "deletion", step=5, substrate=sub, batch_size=2)
    assert calls == [2, 2, 1]
    ref = perturbation_curve(x, sal, _toy_score, "deletion", step=5, substrate=sub, batch_size=64)
    np.testing.assert_array_equal(curve, ref)
    assert curve[0] == 1.0 and curve[-1] == 0.0 and len(curve) == 5
    # Ties keep row-major order: a constant map deletes pixel (0, 0) first.
    first_px = perturbation_curve(x, np.zeros((4, 4)), lambda b: b[:, 0, 0, 0], "deletion", 1, sub)
    np.testing.assert_array_equal(first_px[:2], [1, 0])
    second_px = perturbation_curve(x, np.zeros((4, 4)), lambda b: b[:, 0, 0, 1], "deletion", 1, sub)
    np.testing.assert_array_equal(second_px[:3], [1, 1, 0])


def test_perturbation_bad_inputs():
    x, sub = _toy()
    sal = np.zeros((4, 4))
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(x, sal, _toy_score, "erase", 1, sub)
    with pytest.raises(ValueError, match="saliency must be"):
        perturbation_curve(x, np.zeros((3, 3)), _toy_score, "deletion", 1, sub)
    with pytest.raises(ValueError, match="substrate"):
        perturbation_curve(x, sal, _toy_score, "deletion", 1, sub[:, :2])
    with pytest.raises(ValueError, match="step"):
        perturbation_curve(x, sal, _toy_score, "deletion", 0, sub)
    with pytest.raises(ValueError, match="returned 1 scores"):
        perturbation_curve(x, sal, lambda b: np.zeros(1), "deletion", 4, sub)


def test_auc_known_curves():
    assert auc([1.0, 0.0]) == pytest.approx(0.5)
    assert auc([0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert auc(np.full(17, 0.3)) == pytest.approx(0.3)
    assert auc(np.linspace(0, 1, 101) ** 2) == pytest.approx(1 / 3, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        auc([0.5])


# ------------------------------------------------------------------------------------------------
# Binned protocol
# ------------------------------------------------------------------------------------------------


def test_accuracy_bins_edges():
    acc = {"a": 0.0, "f": 0.0999, "b": 0.1, "e": 0.7, "g": 0.3, "d": 0.95, "c": 1.0}
    assert accuracy_bins(acc) == {0: ["a", "f"], 1: ["b"], 3: ["g"], 7: ["e"], 9: ["c", "d"]}
    assert accuracy_bins({"x": 0.5}, width=0.25) == {2: ["x"]}
    assert accuracy_bins({"x": 1.0}, width=0.25) == {3: ["x"]}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        accuracy_bins({"x": 1.2})
    with pytest.raises(ValueError, match="width"):
        accuracy_bins({"x": 0.5}, width=0.3)


_ACC = {"A": 0.25, "B": 0.28, "E": 0.55, "C": 0.85, "D": 0.05}
_ROWS = [
    {"class": "A", "correct": True, "insertion": 0.6, "deletion": 0.2},
    {"class": "A", "correct": True, "insertion": 0.4, "deletion": 0.1},
    {"class": "A", "correct": False, "insertion": 0.9, "deletion": 0.9},  # dropped
    {"class": "B", "correct": True, "insertion": 0.5, "deletion": 0.3},
    {"class": "E", "correct": True, "insertion": 0.6, "deletion": 0.4},
    {"class": "C", "correct": True, "insertion": 0.8, "deletion": 0.1},
    {"class": "C", "correct": True, "insertion": 1.0, "deletion": 0.3},
    {"class": "D", "correct": False, "insertion": 0.0, "deletion": 0.0},  # dropped: bin 0 stays empty
]


def test_binned_protocol_hand_table():
    out = binned_protocol(_ROWS, _ACC)
    bins = out["bins"]
    assert [b["bin"] for b in bins] == [2, 5, 8]
    assert [b["n"] for b in bins] == [3, 1, 2]
    assert bins[0]["classes"] == ["A", "B"]
    np.testing.assert_allclose([b["accuracy"] for b in bins], [0.25, 0.55, 0.85])
    np.testing.assert_allclose([b["insertion"] for b in bins], [0.5, 0.6, 0.9])
    np.testing.assert_allclose([b["deletion"] for b in bins], [0.2, 0.4, 0.2])
    np.testing.assert_allclose([b["overall"] for b in bins], [0.3, 0.2, 0.7])
    # Evenly spaced centres 0.25, 0.55, 0.85: mean level = (y0 / 2 + y1 + y2 / 2) / 2.
    assert out["auc"]["insertion"] == pytest.approx(0.65)
    assert out["auc"]["deletion"] == pytest.approx(0.30)
    assert out["auc"]["overall"] == pytest.approx(0.35)
    assert out["n_images"] == 6 and out["n_dropped"] == 2


def test_binned_protocol_single_bin_and_errors():
    one = binned_protocol(_ROWS[:2], _ACC)
    assert one["auc"] == pytest.approx({"insertion": 0.5, "deletion": 0.15, "overall": 0.35})
    with pytest.raises(ValueError, match="no correctly predicted"):
        binned_protocol([_ROWS[2]], _ACC)
    with pytest.raises(ValueError, match="'Z'"):
        binned_protocol([{"class": "Z", "correct": True, "insertion": 1, "deletion": 0}], _ACC)


def test_plot_binned_writes_png(tmp_path):
    a = binned_protocol(_ROWS, _ACC)
    b = binned_protocol(_ROWS[:2] + _ROWS[5:], _ACC)
    path = tmp_path / "plots" / "fig4.png"
    plot_binned({"Decom-CAM": a, "Grad-CAM": b}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["fig4.png"]  # no temporary file left


# ------------------------------------------------------------------------------------------------
# Synthetic data and readers
# ------------------------------------------------------------------------------------------------

_SPEC64 = SyntheticSpec(image_size=64, second_instance_prob=0.5)


@pytest.fixture(scope="module")
def samples64():
    return generate(_SPEC64, 3, "val")


def test_generate_shapes_and_boxes(samples64):
    names = class_names(_SPEC64)
    assert len(names) == 6 and len(set(names)) == 6
    assert len(samples64) == 18
    assert [s.label for s in samples64[:6]] == list(range(6))  # interleaved by index
    assert any(len(s.boxes) == 2 for s in samples64)
    for s in samples64:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.boxes.dtype == np.int64 and s.boxes.shape[1] == 4 and len(s.boxes) >= 1
        assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2:] <= 63).all()
        assert (s.boxes[:, 2:] >= s.boxes[:, :2]).all()
    x, y = to_arrays(samples64)
    assert x.shape == (18, 64, 64, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [3] * 6


def test_generate_is_deterministic(samples64):
    again = generate(_SPEC64, 3, "val")
    x0, y0 = to_arrays(samples64)
    x1, y1 = to_arrays(again)
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(samples64, again):
        np.testing.assert_array_equal(a.boxes, b.boxes)
    # A shorter run is a prefix; another split or seed changes the images.
    np.testing.assert_array_equal(to_arrays(generate(_SPEC64, 1, "val"))[0], x0[:6])
    assert not np.array_equal(to_arrays(generate(_SPEC64, 3, "train"))[0], x0)
    other_seed = SyntheticSpec(image_size=64, second_instance_prob=0.5, seed=1)
    assert not np.array_equal(to_arrays(generate(other_seed, 3, "val"))[0], x0)


def test_spec_validation():
    with pytest.raises(ValueError, match="n_classes"):
        SyntheticSpec(n_classes=9)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=16)
    with pytest.raises(ValueError, match="no samples"):
        to_arrays([])


def test_voc_round_trip(tmp_path, samples64):
    names = class_names(_SPEC64)
    ids = write_voc_layout(samples64, names, tmp_path / "voc")
    items = read_voc(tmp_path / "voc", "val")
    assert [it.image_id for it in items] == ids
    for i, (s, it) in enumerate(zip(samples64, items)):
        assert (it.width, it.height) == (64, 64)
        assert list(it.objects) == [names[s.label]]
        np.testing.assert_array_equal(it.objects[names[s.label]], s.boxes)  # 0-based again
        assert not it.difficult[names[s.label]].any()
        img = cv2.cvtColor(cv2.imread(str(it.image_path)), cv2.COLOR_BGR2RGB)
        err = np.abs(img.astype(int) - s.image).mean()  # JPEG (quality 95, chroma subsampled)
        other = samples64[(i + 1) % len(samples64)].image
        assert err < 15 and err < np.abs(img.astype(int) - other).mean() / 3
    # The XML itself is 1-based.
    xml = ET.parse(tmp_path / "voc" / "Annotations" / f"{ids[0]}.xml").getroot()
    assert int(xml.find("object/bndbox/xmin").text) == samples64[0].boxes[0, 0] + 1
    assert int(xml.find("object/bndbox/ymax").text) == samples64[0].boxes[0, 3] + 1
    per_class = (tmp_path / "voc" / "ImageSets" / "Main" / f"{names[0]}_val.txt").read_text().split()
    assert per_class[:2] == [ids[0], "1"] and per_class[3] == "-1"
    assert len(read_voc(tmp_path / "voc", limit=4)) == 4


def test_imagefolder_round_trip(tmp_path, samples64):
    names = class_names(_SPEC64)
    write_imagefolder_layout(samples64, names, tmp_path / "ifo")
    (tmp_path / "ifo" / names[0] / "notes.txt").write_text("not an image")
    classes, items = read_imagefolder(tmp_path / "ifo")
    assert classes == sorted(names)
    assert len(items) == len(samples64)
    by_name = {p.name: (p, c) for p, c in items}
    for i, s in enumerate(samples64):
        path, c = by_name[f"{i:06d}.png"]
        assert classes[c] == names[s.label]
        np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), s.image)
    _, limited = read_imagefolder(tmp_path / "ifo", limit_per_class=1)
    assert sorted(c for _, c in limited) == list(range(6))


def test_voc_classes():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person" and VOC_CLASSES[-1] == "tvmonitor"


def test_reader_errors(tmp_path, samples64):
    with pytest.raises(ValueError, match="VOC root folder not found: .*nowhere"):
        read_voc(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="image folder not found: .*nowhere"):
        read_imagefolder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        read_imagefolder(tmp_path / "empty")

    root = tmp_path / "voc"
    ids = write_voc_layout(samples64[:2], class_names(_SPEC64), root, ext="png")
    with pytest.raises(ValueError, match=r"split list not found: .*test\.txt"):
        read_voc(root, split="test")
    xml_path = root / "Annotations" / f"{ids[1]}.xml"
    xml_path.write_text("<annotation><size><width>64</width>")  # truncated
    with pytest.raises(ValueError, match=rf"malformed VOC annotation .*{ids[1]}\.xml"):
        read_voc(root)
    xml_path.write_text("<annotation><size><width>64</width></size></annotation>")
    with pytest.raises(ValueError, match=r"malformed VOC annotation .*missing <height>"):
        read_voc(root)
    xml_path.unlink()
    with pytest.raises(ValueError, match=rf"VOC annotation not found: .*{ids[1]}\.xml"):
        read_voc(root)
    (root / "JPEGImages" / f"{ids[0]}.png").unlink()
    with pytest.raises(ValueError, match=rf"VOC image not found: .*{ids[0]}\.png"):
        read_voc(root, limit=1)
