"""Smoke tests of the benchmarks: one iteration of each on the tiny export, checking the JSON's shape.

No timing thresholds: these prove the benchmarks run and report finite numbers, not how fast anything is.
"""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest

from benchmarks import common, latency, parity


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load(path) -> dict:
    rep = json.loads(path.read_text())
    assert {"benchmark", "machine", "command", "table", "results"} <= set(rep)
    assert {"cpu", "cores", "versions"} <= set(rep["machine"])
    assert {"onnxruntime", "numpy", "opencv", "torch"} <= set(rep["machine"]["versions"])
    return rep


def test_latency_one_iteration(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--engines", "torch,cpu", "--batch", "1,2", "--top-p", "3",
            "--repeat", "1", "--warmup", "0", "--threads", "2", "--json", str(out)]
    assert latency.main(argv) == 0
    rep = load(out)
    assert rep["benchmark"] == "latency" and rep["command"].startswith("python -m benchmarks.latency --artifacts")
    assert {(r["engine"], r["batch"]) for r in rep["results"]} == {("torch", 1), ("cpu", 1), ("torch", 2), ("cpu", 2)}
    for r in rep["results"]:
        assert r["method"] == "decomcam" and r["precision"] == "fp32"
        assert {"preprocess", "explain", "decompose", "upsample", "blur", "blend", "classify",
                "integrate"} <= set(r["stages_ms"])
        assert all(finite(v) and v >= 0 for v in r["stages_ms"].values())
        assert all(finite(r["end_to_end_ms"][k]) for k in ("p50", "p90", "p99", "mean"))
        assert finite(r["images_per_s"]) and finite(r["speedup_vs_torch"]) and finite(r["peak_rss_mb"])
        assert r["peak_device_mb"] is None  # no GPU here
    assert all(r["speedup_vs_torch"] == 1.0 for r in rep["results"] if r["engine"] == "torch")
    assert finite(rep["process"]["peak_rss_mb"]) and finite(rep["process"]["rss_mb"])
    assert "speed-up" in capsys.readouterr().out


def test_latency_skips_what_cannot_run(tiny_artifacts, tmp_path):
    out = tmp_path / "latency.json"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--engines", "cpu,nope", "--methods", "decomcam,gradcam",
            "--top-p", "2", "--repeat", "1", "--warmup", "0", "--json", str(out)]
    assert latency.main(argv) == 0
    rep = load(out)
    assert [s["engine"] for s in rep["skipped"]] == ["nope"]
    assert "unknown engine 'nope'" in rep["skipped"][0]["reason"]
    assert {r["method"] for r in rep["results"]} == {"decomcam", "gradcam"}
    assert all(r["speedup_vs_torch"] is None for r in rep["results"])


def test_throughput_one_iteration(tiny_artifacts, tmp_path):
    out, folder = tmp_path / "throughput.json", tmp_path / "images"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--folder", str(folder), "--n", "2,3", "--engines", "cpu",
            "--top-p", "2", "--json", str(out)]
    assert latency.main(argv) == 0
    rep = load(out)
    assert rep["benchmark"] == "throughput"
    assert sorted(p.name for p in folder.iterdir()) == ["bench_00000.jpg", "bench_00001.jpg", "bench_00002.jpg"]
    assert [r["n"] for r in rep["results"]] == [2, 3]
    for r in rep["results"]:
        assert r["explained"] == r["n"]
        for k in ("images_per_s", "images_per_s_wall", "wall_s", "rss_start_mb", "rss_10_20pct_mb",
                  "rss_last_10pct_mb", "rss_growth_mb", "peak_rss_mb", "rss_after_mb"):
            assert finite(r[k]), k


def test_throughput_modes_serial_pipeline_and_ray(tiny_artifacts, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    out, folder = tmp_path / "throughput.json", tmp_path / "images"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--folder", str(folder), "--n", "3", "--engines", "cpu",
            "--modes", "serial,pipeline,ray-2", "--top-p", "2", "--threads", "2", "--json", str(out)]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert latency.main(argv) == 0
    # Ray started and stopped by the benchmark (runtime.dataset.ray_session): ray.init's SIGTERM handler
    # (sys.exit) does not outlive it
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    rep = load(out)
    assert [(r["mode"], r["explained"]) for r in rep["results"]] == [("serial", 3), ("pipeline", 3), ("ray-2", 3)]
    for r in rep["results"]:
        assert finite(r["images_per_s"]) and finite(r["images_per_s_wall"])
        assert (r["peak_rss_mb"] is None) == (r["mode"] == "ray-2")  # Ray's actors are other processes
    assert "| ray-2 " in rep["table"]
    with pytest.raises(SystemExit, match="unknown --modes"):
        latency.main([*argv[:-4], "--modes", "threads", "--json", str(out)])


def test_parity_one_iteration(tiny_artifacts, tmp_path):
    out = tmp_path / "parity.json"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--engines", "cpu", "--precision", "fp32,fp16",
            "--n-images", "2", "--top-p", "3", "--oracle-fp64", "--json", str(out)]
    assert parity.main(argv) == 0
    rep = load(out)
    (r,) = rep["results"]
    assert (r["engine"], r["precision"]) == ("cpu", "fp32")
    for k in ("logits", "activations", "gradients"):
        assert {"max_abs", "max_rel", "cosine_min"} <= set(r["graphs"][k])
        assert all(finite(v) for v in r["graphs"][k].values())
    assert set(r["graphs_vs_fp64"]) == set(rep["reference_vs_fp64"]["graphs"]) == {"logits", "activations", "gradients"}
    for m in (r["method"], r["method_given_engine_graph_outputs"], r["method_vs_fp64"], rep["reference_vs_fp64"]["method"]):
        assert len(m["components_abs_cos_min_per_index"]) == 3
        for k in ("components_abs_cos_min", "saliency_max_abs", "saliency_pearson_min", "saliency_top10_iou_min"):
            assert finite(m[k]), k
        assert m["targets_equal"] is True
    assert [(s["engine"], s["precision"]) for s in rep["skipped"]] == [("cpu", "fp16")]


def test_parity_fp16_on_the_cpu_with_real_files(tiny, tiny_artifacts, tmp_path):
    """--images: photos from a folder (the first N in path order, an undecodable one skipped); the cpu
    engine runs the export's fp16 graphs when it has them, compared with the fp32 eager reference."""
    import shutil

    import cv2

    import export.precision as prec
    from tests.conftest import make_images

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, art)
    prec.add_fp16_graphs(tiny, art)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a_broken.png").write_bytes(b"not an image")
    for i, im in enumerate(make_images(4, seed=21)):
        cv2.imwrite(str(folder / f"b{i}.png"), im[:, :, ::-1])
    out = tmp_path / "parity.json"
    argv = ["--artifacts", str(art), "--engines", "cpu", "--precision", "fp32,fp16", "--images", str(folder),
            "--n-images", "3", "--top-p", "3", "--json", str(out)]
    assert parity.main(argv) == 0
    rep = load(out)
    assert [(r["engine"], r["precision"]) for r in rep["results"]] == [("cpu", "fp32"), ("cpu", "fp16")]
    assert rep["skipped"] == [] and rep["settings"]["n_images"] == 3
    assert "the first 3 photos of" in rep["settings"]["images"]
    fp32, fp16 = rep["results"]
    # fp16 graphs differ from the fp32 ones (a real fp16 run), and still agree with the reference
    assert fp16["graphs"]["logits"]["max_abs"] > 10 * fp32["graphs"]["logits"]["max_abs"]
    assert fp16["graphs"]["logits"]["cosine_min"] > 0.999
    assert len(fp16["method"]["saliency_pearson_per_image"]) == 3
    assert "Pearson median" in rep["table"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="no decodable image"):
        parity.main([*argv[:6], "--images", str(broken), "--n-images", "1"])


def test_backward_one_iteration(tiny_artifacts, tmp_path, capsys):
    """benchmarks.backward on one export against itself: the same nodes, bytes and GFLOP, outputs that differ by
    0, finite latencies at each batch size."""
    from benchmarks import backward

    out = tmp_path / "backward.json"
    d = str(tiny_artifacts.out_dir)
    assert backward.main(["--pair", "RN-tiny", d, d, "--batches", "1,2", "--runs", "1", "--threads", "1",
                          "--json", str(out)]) == 0
    rep = load(out)
    assert rep["benchmark"] == "backward" and [r["graph"] for r in rep["results"]] == ["explain", "head_grad"]
    for r in rep["results"]:
        assert r["nodes"]["before"] == r["nodes"]["after"] > 0 and r["bytes"]["before"] == r["bytes"]["after"]
        assert r["gflop_per_image"]["before"] == r["gflop_per_image"]["after"] > 0
        for b in ("1", "2"):
            assert r["outputs_max_rel_diff"][b]["gradients"] == 0.0
            assert all(finite(v) and v > 0 for v in r["latency_ms"][b].values())
    assert "| RN-tiny" in capsys.readouterr().out


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    assert parity.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert parity.top_iou(a, a) == 1.0 and parity.top_iou(a, -a) == 0.0
    assert parity.cosine(np.zeros(4), np.zeros(4)) == 1.0 and parity.cosine(np.ones(4), np.zeros(4)) == 0.0
    d = parity.tensor_diff(a[None], (a + 1e-3)[None])
    assert d["max_abs"] == pytest.approx(1e-3) and d["cosine_min"] > 0.999
    s = common.stats_ms([0.001, 0.002, 0.003])
    assert s["p50"] == pytest.approx(2.0) and s["n"] == 3


def test_photo_like_is_deterministic(tmp_path):
    a, b = common.photo_like(3, seed=1), common.photo_like(3, seed=1)
    assert a.shape == (240, 320, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, common.photo_like(4, seed=1))
    assert a.std() > 10  # not a flat image
    paths = common.image_folder(tmp_path, 2)
    assert [p.name for p in paths] == ["bench_00000.jpg", "bench_00001.jpg"]
    assert common.image_folder(tmp_path, 1) == paths[:1]  # existing files are reused


def test_peak_rss_is_reported_for_runs_shorter_than_the_sampling_period(tiny_artifacts, tmp_path, monkeypatch):
    """The RSS sampler's thread may not tick during a short run: each engine's segment is sampled at its
    start and end, so peak_rss_mb is never None (it was, for runs under the 20 ms period)."""
    real = common.RssSampler

    class Slow(real):  # a period no run reaches: only the start/end samples can count
        def __init__(self, interval: float = 0.02):
            super().__init__(interval=3600.0)

    monkeypatch.setattr(common, "RssSampler", Slow)
    out = tmp_path / "latency.json"
    argv = ["--artifacts", str(tiny_artifacts.out_dir), "--engines", "cpu", "--batch", "1", "--top-p", "2",
            "--repeat", "1", "--warmup", "0", "--json", str(out)]
    assert latency.main(argv) == 0
    rep = load(out)
    assert all(finite(r["peak_rss_mb"]) and r["peak_rss_mb"] > 0 for r in rep["results"])


def test_rss_sampler_segment_samples_at_start_and_end():
    with common.RssSampler(interval=3600.0) as s:
        with s.segment("quick"):
            pass
    assert len(s.values("quick")) == 2 and finite(s.peak("quick"))


def test_gpu_engines_that_fell_back_are_skipped_not_mislabelled(tiny_artifacts, tmp_path, monkeypatch):
    """onnxruntime-gpu lists CUDA and TensorRT, but TensorRT's library is missing (ORT rebuilds the session on
    CUDA) and CUDA's too (CPU): both are skipped with the reason, in latency and parity alike."""
    import onnxruntime as ort

    import runtime.engines as eng

    real = ort.InferenceSession

    class FellBack:
        def __init__(self, model, so, providers):
            names = [p if isinstance(p, str) else p[0] for p in providers]
            self.sess = real(model, so, providers=["CPUExecutionProvider"])
            self.got = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "TensorrtExecutionProvider" in names \
                else ["CPUExecutionProvider"]

        def get_providers(self):
            return self.got

        def __getattr__(self, name):
            return getattr(self.sess, name)

    monkeypatch.setattr(eng, "available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                             "CPUExecutionProvider"])
    monkeypatch.setattr(eng, "preload_gpu_libraries", lambda: None)
    monkeypatch.setattr(eng.ort, "InferenceSession", FellBack)
    eng.probe_engine.cache_clear()
    try:
        out = tmp_path / "latency.json"
        argv = ["--artifacts", str(tiny_artifacts.out_dir), "--engines", "cpu,cuda,trt", "--top-p", "2",
                "--repeat", "1", "--warmup", "0", "--json", str(out)]
        assert latency.main(argv) == 0
        rep = load(out)
        assert [r["engine"] for r in rep["results"]] == ["cpu"]
        assert rep["results"][0]["providers"] == ["CPUExecutionProvider"]
        assert rep["results"][0]["transfers"]["totals"]["h2d"] == {"count": 0, "bytes": 0}
        reasons = {s["engine"]: s["reason"] for s in rep["skipped"]}
        assert reasons["cuda"].startswith("engine 'cuda': CUDAExecutionProvider failed to load")
        assert reasons["trt"].startswith("engine 'trt': TensorrtExecutionProvider failed to load")
        assert parity.skip_reason("trt", "fp32").startswith("engine 'trt': TensorrtExecutionProvider failed")
        assert "has none" in parity.skip_reason("cuda", "fp16", has_fp16=False)
    finally:
        eng.probe_engine.cache_clear()


def test_a_fast_runs_loop_time_comes_from_the_per_image_time():
    """The CLI prints its total with one decimal ("in 0.0 s" for a run under 50 ms) and the time per image with
    four significant digits: the benchmarks read the loop time as images x the per-image time, so a fast run
    still gets a positive, finite throughput."""
    from benchmarks import serve
    from benchmarks.latency import _CLI_SECONDS

    line = "explained 2 of 2 inputs with decomcam on cpu: 0 failed, 0 skipped (outputs exist) in 0.0 s (0.01234 s/image) -> 'o'"
    for rx in (_CLI_SECONDS, serve._CLI_LINE):
        m = rx.search(line)
        assert (m.group(1), m.group(3), m.group(4)) == ("2", "0.0", "0.01234")
    m = _CLI_SECONDS.search("explained 0 of 1 inputs with gradcam on cpu: 1 failed, 0 skipped (outputs exist) in 0.4 s -> 'o'")
    assert m.group(1) == "0" and m.group(4) is None
