"""Small array numerics shared by the explainer and the methods, over an array module `xp` (numpy or cupy):
min-max normalisation, softmax (restricted to a mask), and the zero padding that keeps a graph call at one
shape (EngineOptions.fixed_chunks)."""

from __future__ import annotations

from .config import NORM_EPS


def minmax(xp, maps):
    """Per-map min-max over the last two axes to [0, 1]; a constant map becomes 0 (never NaN)."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return (maps - lo) / xp.maximum(hi - lo, NORM_EPS)


def softmax(xp, z, keep=None):
    """Softmax over the last axis of z [..., K]; with `keep` (bool, z's shape) only over the kept entries,
    0 elsewhere, and all 0 for a row that keeps nothing."""
    if keep is not None:
        z = xp.where(keep, z, -xp.inf)
    zmax = z.max(axis=-1, keepdims=True)
    e = xp.exp(z - xp.where(xp.isfinite(zmax), zmax, 0.0))
    if keep is not None:
        e = xp.where(keep, e, 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    return e / xp.where(tot > 0, tot, 1.0)


def chunks(n: int, size: int):
    """(start, stop) of consecutive chunks of at most `size` rows covering range(n)."""
    size = max(int(size), 1)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def pad_rows(xp, arr, rows: int):
    """`arr` [k, ...] zero-padded along axis 0 to `rows` rows (unchanged when k >= rows)."""
    k = arr.shape[0]
    if k >= rows:
        return arr
    return xp.concatenate([arr, xp.zeros((rows - k,) + tuple(arr.shape[1:]), arr.dtype)])


def fixed_shape(xp, arr, size: int, total: int, fixed: bool):
    """One chunk of a graph call over `total` rows in chunks of `size`: with `fixed` (one input shape per
    graph), a short chunk of a call that needs more than one chunk is zero-padded to `size` rows; the
    caller drops the padded rows' outputs."""
    return pad_rows(xp, arr, size) if fixed and total > size else arr
