"""Generated photo-like images: a smooth colour field, a few filled shapes, sensor noise. Deterministic for a
given generator; used as default calibration photos (export/quantize.py) and as the tests' images."""

from __future__ import annotations

import numpy as np


def _draw(rng: np.random.Generator, spec: int | tuple[int, int]) -> int:
    """A fixed count, or one drawn from [lo, hi) with `rng`."""
    return int(rng.integers(*spec)) if isinstance(spec, tuple) else int(spec)


def photo_like_rgb(rng: np.random.Generator, h: int, w: int, *, grid: int | tuple[int, int] = 4,
                   shapes: int | tuple[int, int] = 3, level: tuple[float, float] = (200.0, 20.0),
                   radius_div: int = 10, noise: float = 5.0) -> np.ndarray:
    """One uint8 RGB image [h, w, 3].

    grid: side of the random colour grid upsampled (bicubic) to the background (a count or a [lo, hi) range);
    level: (scale, offset) of the background in 0..255; shapes: filled circles or squares in random colours,
    radius in [min(h, w) // radius_div, min(h, w) // 3); noise: Gaussian sigma in grey levels."""
    import cv2

    gh, gw = _draw(rng, grid), _draw(rng, grid)
    low = rng.random((gh, gw, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * level[0] + level[1]
    for _ in range(_draw(rng, shapes)):
        c = tuple(float(v) for v in rng.integers(0, 255, 3))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        r = int(rng.integers(min(h, w) // radius_div, min(h, w) // 3))
        if rng.random() < 0.5:
            cv2.circle(img, centre, r, c, -1)
        else:
            cv2.rectangle(img, (centre[0] - r, centre[1] - r), (centre[0] + r, centre[1] + r), c, -1)
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
