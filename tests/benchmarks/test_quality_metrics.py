"""The newer quality metrics against independent computations on hand-made maps: ROAD's noisy linear imputation
and curves, the energy-based pointing game, the centre-miss subset, Spearman's rank correlation of the sanity
check, and the units the sanity check randomises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality.boxes_data import BoxedItem
from benchmarks.quality.protocol import energy_share, noisy_linear_impute, road_curve
from benchmarks.quality.real import RealConfig, _point_baselines, energy_shares, photo_seed, summarise

# --------------------------------------------------------------------------------------------------
# ROAD
# --------------------------------------------------------------------------------------------------

WEIGHTS = {(0, 1): 1 / 6, (0, -1): 1 / 6, (1, 0): 1 / 6, (-1, 0): 1 / 6,
           (1, 1): 1 / 12, (1, -1): 1 / 12, (-1, 1): 1 / 12, (-1, -1): 1 / 12}


def impute_by_hand(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The imputation written pixel by pixel: for each removed pixel p, sum over its neighbours n inside the
    image of w_n (u_p - u_n) = 0, with u_n the image where n is kept; a dense system solved by numpy."""
    c, h, w = x.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    index = {p: k for k, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for k, (i, j) in enumerate(unknown):
        for (di, dj), wt in WEIGHTS.items():
            ni, nj = i + di, j + dj
            if not (0 <= ni < h and 0 <= nj < w):
                continue
            a[k, k] += wt
            if removed[ni, nj]:
                a[k, index[(ni, nj)]] -= wt
            else:
                b[k] += wt * x[:, ni, nj]
    sol = np.linalg.solve(a, b)
    out = x.astype(np.float64).copy()
    for k, (i, j) in enumerate(unknown):
        out[:, i, j] = sol[k]
    return out


@pytest.mark.parametrize("pattern", ["blob", "scattered", "border"])
def test_imputation_solves_the_neighbour_equations(pattern):
    rng = np.random.default_rng(4)
    h, w = 9, 13
    x = rng.normal(size=(3, h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    removed = {"blob": (yy - 4) ** 2 + (xx - 6) ** 2 <= 10,
               "scattered": rng.random((h, w)) < 0.6,
               "border": (yy < 2) | (xx >= w - 3)}[pattern]
    got = noisy_linear_impute(x, removed, noise=0.0)
    want = impute_by_hand(x, removed)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(got[:, ~removed], x[:, ~removed])  # kept pixels untouched
    # each imputed pixel is the weighted mean of its neighbours (the equations themselves)
    i, j = np.argwhere(removed)[0]
    nb = [(wt, got[:, i + di, j + dj]) for (di, dj), wt in WEIGHTS.items() if 0 <= i + di < h and 0 <= j + dj < w]
    np.testing.assert_allclose(got[:, i, j], sum(wt * v for wt, v in nb) / sum(wt for wt, _ in nb), atol=1e-10)


def test_imputation_noise_is_seeded_and_on_removed_pixels_only():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7, 8)).astype(np.float32)
    removed = rng.random((7, 8)) < 0.5
    clean = noisy_linear_impute(x, removed, noise=0.0)
    noisy = noisy_linear_impute(x, removed, noise=0.01, rng=np.random.default_rng(11))
    draws = np.random.default_rng(11).standard_normal((3, int(removed.sum())))  # removed pixels in index order
    want = clean.astype(np.float64).copy()
    want[:, removed] += 0.01 * draws
    assert noisy.dtype == np.float32
    np.testing.assert_allclose(noisy, want, atol=1e-6)
    with pytest.raises(ValueError, match="every pixel is removed"):
        noisy_linear_impute(x, np.ones((7, 8), bool), noise=0.0)
    with pytest.raises(ValueError, match="needs an rng"):
        noisy_linear_impute(x, removed, noise=0.01)


def test_road_curve_removes_the_ranked_fractions():
    """MoRF removes the round(q N) most salient pixels, LeRF the least salient; ties keep row-major order;
    the score function sees one batch of the imputed images, in the fractions' order."""
    rng = np.random.default_rng(6)
    h, w = 6, 7
    x = rng.normal(size=(3, h, w))
    sal = rng.permutation(h * w).reshape(h, w).astype(np.float64)  # distinct values
    sal[0, :3] = sal.max() + 1.0                                    # a tie at the top: row-major order
    seen = []

    def score(batch):
        seen.append(batch.copy())
        return batch.mean(axis=(1, 2, 3))

    fractions = (0.1, 0.5, 0.9)
    for order in ("morf", "lerf"):
        seen.clear()
        got = road_curve(x, sal, score, order, fractions, noise=0.0)
        (batch,) = seen
        assert batch.shape == (3, 3, h, w)
        flat = sal.ravel()
        ranked = sorted(range(h * w), key=lambda p: (-flat[p], p))  # independent ranking: value, then index
        for k, q in enumerate(fractions):
            n = int(round(q * h * w))
            gone = ranked[:n] if order == "morf" else ranked[h * w - n:]
            removed = np.zeros(h * w, bool)
            removed[gone] = True
            want = impute_by_hand(x, removed.reshape(h, w))
            np.testing.assert_allclose(batch[k], want, atol=1e-10)
            assert got[k] == pytest.approx(want.mean())
    with pytest.raises(ValueError, match="fractions must lie in"):
        road_curve(x, sal, score, "morf", (0.0, 0.5))


# --------------------------------------------------------------------------------------------------
# Energy-based pointing game
# --------------------------------------------------------------------------------------------------


def test_energy_share_by_hand():
    sal = np.arange(48, dtype=np.float64).reshape(6, 8) - 5.0   # negative values carry no mass
    boxes = np.array([[1.5, 0.0, 3.0, 2.2], [2.0, 2.0, 6.4, 4.0]])   # overlapping, fractional edges
    inside = total = 0.0
    for i in range(6):
        for j in range(8):
            v = max(sal[i, j], 0.0)
            total += v
            if any(x0 <= j <= x1 and y0 <= i <= y1 for x0, y0, x1, y1 in boxes):
                inside += v  # a pixel in both boxes counts once
    assert energy_share(sal, boxes) == pytest.approx(inside / total, abs=1e-12)
    assert energy_share(np.zeros((6, 8)), boxes) == 0.0
    assert energy_share(np.ones((6, 8)), [[0, 0, 7, 5]]) == pytest.approx(1.0)
    assert energy_share(np.ones((6, 8)), np.zeros((0, 4))) == 0.0


@pytest.mark.parametrize("w,h,s", [(227, 227, 32), (300, 150, 24)])
def test_energy_shares_map_boxes_from_the_photo(w, h, s):
    """Model-input pixel (i, j) is in the box when its centre mapped to the photo, ((j + 0.5) W / S,
    (i + 0.5) H / S), lies in the written box grown by the tolerance."""
    rng = np.random.default_rng(8)
    written = [[0.3 * w, 0.2 * h, 0.55 * w, 0.7 * h]]
    item = BoxedItem(path=Path("x"), file="x", class_index=0, class_name="c", synset="", width=w, height=h,
                     boxes=np.asarray(written) - 0.5)
    sal = rng.random((s, s))
    got = energy_shares(sal, item, (0.0, 15.0))
    for t in (0.0, 15.0):
        mask = np.array([[any(x0 - t <= (j + 0.5) * w / s <= x1 + t and y0 - t <= (i + 0.5) * h / s <= y1 + t
                              for x0, y0, x1, y1 in written) for j in range(s)] for i in range(s)])
        assert got[f"{t:g}"] == pytest.approx(sal[mask].sum() / sal.sum(), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# The centre-miss subset
# --------------------------------------------------------------------------------------------------


def test_center_miss_subset_on_hand_made_boxes():
    """Photos whose written boxes, grown by the tolerance, do not hold the photo's centre (W / 2, H / 2 in
    written coordinates): the centre point scores 0 there; a method is scored on those photos only."""
    w, h = 200, 100                                     # centre (100, 50)
    written = [
        [[90, 40, 110, 60]],                            # holds the centre
        [[0, 0, 80, 40]],                               # misses by 20 px in x: a miss at 0 and at 15 px
        [[105, 0, 150, 100]],                           # misses by 5 px in x: a miss at 0, a hit at 15 px
        [[0, 0, 20, 20], [100, 50, 120, 70]],           # its second box has the centre on its corner
        [[10, 55, 190, 95]],                            # misses by 5 px in y
    ]
    items = [BoxedItem(path=Path(f"p{i}"), file=f"p{i}", class_index=0, class_name=f"c{i % 2}", synset="",
                       width=w, height=h, boxes=np.asarray(b, np.float64) - 0.5, row=i)
             for i, b in enumerate(written)]
    cfg = RealConfig(n_bootstrap=50)
    method_hits = [True, False, True, True, False]
    records = []
    for it, hit in zip(items, method_hits):
        rec = {"row": it.row, "file": it.file, "class_name": it.class_name, "correct": False,
               "pointing": _point_baselines(it, cfg.seed, cfg.tolerances), "energy": {}, "auc": {}, "road": {}}
        for name in ("m", "random_saliency", "center_saliency"):
            rec["pointing"][name] = {"0": hit, "15": hit}
            rec["energy"][name] = {"0": 0.25 * it.row, "15": 0.5}
        records.append(rec)
    res = summarise(records, ["m"], cfg)
    for t in (0.0, 15.0):
        want = [i for i, b in enumerate(written)
                if not any(x0 - t <= w / 2 <= x1 + t and y0 - t <= h / 2 <= y1 + t for x0, y0, x1, y1 in b)]
        cm = res["center_miss"][f"{t:g}"]
        assert cm["n_images"] == len(want)
        assert cm["baselines"]["center_point"]["pointing"]["mean"] == 0.0
        m = cm["methods"]["m"]
        assert m["pointing"]["n"] == len(want)
        assert m["pointing"]["mean"] == pytest.approx(np.mean([method_hits[i] for i in want]))
        assert m["energy"]["mean"] == pytest.approx(np.mean([0.25 * i if t == 0 else 0.5 for i in want]))
    assert res["center_miss"]["0"]["n_images"] == 3 and res["center_miss"]["15"]["n_images"] == 1


def test_random_baselines_are_seeded_by_the_photo():
    """The same photo gets the same random point in any run, chunk or position; other photos other points."""
    item = BoxedItem(path=Path("a"), file="images/a.JPEG", class_index=0, class_name="c", synset="", width=50,
                     height=40, boxes=np.array([[0.0, 0.0, 24.0, 19.0]]), row=7)
    moved = BoxedItem(**{**item.__dict__, "row": 0})
    assert _point_baselines(item, 0, (0.0,)) == _point_baselines(moved, 0, (0.0,))
    assert photo_seed("images/a.JPEG") != photo_seed("images/b.JPEG")
    hits = [_point_baselines(BoxedItem(**{**item.__dict__, "file": f"images/{k}.JPEG"}), 0, (0.0,))
            ["random_point"]["0"] for k in range(200)]
    assert 0.15 < np.mean(hits) < 0.35  # the box is a quarter of the photo


# --------------------------------------------------------------------------------------------------
# Sanity check: Spearman and the randomised units
# --------------------------------------------------------------------------------------------------


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    from benchmarks.quality.sanity import spearman

    rng = np.random.default_rng(9)
    a = rng.random((12, 12))
    b = a + rng.normal(0, 0.3, (12, 12))
    b[b < 0.2] = 0.0                                     # ties, as a ReLU'd map has
    assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) is None


def test_model_units_and_levels():
    import torchvision

    from benchmarks.quality.sanity import level_units, model_units, parse_levels

    units = model_units(torchvision.models.resnet18(num_classes=10))
    names = [n for n, _ in units]
    assert names[0] == "conv1+bn1" and names[-1] == "fc" and names[-2] == "layer4.1" and len(names) == 10
    assert [n for n, _ in level_units(units, "head")] == ["fc"]
    assert [n for n, _ in level_units(units, "2")] == ["layer4.0", "layer4.1", "fc"]
    with pytest.raises(ValueError, match="only 9 blocks"):
        level_units(units, "10")
    assert parse_levels("head, 1,3,1") == ["head", "1", "3"]
    with pytest.raises(ValueError, match="'0' is neither"):
        parse_levels("head,0")
