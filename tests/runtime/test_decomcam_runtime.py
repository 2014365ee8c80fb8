"""Runtime Decom-CAM (numpy + ORT CPU) against the eager PyTorch reference, and its numerical building blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.reference import decomcam_reference
from runtime.backend import MatrixBackend, NumpyBackend, get_backend
from runtime.config import DecomCamConfig
from runtime.decomcam import decompose
from runtime.engines import EngineError, EngineOptions, providers_for
from runtime.explainer import Explainer, TargetError
from runtime.images import preprocess
from tests.conftest import make_images


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def explainer(tiny_artifacts):
    return Explainer.from_artifacts(tiny_artifacts.out_dir)


@pytest.fixture(scope="module")
def parity_images():
    return make_images(6, seed=11)


@pytest.mark.parametrize("method", ["decomcam", "decomcam-authors"])
def test_runtime_matches_eager_reference(tiny, explainer, parity_images, method):
    cfg = DecomCamConfig(authors_top_k=64)
    exps = explainer.explain(parity_images, method=method, config=cfg)
    x = torch.from_numpy(np.stack([preprocess(im, tiny.image_size, tiny.mean, tiny.std)[0] for im in parity_images]))
    text = torch.from_numpy(explainer.classes.embeddings)
    ref = decomcam_reference(tiny.model, x, text, tiny.mean, tiny.std, config=cfg, method=method)
    for i, e in enumerate(exps):
        assert e.target == ref.target[i]
        if np.ptp(ref.saliency[i]) > 0:
            assert pearson(e.saliency, ref.saliency[i]) >= 0.9999
        assert np.abs(e.saliency - ref.saliency[i]).max() <= 1e-3
        # component maps match one to one (same order, same sign)
        assert e.components.shape == ref.components[i].shape
        for c_rt, c_ref in zip(e.components, ref.components[i]):
            if np.ptp(c_ref) > 0:
                cos = float((c_rt * c_ref).sum() / (np.linalg.norm(c_rt) * np.linalg.norm(c_ref)))
                assert cos >= 0.999
            else:
                assert np.ptp(c_rt) == 0
        np.testing.assert_allclose(e.explained_variance, ref.explained_variance[i], atol=1e-4)
        np.testing.assert_allclose(e.weights, ref.weights[i], atol=2e-3)


def test_gram_eigen_equals_full_svd():
    rng = np.random.default_rng(0)
    b, c, h, w = 3, 300, 7, 7
    act = rng.random((b, c, h, w)).astype(np.float32)
    grad = (rng.standard_normal((b, c, h, w)) * 0.01).astype(np.float32)
    dec = decompose(NumpyBackend(), act, grad, 10)
    for i in range(b):
        s = (grad[i].astype(np.float64) * act[i]).reshape(c, -1)
        u, sv, vt = np.linalg.svd(s, full_matrices=False)
        f = u[:, :10].T @ s                              # the paper's projection
        g = s.sum(0)
        f *= np.where(f @ g >= 0, 1.0, -1.0)[:, None]    # the sign convention, computed independently
        np.testing.assert_allclose(dec.singular_values[i], sv[:10], rtol=1e-9)
        np.testing.assert_allclose(dec.feature_maps[i], f, atol=1e-9 * sv[0])
        np.testing.assert_allclose(dec.explained_variance[i], sv[:10] ** 2 / (sv ** 2).sum(), rtol=1e-9)


def test_decomposition_is_independent_of_svd_sign():
    rng = np.random.default_rng(1)
    act = rng.random((1, 64, 4, 4)).astype(np.float32)
    grad = rng.standard_normal((1, 64, 4, 4)).astype(np.float32)
    be = NumpyBackend()

    class FlipEigh(NumpyBackend):
        def eigh(self, gram):
            w, v = np.linalg.eigh(gram)
            return w, v * np.where(np.arange(v.shape[-1]) % 2 == 0, -1.0, 1.0)

    a = decompose(be, act, grad, 6)
    b = decompose(FlipEigh(), act, grad, 6)
    np.testing.assert_allclose(a.feature_maps, b.feature_maps, atol=1e-12)


def test_matrix_backend_matches_opencv_backend():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((300, 7, 7)).astype(np.float32)  # more maps than OpenCV takes in one call
    imgs = rng.random((2, 3, 96, 96)).astype(np.float32)
    a, b = NumpyBackend(), MatrixBackend(np)
    for interp in ("bilinear", "bicubic"):
        np.testing.assert_allclose(b.resize(maps, 96, interp), a.resize(maps, 96, interp), atol=1e-5)
    np.testing.assert_allclose(b.blur(imgs, 4.3, 18), a.blur(imgs, 4.3, 18), atol=1e-5)


def test_explainer_on_matrix_backend_equals_numpy_backend(tiny_artifacts, parity_images):
    a = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[:2])
    b = Explainer.from_artifacts(tiny_artifacts.out_dir, backend="matrix-numpy").explain(parity_images[:2])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.saliency, y.saliency, atol=1e-4)


def test_batch_equals_single(explainer, parity_images):
    batch = explainer.explain(parity_images[:3])
    for im, e in zip(parity_images[:3], batch):
        single = explainer.explain(im)
        assert single.target == e.target
        np.testing.assert_allclose(single.saliency, e.saliency, atol=2e-4)


def test_explanation_contents(explainer, parity_images):
    e = explainer.explain(parity_images[0], top_p=4)
    s = explainer.size
    assert e.saliency.shape == (s, s) and e.components.shape == (4, s, s)
    assert e.saliency_original.shape == parity_images[0].shape[:2]
    assert e.components_original().shape == (4, *parity_images[0].shape[:2])
    assert len(e.top5) == 5 and e.top5[0][0] == e.target_name
    z = e.logits.astype(np.float64)                       # softmax over the class set, computed here
    prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    order = np.argsort(-prob, kind="stable")[:5]
    assert [n for n, _ in e.top5] == [explainer.classes.labels[i] for i in order]
    np.testing.assert_allclose([p for _, p in e.top5], prob[order], rtol=1e-6)
    assert set(e.timings) >= {"preprocess", "explain", "decompose", "upsample", "blur", "blend", "classify",
                              "integrate", "postprocess"}
    assert e.random_weights is True
    j = e.summary()
    assert j["target"]["name"] == e.target_name and len(j["weights"]) == 4


def test_target_by_name_and_index(explainer, parity_images):
    a = explainer.explain(parity_images[0], target="dog")
    b = explainer.explain(parity_images[0], target=explainer.classes.labels.index("dog"))
    assert a.target == b.target == explainer.classes.labels.index("dog")
    np.testing.assert_array_equal(a.saliency, b.saliency)


def test_target_errors(explainer):
    with pytest.raises(TargetError, match=r"unknown target class 'dgo'.*did you mean: dog"):
        explainer.resolve_target("dgo")
    with pytest.raises(TargetError, match="target index 99 is out of range"):
        explainer.resolve_target(99)


def test_sessions_are_created_once(explainer, parity_images):
    explainer.explain(parity_images[0])
    runners = dict(explainer._sessions)
    explainer.explain(parity_images[1])
    assert all(explainer._sessions[k] is v for k, v in runners.items())


def test_engine_provider_lists(monkeypatch):
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match=r"unknown engine 'tpu'; valid engines: cpu, cuda, trt"):
        providers_for("tpu")
    import runtime.engines as eng

    monkeypatch.setattr(eng, "available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match=r"engine 'cuda' needs CUDAExecutionProvider.*available providers: "
                                          r"CPUExecutionProvider"):
        providers_for("cuda")
    monkeypatch.setattr(eng, "available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    p = providers_for("trt", EngineOptions(fp16=True, trt_cache_dir="/tmp/c", device_id=1))
    assert [x if isinstance(x, str) else x[0] for x in p] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                              "CPUExecutionProvider"]
    trt = p[0][1]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"].startswith("/tmp/c/ort-") and trt["trt_timing_cache_enable"] is True
    assert trt["device_id"] == 1
    cuda = providers_for("cuda", EngineOptions(device_id=1))
    assert cuda[0][1]["device_id"] == 1 and cuda[-1] == "CPUExecutionProvider"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown array back end 'jax'"):
        get_backend("jax")


@pytest.mark.gpu
def test_cupy_backend_matches_numpy(tiny_artifacts, parity_images):
    import cupy

    a = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[:2])
    # TF32 off and the CPU run's targets passed explicitly: a near tie must not change the explained class
    # (cuDNN's HEURISTIC algorithm choice: no EXHAUSTIVE search per new shape in a test)
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, engine="cuda", engine_options=EngineOptions(
        tf32=False, extra={"cudnn_conv_algo_search": "HEURISTIC"}))
    assert ex.backend.module is cupy and ex.runner("explain").bound
    b = ex.explain(parity_images[:2], target=[e.target for e in a])
    for x, y in zip(a, b):
        assert pearson(x.saliency, y.saliency) >= 0.9999
    # what crossed: the images up, the logits, maps and numbers down; never the activations nor the eigh's
    # operands (it runs on the device)
    names = {(t["name"], t["direction"]) for t in b[0].transfers}
    assert not any(n.startswith(("explain.activations", "eigh.")) for n, _ in names)
    # the graph outputs are bound to device buffers: what a runner returns is a CuPy array
    out = ex.runner("classify").run({"image": cupy.zeros((1, 3, ex.size, ex.size), cupy.float32), "text": ex.text})
    assert isinstance(out["logits"], cupy.ndarray)


@pytest.mark.gpu
def test_decomcam_ig_on_cuda_matches_cpu(tiny_artifacts, parity_images):
    """decomcam-ig on the cuda engine: alpha_k A stacked on the device and bound to head_grad.onnx, the mean
    gradient and the decomposition on the device; the same maps as on the CPU for the same targets."""
    a = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[:3], method="decomcam-ig")
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, engine="cuda", batch_size=8, engine_options=EngineOptions(
        tf32=False, extra={"cudnn_conv_algo_search": "HEURISTIC"}))
    b = ex.explain(parity_images[:3], method="decomcam-ig", target=[e.target for e in a])
    assert ex.runner("head_grad").bound
    for x, y in zip(a, b):
        assert pearson(x.saliency, y.saliency) >= 0.9999
        np.testing.assert_allclose(x.weights, y.weights, atol=1e-3)
    names = {(t["name"], t["direction"]) for t in b[0].transfers}
    assert not any(n.startswith(("head_grad.activations", "head_grad.gradients")) for n, _ in names)


@pytest.mark.cupy
def test_cupy_numerics_through_any_onnxruntime(tiny_artifacts, parity_images):
    """The CuPy back end on a CPU session (the runner round-trips through the host) or a GPU one: the same
    maps as the numpy back end, for the same targets; the eigh on the device, and through the host."""
    import cupy

    a = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[:3])
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, backend="cupy")
    assert ex.backend.module is cupy
    b = ex.explain(parity_images[:3], target=[e.target for e in a])
    for x, y in zip(a, b):
        assert pearson(x.saliency, y.saliency) >= 0.9999 and np.abs(x.saliency - y.saliency).max() <= 1e-3
        np.testing.assert_allclose(x.weights, y.weights, atol=1e-4)
    assert not any(t["name"].startswith("eigh.") for t in b[0].transfers)
    ex.backend._device_eigh = False
    c = ex.explain(parity_images[:3], target=[e.target for e in a])
    assert ("eigh.gram", "d2h") in {(t["name"], t["direction"]) for t in c[0].transfers}
    for x, y in zip(b, c):
        assert pearson(x.saliency, y.saliency) >= 0.9999
    ex.backend._device_eigh = True
    for name in ("eigencam", "gradcam", "decomcam-ig"):
        x, y = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[0], method=name), \
            ex.explain(parity_images[0], method=name, target=a[0].target)
        assert pearson(x.saliency, y.saliency) >= 0.9999


@pytest.mark.trt
def test_trt_engine_runs(tiny_artifacts, parity_images, tmp_path):
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, engine="trt",
                                  engine_options=EngineOptions(fp16=True, trt_cache_dir=str(tmp_path)))
    ref = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(parity_images[0])
    e = ex.explain(parity_images[0], target=ref.target)
    assert pearson(e.saliency, ref.saliency) >= 0.995
    from runtime.engines import trt_cache_path

    assert ex.runner("explain").session.get_providers()[0] == "TensorrtExecutionProvider"
    assert any(Path(trt_cache_path(str(tmp_path))).iterdir())  # engine / timing cache, per ORT + TRT version
