"""The pooled-linear family: CNN classifiers whose head after the target layer is global average pooling
followed by a small MLP, with the head's backward written by hand.

Most CNN classifiers people deploy end this way (torchvision ResNet/EfficientNet/MobileNetV3/ConvNeXt,
timm, EfficientNet-Lite): target layer A [B, C, h, w] -> p = mean_hw(A) [B, C] -> head ops -> logits [B, K].
The head ops supported here, each with its vector-Jacobian product in plain torch ops:

    Linear      y = x W^T + b                     g_x = g_y W
    ReLU        y = max(x, 0)                     g_x = g_y * (x > 0)
    Hardswish   y = x relu6(x + 3) / 6            g_x = g_y * (0 | x / 3 + 1/2 | 1)   (torch's backward)
    LayerNorm   y = (x - mu) / s * w + b          g_x = (g^ - mean(g^) - x^ mean(g^ x^)) / s,  g^ = g_y w
    Dropout, Flatten, Identity                    no-ops in eval

and the pooling's backward broadcasts: dy/dA[b, c, i, j] = g_p[b, c] / (h w). For a single Linear head this is
the design card's dy/dA = W[target] / (h w). The classes are fixed (the Linear's K outputs): the graphs have
no `text` input and the labels live in the export.

`PooledModel` wraps an unmodified classifier with three declarations (trunk, head modules, target layer) so
the export can build its graphs and validate them against torch autograd on the unmodified module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class HeadError(ValueError):
    """A classifier head with a module whose backward is not written here."""


SUPPORTED_HEAD_MODULES = ("Linear", "ReLU", "Hardswish", "LayerNorm", "LayerNorm2d", "Dropout", "Flatten", "Identity")


class _Op(nn.Module):
    """One head op: forward(x) -> (y, cache); backward(g_y, cache) -> g_x. x, y [B, n]."""


class _Linear(_Op):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.register_buffer("w", lin.weight.detach().clone())  # [out, in]
        b = lin.bias.detach().clone() if lin.bias is not None else torch.zeros(lin.out_features)
        self.register_buffer("b", b)

    def forward(self, x):
        return x @ self.w.T + self.b, None

    def backward(self, g, cache):
        return g @ self.w


class _ReLU(_Op):
    def forward(self, x):
        return torch.relu(x), x

    def backward(self, g, x):
        return g * (x > 0).to(g.dtype)


class _Hardswish(_Op):
    def forward(self, x):
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0, x

    def backward(self, g, x):
        # torch's hardswish_backward: 0 below -3, x / 3 + 1/2 on [-3, 3], 1 above 3
        mid = x / 3.0 + 0.5
        d = torch.where(x < -3.0, torch.zeros_like(x), torch.where(x <= 3.0, mid, torch.ones_like(x)))
        return g * d


class _LayerNorm(_Op):
    def __init__(self, ln: nn.Module):
        super().__init__()
        n = ln.normalized_shape[0]
        w = ln.weight.detach().clone() if ln.weight is not None else torch.ones(n)
        b = ln.bias.detach().clone() if ln.bias is not None else torch.zeros(n)
        self.register_buffer("w", w)
        self.register_buffer("b", b)
        self.eps = float(ln.eps)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)          # biased, as torch's layer_norm
        rstd = 1.0 / torch.sqrt(var + self.eps)
        xh = (x - mu) * rstd
        return xh * self.w + self.b, (xh, rstd)

    def backward(self, g, cache):
        xh, rstd = cache
        gh = g * self.w
        return (gh - gh.mean(-1, keepdim=True) - xh * (gh * xh).mean(-1, keepdim=True)) * rstd


def head_ops(modules: list[nn.Module]) -> list[_Op]:
    """The classifier's modules after the pooling -> ops with a hand-written backward (HeadError otherwise)."""
    ops: list[_Op] = []
    flat: list[nn.Module] = []
    for m in modules:
        flat.extend(m if isinstance(m, nn.Sequential) else [m])
    for m in flat:
        kind = type(m).__name__
        if isinstance(m, nn.Linear):
            ops.append(_Linear(m))
        elif isinstance(m, nn.ReLU):
            ops.append(_ReLU())
        elif isinstance(m, nn.Hardswish):
            ops.append(_Hardswish())
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:  # torchvision's LayerNorm2d too
            ops.append(_LayerNorm(m))
        elif isinstance(m, (nn.Dropout, nn.Flatten, nn.Identity)):
            continue
        else:
            raise HeadError(f"head module {kind} has no hand-written backward; supported: "
                            f"{', '.join(SUPPORTED_HEAD_MODULES)}")
    if not ops or not isinstance(ops[-1], _Linear):
        raise HeadError("the head must end in a Linear layer (the logits)")
    return ops


class PooledHead(nn.Module):
    """Global average pooling + head ops, with the explicit backward of one logit per image."""

    def __init__(self, ops: list[_Op]):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward_cache(self, a: torch.Tensor):
        x = a.mean((2, 3))                                   # [B, C]
        caches = []
        for op in self.ops:
            x, c = op(x)
            caches.append(c)
        return x, caches                                     # logits [B, K]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.forward_cache(a)[0]

    def backward(self, a: torch.Tensor, caches, target: torch.Tensor) -> torch.Tensor:
        """d logits[b, target[b]] / d a, shape [B, C, h, w]."""
        last = self.ops[-1]
        g = last.w[target]                                   # [B, n_in]: one-hot through the last Linear
        for op, c in zip(reversed(self.ops[:-1]), reversed(caches[:-1])):
            g = op.backward(g, c)
        n = a.shape[2] * a.shape[3]
        return g[:, :, None, None].expand_as(a) / n          # [B, C, h, w]: the mean's backward


@dataclass
class PooledParts:
    """How one classifier splits at its target layer (declared per architecture in export/models.py)."""

    trunk: Callable[[torch.Tensor], torch.Tensor]   # image [B, 3, H, W] -> activations [B, C, h, w]
    head_modules: list                              # the modules after the global pooling, in order
    target_module: nn.Module                        # module whose output (call `target_call`) is the target layer
    target_call: int = -1                           # which call of target_module in one forward (-1: the last)
    name: str = ""                                  # the target layer, as the manifest names it


class PooledModel(nn.Module):
    """An unmodified classifier plus its split; `forward` is the classifier's own forward."""

    def __init__(self, model: nn.Module, parts: PooledParts):
        super().__init__()
        self.model = model
        self.parts = parts
        self.ops = head_ops(parts.head_modules)

    def forward(self, image):
        return self.model(image)

    @property
    def num_classes(self) -> int:
        return int(self.ops[-1].w.shape[0])

    def head_eager(self, act: torch.Tensor) -> torch.Tensor:
        """The unmodified head modules on activations: global average pooling, then each module."""
        x = act.mean((2, 3), keepdim=True)                   # [B, C, 1, 1] as AdaptiveAvgPool2d(1)
        for m in self.parts.head_modules:
            if isinstance(m, nn.Linear) and x.ndim > 2:
                x = torch.flatten(x, 1)
            x = m(x)
        return x if x.ndim == 2 else torch.flatten(x, 1)

    def autograd(self, image: torch.Tensor, target: torch.Tensor):
        """Independent oracle on the unmodified module: logits, target-layer activations and
        d logits[b, target[b]] / d activations by torch autograd (a forward hook captures the layer)."""
        from .graphs import hooked_autograd

        return hooked_autograd(lambda: self.model(image), self.parts.target_module, target, self.parts.target_call)


class PooledTrunk(nn.Module):
    def __init__(self, pm: PooledModel):
        super().__init__()
        self.model = pm.model  # registers the parameters
        self._trunk = pm.parts.trunk

    def forward(self, image):
        return self._trunk(image)


class PooledExplain(nn.Module):
    """image [B,3,H,W], target [B] -> logits [B,K], activations [B,C,h,w], gradients [B,C,h,w];
    a negative target selects the image's top-1 class."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.trunk = PooledTrunk(pm)
        self.head = PooledHead(pm.ops)

    def forward(self, image, target):
        a = self.trunk(image)
        logits, caches = self.head.forward_cache(a)
        target = torch.where(target < 0, logits.argmax(1), target)
        return logits, a, self.head.backward(a, caches, target)


class PooledClassify(nn.Module):
    """image [B,3,H,W] -> logits [B,K]."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.trunk = PooledTrunk(pm)
        self.head = PooledHead(pm.ops)

    def forward(self, image):
        return self.head(self.trunk(image))


class PooledFeatures(nn.Module):
    """image [B,3,H,W] -> logits [B,K], activations [B,C,h,w] (forward only)."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.trunk = PooledTrunk(pm)
        self.head = PooledHead(pm.ops)

    def forward(self, image):
        a = self.trunk(image)
        return self.head(a), a


class PooledHeadGraph(nn.Module):
    """activations [B,C,h,w] -> logits [B,K]."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.head = PooledHead(pm.ops)

    def forward(self, activations):
        return self.head(activations)


class PooledHeadGrad(nn.Module):
    """activations [B,C,h,w], target [B] -> logits [B,K], gradients [B,C,h,w] (the head's explicit backward at
    the given activations; a negative target selects the top-1 class there)."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.head = PooledHead(pm.ops)

    def forward(self, activations, target):
        logits, caches = self.head.forward_cache(activations)
        target = torch.where(target < 0, logits.argmax(1), target)
        return logits, self.head.backward(activations, caches, target)
