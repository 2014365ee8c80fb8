"""Ablation-CAM (Desai and Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network
via Gradient-free Localization", WACV 2020; ref. [23] of the Decom-CAM paper)."""

from __future__ import annotations

from .base import register
from .base_cam import EPS, BaseCam


@register
class AblationCam(BaseCam):
    """Paper: zero channel c of the target layer's activations and run the rest of the network
    (head.onnx): w_c = (y - y_c) / y, the relative drop of the target logit; L = ReLU(sum_c w_c A_c).

    One head forward per channel, chunked. A channel whose map is already all zero is not run: ablating
    it changes nothing (y_c = y, w_c = 0). pytorch-grad-cam zeroes the channel too when the layer's minimum
    is 0 (always, after layer4's ReLU); on a signed layer (the -lastblock exports' last MBConv block, no
    activation) it sets the channel to min(A) - 1e7 instead, and the two differ there."""

    name = "ablationcam"
    doc = "Ablation-CAM: relative drop of the target logit when each channel is zeroed"
    needs_gradients = False
    needs_head = True

    def ablated(self, ctx, b, idx):
        """[k, C, h, w]: image b's activations with channel idx[j] zeroed in copy j."""
        xp = ctx.backend.xp
        a = xp.repeat(ctx.activations[b:b + 1], len(idx), axis=0)
        a[xp.arange(len(idx)), xp.asarray(idx)] = 0
        return a

    def weights(self, ctx):
        xp = ctx.backend.xp
        keep = xp.abs(ctx.activations).max(axis=(2, 3)) > 0             # [B, C]
        y_c = self.channel_scores(ctx, keep, lambda b, idx: self.ablated(ctx, b, idx), ctx.head, "head")
        tgt = xp.asarray(ctx.target)
        y = ctx.logits[xp.arange(len(ctx.target)), tgt].astype(xp.float64)[:, None]  # [B, 1]
        y_safe = xp.where(xp.abs(y) > EPS, y, EPS)
        return xp.where(keep, (y - y_c) / y_safe, 0.0)                   # [B, C]
