"""EigenGradCAM: EigenCAM on the gradient-weighted activations (pytorch-grad-cam's variant of Muhammad and
Yeasin, "Eigen-CAM", IJCNN 2020, made class-discriminative)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam
from .eigencam import principal_projection


@register
class EigenGradCam(BaseCam):
    """As pytorch-grad-cam's EigenGradCAM: L = ReLU(first-principal-component projection of dy/dA * A),
    centred over positions, sign fixed by the channel sum of dy/dA * A (see eigencam.principal_projection)."""

    name = "eigengradcam"
    doc = "EigenGradCAM: first principal component of A * dy/dA"

    def cam(self, ctx):
        xp = ctx.backend.xp
        return principal_projection(ctx.backend, ctx.gradients.astype(xp.float64) * ctx.activations)
