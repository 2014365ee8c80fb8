"""The CAM baselines' pipeline on synthetic arrays: each hook's formula by hand, the perturbation methods'
chunking and shortcuts, gradient-free methods without gradients, both array back ends. No graphs, no torch
(the parity with pytorch-grad-cam and the eager reference is tests/export/test_baselines_parity.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.backend import get_backend
from runtime.config import DecomCamConfig
from runtime.decomcam import build_masks
from runtime.numerics import minmax
from runtime.methods import Method, MethodContext, MethodOutput, get_method, list_methods
from runtime.methods.base_cam import BaseCam, align_corners_matrix, upsample
from runtime.methods.gradcampp import GradCamPlusPlus
from runtime.methods.scorecam import ScoreCam

CAMS = [m for m in list_methods() if isinstance(get_method(m), BaseCam)]
B, C, H, S, L = 2, 12, 3, 24, 4
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


class Spy:
    """A fake graph: records the batch of every call; logits are a fixed linear map of the input."""

    def __init__(self, shape, seed):
        self.w = np.random.default_rng(seed).normal(size=(int(np.prod(shape)), L)).astype(np.float32) / 50
        self.calls: list[int] = []

    def __call__(self, batch):
        self.calls.append(batch.shape[0])
        return np.asarray(batch, np.float32).reshape(batch.shape[0], -1) @ self.w


def make_ctx(backend="numpy", batch_size=5, seed=0, gradients=True) -> MethodContext:
    rng = np.random.default_rng(seed)
    act = np.maximum(rng.normal(size=(B, C, H, H)), 0).astype(np.float32)
    act[:, :3] = 0                                   # dead channels, as after layer4's ReLU
    act[1, 5] = 0
    grad = rng.normal(scale=1e-2, size=(B, C, H, H)).astype(np.float32)
    be = get_backend(backend)
    x = rng.normal(size=(B, 3, S, S)).astype(np.float32)
    classify, head = Spy((3, S, S), 1), Spy((C, H, H), 2)
    logits = classify(x)
    classify.calls.clear()
    return MethodContext(
        backend=be, x=be.asarray(x), text=None, target=np.array([1, 3]), logits=be.asarray(logits),
        activations=be.asarray(act), gradients=be.asarray(grad) if gradients else None,
        classify=classify, head=head, mean=MEAN, std=STD, logit_scale=100.0, config=DecomCamConfig(),
        batch_size=batch_size,
    )


def expected(ctx, w):
    """The pipeline by hand: ReLU(sum_c w_c A_c), bilinear upsampling, min-max."""
    be = ctx.backend
    a = be.to_host(ctx.activations).astype(np.float64)
    w = w[:, :, None, None] if w.ndim == 2 else w
    cam = np.maximum((w * a).sum(1), 0)
    return be.to_host(minmax(np, be.to_host(be.resize(cam.astype(np.float32), S))))


def host(ctx):
    be = ctx.backend
    return be.to_host(ctx.activations).astype(np.float64), be.to_host(ctx.gradients).astype(np.float64)


def test_registry_lists_every_baseline():
    assert set(CAMS) == {"gradcam", "gradcam++", "xgradcam", "layercam", "wgradcam", "scorecam", "scorecam++",
                         "ablationcam", "eigencam", "eigengradcam"}
    for name in CAMS:
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name and m.doc and type(m).__doc__


@pytest.mark.parametrize("backend", ["numpy", "matrix-numpy"])
@pytest.mark.parametrize("name", CAMS)
def test_output_contract(name, backend):
    ctx = make_ctx(backend)
    out = get_method(name)(ctx)
    assert isinstance(out, MethodOutput)
    sal = ctx.backend.to_host(out.saliency)
    assert sal.shape == (B, S, S) and sal.dtype == np.float32
    assert np.all(np.isfinite(sal)) and sal.min() >= 0 and sal.max() <= 1 + 1e-6
    assert out.components is None and out.weights is None and out.scores is None
    assert "weights" in ctx.timings and "upsample" in ctx.timings


def test_gradcam_family_formulas():
    ctx = make_ctx()
    a, g = host(ctx)
    gradcam = g.mean((2, 3))
    xgrad = np.where(a.sum((2, 3)) > 0, (g * a).sum((2, 3)) / np.maximum(a.sum((2, 3)), 1e-30), 0)
    alpha = (a * g).mean((2, 3))
    wgrad = (alpha - alpha.min(1, keepdims=True)) / (alpha.max(1, keepdims=True) - alpha.min(1, keepdims=True))
    g2 = g ** 2
    den = 2 * g2 + a.sum((2, 3), keepdims=True) * g2 * g
    pp = (np.where(den != 0, g2 / np.where(den != 0, den, 1), 0) * np.maximum(g, 0)).sum((2, 3))
    for name, w in [("gradcam", gradcam), ("xgradcam", xgrad), ("wgradcam", wgrad), ("gradcam++", pp),
                    ("layercam", np.maximum(g, 0))]:
        np.testing.assert_allclose(get_method(name)(make_ctx()).saliency, expected(ctx, w), atol=1e-5, err_msg=name)


def test_gradcampp_eps_option_changes_only_the_denominator():
    ctx = make_ctx()
    a, g = host(ctx)
    g2 = g ** 2
    w = (g2 / (2 * g2 + a.sum((2, 3), keepdims=True) * g2 * g + 1e-6) * np.maximum(g, 0)).sum((2, 3))
    np.testing.assert_allclose(GradCamPlusPlus(eps=1e-6)(make_ctx()).saliency, expected(ctx, w), atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "matrix-numpy"])
def test_scorecam_chunks_and_skips_dead_channels(backend):
    ctx = make_ctx(backend, batch_size=4)
    out = get_method("scorecam")(ctx)
    kept = [C - 3, C - 4]                                                # image 1 also lost channel 5
    assert ctx.classify.calls == [4, 4, 1, 4, 4]                         # ceil(9/4) + ceil(8/4) calls, <= 4 each
    assert out.forwards == math.ceil(sum(kept) / B)
    assert {"masks", "classify"} <= set(ctx.timings)
    # by hand, every channel scored (no skipping): the same map, since dead channels only rescale the softmax
    a, _ = host(ctx)
    be = ctx.backend
    x = be.to_host(ctx.x)
    w = np.zeros((B, C))
    for b in range(B):
        masks = minmax(np, be.to_host(be.resize(a[b].astype(np.float32), S)))
        y = ctx.classify(x[b][None] * masks[:, None])[:, ctx.target[b]].astype(np.float64)
        w[b] = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
    np.testing.assert_allclose(be.to_host(out.saliency), expected(ctx, w), atol=1e-5)


def test_scorecampp_keeps_positive_channels_and_blur_blends():
    ctx = make_ctx(batch_size=3)
    a, g = host(ctx)
    keep = np.maximum(g * a, 0).max((2, 3)) > 0
    out = get_method("scorecam++")(ctx)
    assert sum(ctx.classify.calls) == keep.sum() and max(ctx.classify.calls) <= 3
    be = ctx.backend
    w = np.zeros((B, C))
    for b in range(B):
        idx = np.flatnonzero(keep[b])
        masks = minmax(np, be.resize(a[b, idx].astype(np.float32), S))
        size = ctx.x.shape[-1]
        masked, blurred = build_masks(be, ctx.x[b:b + 1], masks[None], MEAN, STD, ctx.config.sigma(size),
                                      ctx.config.radius(size))
        y = ctx.classify(masked[0])[:, ctx.target[b]] - ctx.classify(blurred)[0, ctx.target[b]]
        w[b, idx] = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
    np.testing.assert_allclose(out.saliency, expected(ctx, w), atol=1e-5)


def test_ablationcam_relative_drop_through_the_head():
    ctx = make_ctx(batch_size=5)
    out = get_method("ablationcam")(ctx)
    assert ctx.classify.calls == [] and max(ctx.head.calls) <= 5
    a, _ = host(ctx)
    y = np.asarray(ctx.logits)[np.arange(B), ctx.target].astype(np.float64)
    w = np.zeros((B, C))
    for b in range(B):
        for c in range(C):
            abl = a[b].copy()
            abl[c] = 0
            w[b, c] = (y[b] - ctx.head(abl[None].astype(np.float32))[0, ctx.target[b]]) / y[b]
    np.testing.assert_allclose(out.saliency, expected(ctx, w), atol=1e-5)
    assert out.forwards == math.ceil((C - 3 + C - 4) / B)


@pytest.mark.parametrize("name", ["eigencam", "eigengradcam"])
def test_eigen_methods_first_component_with_fixed_sign(name):
    ctx = make_ctx()
    a, g = host(ctx)
    m = a if name == "eigencam" else a * g
    cams = []
    for b in range(B):
        x = m[b].reshape(C, -1).T
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc)
        p = xc @ vt[0]
        cams.append(p * np.sign(p @ x.sum(1)))                          # oriented to the channel sum
    cam = np.maximum(np.stack(cams).reshape(B, H, H), 0)
    want = minmax(np, ctx.backend.resize(cam.astype(np.float32), S))
    np.testing.assert_allclose(get_method(name)(ctx).saliency, want, atol=1e-5)


def test_gradient_free_methods_run_without_gradients():
    free = [m for m in CAMS if not get_method(m).needs_gradients]
    assert free == ["scorecam", "ablationcam", "eigencam"]
    assert [m for m in CAMS if get_method(m).needs_head] == ["ablationcam"]
    for name in free:
        out = get_method(name)(make_ctx(gradients=False))
        assert out.saliency.shape == (B, S, S)


def test_degenerate_inputs_give_zeros_not_nan():
    ctx = make_ctx()
    ctx.gradients = ctx.gradients * 0
    for name in ("gradcam", "gradcam++", "xgradcam", "layercam", "wgradcam", "eigengradcam"):
        sal = get_method(name)(ctx).saliency
        assert np.all(np.isfinite(sal)) and np.all(sal == 0), name
    zero = make_ctx()
    zero.activations = zero.activations * 0
    for name in ("scorecam", "ablationcam", "eigencam"):
        out = get_method(name)(zero)
        assert np.all(out.saliency == 0) and out.forwards == 0, name


def test_align_corners_upsampling():
    r = align_corners_matrix(4, 7)
    np.testing.assert_allclose(r.sum(1), 1)
    for i in range(7):  # output i samples input position i * 3 / 6, linearly
        np.testing.assert_allclose(r[i] @ np.arange(4.0), i * 3 / 6)
    maps = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    up = upsample(get_backend("numpy"), maps, 7, "align_corners")
    np.testing.assert_allclose(up[:, [0, -1]][:, :, [0, -1]], maps[:, [0, -1]][:, :, [0, -1]], atol=1e-6)
    with pytest.raises(ValueError, match="unknown upsampling 'nearest'; valid: bilinear, align_corners, bicubic"):
        upsample(get_backend("numpy"), maps, 7, "nearest")
    for bad in ("nearest", "bicubic"):   # Score-CAM's masks: bilinear or align_corners only
        with pytest.raises(ValueError, match="unknown upsampling"):
            ScoreCam(upsample=bad)


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'gradcam\+'; valid methods: .*gradcam\+\+.*scorecam"):
        get_method("gradcam+")
