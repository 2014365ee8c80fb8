"""The CAM family's shared pipeline; each method (one file each) overrides one hook.

    activations A, gradients dy/dA [B, C, h, w]   (explain.onnx, or features.onnx without gradients)
    hook -> channel weights w [B, C]               `weights(ctx)`            (Grad-CAM, Score-CAM, ...)
         or per-position weights W [B, C, h, w]    `spatial_weights(ctx)`    (LayerCAM)
         or the whole low-resolution map [B, h, w] `cam(ctx)`                (EigenCAM)
    cam = sum_c W_c * A_c                          [B, h, w]
    ReLU, bilinear upsampling (backend.resize, half-pixel centres) to S x S, per-map min-max to [0, 1]
    (`kernel = "bicubic"` on an instance: OpenCV's cubic kernel instead, the kernel Decom-CAM's maps use)

This is pytorch-grad-cam's order up to an affine map: it ReLUs, min-max scales, resizes with cv2 and
min-max scales again; bilinear resizing commutes with x -> a x + b, so the final maps are the same.

The perturbation methods score many modified inputs, one per channel (Score-CAM: masked images through
classify.onnx, Ablation-CAM: ablated activations through head.onnx). `channel_scores` builds those inputs
chunk by chunk (ctx.batch_size per graph call), so memory stays bounded for RN50's 2048 channels, and skips
the channels a method's definition makes irrelevant (all-zero activation maps change nothing).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..numerics import fixed_shape, minmax
from .base import Method, MethodContext, MethodOutput

UPSAMPLE_MODES = ("bilinear", "align_corners")   # Score-CAM's mask upsampling (its `upsample` option)
KERNELS = ("bilinear", "bicubic")                 # the CAM's final upsampling (BaseCam.kernel)
EPS = 1e-12  # guards divisions by sums that are exactly zero only for all-zero inputs


@functools.lru_cache(maxsize=32)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear operator with align_corners=True (torch.nn.UpsamplingBilinear2d):
    output i samples input position i * (n_in - 1) / (n_out - 1)."""
    r = np.zeros((n_out, n_in), np.float64)
    if n_in == 1 or n_out == 1:
        r[:, 0] = 1.0
        return r
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    i0 = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    np.add.at(r, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(r, (np.arange(n_out), i1), frac)
    return r


def upsample(be, maps, size: int, mode: str = "bilinear"):
    """maps [N, h, w] -> [N, size, size] float32; "bilinear" / "bicubic" are the backend's (OpenCV
    INTER_LINEAR / INTER_CUBIC, half-pixel centres), "align_corners" is torch's UpsamplingBilinear2d
    (pytorch-grad-cam's Score-CAM)."""
    xp = be.xp
    if mode in KERNELS:
        return be.resize(maps.astype(xp.float32), size, mode)
    if mode != "align_corners":
        raise ValueError(f"unknown upsampling '{mode}'; valid: {', '.join(UPSAMPLE_MODES + ('bicubic',))}")
    _, h, w = maps.shape
    rh = xp.asarray(align_corners_matrix(h, size), dtype=xp.float32)
    rw = xp.asarray(align_corners_matrix(w, size), dtype=xp.float32)
    return rh @ maps.astype(xp.float32) @ rw.T


class BaseCam(Method):
    """Owns the pipeline; a subclass overrides `weights`, `spatial_weights` or `cam`."""

    name = "basecam"
    needs_activations = True
    needs_gradients = True
    kernel = "bilinear"   # the final upsampling: "bilinear" (every published CAM) or "bicubic"

    def __init__(self):
        self.forwards = 0  # extra graph forwards in the current call, all images together

    # -- hooks ------------------------------------------------------------------------------------------
    def weights(self, ctx: MethodContext):
        """Channel weights [B, C]."""
        raise NotImplementedError(f"{type(self).__name__} overrides none of weights/spatial_weights/cam")

    def spatial_weights(self, ctx: MethodContext):
        """Per-position weights [B, C, h, w] (or [B, C, 1, 1]); default: the channel weights."""
        return self.weights(ctx)[:, :, None, None]

    def cam(self, ctx: MethodContext):
        """Low-resolution map [B, h, w] before the ReLU; default: sum_c W_c * A_c."""
        xp = ctx.backend.xp
        w = self.spatial_weights(ctx)
        return (xp.asarray(w, dtype=xp.float64) * ctx.activations.astype(xp.float64)).sum(1)

    # -- pipeline ---------------------------------------------------------------------------------------
    def __call__(self, ctx: MethodContext) -> MethodOutput:
        be, xp = ctx.backend, ctx.backend.xp
        self.forwards = 0
        b = ctx.x.shape[0]
        size = ctx.x.shape[-1]
        with ctx.stage("weights"):     # the masks and forwards a hook runs are stages of their own
            cam = self.cam(ctx)                                          # [B, h, w]
        with ctx.stage("upsample"):
            cam = xp.maximum(cam, 0)
            sal = minmax(xp, upsample(be, cam, size, self.kernel)).astype(xp.float32)  # [B, S, S]
        return MethodOutput(sal, forwards=math.ceil(self.forwards / max(b, 1)))

    # -- helpers for the perturbation methods -----------------------------------------------------------
    def channel_scores(self, ctx: MethodContext, keep, make, run, stage: str):
        """Target logit of one modified input per kept (image, channel).

        keep [B, C] bool; make(b, idx) -> the inputs for channels idx (host int array) of image b, one per
        channel; run(inputs) -> logits [k, L] (ctx.classify or ctx.head). Inputs are built and run in chunks
        of ctx.batch_size. Returns [B, C] float64, 0 where not kept; the inputs are timed as the stage "masks",
        the graph runs as `stage`."""
        be, xp = ctx.backend, ctx.backend.xp
        keep_host = be.to_host(keep).astype(bool)
        b, c = keep_host.shape
        out = xp.zeros((b, c), xp.float64)
        bs = max(int(ctx.batch_size), 1)
        for i in range(b):
            idx = np.flatnonzero(keep_host[i])
            for s in range(0, idx.size, bs):
                chunk = idx[s:s + bs]
                with ctx.stage("masks"):
                    inputs = fixed_shape(xp, make(i, chunk), bs, idx.size, ctx.fixed_chunks)
                with ctx.stage(stage):
                    logits = run(inputs)[:len(chunk)]                    # [k, L]
                    out[i, xp.asarray(chunk)] = logits[:, int(ctx.target[i])].astype(xp.float64)
            self.forwards += int(idx.size)
        return out

    def channel_masks(self, ctx: MethodContext, b: int, idx, mode: str = "bilinear"):
        """H_k = minmax(Up(A_k)) for channels idx of image b: [k, S, S] float32 in [0, 1]."""
        xp = ctx.backend.xp
        size = ctx.x.shape[-1]
        a = ctx.activations[b, xp.asarray(idx)]                          # [k, h, w]
        return minmax(xp, upsample(ctx.backend, a, size, mode)).astype(xp.float32)
