"""WGrad-CAM, the baseline of the Decom-CAM paper (ref. [34]: Zhang, Rao and Yang, AAAI 2021)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam, EPS


@register
class WGradCam(BaseCam):
    """Definition followed: the project's (issue 5), as the Decom-CAM paper describes its baseline
    ("adopts the pixel-wise gradients"); ref. [34] itself could not be consulted offline:

        alpha_c = (1 / hw) sum_ij A_c[i,j] dy/dA_c[i,j]    (spatial mean of the gradient-weighted activation)
        alpha  <- (alpha - min_c alpha) / (max_c alpha - min_c alpha)   (min-max over channels, per image)
        L = ReLU(sum_c alpha_c A_c)

    pytorch-grad-cam has no WGrad-CAM; tests compare it with export/baselines_reference.py only."""

    name = "wgradcam"
    doc = "WGrad-CAM: channel weights = min-max normalised spatial mean of A * dy/dA"

    def weights(self, ctx):
        xp = ctx.backend.xp
        alpha = (ctx.activations.astype(xp.float64) * ctx.gradients.astype(xp.float64)).mean(axis=(2, 3))
        lo = alpha.min(axis=1, keepdims=True)
        hi = alpha.max(axis=1, keepdims=True)
        return (alpha - lo) / xp.maximum(hi - lo, EPS)                  # [B, C] in [0, 1]
