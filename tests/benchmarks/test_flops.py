"""benchmarks.flops: FLOP counts of ONNX graphs against a hand count, and the peak formula."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.flops import graph_flops


def _graph(path):
    # x [batch, 3, 8, 8] -> Conv 3->4, 3x3, pad 1 -> [batch, 4, 8, 8] -> Relu -> Reshape [batch, 256]
    # -> MatMul [256, 5] -> [batch, 5]
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.ones((256, 5), np.float32), "m")
    shape = numpy_helper.from_array(np.array([-1, 256], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "m"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], [w, m, shape])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(path))


def test_counts_match_a_hand_count(tmp_path):
    _graph(tmp_path / "g.onnx")
    for batch in (1, 3):
        f = graph_flops(tmp_path / "g.onnx", batch)
        conv = 2 * batch * 4 * 8 * 8 * (3 * 3 * 3)      # 2 x outputs x (Cin x kh x kw)
        matmul = 2 * batch * 5 * 256
        assert f["products"] == conv + matmul
        assert f["total"] == conv + matmul + batch * 256 + batch * 256   # Relu + Reshape outputs
        assert f["unknown_nodes"] == 0


def test_conv_transpose_counts_its_products(tmp_path):
    """ConvTranspose (the generated backward of a Conv): every input element meets Cout/group x kh x kw weights."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")      # [Cin, Cout/group, kh, kw]
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                                            output_padding=[1, 1])], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "ct.onnx"))
    f = graph_flops(tmp_path / "ct.onnx", 2)
    assert f["products"] == 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3) and f["unknown_nodes"] == 0


@pytest.mark.parametrize("flags, mhz, threads, fp32, int8", [
    # an AVX-512 + VNNI Xeon at 2.0 GHz, 4 threads: 16 lanes x 2 FMA units x 2 flops x 2.0 GHz x 4 = 512
    ({"avx512f", "avx512_vnni", "avx2", "fma"}, "2000.000", 4, 512.0, 2048.0),
    # an AVX2 EPYC at 3.0 GHz, 2 threads: 8 x 2 x 2 x 3.0 x 2 = 192, int8 twice that without VNNI
    ({"avx2", "fma", "avx"}, "3000.000", 2, 192.0, 384.0),
])
def test_peak_of_known_machines(monkeypatch, flags, mhz, threads, fp32, int8):
    """Hand-computed peaks of two machine descriptions (lscpu and the CPU flags given here)."""
    import benchmarks.flops as flops

    monkeypatch.setattr(flops, "_lscpu", lambda: {"CPU max MHz": mhz})
    monkeypatch.setattr(flops, "cpu_flags", lambda: set(flags))
    p = flops.peak_gflops(threads=threads)
    assert p["gflops_fp32"] == pytest.approx(fp32) and p["gops_int8"] == pytest.approx(int8)
    monkeypatch.setattr(flops, "_lscpu", lambda: {})
    monkeypatch.setattr(flops.Path, "read_text", lambda self, *a, **k: "no clock here")
    assert np.isnan(flops.peak_gflops(threads=threads)["gflops_fp32"])


def test_latency_reports_gflop_per_s_from_the_graph_count(tiny_artifacts, tmp_path):
    import json

    from benchmarks import latency
    from benchmarks.flops import explanation_flops
    from runtime.artifacts import load_artifacts

    out = tmp_path / "lat.json"
    assert latency.main(["--artifacts", str(tiny_artifacts.out_dir), "--engines", "cpu", "--batch", "1",
                         "--top-p", "3", "--repeat", "1", "--warmup", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    want = explanation_flops(load_artifacts(tiny_artifacts.out_dir), 4)["total"]
    assert r["gflop_per_image"] * 1e9 == want
    assert abs(r["gflop_per_s"] - want / (r["end_to_end_ms"]["p50"] / 1e3) / 1e9) < 1e-9 * max(1, r["gflop_per_s"])
