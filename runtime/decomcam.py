"""Decom-CAM's numerics over an array back end (numpy on the CPU, cupy on the GPU).

    decompose(act, grad, p)         S* = dy/dA * A -> top-p orthogonal feature maps F [B, p, h*w]
    build_masks(x, H)               H = s(Up(F)); masked = max(P * H, blur(P) * (1 - H)) -> (p+1)B images
    integrate(y_masked, y_blur, H)  C_i = y(masked_i) - y(blurred); saliency = sum softmax(C)_i H_i

plus the authors' variant (decompose_authors, integrate_authors) and decomcam-ig's path-averaged gradient
and rank-p map (path_gradient, integrate_rank_p). The decomposition uses the Gram matrix G = S*^T S*
[h*w, h*w] (49 x 49 at 224 px) and its eigenvectors, batched over images in float64, instead of a full SVD
of S* [C, h*w]: V_p and sigma_p = sqrt(lambda_p) give F* = Sigma_p V_p^T, which equals the paper's U_p^T S*.
The open choices (sign, null components, epsilon, blur) are docs/method.md's, as in the eager reference.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from .backend import Backend
from .config import NULL_TOL, SIGN_TOL
from .numerics import fixed_shape, minmax, softmax


@dataclass
class Decomposition:
    feature_maps: object        # [B, p, n] float64, signed F_i (n = h*w); null components are 0
    singular_values: object     # [B, p] float64
    explained_variance: object  # [B, p] float64, sigma_i^2 / sum of all sigma^2
    null: object                # [B, p] bool
    share: object = None        # [B, p] float64, a_i = <F_i, g> / sigma_i^2 with g = sum_c S*[c] (paper's decomposition)


def _orient(xp, fm, g):
    """fm [B, p, n], g [B, n]: make <F_i, g> positive, else the largest-magnitude entry positive."""
    dots = xp.einsum("bpn,bn->bp", fm, g)
    norms = xp.linalg.norm(fm, axis=2) * xp.linalg.norm(g, axis=1)[:, None]
    idx = xp.argmax(xp.abs(fm), axis=2)
    peak = xp.take_along_axis(fm, idx[:, :, None], axis=2)[:, :, 0]
    s = xp.where(xp.abs(dots) <= SIGN_TOL * norms, xp.sign(peak), xp.sign(dots))
    s = xp.where(s == 0, 1.0, s)
    return fm * s[:, :, None]


def _top_eig(be: Backend, gram, p: int):
    """gram [B, n, n] float64 -> (sigma [B, p] descending, V [B, n, p], total variance [B])."""
    xp = be.xp
    lam, vec = be.eigh(gram)                      # ascending
    lam = lam[:, ::-1][:, :p]
    vec = vec[:, :, ::-1][:, :, :p]
    sigma = xp.sqrt(xp.clip(lam, 0.0, None))
    total = xp.trace(gram, axis1=1, axis2=2)      # = sum of all sigma^2 = |S*|_F^2
    return sigma, vec, total


def _orient_peak(xp, fm):
    """fm [B, p, n]: make the entry of largest magnitude of each F_i positive (first one on ties).

    This is scikit-learn's `svd_flip` with `u_based_decision=True` applied to the PCA scores U Sigma, the
    convention of `PCA.fit_transform` before scikit-learn 1.5 (1.5 switched PCA to the sign of the
    principal axes V instead), so the sign of the authors' 2023 components."""
    idx = xp.argmax(xp.abs(fm), axis=2)
    peak = xp.take_along_axis(fm, idx[:, :, None], axis=2)[:, :, 0]
    s = xp.where(peak < 0, -1.0, 1.0)
    return fm * s[:, :, None]


def _finish(xp, fm, sigma, total):
    s1 = sigma[:, :1]
    null = (sigma <= NULL_TOL * s1) | (s1 <= 0)
    fm = xp.where(null[:, :, None], 0.0, fm)
    safe_total = xp.where(total > 0, total, 1.0)
    evr = xp.where(total[:, None] > 0, sigma ** 2 / safe_total[:, None], 0.0)
    return Decomposition(fm, sigma, evr, null)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it the host BLAS keeps its own thread count
        return None
    return ThreadpoolController()


def single_thread_blas(xp):
    """Context: the host BLAS (numpy's OpenBLAS) on one thread, for the small products of the decomposition.

    Why: the product is too small to share, and the BLAS pool's threads must wake on cores that ONNX
    Runtime's (or torch's) worker threads are still spinning on (docs/implementation.md). OpenBLAS never
    splits the summed dimension across threads, so the results are bitwise the same. A no-op on the GPU and
    without threadpoolctl."""
    ctl = _blas_controller() if xp is np else None
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()


def decompose(be: Backend, act, grad, p: int) -> Decomposition:
    """act, grad [B, C, h, w] (float32, or float64 for grad; on the back end's device) -> the top-p feature
    maps of S* = grad * act, signed to agree with its channel sum g, with their shares a_i of g."""
    with single_thread_blas(be.xp):
        xp = be.xp
        b, c, h, w = act.shape
        n = h * w
        p = min(int(p), c, n)
        s = (grad.astype(xp.float64) * act.astype(xp.float64)).reshape(b, c, n)   # S* [B, C, n]
        gram = xp.matmul(s.transpose(0, 2, 1), s)                                  # [B, n, n]
        sigma, vec, total = _top_eig(be, gram, p)
        fm = (vec * sigma[:, None, :]).transpose(0, 2, 1)                          # Sigma_p V_p^T  [B, p, n]
        g = s.sum(1)                                                               # [B, n]
        fm = _orient(xp, fm, g)
        dec = _finish(xp, fm, sigma, total)
        sig2 = sigma ** 2
        share = xp.einsum("bpn,bn->bp", dec.feature_maps, g) / xp.where(sig2 > 0, sig2, 1.0)
        dec.share = xp.where(dec.null, 0.0, share)                                 # a_i, g = sum_i a_i F_i
        return dec


def decompose_authors(be: Backend, act, grad, p: int, top_k: int) -> Decomposition:
    """The authors' 2023 decomposition: the top-K channels by alpha = mean(dy/dA), PCA of alpha * A centred
    over positions, components signed as scikit-learn < 1.5 did and clamped at 0."""
    with single_thread_blas(be.xp):
        xp = be.xp
        b, c, h, w = act.shape
        n = h * w
        k = min(int(top_k), c)
        p = min(int(p), k, n)
        alpha = grad.astype(xp.float64).reshape(b, c, n).mean(2)                   # [B, C]
        keep = xp.argsort(-alpha, axis=1, kind="stable")[:, :k]                    # [B, K]
        a64 = act.astype(xp.float64).reshape(b, c, n)
        m = xp.take_along_axis(alpha, keep, 1)[:, :, None] * xp.take_along_axis(a64, keep[:, :, None], 1)  # [B, K, n]
        x = m.transpose(0, 2, 1)
        x = x - x.mean(1, keepdims=True)                                           # [B, n, K]
        if k <= n:                                                                 # K x K covariance
            sigma, vec, total = _top_eig(be, xp.matmul(x.transpose(0, 2, 1), x), p)
            comps = xp.matmul(x, vec).transpose(0, 2, 1)                           # X V_p  [B, p, n]
        else:                                                                      # n x n: X X^T = U S^2 U^T
            sigma, vec, total = _top_eig(be, xp.matmul(x, x.transpose(0, 2, 1)), p)
            comps = (vec * sigma[:, None, :]).transpose(0, 2, 1)                   # U_p Sigma_p
        comps = _orient_peak(xp, comps)                                            # sklearn < 1.5 svd_flip
        comps = xp.clip(comps, 0.0, None)
        return _finish(xp, comps, sigma, total)


def upsample(be: Backend, dec: Decomposition, h: int, w: int, size: int, kernel: str = "bilinear"):
    """F [B, p, n] -> Up(F) [B, p, S, S] float32, not normalised (the paper: bilinear; the authors' code and
    decomcam-ig: bicubic); null components are 0."""
    xp = be.xp
    b, p, _ = dec.feature_maps.shape
    up = be.resize(dec.feature_maps.reshape(b * p, h, w).astype(xp.float32), size, kernel).reshape(b, p, size, size)
    return xp.where(dec.null[:, :, None, None], xp.float32(0), up)


def normalise_components(be: Backend, up, null):
    """Up(F) [B, p, S, S] -> H = s(Up(F)) [B, p, S, S] float32 in [0, 1]; null components are 0."""
    xp = be.xp
    comps = minmax(xp, up).astype(xp.float32)
    return xp.where(null[:, :, None, None], xp.float32(0), comps)


def blur_reference(be: Backend, x, mean, std, sigma: float, radius: int):
    """x [B, 3, S, S] normalised -> (P, blur(P)) in [0, 1] pixel space, float32: the image and the paper's
    reference image of eq. 11 (Gaussian, reflect-101)."""
    xp = be.xp
    m = xp.asarray(mean, dtype=xp.float32).reshape(1, 3, 1, 1)
    sd = xp.asarray(std, dtype=xp.float32).reshape(1, 3, 1, 1)
    pix = x * sd + m
    return pix, be.blur(pix, sigma, radius)


def build_masks(be: Backend, x, comps, mean, std, sigma: float, radius: int, stage=None):
    """x [B, 3, S, S] normalised, comps H [B, p, S, S] -> (masked [B, p, 3, S, S], blurred [B, 3, S, S]),
    both normalised, ready for classify: max(P * H, blur(P) * (1 - H)) in [0, 1] pixel space. `stage`
    (a runtime.stages.Stages) times the "blur" and the "blend"."""
    xp = be.xp
    stage = stage or (lambda name: contextlib.nullcontext())
    m = xp.asarray(mean, dtype=xp.float32).reshape(1, 3, 1, 1)
    sd = xp.asarray(std, dtype=xp.float32).reshape(1, 3, 1, 1)
    with stage("blur"):
        pix, pix_b = blur_reference(be, x, mean, std, sigma, radius)
    with stage("blend"):
        hm = comps[:, :, None]                                               # [B, p, 1, S, S]
        masked = xp.maximum(pix[:, None] * hm, pix_b[:, None] * (1 - hm))    # [B, p, 3, S, S]
        masked = (masked - m[:, None]) / sd[:, None]
        blurred = (pix_b - m) / sd
    return masked.astype(xp.float32), blurred.astype(xp.float32)


def path_gradient(be: Backend, head_gradient, act, target, steps: int, batch_size: int, fixed_chunks: bool = False):
    """mean_k dy/dA(alpha_k A), alpha_k = (k + 1/2) / steps -> [B, C, h, w] float64: the path-averaged
    gradient, so that A * path_gradient(...) is the integrated-gradient evidence S_IG from 0 to A (midpoint
    rule). head_gradient(acts [N, C, h, w], target [N]) -> dy/dA at those activations (head_grad.onnx).

    The steps x B rows (alpha_k A_b, step-major) are built and run in calls of batch_size rows, so memory
    stays at one call's activation maps whatever B and steps are; with fixed_chunks a short last call is
    padded (numerics.fixed_shape)."""
    xp = be.xp
    b = act.shape[0]
    tgt = be.asarray(target, dtype=np.int64)
    n, bs = steps * b, max(int(batch_size), 1)
    total = xp.zeros(act.shape, xp.float64)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        segs = []                                     # (step, first image, end image) within this call
        r = start
        while r < stop:
            k, b0 = divmod(r, b)
            b1 = min(b, b0 + stop - r)
            segs.append((k, b0, b1))
            r += b1 - b0
        rows = xp.concatenate([act[b0:b1] * xp.float32((k + 0.5) / steps) for k, b0, b1 in segs])
        tgts = xp.concatenate([tgt[b0:b1] for _, b0, b1 in segs])
        g = head_gradient(fixed_shape(xp, rows, bs, n, fixed_chunks),
                          fixed_shape(xp, tgts, bs, n, fixed_chunks)).astype(xp.float64)
        r = 0
        for _, b0, b1 in segs:
            total[b0:b1] += g[r:r + b1 - b0]
            r += b1 - b0
    return total / steps


def integrate_rank_p(be: Backend, dec: Decomposition, h: int, w: int, size: int):
    """The "ig" integration: saliency = s(Up_bicubic(relu(sum_{i<=p} a_i F_i))) [B, S, S] float32, the rank-p
    part of the decomposed map's channel sum with every share weight 1; weights a_i / sum_j a_j [B, p]."""
    xp = be.xp
    coef = dec.share                                                              # [B, p], 0 for null ones
    b = coef.shape[0]
    cam = xp.einsum("bp,bpn->bn", coef, dec.feature_maps).reshape(b, h, w)
    up = be.resize(xp.maximum(cam, 0.0).astype(xp.float32), size, "bicubic")
    tot = coef.sum(axis=1, keepdims=True)
    return minmax(xp, up).astype(xp.float32), coef / xp.where(tot != 0, tot, 1.0)


def integrate(be: Backend, y_masked, y_blur, comps, null):
    """Eqs. 11-12: y_masked [B, p], y_blur [B] target logits, comps H [B, p, S, S] in [0, 1] ->
    (saliency [B, S, S], weights [B, p] = softmax over the non-null C_i, scores C_i [B, p])."""
    xp = be.xp
    scores = y_masked.astype(xp.float64) - y_blur.astype(xp.float64)[:, None]   # C_i
    wts = softmax(xp, scores, ~null)
    sal = xp.einsum("bp,bpij->bij", wts.astype(xp.float32), comps)
    return sal.astype(xp.float32), wts, scores


def integrate_authors(be: Backend, y_masked, y_blur, raw, null, logit_scale: float):
    """The authors' integration: cosine-similarity gains w_i = C_i / logit_scale, weights w * softmax(w), the
    saliency ReLU(sum_i weight_i * raw_i) min-max normalised; raw = Up(F) [B, p, S, S] before normalisation."""
    xp = be.xp
    scores = (y_masked.astype(xp.float64) - y_blur.astype(xp.float64)[:, None]) / logit_scale
    wts = xp.where(null, 0.0, scores * softmax(xp, scores, ~null))
    sal = xp.einsum("bp,bpij->bij", wts.astype(xp.float32), raw)
    return minmax(xp, xp.maximum(sal, 0)).astype(xp.float32), wts, scores
