"""Class sets and zero-shot text embeddings.

A class set is a list of names plus prompt templates. Its embeddings `[L, D]` are the L2-normalised mean
over templates of the L2-normalised text features (CLIP's zero-shot recipe), cached to `.npy` under
`~/.cache/decomcam/embeddings` keyed by model, weights, names and templates.

Built-in sets: `voc` (the 20 PASCAL VOC classes) and `imagenet` (open_clip's 1000 names). A custom set
comes from a text file with one name per line. Templates: `authors` ('the {} in the picture', the
Decom-CAM authors' prompt, the default), `photo` ('a photo of a {}.'), `imagenet` (open_clip's 80
OpenAI templates), or any string containing '{}'.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import open_clip
from runtime.fsutil import atomic_open, remove_stale_temporaries
from runtime.manifest import SET_NAME, SET_NAME_RULE
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# Prompt-friendly spellings of the VOC names (the label names stay the VOC ones).
_VOC_PROMPT_NAMES = {"aeroplane": "aeroplane", "diningtable": "dining table", "motorbike": "motorbike",
                     "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

BUILTIN_SETS = ("voc", "imagenet")
TEMPLATE_SETS = {
    "authors": ("the {} in the picture",),
    "photo": ("a photo of a {}.",),
    "imagenet": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
}
DEFAULT_TEMPLATE = "authors"


class ClassSetError(ValueError):
    """A class set or template that cannot be used."""


@dataclass(frozen=True)
class ClassSet:
    name: str                    # set name, used for file names in the artifacts folder
    labels: tuple[str, ...]      # label names (what the user selects a target by)
    prompts: tuple[str, ...]     # the text inserted into the templates, one per label
    templates: tuple[str, ...]   # prompt templates, each containing '{}'


def resolve_templates(template: str | None) -> tuple[str, ...]:
    template = template or DEFAULT_TEMPLATE
    if template in TEMPLATE_SETS:
        return TEMPLATE_SETS[template]
    if "{}" not in template:
        raise ClassSetError(
            f"template '{template}' must contain '{{}}' or be one of: {', '.join(TEMPLATE_SETS)}"
        )
    return (template,)


def check_set_name(name: str) -> str:
    """A class-set name is a plain identifier (it names files in the artifacts folder)."""
    if not isinstance(name, str) or not SET_NAME.match(name):
        raise ClassSetError(f"class set name {name!r} is not a plain identifier ({SET_NAME_RULE}); "
                            f"choose one with --name")
    return name


def _clean_names(names, source: str) -> list[str]:
    out = [n.strip() for n in names if n.strip() and not n.strip().startswith("#")]
    if not out:
        raise ClassSetError(f"{source}: no class names")
    bad = [n for n in out if not n.isprintable()]
    if bad:
        raise ClassSetError(f"{source}: class name {bad[0][:60]!r} contains a line break or control character")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ClassSetError(f"{source}: duplicate class names: {', '.join(dup[:5])}")
    return out


def get_class_set(spec: str, template: str | None = None, name: str | None = None) -> ClassSet:
    """`spec` is a built-in set name or a text file (one name per line)."""
    templates = resolve_templates(template)
    if spec == "voc":
        labels = list(VOC_CLASSES)
        prompts = [_VOC_PROMPT_NAMES.get(c, c) for c in labels]
        return ClassSet(check_set_name("voc" if name is None else name), tuple(labels), tuple(prompts), templates)
    if spec == "imagenet":
        labels = list(IMAGENET_CLASSNAMES)
        return ClassSet(check_set_name("imagenet" if name is None else name), tuple(labels), tuple(labels), templates)
    path = Path(spec)
    if path.is_file():
        set_name = check_set_name(path.stem if name is None else name)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ClassSetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        labels = _clean_names(text.split("\n"), str(path))
        return ClassSet(set_name, tuple(labels), tuple(labels), templates)
    raise ClassSetError(f"class set '{spec}' is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a file")


def class_set_from_names(names: list[str], name: str, template: str | None = None) -> ClassSet:
    labels = _clean_names(names, f"class set '{check_set_name(name)}'")
    return ClassSet(name, tuple(labels), tuple(labels), resolve_templates(template))


def _cache_dir() -> Path:
    root = os.environ.get("DECOMCAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "decomcam")
    return Path(root) / "embeddings"


def embedding_key(model_name: str, pretrained_id: str, cs: ClassSet) -> str:
    blob = json.dumps([model_name, pretrained_id, cs.prompts, cs.templates])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@torch.no_grad()
def text_embeddings(model, model_name: str, pretrained_id: str, cs: ClassSet, use_cache: bool = True,
                    batch_size: int = 256) -> np.ndarray:
    """L2-normalised class embeddings [L, D] float32, cached on disk when `use_cache`."""
    cache = _cache_dir() / f"{embedding_key(model_name, pretrained_id, cs)}.npy"
    if use_cache and cache.is_file():
        return np.load(cache)
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = [t.replace("{}", p) for p in cs.prompts for t in cs.templates]  # L*T prompts, class-major
    feats = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]), normalize=True)
                       for i in range(0, len(texts), batch_size)])
    mean = feats.reshape(len(cs.prompts), len(cs.templates), -1).mean(1)  # [L, D]
    emb = (mean / mean.norm(dim=-1, keepdim=True)).float().numpy()
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(cache.parent)
        with atomic_open(cache) as f:
            np.save(f, emb)
    return emb


def check_embeddings(embeddings: dict[str, np.ndarray], class_sets: list[ClassSet], d: int) -> dict[str, np.ndarray]:
    """Validate precomputed class embeddings against their class sets; return them L2-normalised, float32. A
    set that is not exported, a wrong shape or a non-finite / all-zero row is an ExportError."""
    from .writing import ExportError

    sets = {cs.name: cs for cs in class_sets}
    out = {}
    for name, emb in embeddings.items():
        if name not in sets:
            raise ExportError(f"embeddings given for class set '{name}', which is not exported "
                              f"(class sets: {', '.join(sets) or 'none'})")
        e = np.asarray(emb, dtype=np.float64)
        want = (len(sets[name].labels), d)
        if e.shape != want:
            raise ExportError(f"embeddings for class set '{name}' have shape {e.shape}, expected {want}")
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        if not np.all(np.isfinite(e)) or np.any(norms == 0):
            raise ExportError(f"embeddings for class set '{name}' have a non-finite or all-zero row")
        out[name] = (e / norms).astype(np.float32)
    return out


def write_class_set(out_dir: Path, cs: ClassSet, emb: np.ndarray) -> dict:
    """Write a class set's labels (`classes/<name>.txt`) and embeddings (`classes/<name>.npy`) atomically; return
    its manifest entry."""
    from runtime.artifacts import sha256_path
    from runtime.fsutil import atomic_write

    cdir = Path(out_dir) / "classes"
    cdir.mkdir(parents=True, exist_ok=True)
    check_set_name(cs.name)
    remove_stale_temporaries(cdir)
    npy = cdir / f"{cs.name}.npy"
    with atomic_open(npy) as f:
        np.save(f, emb.astype(np.float32))
    labels = ("\n".join(cs.labels) + "\n").encode("utf-8")
    atomic_write(cdir / f"{cs.name}.txt", labels)
    return {"labels": f"classes/{cs.name}.txt", "embeddings": f"classes/{cs.name}.npy", "count": len(cs.labels),
            "templates": list(cs.templates), "sha256": sha256_path(npy),
            "labels_sha256": hashlib.sha256(labels).hexdigest()}
