"""Pictures and files of an explanation: overlay PNG, component grid PNG, JSON and NPZ.

Every file is written to a temporary in the destination folder and renamed into place (runtime.fsutil),
so a reader never sees a half-written file, and an interrupted run leaves none behind.
"""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np

from .fsutil import atomic_write


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a safe temporary (runtime.fsutil.atomic_write)."""
    atomic_write(path, data)


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def heatmap(saliency: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 RGB jet colour map."""
    u8 = np.clip(np.nan_to_num(saliency) * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the saliency heat map over an RGB image of the same size."""
    return cv2.addWeighted(rgb, 1.0 - alpha, heatmap(saliency), alpha, 0.0)


def _label(img: np.ndarray, text: str, scale: float | None = None, banner: bool = False) -> np.ndarray:
    img = img.copy()
    scale = scale or max(0.35, img.shape[1] / 700.0)
    thick = max(1, int(round(scale * 1.5)))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    while tw > img.shape[1] - 8 and scale > 0.25:  # shrink to fit the width
        scale *= 0.9
        thick = max(1, int(round(scale * 1.5)))
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    y0 = img.shape[0] - th - base - 6 if banner else 0
    cv2.rectangle(img, (0, y0), (min(img.shape[1], tw + 8), y0 + th + base + 6),
                  (160, 0, 0) if banner else (0, 0, 0), -1)
    cv2.putText(img, text, (4, y0 + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return img


def overlay_png(rgb: np.ndarray, exp) -> bytes:
    """The saliency on the original image, titled with the target; marked when weights are random."""
    img = _label(overlay(rgb, exp.saliency_original), f"{exp.method}: {exp.target_name}")
    if exp.random_weights:
        img = _label(img, "RANDOM WEIGHTS (--pretrained none): not a trained model", banner=True)
    return encode_png(img)


def components_png(exp, cols: int = 5) -> bytes:
    """Grid of the p feature-level maps over the model input, each titled with weight and explained variance."""
    base = exp.input_rgb  # [S, S, 3] uint8, what the model saw
    tiles = []
    comps = exp.components if exp.components is not None else exp.saliency[None]
    for i, c in enumerate(comps):
        t = overlay(base, c)
        if exp.weights is not None and exp.explained_variance is not None:
            t = _label(t, f"#{i + 1} w={exp.weights[i]:.3f} ev={exp.explained_variance[i]:.3f}", scale=0.35)
        tiles.append(t)
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    s = base.shape[0]
    grid = np.full((rows * s, cols * s, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * s:(r + 1) * s, c * s:(c + 1) * s] = t
    if exp.random_weights:
        grid = _label(grid, "RANDOM WEIGHTS: not a trained model", scale=0.4, banner=True)
    return encode_png(grid)


def npz_bytes(exp) -> bytes:
    arrays = {"saliency": exp.saliency.astype(np.float32),
              "saliency_original": exp.saliency_original.astype(np.float32),
              "logits": exp.logits.astype(np.float32)}
    for k in ("components", "weights", "scores", "explained_variance", "singular_values"):
        v = getattr(exp, k)
        if v is not None:
            arrays[k] = np.asarray(v, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


OUTPUT_SUFFIXES = (".overlay.png", ".components.png", ".json", ".npz")


def render_outputs(rgb: np.ndarray, exp, extra: dict | None = None) -> list[bytes]:
    """The bytes of NAME.overlay.png, NAME.components.png, NAME.json and NAME.npz (OUTPUT_SUFFIXES order).
    Pure computation (PNG encoding releases the GIL): callers render several images in a thread pool."""
    return [
        overlay_png(rgb, exp),
        components_png(exp),
        json.dumps({**exp.summary(), **(extra or {})}, indent=2).encode(),
        npz_bytes(exp),
    ]


def write_payloads(out_dir: Path, stem: str, payloads: list[bytes]) -> list[Path]:
    """Write render_outputs' bytes to NAME.json, NAME.overlay.png, ... (each atomically; NAME.json first, so
    that outputs on disk always have the record of what they are: runtime/batch.py's resume)."""
    files = [out_dir / f"{stem}{s}" for s in OUTPUT_SUFFIXES]
    first = OUTPUT_SUFFIXES.index(".json")
    for k in [first] + [k for k in range(len(files)) if k != first]:
        atomic_write_bytes(files[k], payloads[k])
    return files


def write_outputs(out_dir: Path, stem: str, rgb: np.ndarray, exp, extra: dict | None = None):
    """Write NAME.overlay.png, NAME.components.png, NAME.json and NAME.npz (each atomically)."""
    return write_payloads(out_dir, stem, render_outputs(rgb, exp, extra))


def render_many(jobs: list, extra: dict | list | None = None, workers: int | None = None):
    """[(rgb, exp), ...] -> an iterator, in order, of render_outputs' bytes or the OSError that rendering
    raised (reported like a failed write); rendered in the shared image pool (runtime.artifacts.image_pool)
    when there is more than one. `extra`: JSON fields for every job, or a list of them, one per job. Any
    other exception is raised when its item is reached."""
    from .artifacts import image_pool

    pool = image_pool(workers) if len(jobs) > 1 else None
    extras = extra if isinstance(extra, list) else [extra] * len(jobs)

    def one(k):
        try:
            return render_outputs(jobs[k][0], jobs[k][1], extras[k])
        except OSError as e:
            return e

    if pool is None:
        yield from map(one, range(len(jobs)))
        return
    # at most one job per pool thread ahead of the writer: finished bytes do not pile up in memory, the
    # loader's and the engine's work in the same pool waits behind at most that much, and a writer that
    # stops (an error, a second Ctrl-C) leaves at most that much running
    pending = collections.deque()
    try:
        for k in range(len(jobs)):
            pending.append(pool.submit(one, k))
            if len(pending) >= pool.size:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
