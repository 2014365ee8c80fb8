"""runtime/stages.py and runtime/numerics.py: stage times are exclusive (nested stages are counted once, in
the inner one) and the device is synchronised at each stage's end; min-max, masked softmax and the
fixed-shape padding against hand computations."""

from __future__ import annotations

import time

import numpy as np

from runtime.numerics import chunks, fixed_shape, minmax, pad_rows, softmax
from runtime.stages import Stages


class Clock:
    def __init__(self):
        self.syncs = 0

    def synchronize(self):
        self.syncs += 1


def test_nested_stages_are_exclusive_and_synchronised(monkeypatch):
    t = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: t[0])
    be = Clock()
    st = Stages(be)
    with st("weights"):
        t[0] += 1.0
        with st("masks"):
            t[0] += 2.0
        with st("classify"):
            t[0] += 4.0
        t[0] += 0.5
    with st("masks"):
        t[0] += 3.0
    assert st.times == {"weights": 1.5, "masks": 5.0, "classify": 4.0}
    assert sum(st.times.values()) == t[0] and be.syncs == 4


def test_numerics_against_hand_computations():
    m = np.array([[[0.0, 2.0], [4.0, 8.0]], [[3.0, 3.0], [3.0, 3.0]]])
    np.testing.assert_allclose(minmax(np, m), [[[0, 0.25], [0.5, 1]], [[0, 0], [0, 0]]])
    z = np.array([[1.0, 2.0, 3.0], [5.0, -1.0, 0.0]])
    keep = np.array([[True, False, True], [False, False, False]])
    e = np.exp([1.0, 3.0])
    np.testing.assert_allclose(softmax(np, z, keep), [[e[0] / e.sum(), 0, e[1] / e.sum()], [0, 0, 0]])
    np.testing.assert_allclose(softmax(np, z).sum(1), 1.0)
    assert chunks(7, 3) == [(0, 3), (3, 6), (6, 7)] and chunks(0, 3) == []
    a = np.ones((2, 3))
    assert pad_rows(np, a, 5).shape == (5, 3) and pad_rows(np, a, 5)[2:].sum() == 0
    assert fixed_shape(np, a, 4, 9, True).shape == (4, 3)      # a short chunk of a multi-chunk call
    assert fixed_shape(np, a, 4, 2, True).shape == (2, 3)      # one chunk: never padded
    assert fixed_shape(np, a, 4, 9, False).shape == (2, 3)
