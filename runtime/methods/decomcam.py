"""Decom-CAM as methods: the paper's equations (`decomcam`), the authors' 2023 code (`decomcam-authors`) and
the decomposition of path-integrated evidence (`decomcam-ig`). docs/method.md says what each computes."""

from __future__ import annotations

from .. import decomcam as dc
from .base import Method, MethodContext, MethodOutput, register


@register
class DecomCam(Method):
    """Decom-CAM, section 3.2 of the paper: SVD of dy/dA * A, top-p orthogonal feature maps, masked
    forwards against the blurred image, softmax integration."""

    name = "decomcam"
    kernel = "bilinear"   # the components' upsampling
    uses = ("top_p", "blur_sigma")

    def decompose(self, ctx: MethodContext, p: int) -> dc.Decomposition:
        return dc.decompose(ctx.backend, ctx.activations, ctx.gradients, p)

    def integrate(self, ctx: MethodContext, y, y_blur, comps, up, dec):
        return dc.integrate(ctx.backend, y, y_blur, comps, dec.null)

    def __call__(self, ctx: MethodContext) -> MethodOutput:
        be, xp, cfg = ctx.backend, ctx.backend.xp, ctx.config
        b, _, h, w = ctx.activations.shape
        size = ctx.x.shape[-1]
        with ctx.stage("decompose"):
            dec = self.decompose(ctx, cfg.top_p)
        with ctx.stage("upsample"):
            up = dc.upsample(be, dec, h, w, size, self.kernel)                 # Up(F) [B, p, S, S]
            comps = dc.normalise_components(be, up, dec.null)                 # H [B, p, S, S] in [0, 1]
        masked, blurred = dc.build_masks(be, ctx.x, comps, ctx.mean, ctx.std, cfg.sigma(size), cfg.radius(size),
                                         stage=ctx.stage)
        p = comps.shape[1]
        with ctx.stage("blend"):
            batch = xp.concatenate([masked.reshape(b * p, 3, size, size), blurred])
        with ctx.stage("classify"):
            logits = ctx.classify(batch)                                       # [(p+1)B, L]
        with ctx.stage("integrate"):
            tgt = xp.asarray(ctx.target)
            y = logits[xp.arange(b * p), xp.repeat(tgt, p)].reshape(b, p)      # target logit per masked image
            y_blur = logits[b * p + xp.arange(b), tgt]
            sal, wts, scores = self.integrate(ctx, y, y_blur, comps, up, dec)
        return MethodOutput(sal, comps, wts, scores, dec.explained_variance, dec.singular_values, forwards=p + 1)


@register
class DecomCamAuthors(DecomCam):
    """Decom-CAM as in the authors' 2023 code (top-K channels by Grad-CAM weight, centred PCA of alpha*A,
    clamped components, bicubic upsampling, w*softmax(w) cosine-gain weights over the raw maps)."""

    name = "decomcam-authors"
    kernel = "bicubic"

    def decompose(self, ctx: MethodContext, p: int) -> dc.Decomposition:
        return dc.decompose_authors(ctx.backend, ctx.activations, ctx.gradients, p, ctx.config.authors_top_k)

    def integrate(self, ctx: MethodContext, y, y_blur, comps, up, dec):
        return dc.integrate_authors(ctx.backend, y, y_blur, up, dec.null, ctx.logit_scale)


@register
class DecomCamIG(Method):
    """Decom-CAM on the path-integrated evidence S_IG = A * mean_k dy/dA(alpha_k A): the paper's decomposition
    of S_IG, the rank-p part of its channel sum, ReLU, bicubic, min-max. ig_steps head passes
    (head_grad.onnx) per image and no masked forward."""

    name = "decomcam-ig"
    needs_gradients = False    # the local gradient is not used: features.onnx (or explain.onnx) gives A
    needs_head_grad = True
    uses = ("top_p", "ig_steps")

    def __call__(self, ctx: MethodContext) -> MethodOutput:
        be, cfg = ctx.backend, ctx.config
        if ctx.head_gradient is None:
            raise ValueError("decomcam-ig needs the head's gradient (head_grad.onnx): MethodContext.head_gradient")
        act = ctx.activations
        b, _, h, w = act.shape
        size = ctx.x.shape[-1]
        with ctx.stage("head_grad"):
            grad = dc.path_gradient(be, ctx.head_gradient, act, ctx.target, int(cfg.ig_steps), ctx.batch_size,
                                    ctx.fixed_chunks)
        with ctx.stage("decompose"):
            dec = dc.decompose(be, act, grad, cfg.top_p)                       # S_IG = A * grad
        with ctx.stage("upsample"):
            up = dc.upsample(be, dec, h, w, size, "bicubic")                   # Up_bicubic(F) [B, p, S, S]
            comps = dc.normalise_components(be, up, dec.null)
        with ctx.stage("integrate"):
            sal, wts = dc.integrate_rank_p(be, dec, h, w, size)
        return MethodOutput(sal, comps, wts, None, dec.explained_variance, dec.singular_values,
                            forwards=int(cfg.ig_steps))
