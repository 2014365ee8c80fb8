"""The method interface: what the explainer hands a method, and what a method gives back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..backend import Backend
from ..config import DecomCamConfig
from ..stages import Stages


@dataclass
class MethodContext:
    """Everything one batch of B images offers a method (arrays live on the back end's device)."""

    backend: Backend
    x: object                     # [B, 3, S, S] normalised model input
    text: object                  # [L, D] class embeddings
    target: object                # [B] int64 (host numpy), the explained class per image
    logits: object                # [B, L] logits of the unmodified image
    activations: object | None    # [B, C, h, w] target layer (None for methods that do not ask)
    gradients: object | None      # [B, C, h, w] d logit_target / d activations (None unless asked)
    classify: Callable            # images [N, 3, S, S] -> logits [N, L], batched through classify.onnx
    head: Callable | None         # activations [N, C, h, w] -> logits [N, L], batched through head.onnx
    mean: tuple
    std: tuple
    logit_scale: float
    config: DecomCamConfig
    stage: Stages | None = None   # `with ctx.stage("decompose"):` times a stage (created with the context)
    batch_size: int = 32          # images per graph call: methods that generate many inputs (Score-CAM,
                                  # Ablation-CAM) build them in chunks of this size, so memory stays bounded
    fixed_chunks: bool = False    # pad a short last chunk to batch_size (one input shape per graph; the
                                  # Explainer sets it for cuda and trt, EngineOptions.fixed_chunks)
    head_gradient: Callable | None = None  # (activations [N, C, h, w], target [N]) -> d logit_target / d
                                  # activations [N, C, h, w] at those activations, batched through head_grad.onnx
    features: Callable | None = None  # images [N, 3, S, S] -> activations [N, C, h, w] of the target layer,
                                  # batched through features.onnx (explain.onnx in an export without it)

    def __post_init__(self):
        if self.stage is None:
            self.stage = Stages(self.backend)

    @property
    def timings(self) -> dict:
        """stage -> seconds of this call's stages so far."""
        return self.stage.times


@dataclass
class MethodOutput:
    saliency: object                          # [B, S, S] float32 in [0, 1]
    components: object | None = None          # [B, p, S, S] feature-level maps (Decom-CAM)
    weights: object | None = None             # [B, p] component weights
    scores: object | None = None              # [B, p] per-component gains C_i
    explained_variance: object | None = None  # [B, p]
    singular_values: object | None = None     # [B, p]
    forwards: int = 0                         # extra classifier/head forwards per image


class Method:
    name = "base"
    needs_activations = True   # run explain.onnx (or a forward that yields activations)
    needs_gradients = True     # gradients are needed (explain.onnx)
    needs_head = False         # uses head.onnx
    needs_head_grad = False    # uses head_grad.onnx (the head's gradient at other activations)
    uses: tuple[str, ...] = ()  # the Settings fields (besides method, target, ...) its numbers depend on
    doc = ""

    def __call__(self, ctx: MethodContext) -> MethodOutput:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid methods: {', '.join(METHODS)}")
    return METHODS[name]()
