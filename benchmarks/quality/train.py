"""Train a small CLIP ResNet on the synthetic dataset, cache it, and export it with the toolkit's exporter.

The offline benchmark needs a *trained* model of the family the paper explains (open_clip's ModifiedResNet
with its attention pool), and no weights can be downloaded. This module trains one in about a minute on
two CPU cores:

    image tower   open_clip ``CLIP(**config).visual`` of ``export/model_configs/<TrainConfig.model>.json``
    class side    learned class embeddings E [K, D] (L2-normalised) in place of text embeddings; the text
                  tower of the CLIP model stays at its seeded random init and is never used
    logits        logit_scale * cos(visual(x), E_k), logit_scale learned as in CLIP (clamped at 100)

so the exported graphs (explain / classify / head / features) are exactly what they are for a real CLIP
model, with the learned E passed to ``export_model`` as the class set's embeddings.

Reproducibility: the data are ``synthetic_data.generate`` (deterministic per spec / split / index), the
initialisation and the batch order come from ``torch.manual_seed(seed)`` and one ``torch.Generator``,
BatchNorm is in train mode while training and in eval mode after; training runs on one thread. The same
config gives a bitwise identical checkpoint file (checked on one machine: two trainings, same sha256);
other CPUs may differ in the last bits (oneDNN picks kernels by instruction set).

Cache: ``$DECOMCAM_CACHE/quality/<config hash>.pt`` (default ``~/.cache/decomcam/quality``), keyed by the
training config, the dataset spec, the architecture JSON and ``RECIPE_VERSION``; a rerun loads it instead
of training. The ONNX export is cached next to it (``<config hash>-<export fingerprint>/``), keyed also by
the checkpoint's sha256 and the exporter's source, so a changed exporter re-exports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .synthetic_data import SyntheticSpec, class_names, generate, to_arrays

__all__ = ["TrainConfig", "TrainedModel", "cache_root", "config_hash", "train_or_load", "export_trained",
           "RECIPE_VERSION"]

#: Bump when the training code changes in a way that changes the weights (invalidates cached checkpoints).
RECIPE_VERSION = 1

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.OPENAI_DATASET_STD


@dataclass(frozen=True)
class TrainConfig:
    """How the benchmark model is trained. Every field enters the cache key."""

    model: str = "RN-quality"  # open_clip config name in export/model_configs/
    spec: SyntheticSpec = field(default_factory=lambda: SyntheticSpec(n_classes=8, image_size=128, difficulty=0.7))
    n_train_per_class: int = 100  # training images per class (split "train")
    epochs: int = 12  # passes over the training set
    batch_size: int = 32  # images per Adam step
    lr: float = 3e-3  # peak Adam learning rate (linear warm-up over the first epoch's steps, cosine decay)
    weight_decay: float = 1e-4  # Adam L2 penalty
    augment: bool = True  # random flips and 90-degree rotations (the classes are rotation invariant)
    seed: int = 0  # torch.manual_seed for init and batch order
    init_logit_scale: float = 10.0  # CLIP learns log(scale); start here, clamp at 100 like CLIP

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        return d


@dataclass
class TrainedModel:
    """A trained (or cached) benchmark model."""

    checkpoint: Path  # the .pt in the cache
    sha256: str  # of the checkpoint file; the export's pretrained_id is "sha256:<this>"
    class_names: list[str]  # label order of the learned embeddings
    embeddings: np.ndarray  # [K, D] float32, unit rows
    history: list[dict]  # per epoch: loss, train accuracy, logit scale
    cached: bool  # True when loaded from the cache instead of trained
    seconds: float  # training time (0 when cached)


def cache_root() -> Path:
    """``$DECOMCAM_CACHE/quality``, default ``~/.cache/decomcam/quality``."""
    root = os.environ.get("DECOMCAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "decomcam")
    return Path(root) / "quality"


def _config_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "export" / "model_configs"


def _arch_json(name: str) -> dict:
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        choices = sorted(p.stem for p in _config_dir().glob("*.json"))
        raise ValueError(f"no model config '{name}' in {_config_dir()}; available: {', '.join(choices)}")
    return json.loads(path.read_text(encoding="utf-8"))


def config_hash(cfg: TrainConfig) -> str:
    """16 hex digits of sha256 over the config, the architecture JSON and the recipe version."""
    blob = json.dumps({"train": cfg.to_json(), "arch": _arch_json(cfg.model), "recipe": RECIPE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_clip(cfg: TrainConfig):
    """The open_clip CLIP model of ``cfg.model``, seeded init (the text tower stays random)."""
    import open_clip
    import torch

    arch = _arch_json(cfg.model)
    if arch["vision_cfg"]["image_size"] != cfg.spec.image_size:
        raise ValueError(f"model '{cfg.model}' takes {arch['vision_cfg']['image_size']} px images but the "
                         f"dataset spec draws {cfg.spec.image_size} px ones")
    torch.manual_seed(cfg.seed)
    model = open_clip.model.CLIP(**arch)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.init_logit_scale))
    return model


def _normalise(x_uint8: np.ndarray):
    """uint8 [N, S, S, 3] RGB -> float32 torch [N, 3, S, S], CLIP-normalised (= runtime preprocess at size S)."""
    import torch

    x = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _augment(x, g):
    """Random horizontal / vertical flips and 90-degree rotations, per image, from generator g."""
    import torch

    n = x.shape[0]
    flip_h = torch.rand(n, generator=g) < 0.5
    flip_v = torch.rand(n, generator=g) < 0.5
    rot = torch.randint(0, 4, (n,), generator=g)
    x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(2), x)
    out = x.clone()
    for k in (1, 2, 3):
        sel = rot == k
        if sel.any():
            out[sel] = torch.rot90(x[sel], k, dims=(2, 3))
    return out


def _logits(model, emb, x):
    import torch.nn.functional as F

    feats = F.normalize(model.visual(x), dim=-1)  # [B, D]
    return model.logit_scale.exp() * feats @ F.normalize(emb, dim=-1).T  # [B, K]


def _train(cfg: TrainConfig, out: Path) -> tuple[list[dict], float]:
    """Train and write the checkpoint to ``out``; returns (history, seconds)."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    names = class_names(cfg.spec)
    log(f"[quality] generating {cfg.n_train_per_class} x {len(names)} training images ...")
    x_np, y_np = to_arrays(generate(cfg.spec, cfg.n_train_per_class, "train"))
    x_all, y_all = _normalise(x_np), torch.from_numpy(y_np)
    del x_np

    model = build_clip(cfg)
    d = model.visual.attnpool.c_proj.out_features
    g = torch.Generator().manual_seed(cfg.seed)
    emb = torch.nn.Parameter(torch.randn(len(names), d, generator=g))  # [K, D]
    params = list(model.visual.parameters()) + [emb, model.logit_scale]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x_all.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    visual = model.visual.to(memory_format=torch.channels_last)
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        te = time.perf_counter()
        visual.train()  # BatchNorm uses batch statistics and updates its running averages
        order = torch.randperm(n, generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb, yb = x_all[idx], y_all[idx]
            if cfg.augment:
                xb = _augment(xb, g)
            xb = xb.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = _logits(model, emb, xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            step += 1
        # No timings in the history: it is saved in the checkpoint, whose sha256 must be reproducible.
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "train_accuracy": correct / n,
                        "logit_scale": float(model.logit_scale.exp())})
        log(f"[quality] epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / n:.3f}, train accuracy "
            f"{correct / n:.3f}, {time.perf_counter() - te:.1f} s")
    model.eval()  # BatchNorm running statistics from here on
    model.visual.to(memory_format=torch.contiguous_format)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    unit = F.normalize(emb.detach(), dim=-1).contiguous()
    ckpt = {"state_dict": state, "class_embeddings": unit, "class_names": names, "config": cfg.to_json(),
            "history": history, "recipe": RECIPE_VERSION}
    out.parent.mkdir(parents=True, exist_ok=True)
    from runtime.fsutil import atomic_open

    with atomic_open(out) as f:
        torch.save(ckpt, f)
    return history, time.perf_counter() - t0


def load_checkpoint(path: Path):
    """(CLIP model in eval mode, checkpoint dict) from a checkpoint written by ``train_or_load``."""
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    spec = SyntheticSpec(**ckpt["config"]["spec"])
    cfg = TrainConfig(**{**ckpt["config"], "spec": spec})
    model = build_clip(cfg)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    return model, ckpt


def train_or_load(cfg: TrainConfig, use_cache: bool = True, threads: int | None = 1) -> TrainedModel:
    """The trained model of ``cfg``: loaded from the cache when present, else trained and cached.

    threads: torch intra-op threads while training (restored after). 1 by default: the result then does
    not depend on the machine's core count, and on a shared 2-core machine one thread was measured
    faster than two (2.5-3x); None keeps torch's setting.
    """
    import torch

    path = cache_root() / f"{config_hash(cfg)}.pt"
    cached = use_cache and path.is_file()
    seconds = 0.0
    if cached:
        log(f"[quality] using cached checkpoint {path}")
    else:
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            _, seconds = _train(cfg, path)
        finally:
            torch.set_num_threads(before)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    return TrainedModel(
        checkpoint=path, sha256=_sha256(path), class_names=list(ckpt["class_names"]),
        embeddings=ckpt["class_embeddings"].numpy().astype(np.float32), history=list(ckpt["history"]),
        cached=cached, seconds=seconds,
    )


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _export_fingerprint(sha: str) -> str:
    """Checkpoint sha256 + the exporter's sources + library versions: when any changes, re-export."""
    import onnx
    import torch

    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256(sha.encode())
    for rel in ("export/graphs.py", "export/onnx_export.py", "runtime/spec.py"):
        h.update((root / rel).read_bytes())
    h.update(f"{torch.__version__}|{onnx.__version__}".encode())
    return h.hexdigest()[:16]


def export_trained(tm: TrainedModel, cfg: TrainConfig, out_dir: Path | None = None,
                   use_cache: bool = True) -> Path:
    """Export the trained model with ``export.onnx_export.export_model`` (learned class embeddings as the
    class set ``synthetic``). Returns the artifacts folder: ``out_dir`` when given (the cached export is
    copied there), else the cached folder itself."""
    from export.classes import class_set_from_names
    from export.models import LoadedModel
    from export.onnx_export import export_model

    cached_dir = cache_root() / f"{config_hash(cfg)}-{_export_fingerprint(tm.sha256)}"
    if not (use_cache and (cached_dir / "manifest.json").is_file()):
        model, _ = load_checkpoint(tm.checkpoint)
        lm = LoadedModel(model=model, name=cfg.model, pretrained=str(tm.checkpoint),
                         pretrained_id=f"sha256:{tm.sha256}", image_size=cfg.spec.image_size,
                         mean=CLIP_MEAN, std=CLIP_STD, random_weights=False)
        cs = class_set_from_names(tm.class_names, "synthetic")
        tmp = cached_dir.with_name(f".{cached_dir.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        export_model(lm, [cs], tmp, embeddings={cs.name: tm.embeddings})
        shutil.rmtree(cached_dir, ignore_errors=True)
        os.replace(tmp, cached_dir)
    else:
        log(f"[quality] using cached export {cached_dir}")
    if out_dir is None:
        return cached_dir
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(cached_dir, out_dir)
    return out_dir
