"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017; ref. [25] of the Decom-CAM paper)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam


@register
class GradCam(BaseCam):
    """Paper, eq. 1-2: alpha_c = (1 / hw) sum_ij dy/dA_c[i, j] (global-average-pooled gradient);
    L = ReLU(sum_c alpha_c A_c). Same as pytorch-grad-cam's GradCAM."""

    name = "gradcam"
    doc = "Grad-CAM: channel weights = spatial mean of the gradient"

    def weights(self, ctx):
        xp = ctx.backend.xp
        return ctx.gradients.astype(xp.float64).mean(axis=(2, 3))      # [B, C]
