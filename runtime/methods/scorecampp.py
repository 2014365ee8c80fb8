"""Score-CAM++ (Chen and Zhong, "Score-CAM++: Class Discriminative Localization with Feature Map
Selection", J. Phys.: Conf. Ser. 2278, 2022; ref. [6] of the Decom-CAM paper)."""

from __future__ import annotations

from .. import decomcam as dc
from .base import register
from .scorecam import ScoreCam


@register
class ScoreCamPlusPlus(ScoreCam):
    """Definition followed: the project's (issue 5), the Decom-CAM paper's baseline; the paper itself
    could not be consulted offline. Feature map selection, then Score-CAM with Decom-CAM's perturbation:

        keep channel c when max_ij ReLU(dy/dA_c * A_c) > 0 (it has a positive class-discriminative part);
        H_c = s(Up(A_c)); masked_c = max(P * H_c, blur(P) * (1 - H_c)) exactly as Decom-CAM builds its
        masks (runtime.decomcam.build_masks: blur, blend space from the Decom-CAM config);
        C_c = y(masked_c) - y(blurred); L = ReLU(sum_c softmax(C)_c A_c) over the kept channels.

    y(blurred) is common to all channels and cancels in the softmax, so it is not run."""

    name = "scorecam++"
    doc = "Score-CAM++: Score-CAM over the channels with positive dy/dA*A, blur-blend masks"
    needs_gradients = True

    def keep(self, ctx):
        xp = ctx.backend.xp
        s = ctx.gradients.astype(xp.float32) * ctx.activations.astype(xp.float32)
        return s.max(axis=(2, 3)) > 0                                    # [B, C]

    def masked_inputs(self, ctx, b, idx):
        comps = self.channel_masks(ctx, b, idx, self.upsample)[None]     # [1, k, S, S]
        size = ctx.x.shape[-1]
        masked, _ = dc.build_masks(ctx.backend, ctx.x[b:b + 1], comps, ctx.mean, ctx.std, ctx.config.sigma(size),
                                   ctx.config.radius(size))
        return masked[0]                                                 # [k, 3, S, S]
