"""The GPU paths' logic, tested on the CPU with stand-ins (a session whose providers differ from the request,
a fake provider list, a numpy stand-in for CuPy, an IOBinding that reads and writes through pointers).

Engine selection is proven (preload, the session's providers checked, the probe), TensorRT gets
optimisation profiles and a versioned cache, the runner's binding follows the session, the device copies
are accounted for, and options that cannot work are refused in one line."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import runtime.engines as eng
from runtime.backend import MatrixBackend, TransferLog
from runtime.config import DecomCamConfig
from runtime.engines import EngineError, EngineOptions
from runtime.explainer import Explainer
from runtime.runner import GraphRunner, make_runner, profile_shapes
from runtime.spec import CLASSIFY, EXPLAIN
from tests.conftest import make_images
from tests.fake_cupy import DeviceArray, FakeCupy

ROOT = Path(__file__).resolve().parents[2]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class StandInSession:
    """What ORT returns when a provider fails to load: a session on fewer providers than asked for."""

    created: list = []

    def __init__(self, got):
        self.got = got

    def __call__(self, model, so, providers):
        StandInSession.created.append(providers)
        self.providers = providers
        return self

    def get_providers(self):
        return list(self.got)

    def run(self, names, feed):  # the probe graph, y = Relu(x)
        return [np.maximum(feed["x"], 0)]


@pytest.fixture
def gpu_listed(monkeypatch):
    """onnxruntime-gpu installed: CUDA and TensorRT listed as available; preloading recorded."""
    calls = []
    monkeypatch.setattr(eng, "available_providers", lambda: list(ALL))
    monkeypatch.setattr(eng, "preload_gpu_libraries", lambda: calls.append("preload"))
    eng.probe_engine.cache_clear()
    yield calls
    eng.probe_engine.cache_clear()


# ----------------------------------------------------------------------------------------------------
# Items 1, 2: a provider that failed to load is detected; the probe

def test_cuda_session_without_cuda_provider_is_refused(gpu_listed, monkeypatch, tmp_path):
    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(["CPUExecutionProvider"]))
    with pytest.raises(EngineError, match=r"^engine 'cuda': CUDAExecutionProvider failed to load \(the session "
                                          r"got CPUExecutionProvider\)"):
        eng.create_session(b"model", "cuda")
    assert gpu_listed == ["preload"]  # the CUDA/cuDNN libraries were preloaded before the session


def test_trt_falling_back_to_cuda_is_refused(gpu_listed, monkeypatch, tmp_path):
    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    with pytest.raises(EngineError, match=r"engine 'trt': TensorrtExecutionProvider failed to load"):
        eng.create_session(b"model", "trt", EngineOptions(trt_cache_dir=str(tmp_path)))


def test_session_with_its_provider_is_accepted(gpu_listed, monkeypatch):
    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(ALL[1:]))
    sess = eng.create_session(b"model", "cuda")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    assert eng.session_on_gpu(sess)
    assert not eng.session_on_gpu(StandInSession(["CPUExecutionProvider"]))


def test_cpu_session_is_not_preloaded(gpu_listed):
    eng.create_session(eng.probe_model(), "cpu")
    assert gpu_listed == []


def test_probe_model_is_a_valid_onnx_relu():
    onnx = pytest.importorskip("onnx")
    m = onnx.load_from_string(eng.probe_model())
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["Relu"]
    sess = ort.InferenceSession(eng.probe_model(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.array([-3.0, 4.0], np.float32)})[0].tolist() == [0.0, 4.0]


def test_probe_engine_reports_the_reason(gpu_listed, monkeypatch):
    assert eng.probe_engine("cpu") is None
    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    eng.probe_engine.cache_clear()
    reason = eng.probe_engine("trt")
    assert reason.startswith("engine 'trt': TensorrtExecutionProvider failed to load")
    monkeypatch.setattr(eng, "available_providers", lambda: ["CPUExecutionProvider"])
    eng.probe_engine.cache_clear()
    assert "needs CUDAExecutionProvider" in eng.probe_engine("cuda")


def test_test_helpers_use_the_probe(gpu_listed, monkeypatch):
    """has_trt() must say no when TensorRT is listed but the session falls back to CUDA."""
    from tests import conftest

    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    sys.modules["cupy"].cuda.runtime = type("R", (), {"getDeviceCount": staticmethod(lambda: 1)})
    assert conftest.has_cuda() is True
    assert conftest.has_trt() is False
    assert "TensorrtExecutionProvider failed to load" in conftest.gpu_skip_reason("trt")


# ----------------------------------------------------------------------------------------------------
# Item 3: TensorRT profiles and a versioned cache

def test_trt_profiles_cover_the_batch_range(gpu_listed, monkeypatch):
    dims = {"C": 64, "h": 4, "w": 4, "D": 32, "H": 128, "W": 128}
    prof = profile_shapes(EXPLAIN, dims, max_batch=8, n_classes=20)
    assert prof == {"image": ((1, 3, 128, 128), (8, 3, 128, 128), (8, 3, 128, 128)),
                    "text": ((20, 32), (20, 32), (20, 32)),
                    "target": ((1,), (8,), (8,))}
    p = eng.providers_for("trt", EngineOptions(trt_cache_dir="/tmp/c"), profile_shapes(CLASSIFY, dims, 32, 20))
    trt = p[0][1]
    assert trt["trt_profile_min_shapes"] == "image:1x3x128x128,text:20x32"
    assert trt["trt_profile_opt_shapes"] == "image:32x3x128x128,text:20x32"
    assert trt["trt_profile_max_shapes"] == "image:32x3x128x128,text:20x32"
    assert trt["trt_engine_cache_path"] == f"/tmp/c/ort-{ort.__version__}-trt-{eng.trt_version()}"
    monkeypatch.setattr(eng, "trt_version", lambda: "10.8.0")
    assert eng.trt_cache_path("/x") == f"/x/ort-{ort.__version__}-trt-10.8.0"


def test_explainer_passes_profiles_for_its_batch_size(gpu_listed, monkeypatch, tiny_artifacts, tmp_path):
    stand_in = StandInSession(ALL)
    monkeypatch.setattr(eng.ort, "InferenceSession", stand_in)
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, engine="trt", batch_size=12, backend="numpy",
                                  engine_options=EngineOptions(trt_cache_dir=str(tmp_path)))
    r = ex.runner("classify")
    trt = dict(stand_in.providers[0][1])
    size, n_classes = ex.size, len(ex.classes.labels)
    assert trt["trt_profile_min_shapes"].startswith(f"image:1x3x{size}x{size},text:{n_classes}x")
    assert trt["trt_profile_max_shapes"].startswith(f"image:12x3x{size}x{size},text:{n_classes}x")
    with pytest.raises(ValueError, match=r"classify.onnx: batch 13 exceeds the TensorRT profile's 12"):
        r.run({"image": np.zeros((13, 3, size, size), np.float32), "text": ex.text})


# ----------------------------------------------------------------------------------------------------
# Items 5, 9: TF32, fp16 on cuda, cuda_graph

def test_cuda_tf32_is_an_explicit_option(gpu_listed):
    assert eng.providers_for("cuda")[0][1]["use_tf32"] == 1
    assert eng.providers_for("cuda", EngineOptions(tf32=False))[0][1]["use_tf32"] == 0
    assert eng.providers_for("trt", EngineOptions(tf32=False))[1][1]["use_tf32"] == 0


def test_fp16_is_refused_on_cuda_and_cpu(gpu_listed):
    with pytest.raises(EngineError, match=r"^engine 'cuda' has no fp16 mode of its own: use fp16 graphs"):
        eng.providers_for("cuda", EngineOptions(fp16=True))
    with pytest.raises(EngineError, match=r"engine 'cpu' has no fp16 mode"):
        eng.providers_for("cpu", EngineOptions(fp16=True))
    assert eng.providers_for("trt", EngineOptions(fp16=True))[0][1]["trt_fp16_enable"] is True


def test_cuda_graph_is_refused(gpu_listed):
    with pytest.raises(EngineError, match=r"^cuda_graph is not supported: CUDA graph replay needs fixed buffer"):
        eng.providers_for("cuda", EngineOptions(cuda_graph=True))


# ----------------------------------------------------------------------------------------------------
# Items 4, 8 and the copy accounting: CuPy's logic with the numpy stand-in

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
    assert be.transfers.take() == [{"name": "test_gpu_preflight.upload_mask", "bytes": 24, "direction": "h2d"}]
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
    upload = "test_gpu_preflight.test_device_eigh_paths_match"
    assert names == ([upload] if on_device else [upload, "eigh.gram", "eigh.eigenvalues", "eigh.eigenvectors"])
    w, v = w.get(), v.get()
    np.testing.assert_allclose(np.linalg.eigvalsh(gram), w, rtol=1e-10, atol=1e-8)
    recon = v @ (w[:, :, None] * v.transpose(0, 2, 1))
    np.testing.assert_allclose(recon, gram, atol=1e-8 * np.abs(gram).max())
    np.testing.assert_allclose(v.transpose(0, 2, 1) @ v, np.broadcast_to(np.eye(n), (3, n, n)), atol=1e-10)


class PointerBinding:
    """IOBinding stand-in: records the binds, runs a CPU session on the memory behind the pointers, and
    writes the outputs into the bound output buffers (what ORT's CUDA provider does on the device)."""

    def __init__(self, sess):
        self.sess, self.inputs, self.outputs, self.synced = sess, {}, {}, []

    def bind_input(self, name, device_type, device_id, dtype, shape, ptr):
        self.inputs[name] = (device_type, device_id, np.dtype(dtype), tuple(shape), ptr)

    def bind_output(self, name, device_type, device_id, dtype, shape, ptr):
        self.outputs[name] = (device_type, device_id, np.dtype(dtype), tuple(shape), ptr)

    def synchronize_inputs(self):
        self.synced.append("inputs")

    def synchronize_outputs(self):
        self.synced.append("outputs")

    @staticmethod
    def view(dtype, shape, ptr):
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)

    def run(self):
        feed = {k: self.view(dt, sh, p).copy() for k, (_, _, dt, sh, p) in self.inputs.items()}
        res = self.sess.run(list(self.outputs), feed)
        for (name, (_, _, dt, sh, p)), r in zip(self.outputs.items(), res):
            self.view(dt, sh, p)[...] = r


class GpuSessionStandIn:
    """A session that reports the CUDA provider and computes on the CPU through PointerBinding."""

    def __init__(self, path):
        self.cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.bindings = []

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def io_binding(self):
        self.bindings.append(PointerBinding(self.cpu))
        return self.bindings[-1]

    def run_with_iobinding(self, io):
        io.run()


def test_bound_path_binds_on_the_requested_device(tiny_artifacts):
    """A GPU session gets device buffers bound on device_id, inside cupy.cuda.Device(device_id); outputs are
    fresh device arrays (no copy); nothing but host inputs crosses."""
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    fake = FakeCupy()
    be = MatrixBackend(fake, device_id=1)
    sess = GpuSessionStandIn(art.check_graph("classify"))
    r = GraphRunner(sess, CLASSIFY, be, art.dims, device_id=1)
    assert r.bound and not r.round_trip
    text = np.random.default_rng(0).standard_normal((5, art.dims["D"])).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((2, 3, art.input_size, art.input_size)).astype(np.float32)
    with fake.cuda.Device(1):
        xd = be.asarray(x)
    be.transfers.take()
    out = r.run({"image": xd, "text": text})
    want = sess.cpu.run(["logits"], {"image": x, "text": text})[0]
    assert isinstance(out["logits"], DeviceArray) and out["logits"].device.id == 1
    np.testing.assert_allclose(out["logits"].get(), want, rtol=1e-6, atol=1e-6)
    io = sess.bindings[-1]
    assert {v[:2] for v in io.inputs.values()} == {("cuda", 1)} and io.outputs["logits"][:2] == ("cuda", 1)
    assert io.synced == ["inputs", "outputs"] and 1 in fake.entered
    assert [(t["name"], t["direction"]) for t in be.transfers.take()] == [("classify.text", "h2d")]
    out2 = r.run({"image": xd, "text": be.asarray(text)})
    assert out2["logits"].data.ptr != out["logits"].data.ptr   # a new buffer per call: the first is intact
    np.testing.assert_allclose(out["logits"].get(), want, rtol=1e-6, atol=1e-6)


def test_make_runner_binds_only_when_the_session_is_on_a_gpu(tiny_artifacts, monkeypatch):
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    be = MatrixBackend(FakeCupy())
    r = make_runner(art, "classify", "cpu", EngineOptions(), be, 20, 32)
    assert r.round_trip and not r.bound and r.max_batch is None


# ----------------------------------------------------------------------------------------------------
# Item 12: on the device, a skipped gpu test is a failure

def test_require_gpu_turns_gpu_skips_into_failures(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pass

        def test_plain():
            pass
    """))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", "-c", os.devnull,
           "--rootdir", str(tmp_path), "-o", "markers=gpu\ntrt", str(tmp_path / "test_x.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DECOMCAM_REQUIRE_GPU", None)
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 0 and "1 passed, 1 skipped" in plain.stdout, plain.stdout + plain.stderr
    strict = subprocess.run(cmd, capture_output=True, text=True, env={**env, "DECOMCAM_REQUIRE_GPU": "1"}, cwd=tmp_path)
    assert strict.returncode == 1 and "1 passed, 1 error" in strict.stdout, strict.stdout + strict.stderr
    assert "DECOMCAM_REQUIRE_GPU=1" in strict.stdout


@pytest.mark.parametrize("fixed", [True, False])
def test_fixed_chunks_give_one_shape_and_the_same_logits(tiny_artifacts, fixed):
    """fixed_chunks: a classify call over N > batch_size images runs chunks of exactly batch_size (the last
    padded, its rows dropped); without it the last chunk is short. Logits are the same either way, against
    one classify call per image (no chunking at all)."""
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, batch_size=4,
                                  engine_options=EngineOptions(fixed_chunks=fixed))
    assert ex.fixed_chunks is fixed
    images = np.random.default_rng(0).normal(size=(10, 3, ex.size, ex.size)).astype(np.float32)
    runner = ex.runner("classify")
    seen, run = [], runner.run
    runner.run = lambda feed, **kw: (seen.append(feed["image"].shape[0]), run(feed, **kw))[1]
    logits = ex.classify(images)
    assert seen == ([4, 4, 4] if fixed else [4, 4, 2])
    seen.clear()
    one_by_one = np.concatenate([ex.classify(images[i:i + 1]) for i in range(10)])
    assert seen == [1] * 10          # a call within the batch size is never padded
    assert logits.shape == one_by_one.shape == (10, len(ex.classes.labels))
    np.testing.assert_allclose(logits, one_by_one, rtol=1e-5, atol=1e-5)
    # two per-row inputs (head_grad.onnx: activations and target): both padded, the padded rows dropped
    acts = ex.runner("features").run(ex.feed(image=images))["activations"]
    target = np.arange(10, dtype=np.int64) % len(ex.classes.labels)
    hg = ex.runner("head_grad")
    seen_hg, run_hg = [], hg.run
    hg.run = lambda feed, **kw: (seen_hg.append((feed["activations"].shape[0], feed["target"].shape[0])),
                                 run_hg(feed, **kw))[1]
    grads = ex.head_gradient(acts, target)
    assert seen_hg == ([(4, 4)] * 3 if fixed else [(4, 4), (4, 4), (2, 2)])
    singles = np.concatenate([ex.head_gradient(acts[i:i + 1], target[i:i + 1]) for i in range(10)])
    assert grads.shape == acts.shape
    np.testing.assert_allclose(grads, singles, rtol=1e-5, atol=1e-6 * float(np.abs(singles).max()))


def test_fixed_chunks_default_follows_the_engine(gpu_listed):
    assert EngineOptions().fixed_chunks is None
    for engine, want in (("cpu", False), ("cuda", True), ("trt", True)):
        ex = Explainer.__new__(Explainer)
        ex.engine, ex.options = engine, EngineOptions()
        assert ex.fixed_chunks is want


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


def test_image_pool_is_shared_and_never_nested():
    import threading

    from runtime.artifacts import image_pool

    assert image_pool(1) is None                               # one worker: the calling thread does it
    p = image_pool(2)
    assert p is not None and image_pool(2) is p                # one pool per (process, size)
    inner = p.submit(lambda: (threading.current_thread().name, image_pool(2))).result()
    assert inner[0].startswith("decomcam-images") and inner[1] is None   # no pool from inside the pool


def test_preprocess_images_in_the_pool_equal_one_by_one(tiny_artifacts):
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    ims = make_images(5, seed=11)
    x, geoms = art.preprocess_images(ims, "stretch")
    for i, im in enumerate(ims):
        xi, gi = art.preprocess_image(im, "stretch")
        np.testing.assert_array_equal(x[i], xi)
        assert geoms[i] == gi
    x0, g0 = art.preprocess_images([])
    assert x0.shape == (0, 3, art.input_size, art.input_size) and g0 == []


def test_fixed_chunks_upload_a_host_input_on_a_device_backend(tiny_artifacts):
    """classify() given a host array on a device back end: the padded chunk is uploaded before padding
    (the runner uploads the others), and the logits equal the numpy back end's."""
    be = MatrixBackend(FakeCupy(), name="fake-cupy", device_id=0)
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, backend=be, batch_size=4,
                                  engine_options=EngineOptions(fixed_chunks=True))
    ref = Explainer.from_artifacts(tiny_artifacts.out_dir, batch_size=4)
    images = np.random.default_rng(3).normal(size=(6, 3, ex.size, ex.size)).astype(np.float32)
    got = ex.classify(images)
    assert isinstance(got, DeviceArray)
    np.testing.assert_allclose(got.get(), ref.classify(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_fixed_chunks_in_the_per_channel_methods(tiny_artifacts, rgbs, method):
    """Score-CAM and Ablation-CAM run their channels in chunks of the batch size: with fixed_chunks every
    graph call has exactly that many inputs, and the maps equal the unpadded run's."""
    maps, shapes = {}, {}
    for fixed in (False, True):
        ex = Explainer.from_artifacts(tiny_artifacts.out_dir, batch_size=5,
                                      engine_options=EngineOptions(fixed_chunks=fixed))
        graph = "head" if method == "ablationcam" else "classify"
        runner = ex.runner(graph)
        seen, run = [], runner.run
        name = "activations" if graph == "head" else "image"
        runner.run = lambda feed, seen=seen, run=run, name=name, **kw: (seen.append(feed[name].shape[0]), run(feed, **kw))[1]
        maps[fixed] = ex.explain(rgbs[0], method=method).saliency
        shapes[fixed] = seen
    assert set(shapes[True]) == {5} and len(shapes[True]) == len(shapes[False])
    assert set(shapes[False]) != {5}                  # the unpadded run does have a short chunk
    np.testing.assert_allclose(maps[True], maps[False], atol=1e-5)


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


def test_image_pool_threads_are_daemons_and_render_many_stays_a_window_ahead(monkeypatch):
    """A run that stops (a second Ctrl-C) does not wait for queued picture encodings at exit: the pool's
    threads are daemons; and the writer's generator keeps at most one job per pool thread ahead of it,
    submitting nothing more once it is closed. Synchronised with events only (no sleeps): a fast or a slow
    machine goes through the same steps."""
    import threading

    import runtime.render as render
    from runtime.artifacts import image_pool

    pool = image_pool(2)
    assert pool.size == 2 and pool.submit(lambda: threading.current_thread().daemon).result() is True
    submitted, real_submit = [], pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *args: (submitted.append(args), real_submit(fn, *args))[1])
    release, holding, out = threading.Event(), threading.Semaphore(0), []

    def slow(rgb, exp, extra):
        holding.release()                 # this pool thread now holds a job
        release.wait(600)                 # a cap against a hang, not a timing condition
        return [rgb]

    monkeypatch.setattr(render, "render_outputs", slow)
    gen = render.render_many([(i, None) for i in range(10)], {}, workers=2)
    consumer = threading.Thread(target=lambda: out.append(next(gen)))
    consumer.start()                      # the generator submits its window, then waits on the first result
    assert holding.acquire(timeout=600) and holding.acquire(timeout=600)   # both threads hold a job
    assert len(submitted) == 2            # the generator is blocked on job 0: two submitted, not ten
    release.set()
    consumer.join(600)
    assert out == [[0]]
    gen.close()                           # the writer stops: the job still pending is cancelled
    assert len(submitted) == 2            # and nothing more is submitted
