"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
Networks", CVPR Workshops 2020; ref. [29] of the Decom-CAM paper)."""

from __future__ import annotations

from .base import register
from ..numerics import softmax
from .base_cam import UPSAMPLE_MODES, BaseCam


@register
class ScoreCam(BaseCam):
    """Paper: H_c = s(Up(A_c)) (bilinear upsampling, min-max s); the score of channel c is the
    target logit of the input masked by it, C_c = y(X * H_c) - y(X_b), normalised by a softmax over the
    channels; L = ReLU(sum_c softmax(C)_c A_c). X is the normalised model input (as in the
    authors' code), so masked-out pixels take the dataset mean colour.

    One classify.onnx forward per channel, built chunk by chunk. Two exact shortcuts: the baseline y(X_b)
    is the same for every channel and cancels in the softmax (not run), and channels whose activation map
    is all zero add nothing to the sum and only rescale the softmax, which min-max removes (not run).

    `upsample="align_corners"` reproduces pytorch-grad-cam's ScoreCAM (torch UpsamplingBilinear2d); the
    default is the half-pixel bilinear of the rest of the toolkit (the authors' F.interpolate)."""

    name = "scorecam"
    doc = "Score-CAM: softmax of the target logit of the input masked by each upsampled channel"
    needs_gradients = False

    def __init__(self, upsample: str = "bilinear"):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsampling '{upsample}'; valid: {', '.join(UPSAMPLE_MODES)}")
        self.upsample = upsample

    def keep(self, ctx):
        """[B, C] bool: the channels that get a forward."""
        xp = ctx.backend.xp
        return xp.abs(ctx.activations).max(axis=(2, 3)) > 0

    def masked_inputs(self, ctx, b, idx):
        """[k, 3, S, S]: image b masked by the maps of channels idx."""
        return ctx.x[b][None] * self.channel_masks(ctx, b, idx, self.upsample)[:, None]

    def weights(self, ctx):
        xp = ctx.backend.xp
        keep = self.keep(ctx)
        y = self.channel_scores(ctx, keep, lambda b, idx: self.masked_inputs(ctx, b, idx), ctx.classify, "classify")
        return softmax(xp, y, keep)                                 # [B, C]
