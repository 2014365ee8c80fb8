"""A deterministic synthetic dataset of labelled, boxed images for offline evaluation.

No dataset can be downloaded here (DESIGN.md), so the tests and offline benchmarks use images this
module draws with numpy + OpenCV: one object class per image, drawn on a cluttered background, with
its tight bounding box(es) for the pointing game and its label for deletion / insertion.

Classes (``FAMILIES``, the first ``SyntheticSpec.n_classes`` are used) are a shape + texture + colour
family each, with a *hardness* in [0, 1] that lowers the object's contrast against the background,
shrinks it and widens its colour jitter, so a trained model's per-class accuracy spreads over several
10% bins (what the paper's binned protocol needs)::

    name      shape             texture   colour    hardness
    disc      filled circle     solid     red       0.0
    square    rotated square    stripes   blue      0.2
    triangle  triangle          dots      green     0.4
    cross     plus sign         checker   yellow    0.6
    ring      annulus           solid     magenta   0.8
    star      five-point star   noise     cyan      1.0
    diamond   rhombus           gradient  orange    0.5
    crescent  crescent          stripes   purple    0.7

Background: a two-colour linear gradient, blurred random-colour blobs, random lines, and per-pixel
noise over the whole image at the end.

Distractors: 0..``max_distractors`` shapes per image from a separate, non-class set (ellipse, hollow
ellipse, pentagon, hexagon, bar), drawn *under* the target object so its box stays tight. Their
choice does not depend on the image's label, so they carry no label information; half of them take
the (jittered) colour of a random class, and the pentagon / hollow ellipse resemble the star / ring,
which makes those hard classes harder still.

Determinism: every sample has its own ``numpy`` Generator seeded from (seed, CRC-32 of the split
name, class, index), so the same spec, split and index always give the same image, independent of
``n_per_class``, and different splits give different images.

Boxes are ``(xmin, ymin, xmax, ymax)`` 0-based inclusive int64, the tight box of the pixels where the
object's (anti-aliased) coverage is at least one half.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import xml.etree.ElementTree as ET

__all__ = [
    "FAMILIES",
    "Family",
    "SyntheticSpec",
    "Sample",
    "generate",
    "class_names",
    "write_voc_layout",
    "write_imagefolder_layout",
    "to_arrays",
]


class Family(NamedTuple):
    """One object class: how it is drawn and how hard it is."""

    name: str
    shape: str  # see _shape_mask
    texture: str  # see _texture
    colour: tuple[int, int, int]  # RGB base colour
    hardness: float  # 0 = large, full contrast; 1 = small, low contrast, strong colour jitter


FAMILIES: tuple[Family, ...] = (
    Family("disc", "disc", "solid", (220, 40, 40), 0.0),
    Family("square", "square", "stripes", (40, 80, 220), 0.2),
    Family("triangle", "triangle", "dots", (40, 180, 60), 0.4),
    Family("cross", "cross", "checker", (230, 200, 40), 0.6),
    Family("ring", "ring", "solid", (200, 50, 200), 0.8),
    Family("star", "star", "noise", (40, 200, 210), 1.0),
    Family("diamond", "diamond", "gradient", (240, 140, 30), 0.5),
    Family("crescent", "crescent", "stripes", (120, 50, 190), 0.7),
)

_DISTRACTOR_SHAPES = ("ellipse", "hollow_ellipse", "pentagon", "hexagon", "bar")
_TEXTURES = ("solid", "stripes", "dots", "checker", "noise", "gradient")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. All fields have defaults; the same spec always gives the same images."""

    n_classes: int = 6  # object classes, the first n of FAMILIES (1..8)
    image_size: int = 96  # side S of the square RGB images, in pixels (>= 32)
    seed: int = 0  # base seed; split name, class and index are mixed in per sample
    max_distractors: int = 2  # each image gets a uniform 0..max_distractors non-class shapes
    second_instance_prob: float = 0.1  # chance of a second, smaller instance of the target class
    noise_std: float = 6.0  # std of the per-pixel Gaussian noise added last (0..255 scale)
    difficulty: float = 1.0  # multiplies every class's hardness (0 = all classes easy), in [0, 1]

    def __post_init__(self) -> None:
        if not 1 <= self.n_classes <= len(FAMILIES):
            raise ValueError(f"n_classes must be in 1..{len(FAMILIES)}, got {self.n_classes}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")
        if not 0.0 <= self.second_instance_prob <= 1.0:
            raise ValueError(f"second_instance_prob must be in [0, 1], got {self.second_instance_prob}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {self.difficulty}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclass(frozen=True)
class Sample:
    """One generated image."""

    image: np.ndarray  # uint8 [S, S, 3], RGB
    label: int  # class index into class_names(spec)
    boxes: np.ndarray  # int64 [K, 4] (xmin, ymin, xmax, ymax) 0-based inclusive, K = 1 or 2 target instances


def class_names(spec: SyntheticSpec) -> list[str]:
    """The class names of ``spec``, in label order."""
    return [f.name for f in FAMILIES[: spec.n_classes]]


# --------------------------------------------------------------------------------------------------
# Drawing helpers (all on float32 RGB canvases [S, S, 3] in 0..255)
# --------------------------------------------------------------------------------------------------

_SHIFT = 4  # cv2 sub-pixel bits for polygon / circle coordinates
_ONE = 1 << _SHIFT


def _fix(v: float) -> int:
    return int(round(v * _ONE))


def _polygon(cx: float, cy: float, local: np.ndarray, angle: float) -> np.ndarray:
    """Rotate local [P, 2] (x, y) vertices by ``angle`` and move them to (cx, cy); fixed-point int32."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    pts = local @ rot.T + np.array([cx, cy])  # [P, 2]
    return np.round(pts * _ONE).astype(np.int32)


def _regular(n: int, r: float, r_inner: float | None = None) -> np.ndarray:
    """Vertices [n or 2n, 2] of a regular polygon (or a star when r_inner is given), first one up."""
    if r_inner is None:
        a = -math.pi / 2 + np.arange(n) * 2 * math.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    a = -math.pi / 2 + np.arange(2 * n) * math.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r_inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], axis=1)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Coverage in [0, 1], float32 [S, S], of one shape whose bounding circle is (cx, cy, r)."""
    m = np.zeros((size, size), np.uint8)
    aa = cv2.LINE_AA
    center = (_fix(cx), _fix(cy))
    if shape == "disc":
        cv2.circle(m, center, _fix(r), 255, -1, aa, _SHIFT)
    elif shape == "ring":
        thick = max(2, int(round(0.35 * r)))
        cv2.circle(m, center, _fix(r - thick / 2), 255, thick, aa, _SHIFT)
    elif shape == "crescent":
        cv2.circle(m, center, _fix(r), 255, -1, aa, _SHIFT)
        off = 0.45 * r
        inner = (_fix(cx + off * math.cos(angle)), _fix(cy + off * math.sin(angle)))
        cv2.circle(m, inner, _fix(0.8 * r), 0, -1, aa, _SHIFT)
    elif shape in ("ellipse", "hollow_ellipse"):
        axes = (_fix(r), _fix(0.55 * r))
        thick = -1 if shape == "ellipse" else max(2, int(round(0.25 * r)))
        deg = math.degrees(angle)
        cv2.ellipse(m, center, axes, deg, 0, 360, 255, thick, aa, _SHIFT)
    else:
        if shape == "square":
            local = _regular(4, r)
        elif shape == "triangle":
            local = _regular(3, r)
        elif shape == "star":
            local = _regular(5, r, 0.45 * r)
        elif shape == "pentagon":
            local = _regular(5, r)
        elif shape == "hexagon":
            local = _regular(6, r)
        elif shape == "diamond":
            local = np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]])
        elif shape == "bar":
            local = np.array([[-r, -0.3 * r], [r, -0.3 * r], [r, 0.3 * r], [-r, 0.3 * r]])
        elif shape == "cross":
            a = 0.33 * r
            local = np.array(
                [[a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r],
                 [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a], [-a, -r]]
            )  # fmt: skip
        else:
            raise ValueError(f"unknown shape {shape!r}")
        cv2.fillPoly(m, [_polygon(cx, cy, local, angle)], 255, aa, _SHIFT)
    return m.astype(np.float32) / 255.0


def _texture(kind: str, size: int, r: float, rng: np.random.Generator) -> np.ndarray:
    """Weight of the light colour, float32 [S, S] in [0, 1]; the rest of each pixel is the dark colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # [S, S] each
    period = max(3.0, r / 2.5)
    theta = rng.uniform(0, math.pi)
    if kind == "solid":
        return np.ones((size, size), np.float32)
    if kind == "stripes":
        u = xx * math.cos(theta) + yy * math.sin(theta)
        return ((u / period) % 2.0 < 1.0).astype(np.float32)
    if kind == "checker":
        p = max(2, int(round(period)))
        return (((xx // p) + (yy // p)) % 2 == 0).astype(np.float32)
    if kind == "dots":
        p = max(4.0, period * 1.5)
        dx = (xx % p) - p / 2
        dy = (yy % p) - p / 2
        return (dx * dx + dy * dy > (0.3 * p) ** 2).astype(np.float32)  # light ground, dark dots
    if kind == "noise":
        n = rng.normal(0, 1, (size, size)).astype(np.float32)
        n = cv2.GaussianBlur(n, (0, 0), max(1.0, r / 6))
        return (n > 0).astype(np.float32)
    if kind == "gradient":
        u = xx * math.cos(theta) + yy * math.sin(theta)
        return ((u - u.min()) / max(float(u.max() - u.min()), 1e-6)).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _paint(canvas: np.ndarray, alpha: np.ndarray, light: np.ndarray, dark: np.ndarray, tex: np.ndarray) -> None:
    """Alpha-blend a two-colour textured fill into canvas [S, S, 3] in place."""
    fill = tex[..., None] * light + (1.0 - tex[..., None]) * dark  # [S, S, 3]
    a = alpha[..., None]  # [S, S, 1]
    canvas *= 1.0 - a
    canvas += a * fill


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered background, float32 [S, S, 3]: gradient + blurred blobs + lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    t = ((u - u.min()) / max(float(u.max() - u.min()), 1e-6))[..., None]  # [S, S, 1]
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    img = ((1 - t) * c0 + t * c1).astype(np.float32)  # [S, S, 3]

    blobs = np.zeros_like(img)
    weight = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(4, 11))):
        m = np.zeros((size, size), np.float32)
        center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        axes = (int(rng.integers(size // 16 + 1, size // 4 + 2)), int(rng.integers(size // 16 + 1, size // 4 + 2)))
        cv2.ellipse(m, center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        m = cv2.GaussianBlur(m, (0, 0), size / 24)
        blobs += m[..., None] * rng.uniform(0, 255, 3).astype(np.float32)
        weight += m
    w = np.clip(weight, 0, 1)[..., None] * 0.7
    img = img * (1 - w) + blobs / np.maximum(weight, 1e-6)[..., None] * w

    for _ in range(int(rng.integers(3, 9))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _place(size: int, r: float, rng: np.random.Generator) -> tuple[float, float]:
    """A centre that keeps the bounding circle of radius r (plus one pixel) inside the image."""
    lo, hi = r + 1.0, size - 2.0 - r
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _tight_box(alpha: np.ndarray) -> np.ndarray | None:
    """0-based inclusive (xmin, ymin, xmax, ymax) of the pixels with coverage >= 0.5, or None."""
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def _sample_rng(spec: SyntheticSpec, split: str, label: int, index: int) -> np.random.Generator:
    split_code = zlib.crc32(split.encode("utf-8"))  # stable across runs, unlike hash()
    return np.random.default_rng(np.random.SeedSequence([spec.seed, split_code, label, index]))


def _draw_sample(spec: SyntheticSpec, split: str, label: int, index: int) -> Sample:
    rng = _sample_rng(spec, split, label, index)
    size = spec.image_size
    fam = FAMILIES[label]
    h = min(1.0, spec.difficulty * fam.hardness)  # effective hardness
    img = _background(size, rng)  # [S, S, 3] float32

    # Distractors (label-independent), drawn first so the target stays fully visible on top.
    for _ in range(int(rng.integers(0, spec.max_distractors + 1))):
        shape = _DISTRACTOR_SHAPES[int(rng.integers(len(_DISTRACTOR_SHAPES)))]
        r = float(rng.uniform(0.10, 0.24)) * size
        cx, cy = _place(size, r, rng)
        alpha = _shape_mask(shape, size, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        if rng.random() < 0.5:  # borrow a class colour
            base = np.array(FAMILIES[int(rng.integers(spec.n_classes))].colour, np.float32)
            base = np.clip(base + rng.normal(0, 20, 3), 0, 255)
        else:
            base = rng.uniform(0, 255, 3)
        tex = _texture(_TEXTURES[int(rng.integers(len(_TEXTURES)))], size, r, rng)
        _paint(img, alpha, base.astype(np.float32), (0.55 * base).astype(np.float32), tex)

    # Target instance(s): contrast and size shrink with hardness, colour jitter grows.
    contrast = 1.0 - 0.75 * h  # share of the class colour vs the local background
    r_lo, r_hi = 0.26 * (1 - 0.6 * h) * size, 0.34 * (1 - 0.6 * h) * size
    r = max(4.0, float(rng.uniform(r_lo, r_hi)))
    jitter = 15.0 + 35.0 * h
    radii = [r]
    if rng.random() < spec.second_instance_prob:
        radii.append(max(4.0, 0.7 * r))

    boxes = []
    centres: list[tuple[float, float, float]] = []
    for ri in radii:
        for _ in range(20):  # find a spot that does not overlap an earlier instance
            cx, cy = _place(size, ri, rng)
            if all(math.hypot(cx - x0, cy - y0) > ri + r0 + 2 for x0, y0, r0 in centres):
                break
        else:
            continue  # no room: fewer instances
        alpha = _shape_mask(fam.shape, size, cx, cy, ri, float(rng.uniform(0, 2 * math.pi)))
        box = _tight_box(alpha)
        if box is None:
            continue
        inside = alpha >= 0.5
        bg = img[inside].mean(axis=0)  # [3] local background colour
        base = np.clip(np.array(fam.colour, np.float32) + rng.normal(0, jitter, 3), 0, 255)
        light = (1 - contrast) * bg + contrast * base
        dark = (1 - contrast) * bg + contrast * 0.5 * base
        tex = _texture(fam.texture, size, ri, rng)
        _paint(img, alpha, light.astype(np.float32), dark.astype(np.float32), tex)
        boxes.append(box)
        centres.append((cx, cy, ri))

    if spec.noise_std > 0:
        img += rng.normal(0, spec.noise_std, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)  # [S, S, 3] RGB
    return Sample(image=image, label=label, boxes=np.stack(boxes).astype(np.int64))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def generate(spec: SyntheticSpec, n_per_class: int, split: str) -> list[Sample]:
    """Draw ``n_per_class`` images of every class for ``split`` ("train", "val", ... any string).

    Samples are interleaved by index (class 0..n-1 of index 0, then of index 1, ...), so a prefix
    of the list stays class-balanced. The same (spec, split) always gives the same samples; sample
    (class c, index i) does not depend on ``n_per_class``.
    """
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    return [
        _draw_sample(spec, split, label, i)
        for i in range(n_per_class)
        for label in range(spec.n_classes)
    ]


def to_arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Stack samples into (x uint8 [N, S, S, 3] RGB, y int64 [N])."""
    if len(samples) == 0:
        raise ValueError("to_arrays: no samples")
    x = np.stack([s.image for s in samples]).astype(np.uint8, copy=False)
    y = np.array([s.label for s in samples], dtype=np.int64)
    return x, y


def _write_image(path: Path, image_rgb: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params):
        raise ValueError(f"could not write image {path}")


def _voc_xml(image_id: str, filename: str, sample: Sample, name: str) -> ET.ElementTree:
    """A VOC annotation in the real schema; coordinates are written 1-based inclusive."""
    h, w = sample.image.shape[:2]
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "synthetic"
    ET.SubElement(ann, "filename").text = filename
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "decomcam synthetic"
    ET.SubElement(src, "annotation").text = "benchmarks.quality.synthetic_data"
    ET.SubElement(src, "image").text = image_id
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(w)
    ET.SubElement(size, "height").text = str(h)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for box in sample.boxes:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "occluded").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, tag).text = str(int(v) + 1)  # 0-based -> VOC 1-based
    tree = ET.ElementTree(ann)
    ET.indent(tree)
    return tree


def write_voc_layout(
    samples: Sequence[Sample], names: Sequence[str], root, split: str = "val", ext: str = "jpg"
) -> list[str]:
    """Write samples as a PASCAL VOC folder that ``voc.read_voc(root, split)`` reads back.

    root/JPEGImages/<id>.<ext>, root/Annotations/<id>.xml (VOC schema, 1-based boxes, one <object>
    per target instance), root/ImageSets/Main/<split>.txt (the ids) and, as in VOC,
    root/ImageSets/Main/<class>_<split>.txt ("<id> 1" / "<id> -1"). Ids are the 6-digit sample
    indices. ``ext`` is "jpg" (quality 95, like VOC) or "png" (lossless). Returns the ids.
    """
    ext = ext.lower().lstrip(".")
    if ext not in ("jpg", "png"):
        raise ValueError(f"ext must be 'jpg' or 'png', got {ext!r}")
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, s in enumerate(samples):
        image_id = f"{i:06d}"
        filename = f"{image_id}.{ext}"
        _write_image(root / "JPEGImages" / filename, s.image)
        _voc_xml(image_id, filename, s, names[s.label]).write(
            root / "Annotations" / f"{image_id}.xml", encoding="utf-8", xml_declaration=False
        )
        ids.append(image_id)
    main = root / "ImageSets" / "Main"
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for c, name in enumerate(names):
        lines = [f"{image_id} {1 if s.label == c else -1:2d}\n" for image_id, s in zip(ids, samples)]
        (main / f"{name}_{split}.txt").write_text("".join(lines))
    return ids


def write_imagefolder_layout(samples: Sequence[Sample], names: Sequence[str], root) -> list[Path]:
    """Write samples as root/<class name>/<id>.png (lossless), one folder per class, even if empty.

    ``voc.read_imagefolder`` numbers classes in *sorted* name order, which differs from the label
    order of ``class_names``; map its indices back by name. Returns the written paths, in sample order.
    """
    root = Path(root)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(samples):
        path = root / names[s.label] / f"{i:06d}.png"
        _write_image(path, s.image)
        paths.append(path)
    return paths
