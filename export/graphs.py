"""The exportable modules behind explain.onnx, classify.onnx, head.onnx and features.onnx.

ONNX has no autograd, so the gradient of the target logit with respect to the target layer (`layer4`) is
written out by hand: the head after layer4 is open_clip's attention pool (only query token 0 is used),
the output projection c_proj, L2 normalisation and the scaled matmul with the class embeddings. Its
backward is a few matmuls and one softmax-backward, in plain torch ops that export to standard ONNX ops
with dynamic batch and dynamic L. `tests/export/test_graphs.py` checks it against torch autograd on the
unmodified open_clip module.
"""

from __future__ import annotations

import torch
from torch import nn

TARGET_LAYERS = ("layer4",)


class PoolHead(nn.Module):
    """Attention pool (query token 0) + c_proj + cosine logits, with its explicit backward.

    Shapes: B images, C channels, n = h*w positions, N = n + 1 tokens, H heads of width d = C / H,
    D embedding width, L classes.
    """

    def __init__(self, attnpool: nn.Module, logit_scale: float):
        super().__init__()
        self.num_heads = int(attnpool.num_heads)
        self.register_buffer("pos", attnpool.positional_embedding.detach().clone())  # [N, C]
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            lin = getattr(attnpool, name)
            self.register_buffer(f"{name[0]}_w", lin.weight.detach().clone())  # [out, in]
            self.register_buffer(f"{name[0]}_b", lin.bias.detach().clone())
        self.logit_scale = float(logit_scale)

    def forward_cache(self, a: torch.Tensor, text: torch.Tensor):
        """Forward pass that also returns what the backward needs."""
        b, c, h, w = a.shape
        nh = self.num_heads
        d = c // nh
        x = a.flatten(2).transpose(1, 2)                              # [B, n, C]
        tok = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos   # [B, N, C]
        q = tok[:, 0] @ self.q_w.T + self.q_b                         # [B, C]
        k = tok @ self.k_w.T + self.k_b                               # [B, N, C]
        v = tok @ self.v_w.T + self.v_b                               # [B, N, C]
        qh = q.reshape(b, nh, 1, d)                                   # [B, H, 1, d]
        kh = k.reshape(b, -1, nh, d).transpose(1, 2)                  # [B, H, N, d]
        vh = v.reshape(b, -1, nh, d).transpose(1, 2)                  # [B, H, N, d]
        scale = d ** -0.5
        attn = torch.softmax((qh @ kh.transpose(2, 3)) * scale, -1)   # [B, H, 1, N]
        o = (attn @ vh).reshape(b, c)                                 # [B, C]
        z = o @ self.c_w.T + self.c_b                                 # [B, D]
        znorm = torch.sqrt((z * z).sum(-1, keepdim=True))             # [B, 1]
        u = z / znorm                                                 # [B, D]
        logits = self.logit_scale * (u @ text.T)                      # [B, L]
        cache = (tok, qh, kh, vh, attn, u, znorm, scale, (b, c, h, w))
        return logits, cache

    def forward(self, a: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.forward_cache(a, text)[0]

    def backward(self, cache, text: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d logits[b, target[b]] / d a, shape [B, C, h, w]."""
        tok, qh, kh, vh, attn, u, znorm, scale, (b, c, h, w) = cache
        nh = self.num_heads
        d = c // nh
        g_u = self.logit_scale * text[target]                              # [B, D]
        g_z = (g_u - u * (u * g_u).sum(-1, keepdim=True)) / znorm          # [B, D]   through z / |z|
        g_o = (g_z @ self.c_w).reshape(b, nh, 1, d)                        # [B, H, 1, d]
        g_attn = g_o @ vh.transpose(2, 3)                                  # [B, H, 1, N]
        g_vh = attn.transpose(2, 3) @ g_o                                  # [B, H, N, d]
        g_s = attn * (g_attn - (attn * g_attn).sum(-1, keepdim=True))      # [B, H, 1, N]  softmax backward
        g_s = g_s * scale
        g_qh = g_s @ kh                                                    # [B, H, 1, d]
        g_kh = g_s.transpose(2, 3) @ qh                                    # [B, H, N, d]
        g_q = g_qh.reshape(b, c)                                           # [B, C]
        g_k = g_kh.transpose(1, 2).reshape(b, -1, c)                       # [B, N, C]
        g_v = g_vh.transpose(1, 2).reshape(b, -1, c)                       # [B, N, C]
        g_tok = g_k @ self.k_w + g_v @ self.v_w                            # [B, N, C]
        g_tok0 = g_tok[:, 0] + g_q @ self.q_w                              # [B, C]   token 0 is also the query
        n = h * w
        g_x = g_tok[:, 1:] + g_tok0.unsqueeze(1) / n                       # [B, n, C] token 0 is the mean
        return g_x.transpose(1, 2).reshape(b, c, h, w)


class Trunk(nn.Module):
    """open_clip ModifiedResNet up to the target layer."""

    def __init__(self, visual: nn.Module, target_layer: str = "layer4"):
        super().__init__()
        if target_layer not in TARGET_LAYERS:
            raise ValueError(f"target layer '{target_layer}' is not supported; supported: {', '.join(TARGET_LAYERS)}")
        self.visual = visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.stem(image)
        x = v.layer1(x)
        x = v.layer2(x)
        x = v.layer3(x)
        return v.layer4(x)


class ExplainModule(nn.Module):
    """image [B,3,H,W], text [L,D], target [B] -> logits [B,L], activations [B,C,h,w], gradients [B,C,h,w].

    A negative target selects the image's top-1 class, so the default explanation needs one pass."""

    def __init__(self, clip_model: nn.Module, target_layer: str = "layer4"):
        super().__init__()
        self.trunk = Trunk(clip_model.visual, target_layer)
        self.head = PoolHead(clip_model.visual.attnpool, float(clip_model.logit_scale.detach().exp()))

    def forward(self, image, text, target):
        a = self.trunk(image)
        logits, cache = self.head.forward_cache(a, text)
        target = torch.where(target < 0, logits.argmax(1), target)  # -1: explain the top-1 class
        return logits, a, self.head.backward(cache, text, target)


class ClassifyModule(nn.Module):
    """image [B,3,H,W], text [L,D] -> logits [B,L]."""

    def __init__(self, clip_model: nn.Module, target_layer: str = "layer4"):
        super().__init__()
        self.trunk = Trunk(clip_model.visual, target_layer)
        self.head = PoolHead(clip_model.visual.attnpool, float(clip_model.logit_scale.detach().exp()))

    def forward(self, image, text):
        return self.head(self.trunk(image), text)


class FeaturesModule(nn.Module):
    """image [B,3,H,W], text [L,D] -> logits [B,L], activations [B,C,h,w]; forward only, no backward
    subgraph (what the gradient-free methods need)."""

    def __init__(self, clip_model: nn.Module, target_layer: str = "layer4"):
        super().__init__()
        self.trunk = Trunk(clip_model.visual, target_layer)
        self.head = PoolHead(clip_model.visual.attnpool, float(clip_model.logit_scale.detach().exp()))

    def forward(self, image, text):
        a = self.trunk(image)
        return self.head(a, text), a


class HeadModule(nn.Module):
    """activations [B,C,h,w], text [L,D] -> logits [B,L]."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.head = PoolHead(clip_model.visual.attnpool, float(clip_model.logit_scale.detach().exp()))

    def forward(self, activations, text):
        return self.head(activations, text)


def autograd_reference(clip_model: nn.Module, image: torch.Tensor, text: torch.Tensor, target: torch.Tensor):
    """Independent oracle on the unmodified open_clip module: logits, layer4 activations and
    d logits[b, target[b]] / d activations by torch autograd (a forward hook captures layer4).

    A fixed-class model (export.pooled.PooledModel) answers with its own oracle; `text` is ignored."""
    if hasattr(clip_model, "autograd"):
        return clip_model.autograd(image, target)
    store = {}

    def hook(_m, _i, out):
        store["a"] = out

    handle = clip_model.visual.layer4.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            feats = clip_model.encode_image(image, normalize=True)
            logits = clip_model.logit_scale.exp() * feats @ text.T
            a = store["a"]
            target = torch.where(target < 0, logits.argmax(1), target)
            sel = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(sel, a)
    finally:
        handle.remove()
    return logits.detach(), a.detach(), grad.detach()
