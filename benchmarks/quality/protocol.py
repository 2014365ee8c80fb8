"""The model-independent parts of the Decom-CAM evaluation protocol (paper section 4, DESIGN.md).

Pointing game (Zhang et al.), paper section 2.3 / Table 1
    ``pointing_hit`` scores one saliency map against the ground-truth boxes of its target class;
    ``center_point_hit`` / ``random_point_hit`` are the usual baselines; ``pointing_game_summary``
    turns (class, hit) records into per-class accuracies and their mean over classes (the paper's number).

Deletion / insertion (RISE, Petsiuk et al.), paper section 2.3
    ``perturbation_curve`` produces the class-probability curve as pixels are removed (deletion) or put
    back (insertion) in saliency order; ``auc`` is RISE's trapezoid area under it.

The paper's new protocol, section 4.1 / Figure 4 / Table 2
    ``accuracy_bins`` groups classes by the model's per-class accuracy into 10% bins;
    ``binned_protocol`` keeps only correctly predicted images, averages insertion / deletion / overall
    (= insertion - deletion) per bin, and reports the area under metric-versus-accuracy;
    ``plot_binned`` draws the Figure-4 style plot for several methods.

Energy-based pointing game (Score-CAM, Wang et al. 2020)
    ``energy_share`` is the share of a map's (positive) saliency mass that lies inside the boxes.

ROAD (Rong et al., ICML 2022: remove and debias)
    ``noisy_linear_impute`` replaces removed pixels by the harmonic interpolation of their neighbours plus a
    little noise (ROAD's noisy linear imputation); ``road_curve`` scores the class after removing the most
    (MoRF) or least (LeRF) salient fractions of the pixels.

Uncertainty
    ``bootstrap_ci`` is a seeded percentile bootstrap over images for any of the statistics above.

Coordinate conventions
    Saliency maps are ``[H, W]`` arrays indexed ``[row, col] = [y, x]``. Boxes are ``[K, 4]`` arrays of
    ``(xmin, ymin, xmax, ymax)`` in 0-based *inclusive* pixel coordinates: a box covers the pixels with
    ``xmin <= x <= xmax`` and ``ymin <= y <= ymax``. VOC XML stores 1-based inclusive coordinates;
    ``benchmarks.quality.voc`` subtracts 1 when it reads them, so boxes from there can be passed as is.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

__all__ = [
    "pointing_hit",
    "center_point_hit",
    "random_point_hit",
    "pointing_game_summary",
    "energy_share",
    "boxes_mask",
    "noisy_linear_impute",
    "road_curve",
    "ROAD_FRACTIONS",
    "ROAD_NOISE",
    "perturbation_curve",
    "auc",
    "accuracy_bins",
    "binned_protocol",
    "plot_binned",
    "bootstrap_indices",
    "bootstrap_ci",
    "METRICS",
]

#: The three per-image metrics of the binned protocol, in plotting order.
METRICS = ("insertion", "deletion", "overall")

# Slack for float bin edges: 0.7 / 0.1 == 6.999999999999999 must land in bin 7.
_BIN_EPS = 1e-9


# --------------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------------


def _as_boxes(boxes) -> np.ndarray:
    """Validate and return boxes as float64 [K, 4] (K may be 0)."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b[None, :]  # a single box given as (4,)
    if b.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [K, 4] (xmin, ymin, xmax, ymax), got {b.shape}")
    return b


def _point_in_boxes(x: float, y: float, boxes, tolerance: float) -> bool:
    """True when (x, y) lies inside any box grown by ``tolerance`` pixels on every side."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    b = _as_boxes(boxes)  # [K, 4]
    if len(b) == 0:
        return False
    inside = (
        (b[:, 0] - tolerance <= x)
        & (x <= b[:, 2] + tolerance)
        & (b[:, 1] - tolerance <= y)
        & (y <= b[:, 3] + tolerance)
    )  # [K]
    return bool(inside.any())


def pointing_hit(saliency: np.ndarray, boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """One pointing-game trial: does the saliency maximum fall inside a box of the target class?

    saliency  : [H, W] map in the *original image* coordinates (resize it to the image first).
    boxes     : [K, 4] (xmin, ymin, xmax, ymax), 0-based inclusive pixel coordinates, all the
                ground-truth boxes of the target class in this image (K = 0 is always a miss).
    tolerance : grow every box by this many pixels on each side (an axis-aligned expansion).
                0 is the paper's strict test; 15 is the usual variant of Zhang et al.'s pointing game.
                (TorchRay's implementation of that variant uses a disc of radius 15 around the point
                instead of a square; the two differ only near box corners.)

    Ties: the maximum is the *first* argmax in row-major order (``np.argmax`` on the flattened map),
    so a constant map points at pixel (0, 0). Non-finite values are rejected.
    """
    s = np.asarray(saliency)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"saliency must be a non-empty [H, W] array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency contains NaN or inf")
    y, x = np.unravel_index(int(np.argmax(s)), s.shape)  # first maximum, row-major
    return _point_in_boxes(float(x), float(y), boxes, tolerance)


def center_point_hit(h: int, w: int, boxes: np.ndarray, tolerance: float = 0.0) -> bool:
    """Centre-point baseline: always point at the image centre ((w - 1) / 2, (h - 1) / 2).

    The centre is taken in continuous 0-based pixel coordinates, so for even sizes it lies between
    two pixels and is inside a box exactly when both of its neighbours are.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    return _point_in_boxes((w - 1) / 2.0, (h - 1) / 2.0, boxes, tolerance)


def random_point_hit(
    h: int, w: int, boxes: np.ndarray, rng: np.random.Generator, tolerance: float = 0.0
) -> bool:
    """Random-point baseline: point at a pixel drawn uniformly from the h x w image with ``rng``."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    x = int(rng.integers(0, w))
    y = int(rng.integers(0, h))
    return _point_in_boxes(float(x), float(y), boxes, tolerance)


def pointing_game_summary(records: Iterable[tuple[str, bool]]) -> dict:
    """Aggregate pointing-game trials.

    records : iterable of (class_name, hit) pairs, one per (image, target class) trial.
    Returns ``{"per_class": {name: hits / trials}, "mean_accuracy": mean of per_class over classes,
    "n": number of trials}``. The mean is over classes, not over trials (paper section 2.3), so a
    rare class weighs as much as a common one. ``per_class`` is ordered by class name.
    """
    hits: dict[str, int] = defaultdict(int)
    trials: dict[str, int] = defaultdict(int)
    n = 0
    for name, hit in records:
        trials[name] += 1
        hits[name] += int(bool(hit))
        n += 1
    if n == 0:
        raise ValueError("pointing_game_summary: no records")
    per_class = {name: hits[name] / trials[name] for name in sorted(trials)}
    mean = float(np.mean(list(per_class.values())))
    return {"per_class": per_class, "mean_accuracy": mean, "n": n}


def boxes_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    """[H, W] bool: the pixels whose index (x = column, y = row) lies in at least one box (the union; boxes
    in the pixel-index convention of ``pointing_hit``, inclusive, fractional edges allowed)."""
    h, w = shape
    b = _as_boxes(boxes)  # [K, 4]
    ys = np.arange(h, dtype=np.float64)[:, None]  # [H, 1]
    xs = np.arange(w, dtype=np.float64)[None, :]  # [1, W]
    out = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in b:
        out |= (x0 <= xs) & (xs <= x1) & (y0 <= ys) & (ys <= y1)
    return out


def energy_share(saliency: np.ndarray, boxes) -> float:
    """Energy-based pointing game (Score-CAM, Wang et al. 2020): the share of the map's saliency mass that lies
    in the boxes, sum over in-box pixels of max(s, 0) / sum over all pixels of max(s, 0).

    saliency : [H, W] map in the boxes' coordinates; negative values carry no mass (CAM maps are
               non-negative; a signed map's negative evidence is not "energy" pointing at anything).
    boxes    : [K, 4] pixel-index boxes as ``pointing_hit`` (a pixel counts once when boxes overlap).
    A map without positive mass points at nothing and scores 0. Returns a float in [0, 1].
    """
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"saliency must be a non-empty [H, W] array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency contains NaN or inf")
    pos = np.maximum(s, 0.0)
    total = float(pos.sum())
    if total <= 0.0:
        return 0.0
    return float(pos[boxes_mask(s.shape, boxes)].sum() / total)


# --------------------------------------------------------------------------------------------------
# ROAD: remove and debias (noisy linear imputation)
# --------------------------------------------------------------------------------------------------

#: ROAD's removal fractions (Rong et al. and pytorch-grad-cam's ROADCombined: 10%, 20%, ..., 90%).
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Standard deviation of the noise added to imputed values, in the model's normalised input space.
ROAD_NOISE = 0.01
#: Neighbour weights of the imputation: 1/6 for the 4 edge neighbours, 1/12 for the 4 diagonal ones.
_ROAD_WEIGHTS = (((0, 1), 1 / 6), ((0, -1), 1 / 6), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
                 ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12))
_ND_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _dissection_rank(h: int, w: int) -> np.ndarray:
    """[H * W] int: each pixel's position in a geometric nested-dissection order of the H x W grid (two halves
    first, the separating row or column after them, recursively). Ordering the unknowns this way keeps the
    sparse LU factors of a grid system small (fill ~ n log n instead of n^1.5), a 2-3x faster solve."""
    key = (h, w)
    if key not in _ND_CACHE:
        parts: list[np.ndarray] = []

        def rec(r0: int, r1: int, c0: int, c1: int) -> None:
            if r1 <= r0 or c1 <= c0:
                return
            if (r1 - r0) * (c1 - c0) <= 64:
                rr, cc = np.mgrid[r0:r1, c0:c1]
                parts.append((rr * w + cc).ravel())
            elif r1 - r0 >= c1 - c0:
                m = (r0 + r1) // 2
                rec(r0, m, c0, c1)
                rec(m + 1, r1, c0, c1)
                parts.append(m * w + np.arange(c0, c1))
            else:
                m = (c0 + c1) // 2
                rec(r0, r1, c0, m)
                rec(r0, r1, m + 1, c1)
                parts.append(np.arange(r0, r1) * w + m)

        rec(0, h, 0, w)
        order = np.concatenate(parts)
        rank = np.empty(h * w, dtype=np.int64)
        rank[order] = np.arange(h * w)
        _ND_CACHE[key] = rank
    return _ND_CACHE[key]


def noisy_linear_impute(x: np.ndarray, removed: np.ndarray, noise: float = ROAD_NOISE,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """ROAD's noisy linear imputation (Rong et al. 2022, section 4): every removed pixel becomes the weighted
    mean of its (up to 8) neighbours inside the image, 1/6 for edge and 1/12 for diagonal neighbours, removed
    neighbours being unknowns themselves: one sparse linear system per image, solved exactly for all channels
    at once; then Gaussian noise of standard deviation ``noise`` is added to the removed pixels.

    x       : [C, H, W] image (the model's normalised input).
    removed : [H, W] bool, True where the pixel is removed (at least one pixel must be kept).
    rng     : draws the noise (required when noise > 0).
    Returns a new [C, H, W] array of x's dtype; kept pixels are x's.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu
    from threadpoolctl import threadpool_limits

    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be [C, H, W], got {x.shape}")
    c, h, w = x.shape
    miss2d = np.asarray(removed, dtype=bool)
    if miss2d.shape != (h, w):
        raise ValueError(f"removed must be [H, W] = {(h, w)}, got {miss2d.shape}")
    out = x.astype(np.float64).reshape(c, h * w)  # [C, H*W], a copy
    miss = np.flatnonzero(miss2d.ravel())  # [n] removed pixels
    if miss.size == 0:
        return x.copy()
    if miss.size == h * w:
        raise ValueError("noisy_linear_impute: every pixel is removed; nothing to interpolate from")
    # Unknowns in nested-dissection order (a permutation only: the solution is the same).
    miss = miss[np.argsort(_dissection_rank(h, w)[miss], kind="stable")]
    n = miss.size
    var = np.full(h * w, -1, dtype=np.int64)
    var[miss] = np.arange(n)
    r, col = np.divmod(miss, w)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    known = ~miss2d.ravel()
    for (dr, dc), wt in _ROAD_WEIGHTS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        eq = np.flatnonzero(inside)  # equations with this neighbour
        nb = rr[inside] * w + cc[inside]
        diag[eq] += wt
        k = known[nb]
        rhs[eq[k]] += wt * out[:, nb[k]].T
        rows.append(eq[~k])
        cols.append(var[nb[~k]])
        vals.append(np.full(int((~k).sum()), -wt))
    a = csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # One BLAS thread: the factorisation's dense kernels are small, and BLAS threads that spin on a busy
    # machine make it many times slower.
    with threadpool_limits(1):
        lu = splu(a, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        sol = lu.solve(rhs)  # [n, C]
    if noise > 0:
        if rng is None:
            raise ValueError("noisy_linear_impute: noise > 0 needs an rng")
        # Drawn in pixel-index order so the draws do not depend on the solver's ordering.
        order = np.argsort(miss, kind="stable")
        draws = rng.standard_normal((c, n))  # [C, n] for the removed pixels in ascending index order
        sol[order] += noise * draws.T
    out[:, miss] = sol.T
    return out.reshape(c, h, w).astype(x.dtype)


def road_curve(x: np.ndarray, saliency: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray], order: str,
               fractions: Iterable[float] = ROAD_FRACTIONS, noise: float = ROAD_NOISE,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """ROAD scores of one image: for each fraction q, remove round(q * H * W) pixels and impute them
    (``noisy_linear_impute``), then score the result.

    order : "morf" removes the most salient pixels first, "lerf" the least salient. Pixels are ranked as
            ``perturbation_curve`` ranks them (descending saliency, stable: equal values keep row-major
            index order); LeRF removes the tail of that ranking.
    rng   : the imputation noise; every fraction draws from it in turn.
    Returns [len(fractions)] float64 scores (``score_fn`` over one batch of the imputed images).
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    x = np.asarray(x)
    sal = np.asarray(saliency)
    if x.ndim != 3 or sal.shape != x.shape[1:]:
        raise ValueError(f"saliency must be [H, W] = {x.shape[1:]} to match x [C, H, W], got {sal.shape}")
    if not np.all(np.isfinite(sal)):
        raise ValueError("saliency contains NaN or inf")
    fr = [float(q) for q in fractions]
    if not fr or any(not 0.0 < q < 1.0 for q in fr):
        raise ValueError(f"ROAD fractions must lie in (0, 1), got {fr}")
    h, w = sal.shape
    n_pix = h * w
    ranked = np.argsort(-sal.reshape(-1).astype(np.float64), kind="stable")  # [H*W] most salient first
    batch = []
    for q in fr:
        k = int(round(q * n_pix))
        gone = ranked[:k] if order == "morf" else ranked[n_pix - k:]
        removed = np.zeros(n_pix, dtype=bool)
        removed[gone] = True
        batch.append(noisy_linear_impute(x, removed.reshape(h, w), noise, rng))
    scores = np.asarray(score_fn(np.stack(batch)), dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(fr):
        raise ValueError(f"score_fn returned {scores.shape[0]} scores for a batch of {len(fr)}")
    return scores


# --------------------------------------------------------------------------------------------------
# Deletion / insertion
# --------------------------------------------------------------------------------------------------


def perturbation_curve(
    x: np.ndarray,
    saliency: np.ndarray,
    score_fn: Callable[[np.ndarray], np.ndarray],
    mode: str,
    step: int,
    substrate: np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """RISE-style deletion or insertion curve for one image.

    x         : [3, H, W] model-input image (already normalised, as the model consumes it).
    saliency  : [H, W] saliency in model-input coordinates.
    score_fn  : maps a batch [N, 3, H, W] (dtype of ``x``) to [N] scores, e.g. the target-class probability.
    mode      : "deletion"  - start from x and replace the most salient pixels with ``substrate``;
                "insertion" - start from ``substrate`` and put x's most salient pixels back.
    step      : pixels changed per step; n_steps = ceil(H * W / step), the last step may be smaller.
    substrate : [3, H, W] what removed pixels become (zeros in normalised space = the mean colour,
                or a blurred copy of x).
    batch_size: images per ``score_fn`` call.

    Pixels are ranked by saliency, descending, with a stable sort (equal values keep row-major index
    order). Point i of the curve (0 <= i <= n_steps) has the top min(i * step, H * W) pixels changed, so
    point 0 is the untouched start (x for deletion, substrate for insertion) and the last point is the
    other end. Returns the [n_steps + 1] scores as float64.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    x = np.asarray(x)
    substrate = np.asarray(substrate)
    sal = np.asarray(saliency)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"x must be [3, H, W], got {x.shape}")
    _, h, w = x.shape
    if sal.shape != (h, w):
        raise ValueError(f"saliency must be [H, W] = {(h, w)} to match x, got {sal.shape}")
    if substrate.shape != x.shape:
        raise ValueError(f"substrate must match x's shape {x.shape}, got {substrate.shape}")
    if not np.all(np.isfinite(sal)):
        raise ValueError("saliency contains NaN or inf")
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer, got {step}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    step, batch_size = int(step), int(batch_size)

    n_pix = h * w
    n_steps = math.ceil(n_pix / step)
    # Flat pixel indices, most salient first; stable so ties keep ascending index order.
    order = np.argsort(-sal.reshape(-1).astype(np.float64), kind="stable")  # [H*W]

    src = x.reshape(3, n_pix)  # [3, H*W]
    sub = substrate.reshape(3, n_pix).astype(x.dtype, copy=False)  # [3, H*W]
    start, finish = (src, sub) if mode == "deletion" else (sub, src)
    current = start.copy()  # [3, H*W], evolves step by step

    scores = np.empty(n_steps + 1, dtype=np.float64)
    batch: list[np.ndarray] = []
    filled = 0

    def flush() -> None:
        nonlocal filled
        if not batch:
            return
        out = np.asarray(score_fn(np.stack(batch).reshape(len(batch), 3, h, w)), dtype=np.float64)
        out = out.reshape(-1)
        if out.shape[0] != len(batch):
            raise ValueError(f"score_fn returned {out.shape[0]} scores for a batch of {len(batch)}")
        scores[filled : filled + len(batch)] = out
        filled += len(batch)
        batch.clear()

    for i in range(n_steps + 1):
        if i > 0:
            idx = order[(i - 1) * step : i * step]  # the next `step` pixels in saliency order
            current[:, idx] = finish[:, idx]
        batch.append(current.copy())
        if len(batch) == batch_size:
            flush()
    flush()
    return scores


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced x in [0, 1], by the trapezoid rule (as RISE).

    auc = (sum(c) - (c[0] + c[-1]) / 2) / (len(c) - 1)
    """
    c = np.asarray(curve, dtype=np.float64).reshape(-1)
    if c.shape[0] < 2:
        raise ValueError(f"auc needs a curve of at least 2 points, got {c.shape[0]}")
    return float((c.sum() - (c[0] + c[-1]) / 2.0) / (c.shape[0] - 1))


# --------------------------------------------------------------------------------------------------
# The paper's accuracy-binned protocol
# --------------------------------------------------------------------------------------------------


def _n_bins(width: float) -> int:
    n = int(round(1.0 / width)) if width > 0 else 0
    if n < 1 or abs(n * width - 1.0) > 1e-9:
        raise ValueError(f"width must divide 1 into a whole number of bins, got {width}")
    return n


def _bin_index(acc: float, width: float, n_bins: int) -> int:
    if not (0.0 <= acc <= 1.0) or not math.isfinite(acc):
        raise ValueError(f"accuracy must lie in [0, 1], got {acc}")
    return min(int(math.floor(acc / width + _BIN_EPS)), n_bins - 1)


def accuracy_bins(per_class_accuracy: dict[str, float], width: float = 0.1) -> dict[int, list[str]]:
    """Group classes by the model's per-class accuracy.

    Bin b (0 <= b < 1 / width) holds the classes with accuracy in [b * width, (b + 1) * width);
    accuracy 1.0 goes in the last bin, which is therefore closed: [0.9, 1.0] for width 0.1.
    Edges are compared with a 1e-9 slack so that e.g. 0.7 lands in bin 7 despite 0.7 / 0.1 < 7 in
    floating point. Only populated bins are returned, keys ascending, names sorted within a bin.
    """
    n_bins = _n_bins(width)
    bins: dict[int, list[str]] = defaultdict(list)
    for name, acc in per_class_accuracy.items():
        bins[_bin_index(float(acc), width, n_bins)].append(name)
    return {b: sorted(bins[b]) for b in sorted(bins)}


def _mean_level(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area of y over x divided by the x-span; a single point is its own level."""
    if len(x) == 1:
        return float(y[0])
    area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)
    return area / float(x[-1] - x[0])


def binned_protocol(
    per_image: list[dict], per_class_accuracy: dict[str, float], width: float = 0.1
) -> dict:
    """The paper's deletion/insertion protocol (section 4.1): bin by class accuracy, keep correct images.

    per_image          : rows ``{"class": name, "correct": bool, "insertion": auc, "deletion": auc}``,
                         one per test image (the AUCs of its insertion / deletion curves).
    per_class_accuracy : the model's accuracy for each class on this test set, in [0, 1].
    width              : bin width (0.1 = the paper's 10% bins), see ``accuracy_bins``.

    Rows with ``correct`` false are dropped. Each image goes to its class's bin. For every bin with at
    least one kept image the result holds (means over the bin's images, not over its classes)::

        {"bin": b, "accuracy": (b + 0.5) * width (the bin centre), "lo": b * width, "hi": (b + 1) * width,
         "n": images, "classes": sorted class names with kept images,
         "insertion": mean, "deletion": mean, "overall": insertion - deletion}

    ``auc`` is the area under each metric-versus-accuracy polyline (Table 2): the trapezoid rule over
    the populated bins' centre accuracies (x) of the per-bin means (y), divided by the x-span between
    the first and last populated centres. That makes it a mean level on the metric's own scale (in
    [0, 1] for probability AUCs), comparable between methods and between runs whose populated bins
    differ. With one populated bin it is that bin's mean. ``overall``'s area equals insertion's minus
    deletion's (the trapezoid rule is linear).

    Returns ``{"bins": [...ascending by bin...], "auc": {"insertion", "deletion", "overall"},
    "n_images": kept images, "n_dropped": incorrect rows dropped}``.
    """
    n_bins = _n_bins(width)
    groups: dict[int, list[dict]] = defaultdict(list)
    n_dropped = 0
    for row in per_image:
        name = row["class"]
        if name not in per_class_accuracy:
            raise ValueError(f"class {name!r} of a per-image row has no entry in per_class_accuracy")
        if not bool(row["correct"]):
            n_dropped += 1
            continue
        groups[_bin_index(float(per_class_accuracy[name]), width, n_bins)].append(row)
    if not groups:
        raise ValueError("binned_protocol: no correctly predicted images to evaluate")

    bins = []
    for b in sorted(groups):
        rows = groups[b]
        ins = float(np.mean([float(r["insertion"]) for r in rows]))
        dele = float(np.mean([float(r["deletion"]) for r in rows]))
        bins.append(
            {
                "bin": b,
                "accuracy": (b + 0.5) * width,
                "lo": b * width,
                "hi": (b + 1) * width,
                "n": len(rows),
                "classes": sorted({r["class"] for r in rows}),
                "insertion": ins,
                "deletion": dele,
                "overall": ins - dele,
            }
        )
    xs = np.array([r["accuracy"] for r in bins], dtype=np.float64)  # [B] bin centres
    areas = {m: _mean_level(xs, np.array([r[m] for r in bins], dtype=np.float64)) for m in METRICS}
    return {
        "bins": bins,
        "auc": areas,
        "n_images": int(sum(r["n"] for r in bins)),
        "n_dropped": n_dropped,
    }


def plot_binned(results_by_method: dict[str, dict], path) -> None:
    """Figure-4 style plot: insertion, deletion and overall versus model accuracy, one line per method.

    results_by_method : {method name: result of ``binned_protocol``}.
    path              : PNG to write; written to a temporary name in the same folder, then renamed
                        with ``os.replace`` so readers never see a partial file.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch); matplotlib is
    imported here so the rest of the module does not need it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results_by_method:
        raise ValueError("plot_binned: no methods to plot")
    path = Path(path)
    fig = Figure(figsize=(13, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    titles = {"insertion": "Insertion (higher is better)", "deletion": "Deletion (lower is better)",
              "overall": "Overall = insertion - deletion"}
    for ax, metric in zip(axes, METRICS):
        for i, (method, res) in enumerate(results_by_method.items()):
            xs = [100.0 * r["accuracy"] for r in res["bins"]]
            ys = [r[metric] for r in res["bins"]]
            label = f"{method} ({res['auc'][metric]:.3f})"
            # matplotlib cycles 10 colours: lines 11-20 get a dashed style and square markers.
            style = {"marker": "o"} if i < 10 else {"marker": "s", "linestyle": "--"}
            ax.plot(xs, ys, label=label, **style)
        ax.set_title(titles[metric])
        ax.set_xlabel("model accuracy of the class subset (%)")
        ax.set_xlim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("AUC")
    fig.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_resamples, n] int64 indices drawn uniformly with replacement from range(n), seeded.

    The same (n, n_resamples, seed) gives the same matrix, so statistics of several methods computed on
    the same images are resampled in pairs (the same images in each resample)."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_resamples >= 1, got n={n}, n_resamples={n_resamples}")
    return np.random.default_rng([seed, n]).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(statistic: Callable[[np.ndarray], "float | dict[str, float]"], n: int, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of ``statistic`` over n items (images).

    statistic : maps an int array of item indices [n] (with repeats) to a number, or to a dict of numbers
                (several statistics of the same resample, e.g. insertion, deletion and overall: they are
                then resampled together). The point estimate is ``statistic(arange(n))``. It may return NaN
                where it is undefined for a resample (e.g. no correctly predicted image drawn); such
                resamples are left out and counted.
    Resamples come from ``bootstrap_indices(n, n_resamples, seed)``.

    Returns ``{"estimate", "lo", "hi", "level", "n", "n_resamples", "n_valid", "seed"}``, or a dict of
    those per key for a dict statistic; lo / hi are the (1 - level) / 2 and (1 + level) / 2 quantiles
    (numpy's linear interpolation) of the valid resampled values; NaN when no resample is valid.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    point = statistic(np.arange(n))
    keyed = isinstance(point, dict)
    keys = list(point) if keyed else [None]
    draws = [statistic(idx) for idx in bootstrap_indices(n, n_resamples, seed)]
    out = {}
    for k in keys:
        vals = np.array([float(d[k] if keyed else d) for d in draws], dtype=np.float64)  # [R]
        valid = vals[np.isfinite(vals)]
        if valid.size:
            lo, hi = (float(v) for v in np.quantile(valid, [(1.0 - level) / 2.0, (1.0 + level) / 2.0]))
        else:
            lo = hi = math.nan
        out[k] = {"estimate": float(point[k] if keyed else point), "lo": lo, "hi": hi, "level": level,
                  "n": int(n), "n_resamples": int(n_resamples), "n_valid": int(valid.size), "seed": int(seed)}
    return out if keyed else out[None]
