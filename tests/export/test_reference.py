"""The eager Decom-CAM reference: the properties the paper proves and the decisions it leaves open."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.graphs import autograd_reference
from export.reference import decompose_authors, decompose_paper, decomcam_reference, gaussian_blur, orient
from runtime.config import DecomCamConfig
from runtime.images import preprocess
from tests.conftest import make_images


@pytest.fixture(scope="module")
def batch(tiny):
    imgs = make_images(3, seed=5)
    x = torch.from_numpy(np.stack([preprocess(im, tiny.image_size, tiny.mean, tiny.std)[0] for im in imgs]))
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1)
    return x, text


@pytest.fixture(scope="module")
def result(tiny, batch):
    x, text = batch
    return decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std)


def test_components_orthogonal(result):
    # F F^T is diagonal (eq. 7), with the singular values squared on the diagonal.
    for b in range(result.feature_maps.shape[0]):
        f = result.feature_maps[b].reshape(result.feature_maps.shape[1], -1).astype(np.float64)
        gram = f @ f.T
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() <= 1e-4 * np.abs(np.diag(gram)).max()
        live = np.abs(f).sum(1) > 0  # null components (sigma below the noise floor) are zero maps
        assert live[:2].all()
        np.testing.assert_allclose(np.diag(gram)[live], result.singular_values[b][live].astype(np.float64) ** 2,
                                   rtol=1e-4)


def test_explained_variance_descending_and_bounded(result):
    evr = result.explained_variance
    assert np.all(np.diff(evr, axis=1) <= 1e-7)
    assert np.all(evr >= 0)
    assert np.all(evr.sum(1) <= 1 + 1e-6)


def test_saliency_is_convex_combination(result):
    np.testing.assert_allclose(result.weights.sum(1), 1.0, rtol=1e-5)
    assert result.saliency.min() >= -1e-6 and result.saliency.max() <= 1 + 1e-6
    recon = np.einsum("bp,bpij->bij", result.weights, result.components)
    np.testing.assert_allclose(result.saliency, recon, atol=1e-5)


def test_sign_flip_of_svd_factors_leaves_output_unchanged(tiny, batch):
    x, text = batch
    _, act, grad = autograd_reference(tiny.model, x[:1], text, torch.tensor([-1]))
    f1, sv1, _, _ = decompose_paper(act[0], grad[0], 5)
    # Flip the signs of U's columns (and V's): the oriented maps must not change.
    s = (grad[0].double() * act[0].double()).reshape(act.shape[1], -1)
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)
    signs = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = (u[:, :5] * signs).T @ s
    unflipped = orient(u[:, :5].T @ s, s.sum(0))
    np.testing.assert_allclose(orient(flipped, s.sum(0)).numpy(), unflipped.numpy(), atol=1e-10)
    np.testing.assert_allclose(orient(-unflipped, s.sum(0)).numpy(), unflipped.numpy(), atol=1e-12)
    live = f1.abs().sum(1) > 0
    assert live[0]
    np.testing.assert_allclose(f1[live].numpy(), unflipped[live].numpy(), atol=1e-10)


def test_sign_convention_agrees_with_channel_sum(tiny, batch):
    x, text = batch
    _, act, grad = autograd_reference(tiny.model, x[:1], text, torch.tensor([-1]))
    f, _, _, _ = decompose_paper(act[0], grad[0], 5)
    g = (grad[0].double() * act[0].double()).reshape(act.shape[1], -1).sum(0)
    assert torch.all(f @ g >= 0)


def test_zero_gradient_gives_no_nan(tiny, batch):
    x, text = batch
    logits, act, grad = autograd_reference(tiny.model, x, text, torch.tensor([-1, -1, -1]))
    zero = (logits, act, torch.zeros_like(grad))
    r = decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std, grads=zero)
    for name in ("saliency", "components", "weights", "explained_variance"):
        assert np.all(np.isfinite(getattr(r, name))), name
    assert np.all(r.saliency == 0)
    assert np.all(r.weights == 0)


def test_constant_map_gives_no_nan(tiny, batch):
    # A rank-1 S* whose spatial pattern is constant: every component is a constant map.
    x, text = batch
    logits, act, grad = autograd_reference(tiny.model, x[:1], text, torch.tensor([-1]))
    const_act = torch.ones_like(act)
    const_grad = torch.ones_like(grad) * torch.linspace(0.5, 1.5, act.shape[1]).view(1, -1, 1, 1)
    r = decomcam_reference(tiny.model, x[:1], text, tiny.mean, tiny.std, grads=(logits, const_act, const_grad))
    assert np.all(np.isfinite(r.saliency)) and np.all(np.isfinite(r.components))
    assert np.all(r.components == 0)  # s(constant) = 0


def test_p_larger_than_rank(tiny, batch):
    x, text = batch
    n = (tiny.image_size // 32) ** 2  # h*w: the rank of S* is at most this
    r = decomcam_reference(tiny.model, x[:1], text, tiny.mean, tiny.std, config=DecomCamConfig(top_p=n + 20))
    assert r.components.shape[1] == n
    assert np.all(np.isfinite(r.saliency))
    # a rank-2 S*: only 2 components are live, the rest are null with weight 0
    logits, act, grad = autograd_reference(tiny.model, x[:1], text, torch.tensor([-1]))
    a2 = torch.zeros_like(act)
    a2[0, 0] = torch.rand(act.shape[2:], generator=torch.Generator().manual_seed(1))
    a2[0, 1] = torch.rand(act.shape[2:], generator=torch.Generator().manual_seed(2))
    r2 = decomcam_reference(tiny.model, x[:1], text, tiny.mean, tiny.std, config=DecomCamConfig(top_p=6),
                            grads=(logits, a2, torch.ones_like(grad)))
    assert np.count_nonzero(r2.weights[0]) == 2
    np.testing.assert_allclose(r2.weights[0].sum(), 1.0, rtol=1e-6)
    assert np.all(r2.components[0, 2:] == 0)


def test_batch_equals_single_images(tiny, batch, result):
    # Equal up to float32 rounding: torch picks conv algorithms by batch size (logits move ~1e-5).
    x, text = batch
    for i in range(x.shape[0]):
        single = decomcam_reference(tiny.model, x[i:i + 1], text, tiny.mean, tiny.std)
        np.testing.assert_allclose(single.saliency[0], result.saliency[i], atol=1e-4)
        np.testing.assert_allclose(single.weights[0], result.weights[i], atol=1e-4)
        assert single.target[0] == result.target[i]


def test_deterministic(tiny, batch, result):
    x, text = batch
    again = decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std)
    np.testing.assert_array_equal(again.saliency, result.saliency)
    np.testing.assert_array_equal(again.weights, result.weights)


def test_given_target_is_explained(tiny, batch):
    x, text = batch
    r = decomcam_reference(tiny.model, x[:2], text, tiny.mean, tiny.std, target=torch.tensor([3, 4]))
    assert list(r.target) == [3, 4]


def test_blur_matches_opencv():
    import cv2

    img = np.random.default_rng(0).random((1, 3, 64, 80)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(img), 3.0, 12).numpy()[0]
    ref = cv2.GaussianBlur(img[0].transpose(1, 2, 0), (25, 25), 3.0, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(ours, ref.transpose(2, 0, 1), atol=1e-5)


def test_authors_variant(tiny, batch):
    x, text = batch
    r = decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std, config=DecomCamConfig(authors_top_k=64),
                           method="decomcam-authors")
    assert np.all(r.components >= 0) and np.all(np.isfinite(r.saliency))
    assert np.all(np.diff(r.explained_variance, axis=1) <= 1e-7)
    _, act, grad = autograd_reference(tiny.model, x[:1], text, torch.tensor([-1]))
    comps, _, _, _ = decompose_authors(act[0], grad[0], 5, 64)
    assert torch.all(comps >= 0)


@pytest.mark.parametrize("kw, match", [
    ({"top_p": 0}, "top_p must be >= 1"),
    ({"blur_sigma": -1.0}, "blur_sigma must be a finite number > 0"),
    ({"blur_sigma": float("nan")}, "blur_sigma must be a finite number > 0"),
    ({"ig_steps": 0}, "ig_steps must be >= 1"),
    ({"authors_top_k": 0}, "authors_top_k must be >= 1"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DecomCamConfig(**kw)


def test_default_blur_scales_with_input():
    c = DecomCamConfig()
    assert c.sigma(224) == 10.0 and c.radius(224) == 40
    assert c.sigma(448) == 20.0
