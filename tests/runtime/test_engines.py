"""runtime/engines.py: engine names to providers, a provider that failed to load is refused, the probe,
TensorRT profiles and cache, the CUDA provider's options (TF32, NHWC, cuDNN search, CUDA graphs), and the
test markers that turn a skipped GPU test into a failure on the device. GPU sessions are stand-ins here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import runtime.engines as eng
from runtime.engines import EngineError, EngineOptions
from runtime.explainer import Explainer
from runtime.runner import profile_shapes
from runtime.spec import CLASSIFY, EXPLAIN
from tests.fake_cupy import FakeCupy
from tests.stand_ins import ALL, StandInSession

ROOT = Path(__file__).resolve().parents[2]


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


def test_cuda_tf32_is_an_explicit_option(gpu_listed, monkeypatch):
    assert eng.providers_for("cuda")[0][1]["use_tf32"] == 1
    assert eng.providers_for("cuda", EngineOptions(tf32=False))[0][1]["use_tf32"] == 0
    assert eng.providers_for("trt", EngineOptions(tf32=False))[1][1]["use_tf32"] == 0
    # TF32 off also overrides the cuDNN frontend's convolutions, before CUDA starts
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    monkeypatch.setattr(eng.ort, "InferenceSession", StandInSession(ALL[1:]))
    eng.create_session(b"model", "cuda", EngineOptions(tf32=False))
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"


def test_cuda_provider_options_follow_the_graphs_and_the_shapes(gpu_listed):
    """prefer_nhwc for fp16 graphs (the tensor cores' layout), cuDNN's exhaustive search where calls have fixed
    shapes (fixed_chunks, the cuda default) and its heuristic where they vary, the max workspace; each is
    also a choice of its own; the benchmarks record them (describe)."""
    def cuda(opts=None, precision="fp32"):
        return dict(eng.providers_for("cuda", opts, precision=precision)[0][1])

    assert cuda()["prefer_nhwc"] == 0 and cuda(precision="fp16")["prefer_nhwc"] == 1
    assert cuda(precision="fp16-masks")["prefer_nhwc"] == 1
    assert cuda(EngineOptions(nhwc=False), "fp16")["prefer_nhwc"] == 0
    assert cuda(EngineOptions(nhwc=True))["prefer_nhwc"] == 1
    assert cuda()["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda(EngineOptions(fixed_chunks=False))["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda(EngineOptions(conv_algo="DEFAULT"))["cudnn_conv_algo_search"] == "DEFAULT"
    assert cuda()["cudnn_conv_use_max_workspace"] == 1
    assert cuda(EngineOptions(max_workspace=False))["cudnn_conv_use_max_workspace"] == 0
    with pytest.raises(EngineError, match="unknown cuDNN algorithm search 'FAST'"):
        cuda(EngineOptions(conv_algo="FAST"))
    trt = eng.providers_for("trt", EngineOptions(trt_cache_dir="/tmp/c", extra={"trt_max_workspace_size": 1}))
    assert "trt_max_workspace_size" not in trt[1][1] and trt[0][1]["trt_max_workspace_size"] == 1
    d = EngineOptions(tf32=False).describe("cuda", "fp16")
    assert d["cuda_provider"]["prefer_nhwc"] == 1 and d["cuda_provider"]["use_tf32"] == 0 and not d["cuda_graph"]
    assert "cuda_provider" not in EngineOptions().describe("cpu")


def test_cuda_graph_options_and_refusals(gpu_listed, monkeypatch):
    """enable_cuda_graph on the CUDA provider; refused in one line on another engine, without fixed chunks,
    and where ORT cannot capture the graph (a node off the CUDA provider)."""
    assert eng.providers_for("cuda", EngineOptions(cuda_graph=True))[0][1]["enable_cuda_graph"] == 1
    with pytest.raises(EngineError, match=r"^cuda_graph needs --engine cuda \(engine 'trt'"):
        eng.providers_for("trt", EngineOptions(cuda_graph=True))
    with pytest.raises(EngineError, match=r"^cuda_graph needs fixed_chunks"):
        eng.providers_for("cuda", EngineOptions(cuda_graph=True, fixed_chunks=False))

    def refuses(*a, **k):
        raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all "
                           "compute graph nodes have not been partitioned to the CUDA EP.\nmore")

    monkeypatch.setattr(eng.ort, "InferenceSession", refuses)
    with pytest.raises(EngineError, match=r"^cuda_graph cannot be used with g.onnx: This session cannot use the "
                                          r"graph capture feature .* CUDA EP\.$"):
        eng.create_session("g.onnx", "cuda", EngineOptions(cuda_graph=True))


def test_fp16_is_refused_on_cuda_and_cpu(gpu_listed):
    with pytest.raises(EngineError, match=r"^engine 'cuda' has no fp16 mode of its own: use fp16 graphs"):
        eng.providers_for("cuda", EngineOptions(fp16=True))
    with pytest.raises(EngineError, match=r"engine 'cpu' has no fp16 mode"):
        eng.providers_for("cpu", EngineOptions(fp16=True))
    assert eng.providers_for("trt", EngineOptions(fp16=True))[0][1]["trt_fp16_enable"] is True


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


def test_fixed_chunks_default_follows_the_engine(gpu_listed):
    assert EngineOptions().fixed_chunks is None
    for engine, want in (("cpu", False), ("cuda", True), ("trt", True)):
        ex = Explainer.__new__(Explainer)
        ex.engine, ex.options = engine, EngineOptions()
        assert ex.fixed_chunks is want
