"""`decomcam-authors` against an independent port of the authors' 2023 library.

The port follows CapricornGuang/DecomCAM at commit 627270070b3d611f896b63bf70e7994945822147
(`src/cam/grad_cam.py`, `src/cam/decom_cam.py`, `src/cam/base_cam.py`, `src/utils/viz_tools.py`), written
from that code's structure and not from the runtime:

- Grad-CAM step: gradient of the cosine similarity between the image embedding and the target's text
  embedding w.r.t. the layer4 activations (a forward hook, torch autograd); alpha = grad.mean over positions.
- Channels sorted by alpha (descending), the top K kept; X = (act * alpha)[top K], one row per position.
- scikit-learn's PCA as it was before 1.5: centre X, full SVD, scores U Sigma, `svd_flip` on U
  (the largest-magnitude entry of each score vector positive).
- Each score vector: reshape to h x w, clamp at 0, torch bicubic upsampling to the input size (the RAW map);
  the mask is `normalize` (x - min, then / max).
- Blur: scipy.ndimage.gaussian_filter(sigma, truncate=4) on each channel of the [0, 1] image; masked =
  max(image * mask, blur * (1 - mask)); gains sim(masked) - sim(blur) with cosine similarities.
- `accumulate_attn_map`: weights w * softmax(w); saliency = ReLU(sum_i weight_i * RAW map_i).

What the port leaves out of the original: the uint8 round trip and the re-preprocessing of every masked
image (the port blends the model-input image directly), and scipy's border mode is its default 'reflect'
where the runtime blurs with reflect-101 (a difference within 4 sigma of the border only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from runtime.config import DecomCamConfig
from runtime.explainer import Explainer
from runtime.images import preprocess
from tests.conftest import make_images

TOP_K = 64      # RN-tiny's layer4 has fewer than the authors' 100 channels
N_COMPONENTS = 5


def svd_flip_u(u: np.ndarray, vt: np.ndarray):
    """scikit-learn < 1.5 `svd_flip(u, vt, u_based_decision=True)`: columns of u, largest |entry| positive."""
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    return u * signs, vt * signs[:, None]


def old_pca_fit_transform(x: np.ndarray, n_components: int) -> np.ndarray:
    """x [n_samples, n_features] -> scores [n_samples, n_components] (PCA(svd_solver='full'), sklearn < 1.5)."""
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    u, vt = svd_flip_u(u, vt)
    return u[:, :n_components] * s[:n_components]


def normalize(x: np.ndarray) -> np.ndarray:
    """viz_tools.normalize."""
    x = x - x.min()
    if x.max() > 0:
        x = x / x.max()
    return x


def gaussian_blur_image(image_np: np.ndarray, sigma: float) -> np.ndarray:
    """BaseCAM.gaussian_blur_image: [H, W, 3] per-channel scipy Gaussian, truncate 4."""
    out = np.zeros(image_np.shape)
    for i in range(3):
        out[:, :, i] = gaussian_filter(image_np[:, :, i], sigma, truncate=4)
    return out


def authors_port(clip_model, x: torch.Tensor, text: torch.Tensor, mean, std, k: int, n_components: int,
                 sigma: float):
    """One image x [1, 3, S, S] (normalised), text [D] unit embedding of the target -> (saliency [S, S],
    masks [p, S, S])."""
    store = {}
    handle = clip_model.visual.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    try:
        with torch.enable_grad():
            emb = clip_model.encode_image(x)
            cos = F.cosine_similarity(emb.float(), text[None].float())
            act = store["act"]
            (grad,) = torch.autograd.grad(cos.sum(), act)
    finally:
        handle.remove()
    act, grad = act.detach().double(), grad.detach().double()
    alpha = grad.mean(dim=(2, 3), keepdim=True)                       # [1, C, 1, 1]
    order = torch.sort(alpha.flatten(), descending=True).indices[:k]
    xk = (act[:, order] * alpha[:, order]).flatten(start_dim=2).squeeze(0).T.numpy()   # [h*w, K]
    y = old_pca_fit_transform(xk, n_components)                        # [h*w, p]

    h, w = act.shape[2:]
    size = x.shape[-1]
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    image_np = (x[0].double().numpy() * s + m).transpose(1, 2, 0)      # [S, S, 3] in [0, 1]
    image_blur = gaussian_blur_image(image_np, sigma)

    def sim(img_np):
        t = torch.from_numpy(((img_np.transpose(2, 0, 1) - m) / s)[None]).float()
        with torch.no_grad():
            return F.cosine_similarity(clip_model.encode_image(t), text[None]).item()

    sim0 = sim(image_blur)
    raw_maps, masks, gains = [], [], []
    for i in range(n_components):
        a = torch.from_numpy(y[:, i].reshape(h, w))[None, None]
        a = torch.clamp(a, min=0)
        a = F.interpolate(a, (size, size), mode="bicubic", align_corners=False).squeeze().numpy()
        raw_maps.append(a)
        mask = normalize(a)
        masks.append(mask)
        masked = np.maximum(image_np * mask[:, :, None], image_blur * (1 - mask[:, :, None]))
        gains.append(sim(masked) - sim0)
    wts = np.asarray(gains)
    wts = wts * np.exp(wts) / np.sum(np.exp(wts))                      # accumulate_attn_map
    pcam = sum(wt * a for wt, a in zip(wts, raw_maps))
    return np.maximum(pcam, 0), np.stack(masks)


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def explainer(tiny_artifacts):
    return Explainer.from_artifacts(tiny_artifacts.out_dir)


def test_authors_variant_matches_port_of_2023_code(tiny, explainer):
    images = make_images(6, seed=23)
    cfg = DecomCamConfig(authors_top_k=TOP_K, top_p=N_COMPONENTS)
    exps = explainer.explain(images, method="decomcam-authors", config=cfg)
    text = torch.from_numpy(explainer.classes.embeddings)
    size = tiny.image_size
    for im, e in zip(images, exps):
        x = torch.from_numpy(preprocess(im, size, tiny.mean, tiny.std)[0][None])
        sal, masks = authors_port(tiny.model, x, text[e.target], tiny.mean, tiny.std, TOP_K, N_COMPONENTS,
                                  cfg.sigma(size))
        assert np.ptp(sal) > 0
        assert pearson(e.saliency, sal) >= 0.99
        for c_rt, c_port in zip(e.components, masks):
            assert np.ptp(c_port) > 0
            cos = float((c_rt * c_port).sum() / (np.linalg.norm(c_rt) * np.linalg.norm(c_port)))
            assert abs(cos) >= 0.999


def test_authors_decomposition_equals_old_sklearn_pca_scores():
    """The runtime's authors' decomposition: the clamped old-sklearn PCA scores of (alpha * A)[top K]."""
    from runtime.backend import NumpyBackend
    from runtime.decomcam import decompose_authors

    rng = np.random.default_rng(3)
    b, c, h, w = 2, 150, 7, 7
    act = rng.random((b, c, h, w)).astype(np.float32)
    grad = rng.standard_normal((b, c, h, w)).astype(np.float32)
    for k in (30, 100):                       # K < h*w (K x K covariance) and K > h*w (h*w x h*w Gram)
        dec = decompose_authors(NumpyBackend(), act, grad, 6, k)
        for i in range(b):
            alpha = grad[i].astype(np.float64).mean(axis=(1, 2))
            order = np.argsort(-alpha, kind="stable")[:k]
            xk = (act[i].astype(np.float64)[order] * alpha[order, None, None]).reshape(k, -1).T
            y = old_pca_fit_transform(xk, 6)                  # [h*w, 6]
            np.testing.assert_allclose(dec.feature_maps[i], np.clip(y.T, 0, None), atol=1e-9 * np.abs(y).max())
