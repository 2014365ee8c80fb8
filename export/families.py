"""Model families as data: what the torch export needs to know about each family of runtime/spec.py FAMILIES.

One `ExportFamily` per family declares
    trunk, head        the torch FORWARD modules: image -> the target layer's activations, and the head after it
                       (activations [, text] -> logits). The export traces them to one ONNX graph and derives the
                       five graphs from it (export/onnx_import.derive_graphs: cuts, and export/onnx_grad.py's
                       generated backward of the head); no family writes a backward
    dims               the contract's fixed axis sizes (C, h, w, H, W and D or K)
    autograd, eager_head
                       the references the graphs are validated against: torch autograd on the unmodified model
                       (logits, activations, d logits[b, t_b] / d activations) and the unmodified head
    local_kinks        whether the head has position-wise kinks before the pooling (explain.gradients is then also
                       compared at the graph's own activations, export/onnx_export.references_for)
    logit_scale        the manifest's logit scale
    plan_classes, write_classes
                       the classes: clip's are data (class sets with text embeddings, a `text` input [L, D], L
                       dynamic); pooled-linear's are the classifier's K fixed outputs (labels only)

The graph contracts (inputs, outputs, axes, tolerances, whether there is a `text` input) are runtime/spec.py's
Family of the same name; preprocessing and labels come with the loaded model (export/models.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from runtime.spec import Family, family as spec_family

from .classes import ClassSet, check_embeddings, text_embeddings, write_class_set
from .graphs import PoolHead, Trunk, autograd_reference, head_logits
from .models import LoadedModel
from .pooled import PooledHead, PooledTrunk
from .writing import write_labels


@dataclass(frozen=True)
class ExportFamily:
    name: str                                                     # a key of runtime/spec.py FAMILIES
    default_target_layer: Callable[[LoadedModel], str]            # the target layer the manifest names by default
    trunk: Callable[[LoadedModel, str], nn.Module]                # (model, target layer) -> image -> activations
    head: Callable[[LoadedModel], nn.Module]                      # activations [, text] -> logits
    dims: Callable[[LoadedModel], dict]                           # {"3", "H", "W", "C", "h", "w", "D" or "K"}
    autograd: Callable[..., tuple]                                # (model, image, text, target) -> logits, act, grad
    eager_head: Callable[..., torch.Tensor]                       # (model, act, text) -> logits
    local_kinks: Callable[[LoadedModel], bool]
    logit_scale: Callable[[LoadedModel], float]
    plan_classes: Callable[..., Any]      # (model, class sets, embeddings, labels name) -> plan, checked before export
    write_classes: Callable[..., tuple]   # (model, out dir, plan) -> ({set name: manifest entry}, default set)

    @property
    def spec(self) -> Family:
        """The graph contracts (runtime/spec.py)."""
        return spec_family(self.name)


class Forward(nn.Module):
    """image [B, 3, H, W] -> logits, activations: the trunk to the target layer, then the head."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, image):
        a = self.trunk(image)
        return self.head(a), a


class ForwardWithText(Forward):
    """image [B, 3, H, W], text [L, D] -> logits [B, L], activations."""

    def forward(self, image, text):
        a = self.trunk(image)
        return self.head(a, text), a


def forward_module(lm: LoadedModel, target_layer: str) -> nn.Module:
    """The model's forward as its family builds it (eval mode): what the export traces."""
    fam = export_family(lm.family)
    cls = ForwardWithText if fam.spec.text_input else Forward
    return cls(fam.trunk(lm, target_layer), fam.head(lm)).eval()


# -- clip: open_clip's CLIP ResNets, classes as data --------------------------------------------------------------

def _clip_scale(lm: LoadedModel) -> float:
    return float(lm.model.logit_scale.detach().exp())


def _clip_dims(lm: LoadedModel) -> dict:
    v = lm.model.visual
    side = lm.image_size // 32
    return {"3": 3, "H": lm.image_size, "W": lm.image_size, "C": v.attnpool.k_proj.in_features, "h": side,
            "w": side, "D": v.attnpool.c_proj.out_features}


def _clip_plan(lm: LoadedModel, class_sets: list[ClassSet], embeddings: dict | None, labels_name: str | None):
    """The class sets to write, with the given embeddings checked (the others are encoded by the text tower)."""
    return class_sets, check_embeddings(embeddings or {}, class_sets, _clip_dims(lm)["D"])


def _clip_write(lm: LoadedModel, out_dir: Path, plan) -> tuple[dict, str | None]:
    class_sets, given = plan
    entries = {}
    for cs in class_sets:
        emb = given[cs.name] if cs.name in given else text_embeddings(lm.model, lm.name, lm.pretrained_id, cs)
        entries[cs.name] = write_class_set(out_dir, cs, emb)
    return entries, class_sets[0].name if class_sets else None


CLIP = ExportFamily(
    name="clip",
    default_target_layer=lambda lm: "layer4",
    trunk=lambda lm, layer: Trunk(lm.model.visual, layer),
    head=lambda lm: PoolHead(lm.model.visual.attnpool, _clip_scale(lm)),
    dims=_clip_dims,
    autograd=lambda lm, image, text, target: autograd_reference(lm.model, image, text, target),
    eager_head=lambda lm, act, text: head_logits(lm.model, act, text),
    local_kinks=lambda lm: False,
    logit_scale=_clip_scale,
    plan_classes=_clip_plan,
    write_classes=_clip_write,
)


# -- pooled-linear: global average pooling + a small head, fixed classes ---------------------------------------

@torch.no_grad()
def _pooled_dims(lm: LoadedModel) -> dict:
    pm = lm.model
    _, c, h, w = pm.parts.trunk(torch.zeros(1, 3, lm.image_size, lm.image_size)).shape
    return {"3": 3, "H": lm.image_size, "W": lm.image_size, "C": c, "h": h, "w": w, "K": pm.num_classes}


def _pooled_write(lm: LoadedModel, out_dir: Path, name: str) -> tuple[dict, str]:
    """The fixed classes: labels only, in the classifier's output order."""
    return {name: write_labels(out_dir, name, list(lm.labels))}, name


POOLED_LINEAR = ExportFamily(
    name="pooled-linear",
    default_target_layer=lambda lm: lm.model.parts.name,
    trunk=lambda lm, layer: PooledTrunk(lm.model),   # the split is the registry entry's (its parts)
    head=lambda lm: PooledHead(lm.model),
    dims=_pooled_dims,
    autograd=lambda lm, image, text, target: lm.model.autograd(image, target),
    eager_head=lambda lm, act, text: lm.model.head_eager(act),
    local_kinks=lambda lm: len(lm.model.parts.local_modules) > 0,
    logit_scale=lambda lm: 1.0,
    plan_classes=lambda lm, class_sets, embeddings, labels_name: labels_name or "labels",
    write_classes=_pooled_write,
)

EXPORT_FAMILIES: dict[str, ExportFamily] = {f.name: f for f in (CLIP, POOLED_LINEAR)}


def export_family(name: str) -> ExportFamily:
    """The export declaration of a family of runtime/spec.py FAMILIES; an unknown name lists the valid ones."""
    if name not in EXPORT_FAMILIES:
        raise ValueError(f"unknown model family '{name}'; valid families: {', '.join(EXPORT_FAMILIES)}")
    return EXPORT_FAMILIES[name]


def sample_inputs(lm: LoadedModel, batch: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Smooth, image-like normalised inputs and targets (target[0] = -1: the top-1 path), plus random unit class
    embeddings [n_classes, D] where the family has a `text` input; a fixed-class model's targets are among its K."""
    fam = export_family(lm.family)
    g = torch.Generator().manual_seed(seed)
    s = lm.image_size
    low = torch.rand(batch, 3, 8, 8, generator=g)
    pix = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
    pix = (pix + 0.1 * torch.rand(batch, 3, s, s, generator=g)).clamp(0, 1)
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    dims = fam.dims(lm)
    feed = {"image": ((pix - mean) / std).float()}
    if fam.spec.text_input:
        feed["text"] = torch.nn.functional.normalize(torch.randn(n_classes, dims["D"], generator=g), dim=-1)
    else:
        n_classes = dims["K"]
    target = torch.randint(0, n_classes, (batch,), generator=g)
    target[0] = -1
    feed["target"] = target
    return feed


__all__ = ["ExportFamily", "EXPORT_FAMILIES", "export_family", "forward_module", "sample_inputs", "CLIP",
           "POOLED_LINEAR"]
