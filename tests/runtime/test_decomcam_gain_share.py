"""The "gain-share" integration (runtime/config.py): unit test against an independent numpy computation,
and the runtime method `decomcam-gain-share` against the eager reference (export/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.reference import decomcam_reference
from runtime.backend import NumpyBackend
from runtime.config import DecomCamConfig
from runtime.decomcam import decompose, integrate_share
from runtime.explainer import Explainer
from runtime.images import preprocess
from tests.conftest import make_images


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] 1-D linear interpolation with half-pixel centres and edge clamping
    (torch align_corners=False), written out directly."""
    r = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        f = src - i0
        r[i, i0] += 1 - f
        r[i, i1] += f
    return r


def gain_share_numpy(act, grad, y_masked, y_blur, p, size):
    """One image, from scratch: full SVD of S*, F = U_p^T S*, sign by <F_i, g>, a_i = <F_i, g> / sigma_i^2,
    r_i = relu(C_i) / mean relu(C), M = sum r_i a_i F_i, s(Up(relu(M)))."""
    c, h, w = act.shape
    s = (grad.astype(np.float64) * act).reshape(c, -1)
    u, sv, _ = np.linalg.svd(s, full_matrices=False)
    f = u[:, :p].T @ s                                   # [p, n]
    g = s.sum(0)
    f *= np.where(f @ g >= 0, 1.0, -1.0)[:, None]
    a = (f @ g) / sv[:p] ** 2
    gains = y_masked.astype(np.float64) - y_blur
    pos = np.maximum(gains, 0)
    r = pos / pos.mean() if pos.mean() > 0 else np.ones(p)
    cam = np.maximum(((r * a) @ f).reshape(h, w), 0)
    up = bilinear_matrix(h, size) @ cam @ bilinear_matrix(w, size).T
    up = (up - up.min()) / max(up.max() - up.min(), 1e-7)
    return up, r * a / (r * a).sum()


@pytest.mark.parametrize("gains", [
    [3.0, -1.0, 0.5, 2.0, 0.0],      # mixed signs: negative gains drop out
    [-1.0, -2.0, -0.5, -3.0, -1.0],  # no positive gain: the rank-p share map (r = 1)
])
def test_gain_share_matches_numpy(gains):
    rng = np.random.default_rng(5)
    b, c, h, w, p, size = 2, 40, 7, 7, 5, 56
    act = rng.random((b, c, h, w)).astype(np.float32)
    grad = (rng.standard_normal((b, c, h, w)) * 0.1 + 0.02).astype(np.float32)
    be = NumpyBackend()
    dec = decompose(be, act, grad, DecomCamConfig(top_p=p))
    y_blur = np.array([1.5, -0.5], np.float32)
    y_masked = (np.array(gains)[None] * np.array([[1.0], [0.7]]) + y_blur[:, None]).astype(np.float32)
    sal, wts, scores = integrate_share(be, y_masked, y_blur, dec, h, w, size)
    for i in range(b):
        ref, ref_w = gain_share_numpy(act[i], grad[i], y_masked[i], float(y_blur[i]), p, size)
        assert np.abs(sal[i] - ref).max() <= 1e-5
        np.testing.assert_allclose(wts[i], ref_w, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(scores[i], y_masked[i].astype(np.float64) - y_blur[i], rtol=0, atol=0)


def test_full_rank_equal_gains_give_the_channel_sum_map():
    """With every component kept and equal gains, sum_i a_i F_i is the channel sum of S* exactly."""
    rng = np.random.default_rng(6)
    c, h, w = 12, 3, 3                                   # rank <= min(C, hw) = 9
    act = rng.random((1, c, h, w)).astype(np.float32)
    grad = rng.standard_normal((1, c, h, w)).astype(np.float32)
    be = NumpyBackend()
    dec = decompose(be, act, grad, DecomCamConfig(top_p=9))
    g = (grad[0].astype(np.float64) * act[0]).sum(0)     # [h, w]
    np.testing.assert_allclose(np.einsum("p,pn->n", dec.share[0], dec.feature_maps[0]).reshape(h, w), g,
                               atol=1e-9 * np.abs(g).max())
    y = np.ones((1, 9), np.float32)
    sal, _, _ = integrate_share(be, y, np.zeros(1, np.float32), dec, h, w, 12)
    up = bilinear_matrix(h, 12) @ np.maximum(g, 0) @ bilinear_matrix(w, 12).T
    np.testing.assert_allclose(sal[0], (up - up.min()) / (up.max() - up.min()), atol=1e-5)


def test_gain_share_needs_paper_variant():
    with pytest.raises(ValueError, match="needs variant 'paper'"):
        DecomCamConfig(variant="authors", integration="gain-share")
    with pytest.raises(ValueError, match="unknown Decom-CAM integration"):
        DecomCamConfig(integration="nope")


def test_runtime_gain_share_matches_eager_reference(tiny, tiny_artifacts):
    explainer = Explainer.from_artifacts(tiny_artifacts.out_dir)
    images = make_images(5, seed=17)
    cfg = DecomCamConfig(integration="gain-share")
    exps = explainer.explain(images, method="decomcam-gain-share", config=DecomCamConfig())
    x = torch.from_numpy(np.stack([preprocess(im, tiny.image_size, tiny.mean, tiny.std)[0] for im in images]))
    text = torch.from_numpy(explainer.classes.embeddings)
    ref = decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std, config=cfg)
    paper = explainer.explain(images, method="decomcam")
    for i, e in enumerate(exps):
        assert e.target == ref.target[i]
        assert np.ptp(ref.saliency[i]) > 0
        assert float(np.corrcoef(e.saliency.ravel(), ref.saliency[i].ravel())[0, 1]) >= 0.9999
        assert np.abs(e.saliency - ref.saliency[i]).max() <= 1e-3
        np.testing.assert_allclose(e.weights, ref.weights[i], atol=2e-3)
        np.testing.assert_allclose(e.scores, paper[i].scores, atol=1e-4)   # the same masked forwards
        np.testing.assert_allclose(e.scores, ref.scores[i], rtol=1e-3, atol=1e-3)
        # same decomposition and masks as the paper's integration; only the combination differs
        np.testing.assert_allclose(e.components, paper[i].components, atol=1e-6)
        assert not np.allclose(e.saliency, paper[i].saliency, atol=1e-3)
