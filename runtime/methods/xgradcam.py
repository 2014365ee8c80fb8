"""XGrad-CAM (Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
BMVC 2020)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam


@register
class XGradCam(BaseCam):
    """Paper (the weights that satisfy its sensitivity and conservation axioms):
    alpha_c = sum_ij (A_c[i,j] / sum_ab A_c[a,b]) dy/dA_c[i,j];  L = ReLU(sum_c alpha_c A_c).
    An all-zero channel gets weight 0 (pytorch-grad-cam adds eps = 1e-7 to the sum instead)."""

    name = "xgradcam"
    doc = "XGrad-CAM: gradient averaged with the normalised activation as weights"

    def weights(self, ctx):
        xp = ctx.backend.xp
        g = ctx.gradients.astype(xp.float64)
        a = ctx.activations.astype(xp.float64)
        tot = a.sum(axis=(2, 3))                                         # [B, C]
        num = (g * a).sum(axis=(2, 3))
        return xp.where(tot != 0, num / xp.where(tot != 0, tot, 1.0), 0.0)
