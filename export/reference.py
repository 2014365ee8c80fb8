"""Eager PyTorch reference of Decom-CAM: the oracle every runtime parity check compares with.

Written independently of runtime/: gradients by torch autograd on the unmodified open_clip module, a full
SVD (torch.linalg.svd, float64) with the paper's projection F* = U_p^T S*, torch interpolation, a
conv2d Gaussian blur, and the eager CLIP model for the masked forwards. The open choices (sign, rank,
epsilon, blur) are docs/method.md's; `decomcam-ig` integrates the gradient of the unmodified head by torch
autograd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runtime.config import NORM_EPS, NULL_TOL, SIGN_TOL, DecomCamConfig

from .graphs import autograd_reference, head_logits


METHODS = ("decomcam", "decomcam-authors", "decomcam-ig")


@dataclass
class ReferenceResult:
    saliency: np.ndarray            # [B, S, S] float32
    components: np.ndarray          # [B, p, S, S] H_i, normalised upsampled feature maps
    feature_maps: np.ndarray        # [B, p, h, w] F_i, signed, before upsampling
    weights: np.ndarray             # [B, p] softmax weights (0 for null components)
    scores: np.ndarray              # [B, p] C_i (gains over the blurred image)
    explained_variance: np.ndarray  # [B, p] sigma_i^2 / sum sigma^2
    singular_values: np.ndarray     # [B, p]
    logits: np.ndarray              # [B, L]
    target: np.ndarray              # [B] int64


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(img: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """[N, 3, H, W] separable Gaussian blur with reflect (reflect-101) padding."""
    k = gaussian_kernel1d(sigma, radius).to(device=img.device, dtype=img.dtype)
    c = img.shape[1]
    x = F.pad(img, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] over the last two axes; constant maps become 0."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / torch.clamp(hi - lo, min=NORM_EPS)


def orient(fmaps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """fmaps [p, n] float64, g [n]: make <F_i, g> positive, else the largest-magnitude entry."""
    dots = fmaps @ g
    tiny = dots.abs() <= SIGN_TOL * fmaps.norm(dim=1) * g.norm()
    idx = fmaps.abs().argmax(dim=1)
    fallback = torch.sign(fmaps.gather(1, idx[:, None]).squeeze(1))
    s = torch.where(tiny, fallback, torch.sign(dots))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return fmaps * s[:, None]


def decompose_paper(act: torch.Tensor, grad: torch.Tensor, p: int):
    """One image: act, grad [C, h, w] -> F [p, h*w] (float64), sigma [p], explained variance [p], null [p]."""
    c = act.shape[0]
    s = (grad.double() * act.double()).reshape(c, -1)          # S* [C, n]
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)       # u [C, k], sv [k], vh [k, n]
    fm = u[:, :p].T @ s                                        # F* = U_p^T S*  [p, n]
    fm = orient(fm, s.sum(0))
    total = (sv ** 2).sum()
    evr = (sv[:p] ** 2) / total if total > 0 else torch.zeros(p, dtype=torch.float64, device=s.device)
    null = sv[:p] <= NULL_TOL * sv[0] if sv[0] > 0 else torch.ones(p, dtype=torch.bool, device=s.device)
    fm = torch.where(null[:, None], torch.zeros_like(fm), fm)
    return fm, sv[:p], evr, null


def orient_peak(fmaps: torch.Tensor) -> torch.Tensor:
    """fmaps [p, n]: make each row's largest-magnitude entry positive (scikit-learn < 1.5 `svd_flip` on the
    PCA scores, the sign of the authors' 2023 code)."""
    idx = fmaps.abs().argmax(dim=1)
    peak = fmaps.gather(1, idx[:, None]).squeeze(1)
    return fmaps * torch.where(peak < 0, -1.0, 1.0).to(fmaps.dtype)[:, None]


def decompose_authors(act: torch.Tensor, grad: torch.Tensor, p: int, top_k: int):
    """The authors' 2023 code: top-K channels by alpha = mean(dy/dA), PCA of alpha*A centred over positions
    (scores U Sigma, signed by scikit-learn < 1.5's svd_flip), components clamped at 0."""
    c = act.shape[0]
    alpha = grad.double().reshape(c, -1).mean(1)                   # [C]
    k = min(top_k, c)
    keep = torch.argsort(alpha, descending=True, stable=True)[:k]
    m = alpha[keep, None] * act.double().reshape(c, -1)[keep]       # [K, n]
    x = m.T - m.T.mean(0, keepdim=True)                             # [n, K] centred over positions
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    comps = (x @ vh[:p].T).T                                        # [p, n] projections onto the principal axes
    comps = orient_peak(comps)
    total = (sv ** 2).sum()
    evr = (sv[:p] ** 2) / total if total > 0 else torch.zeros(p, dtype=torch.float64, device=x.device)
    null = sv[:p] <= NULL_TOL * sv[0] if sv[0] > 0 else torch.ones(p, dtype=torch.bool, device=x.device)
    comps = torch.where(null[:, None], torch.zeros_like(comps), comps.clamp_min(0))
    return comps, sv[:p], evr, null


def path_gradient(clip_model, act: torch.Tensor, text: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
    """mean_k d y_target / d A at alpha_k A, alpha_k = (k + 1/2) / steps, by torch autograd through the
    unmodified head after the target layer -> [B, C, h, w] float64 (decomcam-ig's gradient)."""
    total = torch.zeros(act.shape, dtype=torch.float64, device=act.device)
    for k in range(steps):
        a = ((k + 0.5) / steps * act).detach().requires_grad_(True)
        with torch.enable_grad():
            y = head_logits(clip_model, a, text)
            (g,) = torch.autograd.grad(y.gather(1, target[:, None]).sum(), a)
        total += g.double()
    return total / steps


@torch.no_grad()
def eager_logits(clip_model, images: torch.Tensor, text: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits [N, L] of the eager model in batches (CLIP: scaled cosines against `text`; a fixed-class
    export.pooled.PooledModel: its own classifier, `text` ignored)."""
    out = []
    if hasattr(clip_model, "autograd"):
        for i in range(0, images.shape[0], batch_size):
            out.append(clip_model(images[i:i + batch_size]))
        return torch.cat(out)
    for i in range(0, images.shape[0], batch_size):
        feats = clip_model.encode_image(images[i:i + batch_size], normalize=True)
        out.append(clip_model.logit_scale.exp() * feats @ text.T)
    return torch.cat(out)


class _StageClock:
    """Fills `timings` (stage -> seconds) when given one; synchronises CUDA so GPU stages are measured."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings = timings
        self.cuda = device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.t
        self.t = now


@torch.no_grad()
def decomcam_reference(clip_model, image: torch.Tensor, text: torch.Tensor, mean, std,
                       target: torch.Tensor | None = None, config: DecomCamConfig = DecomCamConfig(),
                       batch_size: int = 32, grads=None, timings: dict | None = None,
                       method: str = "decomcam") -> ReferenceResult:
    """Eager Decom-CAM. image [B, 3, S, S] normalised, text [L, D] unit rows; target [B] or None for top-1.
    method: "decomcam" (the paper), "decomcam-authors" or "decomcam-ig".

    `grads` may pass precomputed (logits, activations, gradients) from `autograd_reference`. Works on any
    device (the result comes back as numpy). `timings`, when given, is filled with seconds per stage, under
    the runtime's stage names: explain, head_grad (decomcam-ig only), decompose, upsample, blur, blend,
    classify, integrate, postprocess (decomcam-ig has no blur, blend or classify)."""
    if method not in METHODS:
        raise ValueError(f"unknown reference method '{method}'; valid: {', '.join(METHODS)}")
    authors, ig = method == "decomcam-authors", method == "decomcam-ig"
    clip_model.eval()
    b, _, size, _ = image.shape
    dev = image.device
    clock = _StageClock(timings, dev)
    if grads is None:
        # target None: explain the top-1 class of the same forward (a negative target), as explain.onnx does
        want = torch.full((b,), -1, dtype=torch.long, device=dev) if target is None else \
            torch.as_tensor(target, dtype=torch.long, device=dev).reshape(b)
        grads = autograd_reference(clip_model, image, text, want)
    logits, act, grad = grads
    top1 = logits.argmax(1)
    target = top1 if target is None else torch.as_tensor(target, dtype=torch.long, device=dev).reshape(b)
    target = torch.where(target < 0, top1, target)                   # a negative target: the top-1 class
    clock.lap("explain")
    c, h, w = act.shape[1:]
    p = config.effective_p(c, h * w, authors=authors)
    if ig:                                                          # S_IG = A * the path-averaged gradient
        grad = path_gradient(clip_model, act, text, target, int(config.ig_steps))
        clock.lap("head_grad")

    fmaps, svals, evrs, nulls, shares = [], [], [], [], []
    for i in range(b):
        if not authors:
            fm, sv, evr, null = decompose_paper(act[i], grad[i], p)
            g = (grad[i].double() * act[i].double()).reshape(c, -1).sum(0)    # channel sum of S* [n]
            sv2 = sv ** 2
            share = (fm @ g) / torch.where(sv2 > 0, sv2, torch.ones_like(sv2))
            shares.append(torch.where(null, torch.zeros_like(share), share))   # a_i: g = sum_i a_i F_i
        else:
            fm, sv, evr, null = decompose_authors(act[i], grad[i], p, config.authors_top_k)
        fmaps.append(fm.reshape(p, h, w))
        svals.append(sv)
        evrs.append(evr)
        nulls.append(null)
    fmaps = torch.stack(fmaps)                                       # [B, p, h, w] float64
    null = torch.stack(nulls)                                        # [B, p]
    clock.lap("decompose")
    mode = "bicubic" if authors or ig else "bilinear"
    up = F.interpolate(fmaps.float(), size=(size, size), mode=mode, align_corners=False)  # [B, p, S, S]
    up = torch.where(null[:, :, None, None], torch.zeros_like(up), up)
    comps = minmax(up)                                               # [B, p, S, S]
    comps = torch.where(null[:, :, None, None], torch.zeros_like(comps), comps)
    clock.lap("upsample")
    if ig:                                                          # rank-p share map, bicubic; no forwards
        coef = torch.stack(shares)                                            # [B, p]
        cam = torch.einsum("bp,bpij->bij", coef, fmaps)                      # [B, h, w] float64
        sal = minmax(F.interpolate(torch.relu(cam).float()[:, None], size=(size, size), mode="bicubic",
                                   align_corners=False)[:, 0])
        tot = coef.sum(1, keepdim=True)
        wts = coef / torch.where(tot != 0, tot, torch.ones_like(tot))
        scores = torch.full_like(coef, float("nan"))                          # no gains are measured
        clock.lap("integrate")
        return _result(sal, comps, fmaps, wts, scores, evrs, svals, logits, target, clock)

    mean_t = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    sigma, radius = config.sigma(size), config.radius(size)
    pix = image * std_t + mean_t                                     # blending in [0, 1] pixel space
    pix_b = gaussian_blur(pix, sigma, radius)
    blurred = (pix_b - mean_t) / std_t
    clock.lap("blur")
    hm = comps[:, :, None]                                           # [B, p, 1, S, S]
    masked = torch.maximum(pix[:, None] * hm, pix_b[:, None] * (1 - hm))  # [B, p, 3, S, S]
    masked = (masked - mean_t[:, None]) / std_t[:, None]
    batch = torch.cat([masked.reshape(b * p, 3, size, size), blurred])
    clock.lap("blend")
    lg = eager_logits(clip_model, batch, text, batch_size)
    clock.lap("classify")
    lg_masked = lg[: b * p].reshape(b, p, -1)
    lg_blur = lg[b * p:]
    tsel = target[:, None, None].expand(b, p, 1)
    y_masked = lg_masked.gather(2, tsel).squeeze(2)                   # [B, p]
    y_blur = lg_blur.gather(1, target[:, None])                       # [B, 1]
    if not authors:
        scores = y_masked - y_blur
        z = torch.where(null, torch.full_like(scores, -torch.inf), scores.double())
        wts = torch.softmax(z, dim=1)
        wts = torch.nan_to_num(wts, nan=0.0)                          # every component null -> all zero
        sal = (wts.float()[:, :, None, None] * comps).sum(1)
    else:
        scale = clip_model.logit_scale.exp()
        scores = (y_masked - y_blur) / scale                          # cosine-similarity gains
        z = torch.where(null, torch.full_like(scores, -torch.inf), scores.double())
        sm = torch.nan_to_num(torch.softmax(z, dim=1), nan=0.0)
        wts = torch.where(null, torch.zeros_like(sm), scores.double() * sm)
        sal = minmax(torch.relu((wts.float()[:, :, None, None] * up).sum(1)))   # the RAW maps, as the authors
    clock.lap("integrate")
    return _result(sal, comps, fmaps, wts, scores, evrs, svals, logits, target, clock)


def _result(sal, comps, fmaps, wts, scores, evrs, svals, logits, target, clock) -> ReferenceResult:
    def host(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    res = ReferenceResult(
        saliency=host(sal),
        components=host(comps),
        feature_maps=host(fmaps),
        weights=host(wts),
        scores=host(scores),
        explained_variance=host(torch.stack(evrs)),
        singular_values=host(torch.stack(svals)),
        logits=host(logits),
        target=target.cpu().numpy().astype(np.int64),
    )
    clock.lap("postprocess")
    return res
