"""Grad-CAM++ (Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep
Convolutional Networks", WACV 2018; ref. [4] of the Decom-CAM paper)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam


@register
class GradCamPlusPlus(BaseCam):
    """Paper, eq. 19 with the exponential output Y = exp(y), whose higher derivatives are powers of the
    first (the exp(y) factors cancel in alpha and scale w by a constant, which min-max removes):

        g = dy/dA;  a_c[i,j] = g^2 / (2 g^2 + sum_ab A_c[a,b] * g^3)   (0 where the denominator is 0)
        w_c = sum_ij a_c[i,j] ReLU(g_c[i,j]);  L = ReLU(sum_c w_c A_c)

    pytorch-grad-cam adds eps = 1e-6 to the denominator instead of guarding exact zeros; pass eps=1e-6 to
    reproduce it. It is not negligible for CLIP: with logits = 100 * cosine, dy/dA at layer4 is ~1e-3, so
    the denominator itself is ~1e-6."""

    name = "gradcam++"
    doc = "Grad-CAM++: positive gradients weighted by the second-order alpha (eq. 19)"

    def __init__(self, eps: float = 0.0):
        super().__init__()
        self.eps = float(eps)

    def weights(self, ctx):
        xp = ctx.backend.xp
        g = ctx.gradients.astype(xp.float64)
        a = ctx.activations.astype(xp.float64)
        g2 = g * g
        denom = 2 * g2 + a.sum(axis=(2, 3), keepdims=True) * g2 * g + self.eps
        alpha = xp.where(denom != 0, g2 / xp.where(denom != 0, denom, 1.0), 0.0)
        return (alpha * xp.maximum(g, 0)).sum(axis=(2, 3))              # [B, C]
