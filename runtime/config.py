"""Decom-CAM settings shared by the runtime and the eager reference.

The paper (section 3.2) fixes the algorithm but leaves these choices open; the toolkit makes them here,
once, and both implementations read them:

- Sign of each component. Singular vectors have no sign, so each feature map F_i is oriented to agree with
  the channel sum of the class-discriminative map, g = sum_c S*[c, :] (the un-rectified Grad-CAM-style
  map): sign(<F_i, g>) is made positive. When |<F_i, g>| is tiny (<= 1e-6 * |F_i| |g|) the entry of F_i with
  the largest magnitude is made positive instead. The result does not depend on the SVD library.
- Rank. p is clipped to min(C, h*w). Components with sigma_i <= 1e-3 * sigma_1 (explaining under 1e-6 of
  the top component's variance), and all components when sigma_1 == 0 (e.g. an all-zero gradient), are
  null: their map is 0, their weight 0, and they are left out of the softmax. If every component is null
  the saliency is all zeros. Why: s() rescales every map to [0, 1], so a component at the float32 noise
  floor would otherwise come back as a full-contrast random map and could take most of the softmax
  weight; measured on a rank-4 S*, components at 1e-4 * sigma_1 changed with the batch size (different
  conv algorithms) and moved the saliency by up to 0.6.
- Normalisation s(x) = (x - min) / max(max - min, eps), eps = 1e-7: a constant map becomes 0, never NaN.
- Upsampling: bilinear, half-pixel centres (torch align_corners=False, OpenCV INTER_LINEAR).
- Blur: Gaussian, sigma = blur_sigma pixels of the model input (default 10 * S / 224, the authors' 10 px at
  224), kernel radius ceil(4 sigma) (40 px at 224), reflect-101 borders (OpenCV's default, torch 'reflect').
- Blending happens in [0, 1] pixel space: P = x * std + mean, the paper's max(P * H, blur(P) * (1 - H)), then
  re-normalised. (In normalised space pixel values are negative and the max would pick the wrong image.)
- Scores: C_i = logit_target(masked_i) - logit_target(blurred), logits as the graph emits them (CLIP's
  logit_scale * cosine); weights = softmax over the non-null C_i; saliency = sum_i w_i H_i (a convex
  combination of [0, 1] maps, so it lies in [0, 1]; it is not re-normalised).

Integration (`integration=`, paper variant only). "paper" (default) is eqs. 11-12 above. "gain-share"
(method `decomcam-gain-share`) combines the same components differently, from the same p + 1 forwards:
- Each component's share of the class-discriminative map: with g = sum_c S*[c] (the channel sum, which for
  a global-average-pool head is Grad-CAM's map before its ReLU), g = sum_i a_i F_i over all components,
  a_i = <F_i, g> / sigma_i^2 (> 0 under the sign convention above). The top p shares are the rank-p
  part of g, without the noise of the trailing components.
- Each share is re-weighted by its measured gain: r_i = relu(C_i) / mean_j relu(C_j) over the non-null
  components (r_i = 1 for all when no gain is positive), so a component whose region, kept sharp, does not
  raise the class score over the blurred image drops out, and the mean weight stays 1.
- saliency = s(Up_bilinear(relu(sum_i r_i a_i F_i))), the CAM family's finish (ReLU at h x w, bilinear,
  min-max); weights = r_i a_i / sum_j r_j a_j.
Why not eqs. 11-12: measured on EfficientNet-Lite0 with 363 real ImageNet photos (benchmarks/README.md,
"Integration study"), the gains C_i of the ten components are nearly equal (mean 5.2-5.8 logits) while
their masks differ in mass (the top component keeps 31% of the image sharp, the others 49-52%), and within
an image the gain follows the mask mass (median Pearson 0.43). The softmax spreads over about 3.7
components and picks the top component, the one on the object (pointing game 91.5% alone against 70-80%
for components 2-10), in only 8% of the photos; the paper's saliency points at the object 79% of the time.
gain-share: 90.6% and +20 points of insertion - deletion over the paper's integration, at the level of
Grad-CAM, Grad-CAM++ and LayerCAM (within 2 points on both metrics; not significantly better than any of
them, and on the confirmation half 1.6 points of insertion - deletion below Grad-CAM).
The finish upsamples bilinearly, like every CAM method here. Bicubic upsampling (the authors' kernel) puts
gain-share ahead of every baseline on both metrics on those photos (93.1% pointing, 41.6 insertion -
deletion), but it lifts the baselines as much when they get it too (LayerCAM 93.1%, Grad-CAM 92.8%), and it
changes nothing on the synthetic benchmark: a property of the kernel, not of the integration
(benchmarks/README.md, "Third round").

Integration "ig" (method `decomcam-ig`) decomposes a different evidence map and runs no masked forwards:
- Evidence: the path-integrated S_IG = A * mean_k dy/dA(alpha_k A), alpha_k = (k + 1/2) / m, m = ig_steps
  (16): integrated gradients at the target layer from the zero activation to A (midpoint rule), so that
  sum(S_IG) = y(A) - y(0) up to the rule's error (completeness). The gradients at alpha_k A come from
  head_grad.onnx (the head after the target layer and its explicit backward), m head passes per image and no
  pass through the trunk. For a head that is linear in A (global average pooling + one Linear) the gradient
  does not depend on A and S_IG = S*; for CLIP's attention pool, for pooled MLP heads and for a 1x1 conv
  head before the pooling (the `-lastblock` exports) it does.
- Baseline (`ig_baseline`): where the path starts. "zero" (default): the zero activation, as above. "blur":
  A0 = the trunk's activations of blur(P), the paper's reference image of eq. 11 (the masks' blur; the blend
  space does not change it, a Gaussian blur commutes with the per-channel normalisation); "mean": of the
  mean-colour image (0 in normalised space, the deletion metric's substrate). Then S_IG = (A - A0) *
  mean_k dy/dA(A0 + alpha_k (A - A0)), which sums to y(A) - y(A0); one more trunk pass per image
  (features.onnx, or explain.onnx in an export without it). Measured on six real models and the synthetic benchmark
  (benchmarks/README.md, "Thirteenth round"): neither is better than the zero activation.
- Decomposition: the paper's, of S_IG instead of S* (top-p feature maps F_i, the same sign convention).
- Integration: the rank-p part of S_IG's channel sum, sum_{i<=p} a_i F_i with a_i = <F_i, g> / sigma_i^2 and
  g = sum_c S_IG[c] (every share weight 1; no gains, no forwards), then the CAM finish with the authors'
  kernel: ReLU at h x w, bicubic upsampling, min-max. weights = a_i / sum_j a_j.
Why: S* = dy/dA * A is the evidence at one operating point; on CLIP's attention pool the gradient at A is
that of a softmax and an L2 normalisation there, and the masked forwards of eqs. 11-12 measure gains that
follow mask area (above). Measured (benchmarks/README.md, "Ninth round", on the study variant
`ig-rank-p-bicubic` that this integration implements; "Tenth round": the runtime reproduces it photo by
photo): on the attention-pool synthetic benchmark the same share map gains 9.5 points of pointing and 6.4
of insertion - deletion on S_IG over S*; the map is level with LayerCAM on pointing and ahead of every
baseline on insertion - deletion on four trained models. On real photos with a linear head (S_IG = S*:
EfficientNet-Lite0/1/2 after their conv head) it is the rank-p Grad-CAM map with the bicubic kernel, level
with Grad-CAM ("Eleventh round"). On the same real models one block earlier (the `-lastblock` exports, a
1x1 conv -> BN -> ReLU6 head before the pooling, so S_IG != S*) it leads every baseline on insertion -
deletion and Grad-CAM, Grad-CAM++, LayerCAM and Ablation-CAM on pointing, pooled over the three models
("Twelfth round").

The authors' public code differs; `variant="authors"` (method `decomcam-authors`) follows their 2023
library (GitHub CapricornGuang/DecomCAM, commit 6272700, `src/cam/decom_cam.py`, `base_cam.py`,
`utils/viz_tools.py`): rank channels by the Grad-CAM weight alpha_c = mean(dy/dA_c), keep the top K,
decompose alpha * A with scikit-learn's PCA (centred over positions, scores U Sigma), clamp the scores at 0,
upsample bicubically (the RAW map), mask with the min-max normalised map, blur, and weight by
w * softmax(w) of the cosine-similarity gains w_i = cos(masked_i) - cos(blurred); the saliency is
ReLU(sum_i weight_i * RAW map_i), min-max normalised for display (the authors leave it unnormalised).
- Sign: the largest-magnitude entry of each score vector is made positive. That is scikit-learn's
  `svd_flip(U, V, u_based_decision=True)`, which `PCA.fit_transform` applied before scikit-learn 1.5 (the
  versions of 2023); 1.5 switched PCA to the sign of the principal axes V, so the same code run today
  flips some components. The sign matters because the scores are clamped at 0.
- Measured against a re-implementation of that code (tests/runtime/test_decomcam_authors_parity.py):
  saliency Pearson >= 0.99 per image, component maps cosine >= 0.999. Remaining differences: the authors
  blend the photo before their preprocessing and round it to uint8, and scipy's blur uses 'reflect'
  borders (reflect-101 here).
The authors' 2024 rewrite (HEAD, `pytorch_grad_cam/decom_cam.py`: p = 500, blending in normalised space,
dot-product scores, weights thresholded then divided by their maximum) is a different algorithm; no
variant here follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

VARIANTS = ("paper", "authors")
INTEGRATIONS = ("paper", "gain-share", "ig")
IG_BASELINES = ("zero", "blur", "mean")
BLEND_SPACES = ("pixel", "normalized")

NORM_EPS = 1e-7
NULL_TOL = 1e-3
SIGN_TOL = 1e-6


@dataclass(frozen=True)
class DecomCamConfig:
    top_p: int = 10                  # number of orthogonal feature maps p
    variant: str = "paper"           # "paper" (the equations, default) or "authors" (the public code)
    blur_sigma: float | None = None  # Gaussian sigma in model-input pixels; None = 10 * S / 224
    blend_space: str = "pixel"       # "pixel" ([0,1] pixels, then re-normalised) or "normalized"
    authors_top_k: int = 100         # channels kept by the authors' variant (by Grad-CAM weight)
    integration: str = "paper"       # "paper" (eqs. 11-12, default), "gain-share" or "ig" (paper variant only)
    ig_steps: int = 16               # "ig": midpoints of the path alpha * A, alpha_k = (k + 1/2) / ig_steps
    ig_baseline: str = "zero"        # "ig": where the path starts: the zero activation, or the activations of
                                     # blur(P) ("blur") or of the mean-colour image ("mean")

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown Decom-CAM variant '{self.variant}'; valid: {', '.join(VARIANTS)}")
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"unknown Decom-CAM integration '{self.integration}'; valid: {', '.join(INTEGRATIONS)}")
        if self.integration != "paper" and self.variant != "paper":
            raise ValueError(f"integration '{self.integration}' needs variant 'paper' (the authors' variant "
                             "has its own integration)")
        if self.blend_space not in BLEND_SPACES:
            raise ValueError(f"unknown blend space '{self.blend_space}'; valid: {', '.join(BLEND_SPACES)}")
        if int(self.top_p) < 1:
            raise ValueError(f"top_p must be >= 1, got {self.top_p}")
        if self.blur_sigma is not None and not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0, got {self.blur_sigma}")
        if int(self.authors_top_k) < 1:
            raise ValueError(f"authors_top_k must be >= 1, got {self.authors_top_k}")
        if int(self.ig_steps) < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if self.ig_baseline not in IG_BASELINES:
            raise ValueError(f"unknown ig_baseline '{self.ig_baseline}'; valid: {', '.join(IG_BASELINES)}")

    def sigma(self, size: int) -> float:
        return float(self.blur_sigma) if self.blur_sigma is not None else 10.0 * size / 224.0

    def radius(self, size: int) -> int:
        """Kernel radius, kept below the image side so reflect-101 padding is defined."""
        return min(int(math.ceil(4.0 * self.sigma(size))), size - 1)

    def effective_p(self, channels: int, positions: int) -> int:
        k = min(channels, int(self.authors_top_k)) if self.variant == "authors" else channels
        return min(int(self.top_p), k, positions)

    def with_(self, **kw) -> "DecomCamConfig":
        return replace(self, **kw)
