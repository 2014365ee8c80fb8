"""The pooled-linear family: CNN classifiers whose head after the target layer is global average pooling
followed by a small MLP, with the head's backward written by hand.

Most CNN classifiers people deploy end this way (torchvision ResNet/EfficientNet/MobileNetV3/ConvNeXt,
timm, EfficientNet-Lite): target layer A [B, C, h, w] -> p = mean_hw(A) [B, C] -> head ops -> logits [B, K].
A target layer one block earlier puts a position-wise part before the pooling (the 1x1 conv head of
EfficientNet and MobileNetV3: Conv2d 1x1 -> BatchNorm -> activation at every position), and then the head is
not linear in A: A -> local ops at each of the h w positions -> mean over positions -> head ops -> logits.
The ops supported here, each with its vector-Jacobian product in plain torch ops:

    Linear      y = x W^T + b                     g_x = g_y W
    ReLU        y = max(x, 0)                     g_x = g_y * (x > 0)
    Hardswish   y = x relu6(x + 3) / 6            g_x = g_y * (0 | x / 3 + 1/2 | 1)   (torch's backward)
    ReLU6       y = min(max(x, 0), 6)             g_x = g_y * (0 < x < 6)             (local ops only)
    SiLU        y = x sigmoid(x)                  g_x = g_y * s (1 + x (1 - s))       (local ops only)
    Conv2d 1x1  a Linear over channels at every position (no padding, stride 1, one group)
    BatchNorm2d y = x k + t (eval statistics)     g_x = g_y * k                       (local ops only)
    LayerNorm   y = (x - mu) / s * w + b          g_x = (g^ - mean(g^) - x^ mean(g^ x^)) / s,  g^ = g_y w
    Dropout, Flatten, Identity                    no-ops in eval

and the pooling's backward broadcasts: dy/dA[b, c, i, j] = g_p[b, c] / (h w). For a single Linear head this is
the design card's dy/dA = W[target] / (h w). With local ops the pooling's backward comes first and the local
ops' backward then runs at every position (on [B, h w, C] rows). The classes are fixed (the Linear's K outputs): the graphs have
no `text` input and the labels live in the export.

`PooledModel` wraps an unmodified classifier with its declarations (trunk, local modules, head modules, target
layer) so the export can build its graphs and validate them against torch autograd on the unmodified module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class HeadError(ValueError):
    """A classifier head with a module whose backward is not written here."""


SUPPORTED_HEAD_MODULES = ("Linear", "ReLU", "Hardswish", "LayerNorm", "LayerNorm2d", "Dropout", "Flatten", "Identity")
SUPPORTED_LOCAL_MODULES = ("Conv2d 1x1", "BatchNorm2d", "ReLU", "ReLU6", "Hardswish", "SiLU", "Dropout", "Identity")


class _Op(nn.Module):
    """One head op: forward(x) -> (y, cache); backward(g_y, cache) -> g_x. x, y [B, n] after the pooling,
    [B, h w, n] for the local ops (every op acts on the last axis)."""


class _Linear(_Op):
    def __init__(self, lin: nn.Linear | nn.Conv2d):
        super().__init__()
        w = lin.weight.detach().clone()
        self.register_buffer("w", w.reshape(w.shape[0], -1))  # [out, in] (a 1x1 conv's [out, in, 1, 1] too)
        b = lin.bias.detach().clone() if lin.bias is not None else torch.zeros(w.shape[0])
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


class _ReLU6(_Op):
    def forward(self, x):
        return torch.clamp(x, 0.0, 6.0), x

    def backward(self, g, x):
        # torch's hardtanh_backward: the gradient passes strictly inside (0, 6)
        return g * ((x > 0.0) & (x < 6.0)).to(g.dtype)


class _SiLU(_Op):
    def forward(self, x):
        return x * torch.sigmoid(x), x

    def backward(self, g, x):
        s = torch.sigmoid(x)
        return g * (s * (1.0 + x * (1.0 - s)))


class _BatchNorm(_Op):
    """BatchNorm2d in eval: a per-channel affine map with the running statistics."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise HeadError("a BatchNorm2d without running statistics has no fixed eval map")
        k = 1.0 / torch.sqrt(bn.running_var.detach() + bn.eps)
        if bn.weight is not None:
            k = k * bn.weight.detach()
        t = -bn.running_mean.detach() * k
        if bn.bias is not None:
            t = t + bn.bias.detach()
        self.register_buffer("k", k.clone())
        self.register_buffer("t", t.clone())

    def forward(self, x):
        return x * self.k + self.t, None

    def backward(self, g, cache):
        return g * self.k


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


def _flatten(modules: list[nn.Module]) -> list[nn.Module]:
    flat: list[nn.Module] = []
    for m in modules:
        flat.extend(m if isinstance(m, nn.Sequential) else [m])
    return flat


def _convert(modules: list[nn.Module], table, skip: tuple, what: str, supported: tuple) -> list[_Op]:
    """Modules -> ops by the first matching (test, make) row of `table`; `skip` types are no-ops in eval;
    anything else is a HeadError naming the module (`what`: "head" or "local head")."""
    ops: list[_Op] = []
    for m in _flatten(modules):
        if isinstance(m, skip):
            continue
        make = next((mk for test, mk in table if test(m)), None)
        if make is None:
            raise HeadError(f"{what} module {type(m).__name__} has no hand-written backward; supported: "
                            f"{', '.join(supported)}")
        ops.append(make(m))
    return ops


_HEAD_TABLE = (
    (lambda m: isinstance(m, nn.Linear), _Linear),
    (lambda m: isinstance(m, nn.ReLU), lambda m: _ReLU()),
    (lambda m: isinstance(m, nn.Hardswish), lambda m: _Hardswish()),
    # torchvision's LayerNorm2d too
    (lambda m: isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1, _LayerNorm),
)


def head_ops(modules: list[nn.Module]) -> list[_Op]:
    """The classifier's modules after the pooling -> ops with a hand-written backward (HeadError otherwise)."""
    ops = _convert(modules, _HEAD_TABLE, (nn.Dropout, nn.Flatten, nn.Identity), "head", SUPPORTED_HEAD_MODULES)
    if not ops or not isinstance(ops[-1], _Linear):
        raise HeadError("the head must end in a Linear layer (the logits)")
    return ops


def _is_1x1_conv(m: nn.Module) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    pad = getattr(m, "static_padding", None)      # EfficientNet-Lite's Conv2dStaticSamePadding
    same_pad = (pad is None or type(pad).__name__ == "Identity"
                or (isinstance(pad, nn.ZeroPad2d) and not any(pad.padding)))
    return (tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) and m.groups == 1
            and tuple(m.dilation) == (1, 1) and m.padding in ((0, 0), 0, "valid") and same_pad)


def _local_conv(m: nn.Conv2d) -> _Op:
    if not _is_1x1_conv(m):
        raise HeadError(f"local head module {type(m).__name__} {tuple(m.kernel_size)} is not a position-wise 1x1 "
                        f"convolution (stride 1, one group, no padding)")
    return _Linear(m)


_LOCAL_TABLE = (
    (lambda m: isinstance(m, nn.Conv2d), _local_conv),
    (lambda m: isinstance(m, nn.BatchNorm2d), _BatchNorm),
    (lambda m: isinstance(m, nn.ReLU6), lambda m: _ReLU6()),
    (lambda m: isinstance(m, nn.ReLU), lambda m: _ReLU()),
    (lambda m: isinstance(m, nn.Hardswish), lambda m: _Hardswish()),
    (lambda m: isinstance(m, nn.SiLU), lambda m: _SiLU()),
)


def local_ops(modules: list[nn.Module]) -> list[_Op]:
    """The position-wise modules between the target layer and the pooling -> ops with a hand-written backward
    (HeadError naming the module otherwise)."""
    return _convert(modules, _LOCAL_TABLE, (nn.Dropout, nn.Identity), "local head", SUPPORTED_LOCAL_MODULES)


class PooledHead(nn.Module):
    """[local ops at every position] + global average pooling + head ops, with the explicit backward of one
    logit per image."""

    def __init__(self, ops: list[_Op], local: list[_Op] = ()):
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.local = nn.ModuleList(local)

    def forward_cache(self, a: torch.Tensor):
        local_caches = []
        if len(self.local):
            x = a.flatten(2).transpose(1, 2)                 # [B, h w, C]: one row per position
            for op in self.local:
                x, c = op(x)
                local_caches.append(c)
            x = x.mean(1)                                    # [B, C']
        else:
            x = a.mean((2, 3))                               # [B, C]
        caches = []
        for op in self.ops:
            x, c = op(x)
            caches.append(c)
        return x, (caches, local_caches)                     # logits [B, K]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.forward_cache(a)[0]

    def backward(self, a: torch.Tensor, caches, target: torch.Tensor) -> torch.Tensor:
        """d logits[b, target[b]] / d a, shape [B, C, h, w]."""
        caches, local_caches = caches
        last = self.ops[-1]
        g = last.w[target]                                   # [B, n_in]: one-hot through the last Linear
        for op, c in zip(reversed(self.ops[:-1]), reversed(caches[:-1])):
            g = op.backward(g, c)
        n = a.shape[2] * a.shape[3]
        if not len(self.local):
            return g[:, :, None, None].expand_as(a) / n      # [B, C, h, w]: the mean's backward
        g = (g / n)[:, None, :].expand(-1, n, -1)            # [B, h w, C']: the mean's backward
        for op, c in zip(reversed(list(self.local)), reversed(local_caches)):
            g = op.backward(g, c)
        return g.transpose(1, 2).reshape(a.shape)            # [B, C, h, w]


@dataclass
class PooledParts:
    """How one classifier splits at its target layer (declared per architecture in export/models.py)."""

    trunk: Callable[[torch.Tensor], torch.Tensor]   # image [B, 3, H, W] -> activations [B, C, h, w]
    head_modules: list                              # the modules after the global pooling, in order
    target_module: nn.Module                        # module whose output (call `target_call`) is the target layer
    target_call: int = -1                           # which call of target_module in one forward (-1: the last)
    name: str = ""                                  # the target layer, as the manifest names it
    local_modules: list = field(default_factory=list)  # position-wise modules between the layer and the pooling


class PooledModel(nn.Module):
    """An unmodified classifier plus its split; `forward` is the classifier's own forward."""

    def __init__(self, model: nn.Module, parts: PooledParts):
        super().__init__()
        self.model = model
        self.parts = parts
        self.ops = head_ops(parts.head_modules)
        self.local = local_ops(parts.local_modules)

    def head(self) -> PooledHead:
        return PooledHead(self.ops, self.local)

    def forward(self, image):
        return self.model(image)

    @property
    def num_classes(self) -> int:
        return int(self.ops[-1].w.shape[0])

    def head_eager(self, act: torch.Tensor) -> torch.Tensor:
        """The unmodified head modules on activations: the local modules, global average pooling, then each
        module."""
        x = act
        for m in self.parts.local_modules:
            x = m(x)
        x = x.mean((2, 3), keepdim=True)                     # [B, C, 1, 1] as AdaptiveAvgPool2d(1)
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
        self.head = pm.head()

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
        self.head = pm.head()

    def forward(self, image):
        return self.head(self.trunk(image))


class PooledFeatures(nn.Module):
    """image [B,3,H,W] -> logits [B,K], activations [B,C,h,w] (forward only)."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.trunk = PooledTrunk(pm)
        self.head = pm.head()

    def forward(self, image):
        a = self.trunk(image)
        return self.head(a), a


class PooledHeadGraph(nn.Module):
    """activations [B,C,h,w] -> logits [B,K]."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.head = pm.head()

    def forward(self, activations):
        return self.head(activations)


class PooledHeadGrad(nn.Module):
    """activations [B,C,h,w], target [B] -> logits [B,K], gradients [B,C,h,w] (the head's explicit backward at
    the given activations; a negative target selects the top-1 class there)."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.head = pm.head()

    def forward(self, activations, target):
        logits, caches = self.head.forward_cache(activations)
        target = torch.where(target < 0, logits.argmax(1), target)
        return logits, self.head.backward(activations, caches, target)
