"""Readers for the two dataset layouts the paper evaluates on (section 4.1).

``read_voc``         a PASCAL VOC folder (VOC2012 val for the pointing game):
                         root/JPEGImages/<id>.jpg
                         root/Annotations/<id>.xml
                         root/ImageSets/Main/<split>.txt      one image id per line
``read_imagefolder`` an ImageFolder layout (Mini-ImageNet for deletion / insertion):
                         root/<class name>/<image>.{jpg,jpeg,png,bmp,webp}

Nothing is downloaded: these read folders the user provides, or the ones
``benchmarks.quality.synthetic_data`` writes.

Box convention: VOC XML stores 1-based inclusive pixel coordinates. ``read_voc`` subtracts 1, so every
box it returns is ``(xmin, ymin, xmax, ymax)`` 0-based inclusive, the convention of
``benchmarks.quality.protocol``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["VOC_CLASSES", "IMAGE_EXTENSIONS", "VocItem", "read_voc", "read_imagefolder"]

#: The 20 PASCAL VOC classes in the standard order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

#: File extensions (lower case) that ``read_imagefolder`` treats as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class VocItem:
    """One annotated image of a VOC-layout folder."""

    image_path: Path  # root/JPEGImages/<filename from the XML, or <id>.jpg>
    width: int  # from <size><width>
    height: int  # from <size><height>
    objects: dict[str, np.ndarray]  # class name -> float64 [K, 4] boxes, 0-based inclusive (xmin, ymin, xmax, ymax)
    image_id: str = ""  # the id from ImageSets/Main/<split>.txt
    difficult: dict[str, np.ndarray] = field(default_factory=dict)  # class name -> bool [K], parallel to objects


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ValueError(f"{what} not found: {path}")


def _text(elem: ET.Element, tag: str, xml_path: Path) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"malformed VOC annotation {xml_path}: missing <{tag}> in <{elem.tag}>")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, xml_path: Path) -> float:
    text = _text(elem, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"malformed VOC annotation {xml_path}: <{tag}> is not a number: {text!r}") from None


def _parse_annotation(xml_path: Path, image_id: str, root: Path) -> VocItem:
    if not xml_path.is_file():
        raise ValueError(f"VOC annotation not found: {xml_path}")
    try:
        ann = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"malformed VOC annotation {xml_path}: {e}") from None
    if ann.tag != "annotation":
        raise ValueError(f"malformed VOC annotation {xml_path}: root element is <{ann.tag}>, not <annotation>")

    size = ann.find("size")
    if size is None:
        raise ValueError(f"malformed VOC annotation {xml_path}: missing <size>")
    width, height = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))

    fname = ann.findtext("filename")
    fname = fname.strip() if fname and fname.strip() else f"{image_id}.jpg"
    image_path = root / "JPEGImages" / fname

    boxes: dict[str, list[list[float]]] = {}
    difficult: dict[str, list[bool]] = {}
    for obj in ann.findall("object"):
        name = _text(obj, "name", xml_path)
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"malformed VOC annotation {xml_path}: <object> {name!r} has no <bndbox>")
        # VOC is 1-based inclusive; subtract 1 for 0-based inclusive.
        box = [_number(bb, t, xml_path) - 1.0 for t in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"malformed VOC annotation {xml_path}: box of {name!r} has max < min: {box}")
        boxes.setdefault(name, []).append(box)
        difficult.setdefault(name, []).append(obj.findtext("difficult", "0").strip() == "1")

    return VocItem(
        image_path=image_path,
        width=width,
        height=height,
        objects={k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in boxes.items()},
        image_id=image_id,
        difficult={k: np.asarray(v, dtype=bool) for k, v in difficult.items()},
    )


def read_voc(root, split: str = "val", limit: int | None = None) -> list[VocItem]:
    """Read the images of ``ImageSets/Main/<split>.txt`` with their boxes, in file order.

    root  : the VOC folder (e.g. .../VOC2012) holding JPEGImages/, Annotations/, ImageSets/Main/.
    split : which ImageSets/Main/<split>.txt to read ("val" for the pointing game).
    limit : read only the first ``limit`` ids.

    Every object is kept, ``difficult`` ones included: the standard pointing game counts all boxes
    of the target class (``VocItem.difficult`` records the flag for callers that want to drop them).
    Class names are taken from the XML as written, not checked against ``VOC_CLASSES``, so the
    synthetic dataset's names work too. Boxes are converted to 0-based inclusive.

    Raises ValueError naming the path for a missing folder, id list, annotation or image, and for a
    malformed annotation.
    """
    root = Path(root)
    _require_dir(root, "VOC root folder")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        _require_dir(root / sub, "VOC folder")
    ids_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_path.is_file():
        raise ValueError(f"VOC split list not found: {ids_path}")
    # One id per line; class-specific lists ("<id> 1") also work: the id is the first token.
    ids = [line.split()[0] for line in ids_path.read_text().splitlines() if line.strip()]
    if limit is not None:
        ids = ids[: max(int(limit), 0)]

    items = []
    for image_id in ids:
        item = _parse_annotation(root / "Annotations" / f"{image_id}.xml", image_id, root)
        if not item.image_path.is_file():
            raise ValueError(f"VOC image not found: {item.image_path}")
        items.append(item)
    return items


def read_imagefolder(root, limit_per_class: int | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Read an ImageFolder layout (one sub-folder per class, as Mini-ImageNet).

    Returns (classes, items): ``classes`` are the sub-folder names sorted (hidden folders skipped), and
    ``items`` are (image path, class index) pairs, class by class, files sorted by name within a class.
    Images are files whose extension (any case) is in ``IMAGE_EXTENSIONS``; other files are ignored.
    ``limit_per_class`` keeps the first N images of each class (the paper uses the first 100).
    A class folder with no images keeps its index and contributes no items.

    Raises ValueError naming the path for a missing root or a root with no class folders.
    """
    root = Path(root)
    _require_dir(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder has no class sub-folders: {root}")
    items: list[tuple[Path, int]] = []
    for idx, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if limit_per_class is not None:
            files = files[: max(int(limit_per_class), 0)]
        items.extend((p, idx) for p in files)
    return classes, items
