"""The clip family's torch forward modules: open_clip's ModifiedResNet up to the target layer (`Trunk`) and the
head after it (`PoolHead`: the attention pool for query token 0, c_proj, L2 normalisation, scaled cosine logits
against the class embeddings), plus the eager references the export is validated against (torch autograd on the
unmodified open_clip module, `autograd_reference`; the stock head, `head_logits`).

No backward is written here: the export traces Trunk and PoolHead to one ONNX graph, and export/onnx_grad.py
generates the head's backward from it (export/families.py, export/onnx_export.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

TARGET_LAYERS = ("layer4",)


class PoolHead(nn.Module):
    """Attention pool (query token 0) + c_proj + cosine logits (forward only).

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

    def forward(self, a: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """activations [B, C, h, w], class embeddings text [L, D] -> logits [B, L]."""
        b, c, h, w = a.shape
        nh = self.num_heads
        d = c // nh
        x = a.flatten(2).transpose(1, 2)                              # [B, n, C]
        tok = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos   # [B, N, C]
        q = tok[:, 0] @ self.q_w.T + self.q_b                         # [B, C]
        qh = q.reshape(b, nh, 1, d)                                   # [B, H, 1, d]
        u = (qh @ self.k_wh).squeeze(2)                               # [B, H, C]   W_k,h^T q_h
        attn = torch.softmax((u @ tok.transpose(1, 2)) * d ** -0.5, -1)  # [B, H, N]
        ctx = attn @ tok                                              # [B, H, C]   sum_j a_hj tok_j
        o = (self.v_wh @ ctx.unsqueeze(-1)).reshape(b, c) + self.v_b  # [B, C]      W_v,h ctx_h + b_v,h
        z = o @ self.c_w.T + self.c_b                                 # [B, D]
        e = z / torch.sqrt((z * z).sum(-1, keepdim=True))             # [B, D]
        return self.logit_scale * (e @ text.T)                        # [B, L]


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
