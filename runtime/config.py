"""Decom-CAM's numeric settings, shared by the runtime and the eager reference (export/reference.py).

The method name chooses the algorithm (`decomcam`: the paper; `decomcam-authors`: the authors' 2023 code;
`decomcam-ig`: the decomposition of path-integrated evidence); this holds the few numbers they take and the
constants of the choices the paper leaves open. What each choice is, and why: docs/method.md.

- top_p        components kept, clipped to min(C, h*w) (and to authors_top_k for decomcam-authors)
- blur_sigma   Gaussian sigma of the reference image blur(P), in model-input pixels (default 10 * S / 224);
               kernel radius ceil(4 sigma), reflect-101 borders
- ig_steps     decomcam-ig: midpoints of the path alpha * A, alpha_k = (k + 1/2) / ig_steps
- NULL_TOL     components with sigma_i <= NULL_TOL * sigma_1 are null (map 0, weight 0)
- NORM_EPS     min-max normalisation s(x) = (x - min) / max(max - min, NORM_EPS)
- SIGN_TOL     the component-sign rule falls back to the peak's sign when |<F_i, g>| <= SIGN_TOL |F_i| |g|
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

NORM_EPS = 1e-7
NULL_TOL = 1e-3
SIGN_TOL = 1e-6


@dataclass(frozen=True)
class DecomCamConfig:
    top_p: int = 10                  # number of orthogonal feature maps p
    blur_sigma: float | None = None  # Gaussian sigma in model-input pixels; None = 10 * S / 224
    authors_top_k: int = 100         # decomcam-authors: channels kept (by Grad-CAM weight) before the PCA
    ig_steps: int = 16               # decomcam-ig: midpoints of the path alpha * A

    def __post_init__(self):
        if int(self.top_p) < 1:
            raise ValueError(f"top_p must be >= 1, got {self.top_p}")
        if self.blur_sigma is not None and not (math.isfinite(self.blur_sigma) and self.blur_sigma > 0):
            raise ValueError(f"blur_sigma must be a finite number > 0, got {self.blur_sigma}")
        if int(self.authors_top_k) < 1:
            raise ValueError(f"authors_top_k must be >= 1, got {self.authors_top_k}")
        if int(self.ig_steps) < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")

    def sigma(self, size: int) -> float:
        return float(self.blur_sigma) if self.blur_sigma is not None else 10.0 * size / 224.0

    def radius(self, size: int) -> int:
        """Kernel radius, kept below the image side so reflect-101 padding is defined."""
        return min(int(math.ceil(4.0 * self.sigma(size))), size - 1)

    def effective_p(self, channels: int, positions: int, authors: bool = False) -> int:
        k = min(channels, int(self.authors_top_k)) if authors else channels
        return min(int(self.top_p), k, positions)

    def with_(self, **kw) -> "DecomCamConfig":
        return replace(self, **kw)
