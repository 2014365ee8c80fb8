"""The pooled-linear family's torch side: a CNN classifier split at its target layer, as forward modules.

Most CNN classifiers people deploy end in global average pooling and a small head (torchvision ResNet /
EfficientNet / MobileNetV3 / ConvNeXt, timm, EfficientNet-Lite):

    target layer A [B, C, h, w] -> [local modules at every position] -> mean over h, w -> head modules -> logits [B, K]

The local modules exist where the target layer is one block earlier (the 1x1 conv head of EfficientNet and
MobileNetV3 runs position-wise before the pooling; the head is then not linear in A). The classes are fixed (the
last Linear's K outputs): the graphs have no `text` input and the labels live in the export.

`PooledModel` wraps an unmodified classifier with its split (PooledParts, declared per architecture in
export/architectures.py). `PooledTrunk` and `PooledHead` are the forward modules the export traces: the
classifier's own modules, nothing rewritten. No backward is written here: export/onnx_grad.py generates the head's
from the exported graph, and the export validates it against torch autograd on the unmodified module
(`PooledModel.autograd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


class HeadError(ValueError):
    """A classifier split the family cannot use (a head that does not end in a Linear, a split with no 1x1 conv
    head one block earlier, ...)."""


@dataclass
class PooledParts:
    """How one classifier splits at its target layer (declared per architecture in export/architectures.py)."""

    trunk: Callable[[torch.Tensor], torch.Tensor]   # image [B, 3, H, W] -> activations [B, C, h, w]
    head_modules: list                              # the modules after the global pooling, in order
    target_module: nn.Module                        # module whose output (call `target_call`) is the target layer
    target_call: int = -1                           # which call of target_module in one forward (-1: the last)
    name: str = ""                                  # the target layer, as the manifest names it
    local_modules: list = field(default_factory=list)  # position-wise modules between the layer and the pooling


_NO_OPS = (nn.Dropout, nn.Flatten, nn.Identity)   # modules that do nothing to the logits in eval


def _flatten(modules: list[nn.Module]) -> list[nn.Module]:
    flat: list[nn.Module] = []
    for m in modules:
        flat.extend(_flatten(list(m)) if isinstance(m, nn.Sequential) else [m])
    return flat


def logits_layer(head_modules: list[nn.Module]) -> nn.Linear:
    """The head's last Linear, whose outputs are the logits (Dropout, Flatten, Identity after it change nothing);
    a HeadError when the head ends otherwise."""
    active = [m for m in _flatten(head_modules) if not isinstance(m, _NO_OPS)]
    if not active or not isinstance(active[-1], nn.Linear):
        raise HeadError("the head must end in a Linear layer (the logits)")
    return active[-1]


class PooledModel(nn.Module):
    """An unmodified classifier plus its split; `forward` is the classifier's own forward."""

    def __init__(self, model: nn.Module, parts: PooledParts):
        super().__init__()
        self.model = model
        self.parts = parts
        self._num_classes = int(logits_layer(parts.head_modules).out_features)

    def forward(self, image):
        return self.model(image)

    @property
    def num_classes(self) -> int:
        return self._num_classes

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
    """image [B, 3, H, W] -> activations [B, C, h, w]: the classifier up to the target layer."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.model = pm.model  # registers the parameters
        self._trunk = pm.parts.trunk

    def forward(self, image):
        return self._trunk(image)


class PooledHead(nn.Module):
    """activations [B, C, h, w] -> logits [B, K]: the classifier's own modules after the target layer
    (PooledModel.head_eager)."""

    def __init__(self, pm: PooledModel):
        super().__init__()
        self.model = pm.model  # registers the parameters
        self._head = pm.head_eager

    def forward(self, activations):
        return self._head(activations)
