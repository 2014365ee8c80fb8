"""Eager PyTorch references of the CAM baselines: the oracle for runtime/methods/ parity checks.

Written independently of runtime/ (as export/reference.py is for Decom-CAM): activations and gradients by
torch autograd on the unmodified open_clip module (a forward hook on layer4), the perturbation forwards
through the eager CLIP model (Score-CAM: encode_image on masked images; Ablation-CAM: open_clip's own
attention pool on ablated activations), full SVDs with torch.linalg.svd, torch interpolation and the conv2d
Gaussian blur. No shortcuts: every channel is scored (the runtime skips all-zero channels), and Score-CAM++
runs the blurred baseline the softmax cancels.

Every method ends the same way as runtime/methods/base_cam.py: ReLU, bilinear upsampling (half-pixel
centres, align_corners=False), per-map min-max. `cam_reference(name, ...)` returns [B, S, S] in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from runtime.config import DecomCamConfig

from .graphs import autograd_reference, head_logits
from .reference import eager_logits, gaussian_blur, minmax, orient


def finish(cam: torch.Tensor, size: int) -> torch.Tensor:
    """[B, h, w] -> ReLU, bilinear upsampling to [B, S, S], min-max to [0, 1]."""
    up = F.interpolate(torch.relu(cam).float()[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return minmax(up[:, 0])


def weighted_sum(w: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Channel weights [B, C] (or per position [B, C, h, w]) times A, summed over channels: [B, h, w]."""
    w = w if w.dim() == 4 else w[:, :, None, None]
    return (w.double() * act.double()).sum(1)


def first_component(m: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w]: projection of the hw positions on the first principal axis of the
    centred [hw, C] matrix (full SVD), oriented like runtime/methods/eigencam.py (positive dot product with
    the channel sum, else the largest-magnitude entry positive)."""
    b, c, h, w = m.shape
    out = []
    for i in range(b):
        x = m[i].double().reshape(c, h * w).T                       # [n, C]
        xc = x - x.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        proj = xc @ vh[0]                                            # [n]
        out.append(orient(proj[None], x.sum(1))[0].reshape(h, w))
    return torch.stack(out)


# -- the gradient methods: low-resolution maps from (A, dy/dA) ---------------------------------------------

def gradcam(act, grad, **_):
    return weighted_sum(grad.double().mean((2, 3)), act)


def gradcampp(act, grad, eps: float = 0.0, **_):
    g = grad.double()
    g2 = g * g
    denom = 2 * g2 + act.double().sum((2, 3), keepdim=True) * g2 * g + eps
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    return weighted_sum((alpha * torch.relu(g)).sum((2, 3)), act)


def xgradcam(act, grad, **_):
    a = act.double()
    tot = a.sum((2, 3))
    w = torch.where(tot != 0, (grad.double() * a).sum((2, 3)) / torch.where(tot != 0, tot, torch.ones_like(tot)),
                    torch.zeros_like(tot))
    return weighted_sum(w, act)


def layercam(act, grad, **_):
    return weighted_sum(torch.relu(grad.double()), act)


def wgradcam(act, grad, **_):
    alpha = (act.double() * grad.double()).mean((2, 3))                                  # [B, C]
    lo, hi = alpha.amin(1, keepdim=True), alpha.amax(1, keepdim=True)
    return weighted_sum((alpha - lo) / torch.clamp(hi - lo, min=1e-12), act)


def eigencam(act, grad, **_):
    return first_component(act)


def eigengradcam(act, grad, **_):
    return first_component(grad.double() * act.double())


# -- the perturbation methods ----------------------------------------------------------------------------

def _channel_masks(a: torch.Tensor, size: int, upsample: str) -> torch.Tensor:
    """a [k, h, w] -> min-max normalised upsampled masks [k, S, S]."""
    up = F.interpolate(a[:, None].float(), size=(size, size), mode="bilinear",
                       align_corners=(upsample == "align_corners"))
    return minmax(up[:, 0])


def _blur_blend(image: torch.Tensor, masks: torch.Tensor, mean, std, config: DecomCamConfig):
    """One image [3, S, S] normalised, masks [k, S, S] -> (max(P*H, blur(P)*(1-H)) [k, 3, S, S], blurred
    [1, 3, S, S]), both normalised, as the Decom-CAM paper's eq. 10 with the config's blur, in pixel space."""
    size = image.shape[-1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pix = image[None] * s + m
    pix_b = gaussian_blur(pix, config.sigma(size), config.radius(size))
    hm = masks[:, None]
    out = torch.maximum(pix * hm, pix_b * (1 - hm))
    return (out - m) / s, (pix_b - m) / s


def scorecam(act, grad, *, model, image, text, target, batch_size, upsample="bilinear", **_):
    """Every channel: y(X * s(Up(A_c))), softmax over channels."""
    b, c = act.shape[:2]
    size = image.shape[-1]
    w = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        ys = []
        for s in range(0, c, batch_size):
            masks = _channel_masks(act[i, s:s + batch_size], size, upsample)
            ys.append(eager_logits(model, image[i][None] * masks[:, None], text, batch_size)[:, target[i]])
        w[i] = torch.softmax(torch.cat(ys).double(), 0)
    return weighted_sum(w, act)


def scorecampp(act, grad, *, model, image, text, target, batch_size, mean, std, config, upsample="bilinear", **_):
    """Channels with max ReLU(dy/dA * A) > 0: C_c = y(blur-blend(X, s(Up(A_c)))) - y(blurred), softmax."""
    b, c = act.shape[:2]
    size = image.shape[-1]
    keep = torch.relu(grad * act).amax((2, 3)) > 0
    w = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        idx = torch.nonzero(keep[i]).flatten()
        if idx.numel() == 0:
            continue
        scores = []
        for s in range(0, idx.numel(), batch_size):
            masked, blurred = _blur_blend(image[i], _channel_masks(act[i, idx[s:s + batch_size]], size, upsample),
                                          mean, std, config)
            scores.append(eager_logits(model, masked, text, batch_size)[:, target[i]])
        y_blur = eager_logits(model, blurred, text)[0, target[i]]
        w[i, idx] = torch.softmax(torch.cat(scores).double() - y_blur.double(), 0)
    return weighted_sum(w, act)


def ablationcam(act, grad, *, model, text, target, logits, batch_size, **_):
    """Every channel: zero it, run the head; w_c = (y - y_c) / y."""
    b, c = act.shape[:2]
    w = torch.zeros(b, c, dtype=torch.float64)
    for i in range(b):
        y = logits[i, target[i]].double()
        ys = []
        for s in range(0, c, batch_size):
            k = min(batch_size, c - s)
            a = act[i:i + 1].repeat(k, 1, 1, 1)
            a[torch.arange(k), torch.arange(s, s + k)] = 0
            ys.append(head_logits(model, a, text)[:, target[i]].double())
        w[i] = (y - torch.cat(ys)) / y
    return weighted_sum(w, act)


REFERENCES: dict[str, Callable] = {
    "gradcam": gradcam,
    "gradcam++": gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "wgradcam": wgradcam,
    "scorecam": scorecam,
    "scorecam++": scorecampp,
    "ablationcam": ablationcam,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
}


@torch.no_grad()
def cam_reference(method: str, clip_model, image: torch.Tensor, text: torch.Tensor, mean, std,
                  target: torch.Tensor | None = None, config: DecomCamConfig = DecomCamConfig(),
                  batch_size: int = 32, grads=None, **options) -> np.ndarray:
    """Eager CAM baseline `method` (a runtime.methods name). image [B, 3, S, S] normalised, text [L, D] unit
    rows, target [B] or None (top-1). `options` are the runtime method's (upsample=..., eps=...).
    `grads` may pass precomputed (logits, activations, gradients) from `autograd_reference`.
    Returns the saliency [B, S, S] float32 in [0, 1]."""
    if method not in REFERENCES:
        raise ValueError(f"no eager reference for '{method}'; available: {', '.join(REFERENCES)}")
    clip_model.eval()
    b, _, size, _ = image.shape
    if target is None:
        target = eager_logits(clip_model, image, text, batch_size).argmax(1)
    target = torch.as_tensor(target, dtype=torch.long).reshape(b)
    logits, act, grad = grads if grads is not None else autograd_reference(clip_model, image, text, target)
    cam = REFERENCES[method](act, grad, model=clip_model, image=image, text=text, target=target, logits=logits,
                             batch_size=batch_size, mean=mean, std=std, config=config, **options)
    return finish(cam, size).numpy().astype(np.float32)
