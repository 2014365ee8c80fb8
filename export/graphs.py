"""The exportable modules behind explain.onnx, classify.onnx, head.onnx, features.onnx and head_grad.onnx.

ONNX has no autograd, so the gradient of the target logit with respect to the target layer (`layer4`) is
written out by hand: the head after layer4 is open_clip's attention pool (only query token 0 is used),
the output projection c_proj, L2 normalisation and the scaled matmul with the class embeddings. Its
backward is a few matmuls and one softmax-backward, in plain torch ops that export to standard ONNX ops
with dynamic batch and dynamic L. `tests/export/test_graphs.py` checks it against torch autograd on the
unmodified open_clip module.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

TARGET_LAYERS = ("layer4",)


class PoolHead(nn.Module):
    """Attention pool (query token 0) + c_proj + cosine logits, with its explicit backward.

    Only query token 0 is used, so keys and values are never formed for all N tokens (open_clip computes
    k = tok W_k^T + b_k and v = tok W_v^T + b_v, 2 N C^2 multiply-adds). Per head h (rows h*d..(h+1)*d):
        q_h . k_hj = (W_k,h^T q_h) . tok_j + q_h . b_k,h    the last term is the same for every token j, and
                                                           softmax ignores it
        sum_j a_hj v_hj = W_v,h (sum_j a_hj tok_j) + b_v,h  the attention weights sum to 1
    so the head costs about 3 C^2 + 2 H N C multiply-adds instead of 2 N C^2 (RN50: ~19 million instead of
    ~420 million per image). The export validates it against the stock open_clip module like every graph.

    Shapes: B images, C channels, n = h*w positions, N = n + 1 tokens, H heads of width d = C / H,
    D embedding width, L classes.
    """

    def __init__(self, attnpool: nn.Module, logit_scale: float):
        super().__init__()
        self.num_heads = int(attnpool.num_heads)
        c = attnpool.k_proj.in_features
        nh = self.num_heads
        self.register_buffer("pos", attnpool.positional_embedding.detach().clone())  # [N, C]
        self.register_buffer("q_w", attnpool.q_proj.weight.detach().clone())         # [C, C]
        self.register_buffer("q_b", attnpool.q_proj.bias.detach().clone())           # [C]
        self.register_buffer("k_wh", attnpool.k_proj.weight.detach().clone().reshape(nh, c // nh, c))  # [H, d, C]
        self.register_buffer("v_wh", attnpool.v_proj.weight.detach().clone().reshape(nh, c // nh, c))  # [H, d, C]
        self.register_buffer("v_b", attnpool.v_proj.bias.detach().clone())           # [C]
        self.register_buffer("c_w", attnpool.c_proj.weight.detach().clone())         # [D, C]
        self.register_buffer("c_b", attnpool.c_proj.bias.detach().clone())           # [D]
        self.logit_scale = float(logit_scale)

    def forward_cache(self, a: torch.Tensor, text: torch.Tensor):
        """Forward pass that also returns what the backward needs."""
        b, c, h, w = a.shape
        nh = self.num_heads
        d = c // nh
        x = a.flatten(2).transpose(1, 2)                              # [B, n, C]
        tok = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos   # [B, N, C]
        q = tok[:, 0] @ self.q_w.T + self.q_b                         # [B, C]
        qh = q.reshape(b, nh, 1, d)                                   # [B, H, 1, d]
        u = (qh @ self.k_wh).squeeze(2)                               # [B, H, C]   W_k,h^T q_h
        scale = d ** -0.5
        attn = torch.softmax((u @ tok.transpose(1, 2)) * scale, -1)   # [B, H, N]
        ctx = attn @ tok                                              # [B, H, C]   sum_j a_hj tok_j
        o = (self.v_wh @ ctx.unsqueeze(-1)).reshape(b, c) + self.v_b  # [B, C]      W_v,h ctx_h + b_v,h
        z = o @ self.c_w.T + self.c_b                                 # [B, D]
        znorm = torch.sqrt((z * z).sum(-1, keepdim=True))             # [B, 1]
        e = z / znorm                                                 # [B, D]
        logits = self.logit_scale * (e @ text.T)                      # [B, L]
        cache = (tok, u, attn, ctx, e, znorm, scale, (b, c, h, w))
        return logits, cache

    def forward(self, a: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.forward_cache(a, text)[0]

    def backward(self, cache, text: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d logits[b, target[b]] / d a, shape [B, C, h, w]."""
        tok, u, attn, ctx, e, znorm, scale, (b, c, h, w) = cache
        nh = self.num_heads
        d = c // nh
        g_e = self.logit_scale * text[target]                              # [B, D]
        g_z = (g_e - e * (e * g_e).sum(-1, keepdim=True)) / znorm          # [B, D]   through z / |z|
        g_o = (g_z @ self.c_w).reshape(b, nh, 1, d)                        # [B, H, 1, d]
        g_ctx = (g_o @ self.v_wh).squeeze(2)                               # [B, H, C]  W_v,h^T g_o,h
        g_attn = g_ctx @ tok.transpose(1, 2)                               # [B, H, N]
        g_tok = attn.transpose(1, 2) @ g_ctx                               # [B, N, C]  through ctx = attn tok
        g_s = attn * (g_attn - (attn * g_attn).sum(-1, keepdim=True))      # [B, H, N]  softmax backward
        g_s = g_s * scale
        g_u = g_s @ tok                                                    # [B, H, C]
        g_tok = g_tok + g_s.transpose(1, 2) @ u                            # [B, N, C]  through the scores
        g_q = (g_u.unsqueeze(2) @ self.k_wh.transpose(1, 2)).reshape(b, c)  # [B, C]   W_k,h g_u,h
        # (q_h . b_k,h is constant over tokens: its gradient sum_j g_s_hj b_k,h is 0)
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


class HeadGradModule(nn.Module):
    """activations [B,C,h,w], text [L,D], target [B] -> logits [B,L], gradients [B,C,h,w]: the head and its
    explicit backward at any activations (a negative target selects the top-1 class there)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.head = PoolHead(clip_model.visual.attnpool, float(clip_model.logit_scale.detach().exp()))

    def forward(self, activations, text, target):
        logits, cache = self.head.forward_cache(activations, text)
        target = torch.where(target < 0, logits.argmax(1), target)
        return logits, self.head.backward(cache, text, target)


def head_logits(clip_model: nn.Module, act: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """The unmodified network after the target layer on activations [N, C, h, w]: open_clip's attention pool,
    L2 normalisation, scaled cosine logits [N, L]. A fixed-class model: its own pooling + classifier modules."""
    if hasattr(clip_model, "head_eager"):
        return clip_model.head_eager(act)
    pooled = torch.nn.functional.normalize(clip_model.visual.attnpool(act), dim=-1)
    return clip_model.logit_scale.exp() * pooled @ text.T


def hooked_autograd(forward: Callable[[], torch.Tensor], layer: nn.Module, target: torch.Tensor, call: int = -1):
    """Run `forward()` (-> logits [B, L]) on an unmodified module with a forward hook on `layer`; return the
    logits, the layer's output of call `call` (-1: its last call in the forward) and d logits[b, t_b] /
    d output by torch autograd, t_b = target[b] or the top-1 class where target[b] < 0."""
    calls = []
    handle = layer.register_forward_hook(lambda _m, _i, out: calls.append(out))
    try:
        with torch.enable_grad():
            logits = forward()
            a = calls[call]
            target = torch.where(target < 0, logits.argmax(1), target)
            sel = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(sel, a)
    finally:
        handle.remove()
    return logits.detach(), a.detach(), grad.detach()


def autograd_reference(clip_model: nn.Module, image: torch.Tensor, text: torch.Tensor, target: torch.Tensor):
    """Independent oracle on the unmodified open_clip module: logits, layer4 activations and
    d logits[b, target[b]] / d activations by torch autograd (a forward hook captures layer4).

    A fixed-class model (export.pooled.PooledModel) answers with its own oracle; `text` is ignored."""
    if hasattr(clip_model, "autograd"):
        return clip_model.autograd(image, target)

    def logits():
        feats = clip_model.encode_image(image, normalize=True)
        return clip_model.logit_scale.exp() * feats @ text.T

    return hooked_autograd(logits, clip_model.visual.layer4, target)
