"""decomcam-ig (docs/method.md): the path-averaged gradient, the rank-p
share map with the bicubic finish against independent numpy computations, and the runtime method against the
eager reference (export/reference.py: torch autograd through the unmodified head) on both model families."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export.reference import decomcam_reference, path_gradient as eager_path_gradient
from runtime.artifacts import ArtifactsError
from runtime.backend import NumpyBackend
from runtime.config import DecomCamConfig
from runtime.decomcam import decompose, integrate_rank_p, path_gradient
from runtime.explainer import Explainer
from runtime.images import preprocess
from tests.conftest import count_graph_calls, make_images


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] 1-D cubic convolution (Keys, a = -0.75), half-pixel centres, indices clamped at the
    borders (torch bicubic with align_corners=False, OpenCV INTER_CUBIC), written out directly."""
    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    r = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        f = src - i0
        for j in range(-1, 3):
            r[i, min(max(i0 + j, 0), n_in - 1)] += k(j - f)
    return r


def rank_p_numpy(act, grad, p, size):
    """One image, from scratch: full SVD of S = grad * act [C, n], the rank-p part of its channel sum
    (sum_{i<=p} u_i^T 1 sigma_i v_i = P_p g), ReLU, bicubic, min-max; the share weights a_i / sum a_j."""
    c, h, w = act.shape
    s = (grad.astype(np.float64) * act).reshape(c, -1)
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    g = s.sum(0)
    a = (vt[:p] @ g) / sv[:p]                            # <F_i, g> / sigma_i^2 with F_i = sigma_i v_i (+-)
    cam = np.maximum((vt[:p].T @ (vt[:p] @ g)).reshape(h, w), 0)
    up = cubic_matrix(h, size) @ cam @ cubic_matrix(w, size).T
    up = (up - up.min()) / max(up.max() - up.min(), 1e-7)
    return up, np.abs(a) / np.abs(a).sum()


def test_rank_p_bicubic_matches_numpy():
    rng = np.random.default_rng(11)
    b, c, h, w, p, size = 3, 40, 7, 7, 5, 64
    act = rng.random((b, c, h, w)).astype(np.float32)
    grad = (rng.standard_normal((b, c, h, w)) * 0.1 + 0.02).astype(np.float32)
    be = NumpyBackend()
    dec = decompose(be, act, grad, p)
    sal, wts = integrate_rank_p(be, dec, h, w, size)
    assert sal.shape == (b, size, size) and sal.dtype == np.float32
    for i in range(b):
        ref, ref_w = rank_p_numpy(act[i], grad[i], p, size)
        assert np.ptp(ref) > 0
        assert np.abs(sal[i] - ref).max() <= 1e-5
        np.testing.assert_allclose(wts[i], ref_w, rtol=1e-7, atol=1e-10)  # shares are > 0 under the sign rule


def test_path_gradient_is_the_midpoint_rule_and_chunking_free():
    """A head with a gradient linear in A, dy/dA = w + A * v (y = <w, A> + <v, A^2> / 2): the midpoint rule is
    exact, mean_k grad(alpha_k A) = w + A * v / 2, and completeness holds: sum(A * that) = y(A) - y(0)."""
    rng = np.random.default_rng(3)
    b, c, h, w = 3, 6, 4, 4
    act = rng.standard_normal((b, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((5, c, h, w))                  # one weight map per class
    v = rng.standard_normal((5, c, h, w))
    target = np.array([4, 0, 2])
    calls = []

    def head_gradient(rows, tgt):
        calls.append(rows.shape[0])
        return (wt[tgt] + rows.astype(np.float64) * v[tgt]).astype(np.float32)

    be = NumpyBackend()
    want = wt[target] + act.astype(np.float64) * v[target] / 2
    for steps, batch_size, fixed in ((16, 32, False), (16, 1, False), (5, 4, False), (5, 4, True), (1, 4, True),
                                     (1, 2, False)):
        calls.clear()
        got = path_gradient(be, head_gradient, act, target, steps, batch_size, fixed)
        assert got.dtype == np.float64 and got.shape == act.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        n = steps * b                                        # rows alpha_k A_b, in calls of batch_size
        assert calls == ([batch_size] * -(-n // batch_size) if fixed and n > batch_size else
                         [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else []))
    y = (wt[target] * act + v[target] * act.astype(np.float64) ** 2 / 2).sum((1, 2, 3))
    s_ig = act * path_gradient(be, head_gradient, act, target, 16, 32)
    np.testing.assert_allclose(s_ig.sum((1, 2, 3)), y, rtol=1e-5)


def test_ig_steps_are_checked():
    with pytest.raises(ValueError, match="ig_steps must be >= 1"):
        DecomCamConfig(ig_steps=0)


def _inputs(lm, explainer, images):
    x = torch.from_numpy(explainer.preprocess(images)[0])   # the export's resize policy (manifest)
    text = None if explainer.classes.embeddings is None else torch.from_numpy(explainer.classes.embeddings)
    return x, text


def _check_against_reference(lm, explainer, images, steps, batch_sizes=(1, 32), targets=None):
    """targets: explicit classes (a random tiny model's top-1 can be a near-tie between ORT and eager torch)."""
    x, text = _inputs(lm, explainer, images)
    cfg = DecomCamConfig(ig_steps=steps)
    ref = decomcam_reference(lm.model, x, text, lm.mean, lm.std, config=cfg, method="decomcam-ig",
                             target=None if targets is None else torch.tensor(targets))
    grad = explainer.explain(images, method="gradcam", target=targets)
    for bs in batch_sizes:
        explainer.batch_size = bs
        exps = explainer.explain(images, method="decomcam-ig", target=targets, config=DecomCamConfig(ig_steps=steps))
        for i, e in enumerate(exps):
            assert e.method == "decomcam-ig" and e.target == ref.target[i]
            assert np.ptp(ref.saliency[i]) > 0
            assert float(np.corrcoef(e.saliency.ravel(), ref.saliency[i].ravel())[0, 1]) >= 0.9999
            assert np.abs(e.saliency - ref.saliency[i]).max() <= 1e-3
            np.testing.assert_allclose(e.weights, ref.weights[i], atol=1e-4)
            np.testing.assert_allclose(e.components, ref.components[i], atol=1e-3)
            np.testing.assert_allclose(e.singular_values, ref.singular_values[i], rtol=1e-3)
            assert e.scores is None                       # no gains are measured
            assert e.timings["head_grad"] >= 0
    return exps, grad, ref


def test_runtime_ig_matches_eager_reference_clip(tiny, tiny_artifacts):
    """The attention pool's gradient depends on A: S_IG differs from S*, and the runtime's head_grad.onnx
    path equals torch autograd through the unmodified open_clip head."""
    explainer = Explainer.from_artifacts(tiny_artifacts.out_dir)
    images = make_images(5, seed=17)
    exps, grad, _ = _check_against_reference(tiny, explainer, images, steps=16)
    # decomcam-ig runs features.onnx (A, no backward) and head_grad.onnx: 16 steps x 5 images, 6 steps a call
    fresh = Explainer.from_artifacts(tiny_artifacts.out_dir, batch_size=32)
    calls = count_graph_calls(fresh)
    fresh.explain(images, method="decomcam-ig")
    assert set(fresh._sessions) == {"features", "head_grad"}
    assert calls == {"head_grad": 3, "features": 1}
    # not the same map on the local evidence S* (the explain graph's gradient at A), nor Grad-CAM's: the path
    # matters on this head
    be = NumpyBackend()
    x = explainer.preprocess(images)[0]
    out = explainer.runner("explain").run(explainer.feed(image=x, target=np.array([e.target for e in exps])))
    acts, local = out["activations"], out["gradients"]
    path = path_gradient(be, explainer.head_gradient, acts, np.array([e.target for e in exps]), 16, 32)
    rel = np.linalg.norm((path - local).reshape(len(images), -1), axis=1) / \
        np.linalg.norm(local.reshape(len(images), -1), axis=1)
    assert rel.min() > 0.05
    _, _, h, w = acts.shape
    s_star, _ = integrate_rank_p(be, decompose(be, acts, local, 10), h, w, explainer.size)
    assert max(float(np.abs(e.saliency - m).max()) for e, m in zip(exps, s_star)) > 0.1
    corr = [float(np.corrcoef(e.saliency.ravel(), g.saliency.ravel())[0, 1]) for e, g in zip(exps, grad)]
    assert min(corr) < 0.99


@pytest.fixture(scope="module")
def mobilenet_tiny(tiny_export):
    """The MobileNetV3 head (Linear-Hardswish-Linear): its gradient depends on A. The torch model (seed 0) and
    its export from the session's registry."""
    from export.models import load_model

    return load_model("mobilenet-tiny", "none", seed=0), tiny_export("mobilenet-tiny")


def test_runtime_ig_matches_eager_reference_pooled(mobilenet_tiny):
    lm, out = mobilenet_tiny
    explainer = Explainer.from_artifacts(out)
    _check_against_reference(lm, explainer, make_images(4, seed=5), steps=8, batch_sizes=(3,), targets=[0, 3, 6, 9])


def _without_graph(src, dest, graph: str):
    """A copy of the export `src` at `dest` as written before `graph`.onnx existed (file and manifest entry)."""
    shutil.copytree(src, dest)
    man = json.loads((dest / "manifest.json").read_text())
    del man["graphs"][graph]
    (dest / f"{graph}.onnx").unlink()
    (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def test_ig_without_features_graph_uses_explain(tiny_artifacts, tmp_path):
    """An export without features.onnx: the activations come from explain.onnx (its forward part), with the
    same maps."""
    old = _without_graph(tiny_artifacts.out_dir, tmp_path / "nofeatures", "features")
    images = make_images(2, seed=31)
    cfg = DecomCamConfig(ig_steps=4)
    ex = Explainer.from_artifacts(old)
    calls = count_graph_calls(ex)
    got = ex.explain(images, method="decomcam-ig", config=cfg, target=[2, 5])
    assert "features" not in ex._sessions and calls["explain"] == 1
    want = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(images, method="decomcam-ig", config=cfg,
                                                                   target=[2, 5])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-5)


def test_ig_completeness_through_the_graphs(tiny_artifacts):
    """The evidence the runtime decomposes sums to y(A) - y(0), both logits from head.onnx (not from the
    gradient graph), on the attention pool (a head whose gradient depends on A). Its cosine logits vary
    fastest near A = 0, where the midpoint rule needs many steps: 1024 here (64 are 4% off)."""
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir)
    be = NumpyBackend()
    x = ex.preprocess(make_images(3, seed=9))[0]
    acts = ex.features(x)
    tgt = np.array([2, 4, 7])
    s_ig = acts.astype(np.float64) * path_gradient(be, ex.head_gradient, acts, tgt, 1024, 256)
    rows = np.arange(3)
    dy = ex.head(acts)[rows, tgt].astype(np.float64) - ex.head(np.zeros_like(acts))[rows, tgt]
    assert np.abs(dy).min() > 0.05
    np.testing.assert_allclose(s_ig.sum((1, 2, 3)), dy, rtol=1e-3)


def test_linear_head_path_gradient_is_the_local_gradient():
    """Global average pooling + one Linear: dy/dA does not depend on A, so S_IG = S* (eager oracle)."""
    from export.models import load_model

    lm = load_model("resnet-tiny", "none")
    x = torch.from_numpy(np.stack([preprocess(im, lm.image_size, lm.mean, lm.std)[0]
                                   for im in make_images(3, seed=2)]))
    logits, act, grad = lm.model.autograd(x, torch.full((3,), -1))
    g = eager_path_gradient(lm.model, act, None, logits.argmax(1), 4)
    np.testing.assert_allclose(g.numpy(), grad.double().numpy(), rtol=1e-5, atol=1e-7 * float(grad.abs().max()))


def test_export_without_head_grad_is_a_clear_error(tiny_artifacts, tmp_path, capsys):
    """An export written before head_grad.onnx: decomcam-ig fails in one line naming the manifest; the other
    methods still run on it."""
    from runtime.explain import main

    old = _without_graph(tiny_artifacts.out_dir, tmp_path / "old", "head_grad")
    ex = Explainer.from_artifacts(old)
    with pytest.raises(ArtifactsError, match=r"manifest\.json: no 'head_grad' graph listed; re-export"):
        ex.check_graphs("decomcam-ig")
    assert ex.explain(make_images(1)[0], method="gradcam").saliency.shape == (ex.size, ex.size)
    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), make_images(1)[0][:, :, ::-1])
    rc = main([str(img), "--artifacts", str(old), "--method", "decomcam-ig", "--out", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no 'head_grad' graph listed" in err[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
