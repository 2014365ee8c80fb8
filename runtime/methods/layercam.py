"""LayerCAM (Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
IEEE TIP 30, 2021; ref. [17] of the Decom-CAM paper)."""

from __future__ import annotations

from .base import register
from .base_cam import BaseCam


@register
class LayerCam(BaseCam):
    """Paper: a per-position weight, the positive gradient, w_c[i,j] = ReLU(dy/dA_c[i,j]);
    L = ReLU(sum_c w_c * A_c). Same as pytorch-grad-cam's LayerCAM."""

    name = "layercam"
    doc = "LayerCAM: activations weighted position by position with the positive gradient"

    def spatial_weights(self, ctx):
        xp = ctx.backend.xp
        return xp.maximum(ctx.gradients.astype(xp.float64), 0)           # [B, C, h, w]
