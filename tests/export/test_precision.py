"""fp16 graphs (export/precision.py): converted with fp32 inputs and outputs, validated against the fp32
eager model with fp16 tolerances, recorded under the manifest's `precisions`, picked by the runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import export.precision as prec
from export.onnx_export import ExportError
from runtime.artifacts import ArtifactsError, sha256_path
from runtime.explainer import Explainer
from runtime.spec import GRAPHS
from tests.conftest import make_images


@pytest.fixture(scope="module")
def fp16_dir(tiny, tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "RN-tiny"
    shutil.copytree(tiny_artifacts.out_dir, out)
    entry = prec.add_fp16_graphs(tiny, out)
    return out, entry


def test_fp16_graphs_keep_the_contract_and_are_recorded(fp16_dir):
    out, entry = fp16_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precisions"]["fp16"] == entry
    assert set(entry["graphs"]) == set(manifest["graphs"])          # fp32 entries untouched, one fp16 per graph
    for name, g in entry["graphs"].items():
        assert g["file"] == f"{name}.fp16.onnx" and g["sha256"] == sha256_path(out / g["file"])
        assert g["inputs"] == GRAPHS[name].to_json()["inputs"]
        m = onnx.load(str(out / g["file"]))
        io_types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
        want = {t.name: (onnx.TensorProto.INT64 if t.dtype == "int64" else onnx.TensorProto.FLOAT)
                for t in GRAPHS[name].inputs + GRAPHS[name].outputs}
        assert io_types == want                                       # fp32 (and int64) at the edges
        weights = [i for i in m.graph.initializer if np.prod(i.dims) > 1000]
        assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)   # fp16 inside
        assert g["tolerances"]["logits"] == {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.9995}


def test_fp16_validation_ran_on_the_cpu_within_tolerances(fp16_dir):
    v = fp16_dir[1]["validation"]
    # ORT 1.32's CPU provider runs these fp16 graphs; where it cannot, the status is "not run" with the reason
    assert v["status"] == "passed" and v["provider"] == "CPUExecutionProvider"
    outs = {(r["graph"], r["output"]) for r in v["rows"]}
    assert ("explain", "gradients") in outs and ("head", "logits") in outs
    assert all(r["ok"] and r["cosine"] > 0.999 for r in v["rows"])
    assert max(r["max_abs"] for r in v["rows"]) > 0            # a real fp16 difference, not the fp32 graphs again


def test_fp16_validation_that_fails_writes_nothing(tiny, tiny_artifacts, tmp_path, monkeypatch):
    out = tmp_path / "a"
    shutil.copytree(tiny_artifacts.out_dir, out)
    before = (out / "manifest.json").read_text()
    monkeypatch.setitem(prec.FP16_TOLERANCES, "logits", prec.Tolerance(atol=1e-9, rtol=0))
    with pytest.raises(ExportError, match=r"fp16 graphs fail their tolerances on CPUExecutionProvider: .*logits"):
        prec.add_fp16_graphs(tiny, out)
    assert (out / "manifest.json").read_text() == before
    assert not [p.name for p in out.iterdir() if "fp16" in p.name]


def test_fp16_cosine_floor_fails_on_its_own(tiny, tiny_artifacts, tmp_path, monkeypatch):
    """The element-wise bound passing is not enough: a cosine under the floor fails the validation."""
    out = tmp_path / "c"
    shutil.copytree(tiny_artifacts.out_dir, out)
    monkeypatch.setitem(prec.FP16_MIN_COSINE, "gradients", 1.0 + 1e-9)    # no real cosine reaches it
    with pytest.raises(ExportError, match=r"explain\.gradients .*cosine \d\.\d{5}"):
        prec.add_fp16_graphs(tiny, out)
    assert not [p.name for p in out.iterdir() if "fp16" in p.name]


def test_fp16_validation_that_cannot_run_says_so(tiny, tiny_artifacts, tmp_path, monkeypatch):
    out = tmp_path / "b"
    shutil.copytree(tiny_artifacts.out_dir, out)
    monkeypatch.setitem(prec.PROVIDERS, "cpu", "NoSuchExecutionProvider")
    entry = prec.add_fp16_graphs(tiny, out)
    assert entry["validation"]["status"] == "not run" and entry["validation"]["reason"]
    assert "validation not run on NoSuchExecutionProvider" in prec.validation_table(entry)
    assert (out / "explain.fp16.onnx").is_file()


def test_runtime_picks_the_fp16_graphs(fp16_dir, tiny_artifacts):
    out, _ = fp16_dir
    rgbs = make_images(2, seed=7)
    a = Explainer.from_artifacts(out).explain(rgbs)
    ex = Explainer.from_artifacts(out, precision="fp16")
    b = ex.explain(rgbs, target=[e.target for e in a])
    assert ex.artifacts.check_graph("explain", "fp16").name == "explain.fp16.onnx"
    assert ("explain", "fp16") in ex.artifacts.checked
    for x, y in zip(a, b):
        # the same class explained; fp16 moves the random-weight model's near-tied components a little
        # (the graphs themselves are held to FP16_TOLERANCES above)
        assert np.corrcoef(x.saliency.ravel(), y.saliency.ravel())[0, 1] >= 0.95
        assert 0 < np.abs(x.saliency - y.saliency).max() <= 0.25
    with pytest.raises(ArtifactsError, match=r"manifest.json: no fp16 graphs; export with --precision fp16"):
        Explainer.from_artifacts(tiny_artifacts.out_dir, precision="fp16")


def test_fp16_masks_runs_fp16_classify_and_fp32_explain(fp16_dir, tiny_artifacts):
    """precision "fp16-masks": the classify graph (the masked forwards) in fp16, the explain graph (A and
    dy/dA) in fp32. Checked against an fp32 and an fp16 Explainer on the same inputs: the decomposition
    equals fp32's exactly, the masked logits equal fp16's."""
    out, _ = fp16_dir
    rgbs = make_images(2, seed=9)
    e32 = Explainer.from_artifacts(out)
    e16 = Explainer.from_artifacts(out, precision="fp16")
    mix = Explainer.from_artifacts(out, precision="fp16-masks")
    a = e32.explain(rgbs)
    tgt = [e.target for e in a]
    b = mix.explain(rgbs, target=tgt)
    assert mix.graph_precisions == {"explain": "fp32", "classify": "fp16"}
    assert mix.artifacts.precision_for("head", "fp16-masks") == "fp16"
    assert mix.artifacts.precision_for("features", "fp16-masks") == "fp32"
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.explained_variance, y.explained_variance)   # same A: same spectrum
        np.testing.assert_array_equal(x.components, y.components)
        assert not np.array_equal(x.weights, y.weights)                         # fp16 masked forwards
    x = e32.preprocess(rgbs)[0]
    np.testing.assert_array_equal(mix.classify(x), e16.classify(x))
    with pytest.raises(ArtifactsError, match=r"no fp16 graphs"):
        Explainer.from_artifacts(tiny_artifacts.out_dir, precision="fp16-masks")


def test_cli_precision(fp16_dir, tiny_artifacts, tmp_path, capsys):
    import cv2

    from runtime.explain import main as explain_main

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_images(1, seed=2)[0])
    assert explain_main([str(img), "--artifacts", str(fp16_dir[0]), "--precision", "fp16", "--out",
                         str(tmp_path / "o"), "--quiet"]) == 0
    assert (tmp_path / "o" / "a.json").is_file()
    capsys.readouterr()
    assert explain_main([str(img), "--artifacts", str(tiny_artifacts.out_dir), "--precision", "fp16", "--out",
                         str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no fp16 graphs; export with --precision fp16" in err
