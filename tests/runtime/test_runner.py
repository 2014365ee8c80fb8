"""runtime/runner.py: binding follows the session (a device buffer only to a GPU session), fixed chunks give one
shape per graph, and the CUDA-graph path keeps bound buffers per padded shape; checked with a numpy
stand-in for CuPy and an IOBinding that computes on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backend import MatrixBackend
from runtime.engines import EngineError, EngineOptions
from runtime.explainer import Explainer
from runtime.runner import GraphRunner, make_runner
from runtime.spec import CLASSIFY
from tests.conftest import make_images
from tests.fake_cupy import DeviceArray, FakeCupy
from tests.stand_ins import GpuSessionStandIn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rgbs():
    return make_images(2, seed=5)


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


def test_cuda_graph_keeps_bound_buffers_per_padded_shape(tiny_artifacts):
    """CUDA graphs: a call's batch is padded to its power-of-two bucket (at most the batch size); each bucket
    binds its device buffers once and gets its own graph id; later calls of that bucket copy into the same
    buffers and replay; outputs are copies (the next replay overwrites the buffers) of the real rows only,
    equal to the CPU session's."""
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    fake = FakeCupy()
    be = MatrixBackend(fake)
    sess = GpuSessionStandIn(art.check_graph("classify"))
    r = GraphRunner(sess, CLASSIFY, be, art.dims, cuda_graph=True, graph_batch=8)
    rng = np.random.default_rng(3)
    text = rng.standard_normal((5, art.dims["D"])).astype(np.float32)
    s = art.input_size
    outs = []
    for n in (3, 3, 1, 4, 8, 7):
        x = rng.standard_normal((n, 3, s, s)).astype(np.float32)
        out = r.run({"image": be.asarray(x), "text": be.asarray(text)})["logits"]
        want = sess.cpu.run(["logits"], {"image": x, "text": text})[0]
        assert isinstance(out, DeviceArray) and out.shape == (n, 5)
        np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-5)
        outs.append((out, want))
    assert [dict(k)["image"][0] for k in r.captured_shapes] == [4, 1, 8]
    assert len(sess.bindings) == 3 and sess.graph_ids == ["0", "0", "1", "0", "2", "2"]
    np.testing.assert_allclose(outs[0][0].get(), outs[0][1], rtol=1e-5, atol=1e-5)   # intact after replays
    cap = r._captured[r.captured_shapes[0]]
    assert sess.bindings[0].inputs["image"][4] == cap.inputs["image"].data.ptr       # the same buffer replays


def test_cuda_graph_needs_a_device_session(tiny_artifacts):
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    cpu = ort.InferenceSession(str(art.check_graph("classify")), providers=["CPUExecutionProvider"])
    with pytest.raises(EngineError, match=r"^classify.onnx: cuda_graph needs a CuPy back end and a session on the GPU"):
        GraphRunner(cpu, CLASSIFY, MatrixBackend(FakeCupy()), art.dims, cuda_graph=True)
    with pytest.raises(EngineError, match=r"^cuda_graph needs --engine cuda"):
        make_runner(art, "classify", "cpu", EngineOptions(cuda_graph=True), MatrixBackend(FakeCupy()), 20, 8)

