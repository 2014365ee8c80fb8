"""runtime/backend.py: the device back end's numerics with a numpy stand-in for CuPy equal the host's, every
host<->device copy is counted and named, the eigh stays on the device, and component maps stay there when
not asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.backend import MatrixBackend, TransferLog
from runtime.config import DecomCamConfig
from runtime.engines import EngineOptions
from runtime.explainer import Explainer
from tests.conftest import make_images
from tests.fake_cupy import DeviceArray, FakeCupy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rgbs():
    return make_images(2, seed=5)


def test_device_backend_through_a_cpu_session_round_trips_and_counts(tiny_artifacts, rgbs):
    """CuPy numerics with a CPU onnxruntime: the runner copies through the host; the maps equal the numpy
    back end's; every copy is logged with its name and size."""
    fake = FakeCupy()
    be = MatrixBackend(fake, name="fake-cupy", device_id=0)
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, backend=be)
    ref = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(rgbs)
    got = ex.explain(rgbs)
    assert ex.runner("explain").round_trip and not ex.runner("explain").bound
    for a, b in zip(got, ref):
        assert a.target == b.target
        np.testing.assert_allclose(a.saliency, b.saliency, atol=2e-4)
    tr = got[0].transfers
    assert got[1].transfers is tr  # one log per call, shared by its images
    by = {(r["name"], r["direction"]): r["bytes"] for r in tr}
    d = ex.artifacts.dims
    n, size = len(rgbs), ex.size
    assert by[("explain.image", "d2h")] == n * 3 * size * size * 4
    assert by[("explain.activations", "h2d")] == n * d["C"] * d["h"] * d["w"] * 4
    assert by[("explain.gradients", "h2d")] == n * d["C"] * d["h"] * d["w"] * 4
    assert not any(r["name"].startswith("eigh.") for r in tr)    # the eigh stays on the device
    assert ("classify.logits", "h2d") in by and ("classify.image", "d2h") in by
    assert not any(r["name"].startswith("classify.text") and r["direction"] == "h2d" for r in tr)
    tot = TransferLog.totals(tr)
    assert tot["d2h"]["bytes"] == sum(r["bytes"] for r in tr if r["direction"] == "d2h") > 0


def test_decomcam_ig_on_a_device_backend(tiny_artifacts, rgbs):
    """decomcam-ig's path (alpha_k A stacked on the device, head_grad.onnx through the host, the mean gradient
    and the decomposition on the device) equals the numpy back end's; no host array mixes in."""
    be = MatrixBackend(FakeCupy(), name="fake-cupy", device_id=0)
    cfg = DecomCamConfig(ig_steps=8)
    got = Explainer.from_artifacts(tiny_artifacts.out_dir, backend=be, batch_size=4).explain(
        rgbs, method="decomcam-ig", config=cfg)
    ref = Explainer.from_artifacts(tiny_artifacts.out_dir, batch_size=4).explain(rgbs, method="decomcam-ig", config=cfg)
    for a, b in zip(got, ref):
        assert a.target == b.target and np.ptp(b.saliency) > 0
        np.testing.assert_allclose(a.saliency, b.saliency, atol=2e-4)
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-5)
    by = {(r["name"], r["direction"]) for r in got[0].transfers}
    assert ("head_grad.activations", "d2h") in by and ("head_grad.gradients", "h2d") in by
    uploads = [r for r in got[0].transfers if (r["name"], r["direction"]) == ("features.image", "d2h")]
    assert len(uploads) == 1                           # the image, once


def test_host_backend_logs_no_transfers(tiny_artifacts, rgbs):
    e = Explainer.from_artifacts(tiny_artifacts.out_dir).explain(rgbs[0])
    assert e.transfers == []


def test_counting_module_names_uploads_by_caller():
    fake = FakeCupy()
    be = MatrixBackend(fake)

    def upload_mask():
        return be.xp.asarray(np.ones((2, 3), np.float32))

    d = upload_mask()
    assert isinstance(d, DeviceArray) and be.module is fake
    be.xp.asarray(d)  # already on the device: not a copy
    assert be.transfers.take() == [{"name": "test_backend.upload_mask", "bytes": 24, "direction": "h2d"}]
    with pytest.raises(TypeError, match="host array"):  # the stand-in refuses mixing, as CuPy does
        be.xp.matmul(d, np.ones((3, 2), np.float32))


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("n", [16, 49, 196])
def test_device_eigh_paths_match(n, on_device):
    """The eigh on the device (the default) copies nothing; with CuPy < 14 it goes through the host
    with its two copies. Both match numpy's."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal((3, n, 2 * n))
    gram = a @ a.transpose(0, 2, 1)                          # [3, n, n] symmetric PSD
    be = MatrixBackend(FakeCupy())
    assert be._device_eigh                                  # CuPy 14: on the device by default
    assert not MatrixBackend(FakeCupy(version="13.6.0"))._device_eigh   # older: through the host
    be._device_eigh = on_device
    w, v = be.eigh(be.asarray(gram))
    assert isinstance(w, DeviceArray) and isinstance(v, DeviceArray)
    names = [r["name"] for r in be.transfers.take()]
    upload = "test_backend.test_device_eigh_paths_match"
    assert names == ([upload] if on_device else [upload, "eigh.gram", "eigh.eigenvalues", "eigh.eigenvectors"])
    w, v = w.get(), v.get()
    np.testing.assert_allclose(np.linalg.eigvalsh(gram), w, rtol=1e-10, atol=1e-8)
    recon = v @ (w[:, :, None] * v.transpose(0, 2, 1))
    np.testing.assert_allclose(recon, gram, atol=1e-8 * np.abs(gram).max())
    np.testing.assert_allclose(v.transpose(0, 2, 1) @ v, np.broadcast_to(np.eye(n), (3, n, n)), atol=1e-10)


def test_components_false_keeps_the_component_maps_on_the_device(tiny_artifacts, rgbs):
    """explain_arrays(components=False): the p component maps per image do not come down (the saliency
    maps and the numbers do), and nothing else changes."""
    be = MatrixBackend(FakeCupy(), name="fake-cupy", device_id=0)
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, backend=be)
    p = 3

    def down(res):
        return sum(r["bytes"] for r in res[0].transfers if r["name"] == "explainer.host" and r["direction"] == "d2h")

    full = ex.explain_arrays(list(rgbs), top_p=p)
    lean = ex.explain_arrays(list(rgbs), top_p=p, components=False)
    assert all(e.components is None for e in lean)
    assert all(e.components is not None and e.components.shape == (p, ex.size, ex.size) for e in full)
    assert down(full) - down(lean) == len(rgbs) * p * ex.size * ex.size * 4
    for a, b in zip(full, lean):
        np.testing.assert_array_equal(a.saliency, b.saliency)
        np.testing.assert_array_equal(a.weights, b.weights)


def test_postprocess_in_the_pool_equals_the_serial_path(tiny_artifacts):
    """The per-image host work after the graphs (input pixels, saliency in original coordinates) runs in the
    image pool; the results equal one thread's and an independent computation of the pixels."""
    ims = make_images(4, seed=13)
    pooled = Explainer.from_artifacts(tiny_artifacts.out_dir).explain_arrays(ims, top_p=2)
    serial = Explainer.from_artifacts(tiny_artifacts.out_dir, engine_options=EngineOptions(intra_op_threads=1)
                                      ).explain_arrays(ims, top_p=2, target=[e.target for e in pooled])
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir)
    x, geoms = ex.preprocess(ims)
    for i, (a, b) in enumerate(zip(pooled, serial)):
        np.testing.assert_array_equal(a.input_rgb, b.input_rgb)
        np.testing.assert_array_equal(a.saliency_original, b.saliency_original)
        want = np.clip(x[i].transpose(1, 2, 0) * np.float32(ex.artifacts.std) + np.float32(ex.artifacts.mean), 0, 1)
        assert np.abs(a.input_rgb.astype(int) - np.round(want * 255).astype(int)).max() <= 1
        assert a.input_rgb.flags.c_contiguous and a.input_rgb.shape == (ex.size, ex.size, 3)
        assert a.saliency_original.shape == (geoms[i].orig_h, geoms[i].orig_w)


@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_images_preprocessed_on_the_device_equal_the_hosts(tiny_artifacts, resize):
    """device_images: the uint8 pixels go up (a quarter of the float32 bytes) and are resized, cropped and
    normalised there (Pillow's fixed-point passes as matrix products): the model input equals the host's bit
    for bit, and so do the explanations; the saliency in original coordinates is made on the device too
    (OpenCV's bilinear operators as matrices) and equals the host's within float32 rounding."""
    from runtime.images import preprocess

    ims = make_images(3, seed=21, sizes=((150, 200), (97, 61), (300, 451)))
    be = MatrixBackend(FakeCupy(), name="fake-cupy")
    dev = Explainer.from_artifacts(tiny_artifacts.out_dir, backend=be, resize=resize)
    host = Explainer.from_artifacts(tiny_artifacts.out_dir, resize=resize)
    assert dev.device_images and not host.device_images
    got, ref = dev.explain(ims, method="gradcam"), host.explain(ims, method="gradcam")
    art = dev.artifacts
    for im, a, b in zip(ims, got, ref):
        x, _ = preprocess(im, art.input_size, art.mean, art.std, resize, art.preprocess["resize_size"],
                          art.preprocess["interpolation"])
        pix = np.clip(np.rint((x.transpose(1, 2, 0) * np.float32(art.std) + np.float32(art.mean)) * 255), 0, 255)
        np.testing.assert_array_equal(a.input_rgb, b.input_rgb)
        np.testing.assert_array_equal(a.input_rgb, pix.astype(np.uint8))
        assert a.geometry == b.geometry and a.target == b.target
        np.testing.assert_allclose(a.saliency, b.saliency, atol=2e-5)
        assert a.saliency_original.shape == im.shape[:2]
        np.testing.assert_allclose(a.saliency_original, b.saliency_original, atol=5e-5)
    up = [r for r in got[0].transfers if r["name"] == "image.uint8"]
    assert [r["bytes"] for r in up] == [im.size for im in ims]          # uint8, H x W x 3 each
    assert not any(r["name"].endswith(".image") and r["direction"] == "h2d" for r in got[0].transfers)
    none = dev.explain_arrays(ims[:1], method="gradcam", original=False)
    assert none[0].saliency_original is None


def test_device_preprocessing_matches_pillow_on_awkward_shapes():
    """runtime.images.preprocess_on against Pillow's resize (runtime.images.preprocess): up- and downscaling,
    a 1-pixel side, an axis Pillow leaves alone, both filters and resize policies."""
    from runtime.images import preprocess, preprocess_on

    rng = np.random.default_rng(2)
    fake = FakeCupy()
    for h, w in ((1, 40), (2000, 1500), (224, 224), (37, 300), (256, 100)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for mode in ("crop", "stretch"):
            for interp in ("bicubic", "bilinear"):
                for rs in (None, 256):
                    x, g = preprocess(rgb, 224, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), mode, rs, interp)
                    xd, _, gd = preprocess_on(fake, fake.asarray(rgb), 224, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), mode,
                                              rs, interp)
                    assert gd == g
                    np.testing.assert_array_equal(xd.get(), x)
