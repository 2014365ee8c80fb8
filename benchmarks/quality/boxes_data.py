"""Reader for a folder of labelled photos with ground-truth boxes (the ImageNet-val-with-boxes layout).

    root/manifest.csv   one row per image: file, class_index, synset, class_name, width, height,
                        orig_width, orig_height, n_boxes, boxes_xyxy
    root/boxes.csv      one row per box (not needed here: manifest.csv repeats the boxes)
    root/images/...     the photos, ``file`` is relative to root

``boxes_xyxy`` is ";"-separated "x0 y0 x1 y1" in the file's pixel coordinates (all boxes of the labelled
class), continuous coordinates in which the file spans [0, W] x [0, H] and pixel i covers [i, i + 1] (the
convention in which an annotation is rescaled by multiplying by the size ratio, as the 227-px copies
were). ``read_boxes_manifest`` converts them to the convention of ``benchmarks.quality.protocol``
(pixel-index coordinates: pixel (x, y) is inside when x0 <= x <= x1 and y0 <= y <= y1, pixel centres at
integers) by subtracting 0.5, so a pixel is inside exactly when its centre is inside the written box.
``boxes_to_input`` maps them to the model input of a stretch resize.

A missing folder, manifest or column is a usage error (ValueError, one line). A malformed row (bad number,
box count that disagrees with n_boxes, max < min) is a per-image problem: the row is kept with its
``error`` set, so the caller reports it and goes on.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["COLUMNS", "BoxedItem", "read_boxes_manifest", "boxes_to_input"]

#: The manifest's columns, in the order written by the data set's preparation.
COLUMNS = ("file", "class_index", "synset", "class_name", "width", "height", "orig_width", "orig_height",
           "n_boxes", "boxes_xyxy")


@dataclass(frozen=True)
class BoxedItem:
    """One row of manifest.csv."""

    path: Path             # root / file
    file: str              # as written in the manifest (relative to root)
    class_index: int       # label: index in the data set's class order (ImageNet-1k order for ImageNet)
    class_name: str        # label name as written (e.g. 'tiger_cat')
    synset: str
    width: int             # the file's size in pixels
    height: int
    boxes: np.ndarray      # float64 [K, 4] (x0, y0, x1, y1), file pixel-index coordinates (written box - 0.5)
    error: str | None = None  # why this row cannot be used (None: usable)
    row: int = -1          # 0-based position among the manifest's data rows


def _parse_row(row: dict, root: Path, line: int, manifest: Path) -> BoxedItem:
    item = _parse(row, root, line, manifest)
    return replace(item, row=line - 2)


def _parse(row: dict, root: Path, line: int, manifest: Path) -> BoxedItem:
    file = (row.get("file") or "").strip()
    where = f"{manifest}:{line} ({file or 'no file'})"
    try:
        class_index, width, height, n_boxes = (int(row[k]) for k in ("class_index", "width", "height", "n_boxes"))
    except (TypeError, ValueError):
        return _bad(row, root, f"{where}: class_index, width, height and n_boxes must be integers")
    boxes: list[list[float]] = []
    for part in (row.get("boxes_xyxy") or "").split(";"):
        if not part.strip():
            continue
        try:
            box = [float(v) for v in part.split()]
        except ValueError:
            return _bad(row, root, f"{where}: box {part.strip()!r} is not 4 numbers")
        if len(box) != 4 or not np.all(np.isfinite(box)):
            return _bad(row, root, f"{where}: box {part.strip()!r} is not 4 finite numbers")
        if box[2] < box[0] or box[3] < box[1]:
            return _bad(row, root, f"{where}: box {part.strip()!r} has max < min")
        boxes.append(box)
    error = None
    if not file:
        error = f"{where}: empty file name"
    elif len(boxes) != n_boxes:
        error = f"{where}: n_boxes is {n_boxes} but boxes_xyxy holds {len(boxes)}"
    elif not boxes:
        error = f"{where}: no boxes"
    elif width < 1 or height < 1:
        error = f"{where}: width and height must be positive"
    return BoxedItem(path=root / file, file=file, class_index=class_index, class_name=row["class_name"].strip(),
                     synset=(row.get("synset") or "").strip(), width=width, height=height,
                     boxes=np.asarray(boxes, np.float64).reshape(-1, 4) - 0.5, error=error)


def _bad(row: dict, root: Path, error: str) -> BoxedItem:
    file = (row.get("file") or "").strip()
    try:
        class_index = int(row.get("class_index"))
    except (TypeError, ValueError):
        class_index = -1
    return BoxedItem(path=root / file, file=file, class_index=class_index,
                     class_name=(row.get("class_name") or "").strip(), synset=(row.get("synset") or "").strip(),
                     width=0, height=0, boxes=np.zeros((0, 4)), error=error)


def read_boxes_manifest(root, limit: int | None = None, start: int = 0) -> list[BoxedItem]:
    """Rows of ``root/manifest.csv`` in file order: rows ``start`` .. ``start + limit - 1`` (0-based data rows;
    all from ``start`` when ``limit`` is None). Each item's ``row`` is its position in the manifest.

    Raises ValueError (one line) for a missing folder or manifest, a manifest without the columns in
    ``COLUMNS``, or no rows. Rows that cannot be used come back with ``error`` set.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise ValueError(f"manifest not found: {manifest} (expected columns: {', '.join(COLUMNS)})")
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {', '.join(missing)}; expected: {', '.join(COLUMNS)}")
        items = []
        n = 0
        for line, row in enumerate(reader, start=2):
            n += 1
            if line - 2 < start:
                continue
            if limit is not None and len(items) >= limit:
                break
            items.append(_parse_row(row, root, line, manifest))
    if not items:
        raise ValueError(f"{manifest}: no images" if not n else f"{manifest}: no rows from row {start} "
                         f"(it has {n})")
    return items


def boxes_to_input(boxes: np.ndarray, width: int, height: int, size: int, tolerance: float = 0.0) -> np.ndarray:
    """File boxes (pixel-index coordinates) -> model-input pixel-index coordinates, stretch resize W x H -> S x S.

    Each box is first grown by ``tolerance`` file pixels on every side (the pointing game's tolerance is
    a distance in the photo), then mapped with the resize's pixel-centre alignment (as OpenCV's and
    Pillow's resize): a file pixel index x maps to u = (x + 0.5) * S / W - 0.5, and y likewise with H.
    So ``protocol.pointing_hit(saliency [S, S], boxes_to_input(...))`` is a hit exactly when the
    saliency maximum's pixel, mapped back to the photo by the inverse map, lies in a grown box.
    Returns float64 [K, 4].
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    grown = b + np.array([-tolerance, -tolerance, tolerance, tolerance])
    sx, sy = size / float(width), size / float(height)
    scale = np.array([sx, sy, sx, sy])
    return (grown + 0.5) * scale - 0.5
