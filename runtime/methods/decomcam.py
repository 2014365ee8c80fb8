"""Decom-CAM (the paper's equations), the authors'-code variant, and the gain-share and path-integrated ("ig")
integrations, as methods."""

from __future__ import annotations

import time

from .. import decomcam as dc
from .base import Method, MethodContext, MethodOutput, register


@register
class DecomCam(Method):
    """Decom-CAM, section 3.2 of the paper: SVD of dy/dA * A, top-p orthogonal feature maps, masked
    forwards against the blurred image, softmax integration. Open choices: runtime/config.py."""

    name = "decomcam"
    variant = "paper"
    integration = "paper"

    def __call__(self, ctx: MethodContext) -> MethodOutput:
        be, xp = ctx.backend, ctx.backend.xp
        cfg = ctx.config
        if (cfg.variant, cfg.integration) != (self.variant, self.integration):
            cfg = cfg.with_(variant=self.variant, integration=self.integration)
        b, _, h, w = ctx.activations.shape
        size = ctx.x.shape[-1]
        t = time.perf_counter()
        dec = dc.decompose(be, ctx.activations, ctx.gradients, cfg)
        be.synchronize()
        ctx.timings["decompose"] = time.perf_counter() - t
        t = time.perf_counter()
        up = dc.upsample(be, dec, h, w, size, cfg)                     # Up(F) [B, p, S, S]
        comps = dc.normalise_components(be, up, dec.null)              # H [B, p, S, S] in [0, 1]
        be.synchronize()
        ctx.timings["upsample"] = time.perf_counter() - t
        masked, blurred = dc.build_masks(be, ctx.x, comps, ctx.mean, ctx.std, cfg, timings=ctx.timings)
        p = comps.shape[1]
        batch = xp.concatenate([masked.reshape(b * p, 3, size, size), blurred])
        be.synchronize()
        ctx.timings["masks"] = time.perf_counter() - t                 # upsample + blur + blend
        ctx.timings["blend"] = ctx.timings["masks"] - ctx.timings["upsample"] - ctx.timings["blur"]
        t = time.perf_counter()
        logits = ctx.classify(batch)                                   # [(p+1)B, L]
        ctx.timings["classify"] = time.perf_counter() - t
        t = time.perf_counter()
        tgt = xp.asarray(ctx.target)
        y = logits[xp.arange(b * p), xp.repeat(tgt, p)].reshape(b, p)  # target logit per masked image
        y_blur = logits[b * p + xp.arange(b), tgt]
        if cfg.integration == "paper":
            sal, wts, scores = dc.integrate(be, y, y_blur, comps, dec.null, cfg, ctx.logit_scale, raw=up)
        else:
            sal, wts, scores = dc.integrate_share(be, y, y_blur, dec, h, w, size)
        be.synchronize()
        ctx.timings["integrate"] = time.perf_counter() - t
        return MethodOutput(sal, comps, wts, scores, dec.explained_variance, dec.singular_values, forwards=p + 1)


@register
class DecomCamAuthors(DecomCam):
    """Decom-CAM as in the authors' public code (top-K channels by Grad-CAM weight, centred PCA of
    alpha*A, clamped components, bicubic upsampling, w*softmax(w) cosine-gain weights)."""

    name = "decomcam-authors"
    variant = "authors"


@register
class DecomCamGainShare(DecomCam):
    """Decom-CAM with the "gain-share" integration (runtime/config.py): each component's share a_i F_i of
    the class-discriminative map, re-weighted by its measured gain, ReLU, bilinear, min-max. Same
    decomposition and the same p + 1 forwards as `decomcam`."""

    name = "decomcam-gain-share"
    integration = "gain-share"


@register
class DecomCamIG(Method):
    """Decom-CAM on the path-integrated evidence S_IG = (A - A0) * mean_k dy/dA(A0 + alpha_k (A - A0))
    (runtime/config.py, integration "ig"; A0 = 0 by default, ig_baseline): the paper's decomposition of S_IG,
    the rank-p part of its channel sum, ReLU, bicubic, min-max. ig_steps head passes (head_grad.onnx) per
    image, one trunk pass for a baseline image, and no masked forward."""

    name = "decomcam-ig"
    needs_gradients = False    # the local gradient is not used: features.onnx (or explain.onnx) gives A
    needs_head_grad = True

    def __call__(self, ctx: MethodContext) -> MethodOutput:
        be = ctx.backend
        cfg = ctx.config
        if (cfg.variant, cfg.integration) != ("paper", "ig"):
            cfg = cfg.with_(variant="paper", integration="ig")
        if ctx.head_gradient is None:
            raise ValueError("decomcam-ig needs the head's gradient (head_grad.onnx): MethodContext.head_gradient")
        b, _, h, w = ctx.activations.shape
        size = ctx.x.shape[-1]
        act, base = ctx.activations, None
        if cfg.ig_baseline != "zero":
            if ctx.features is None:
                raise ValueError(f"decomcam-ig with ig_baseline '{cfg.ig_baseline}' needs the trunk "
                                 "(features.onnx): MethodContext.features")
            t = time.perf_counter()
            ref = (dc.blurred_input(be, ctx.x, ctx.mean, ctx.std, cfg) if cfg.ig_baseline == "blur"
                   else be.xp.zeros_like(ctx.x))                       # "mean": 0 in normalised space
            base = ctx.features(ref, ctx.target).astype(act.dtype)     # A0 [B, C, h, w]
            be.synchronize()
            ctx.timings["baseline"] = time.perf_counter() - t
        t = time.perf_counter()
        grad = dc.path_gradient(be, ctx.head_gradient, act, ctx.target, int(cfg.ig_steps),
                                ctx.batch_size, ctx.fixed_chunks, base=base)
        be.synchronize()
        ctx.timings["head_grad"] = time.perf_counter() - t
        t = time.perf_counter()
        dec = dc.decompose(be, act if base is None else act - base, grad, cfg)   # S_IG = (A - A0) * grad
        be.synchronize()
        ctx.timings["decompose"] = time.perf_counter() - t
        t = time.perf_counter()
        up = dc.upsample(be, dec, h, w, size, cfg)                     # Up_bicubic(F) [B, p, S, S]
        comps = dc.normalise_components(be, up, dec.null)
        be.synchronize()
        ctx.timings["upsample"] = time.perf_counter() - t
        t = time.perf_counter()
        sal, wts = dc.integrate_rank_p(be, dec, h, w, size)
        be.synchronize()
        ctx.timings["integrate"] = time.perf_counter() - t
        return MethodOutput(sal, comps, wts, None, dec.explained_variance, dec.singular_values,
                            forwards=int(cfg.ig_steps) + (base is not None))
