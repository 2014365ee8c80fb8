"""`python -m export quantize`: int8 QDQ graphs recorded in the manifest, validated against fp32, picked by
the runtime with precision="int8" (both families)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export.models import load_model
from export.onnx_export import ExportError, ValidationError, export_model
from export.quantize import quantize_export
from runtime.artifacts import ArtifactsError, load_artifacts, sha256_path
from runtime.explainer import Explainer
from runtime.spec import MANIFEST_NAME
from tests.conftest import make_images


@pytest.fixture(scope="module")
def resnet_tiny(resnet_tiny_artifacts):
    return resnet_tiny_artifacts


@pytest.fixture(scope="module")
def quantized(resnet_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "resnet-tiny"
    shutil.copytree(resnet_tiny, out)
    report = quantize_export(out, ["classify"], n_calibration=6, n_check=6, explain_trunk=True,
                             generated_calibration=True, min_top1=0.5)
    return out, report


def test_int8_graphs_are_recorded_like_any_graph(quantized):
    out, report = quantized
    m = json.loads((out / MANIFEST_NAME).read_text())
    int8 = m["precisions"]["int8"]
    assert set(int8["graphs"]) == {"classify", "explain"} and int8["quantization"]["format"] == "QDQ"
    for g in ("classify", "explain"):
        e, v = int8["graphs"][g], int8["validation"][g]
        assert e["file"] == f"{g}.int8.onnx"
        assert e["sha256"] == sha256_path(out / e["file"]) and e["inputs"] == m["graphs"][g]["inputs"]
        assert v["logits_cosine_min"] >= 0.5 and 0 <= v["top1_agreement"] <= 1
        ops = {n.op_type for n in onnx.load(str(out / e["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert report["explain"]["gradients_cosine_min"] > 0.9


def test_runtime_runs_int8_and_falls_back_to_fp32(quantized, resnet_tiny):
    out, _ = quantized
    imgs = make_images(2, seed=5)
    fp32 = Explainer.from_artifacts(resnet_tiny).explain(imgs, method="gradcam")
    ex = Explainer.from_artifacts(out, precision="int8")
    q = ex.explain(imgs, method="gradcam")
    assert ex.graph_precisions == {"explain": "int8"}
    ex.explain(imgs, method="scorecam")                       # features.onnx has no int8 version: fp32
    assert ex.graph_precisions["features"] == "fp32" and ex.graph_precisions["classify"] == "int8"
    for a, b in zip(q, fp32):
        cos = float(a.logits @ b.logits / np.linalg.norm(a.logits) / np.linalg.norm(b.logits))
        assert cos > 0.95
        assert not np.array_equal(a.logits, b.logits)            # really another graph


def test_precision_errors(resnet_tiny, quantized, tmp_path):
    with pytest.raises(ArtifactsError, match="no int8 graphs; python -m export quantize"):
        Explainer.from_artifacts(resnet_tiny, precision="int8")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        Explainer.from_artifacts(resnet_tiny, precision="int4")
    bad = tmp_path / "bad"
    shutil.copytree(quantized[0], bad)
    with open(bad / "classify.int8.onnx", "r+b") as f:   # tamper with the int8 graph
        f.seek(100)
        f.write(b"\0\0\0\0")
    ex = Explainer.from_artifacts(bad, precision="int8")
    with pytest.raises(ArtifactsError, match="sha256"):
        ex.explain(make_images(1)[0], method="gradcam++").saliency  # explain@int8 is fine
        ex.runner("classify")


def test_failed_validation_writes_nothing(resnet_tiny, tmp_path, monkeypatch):
    import export.quantize as q

    out = tmp_path / "r"
    shutil.copytree(resnet_tiny, out)
    before = (out / MANIFEST_NAME).read_text()
    monkeypatch.setattr(q, "INT8_MIN_COSINE", 1.01)
    with pytest.raises(ValidationError, match="worst logit cosine .* against fp32 \\(required 1.01\\)"):
        quantize_export(out, ["classify"], n_calibration=4, n_check=4, generated_calibration=True, min_top1=0.0)
    assert (out / MANIFEST_NAME).read_text() == before
    assert not list(out.glob("*.int8.onnx")) and not list(out.glob(".quantize-*"))
    with pytest.raises(ExportError, match="no 'nope' graph"):
        quantize_export(out, ["nope"], generated_calibration=True)
    with pytest.raises(ExportError, match="unknown calibration"):
        quantize_export(out, ["classify"], calibration="magic", generated_calibration=True)


def test_int8_needs_the_users_photos_and_a_stated_agreement(resnet_tiny, tmp_path, capsys):
    """int8 graphs were written by default from generated images (EfficientNet-Lite0 with real weights kept
    fp32's top-1 class on 21.9% of held-out photos, with a warning) and then run by --precision int8. Now the
    user's photos are required, and a graph under the agreement threshold is not written unless forced."""
    from export.__main__ import main

    out = tmp_path / "r"
    shutil.copytree(resnet_tiny, out)
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises(ExportError, match="int8 needs the user's own photos to calibrate on: --images DIR"):
        quantize_export(out, ["classify"])
    assert main(["quantize", "--artifacts", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: int8 needs the user's own photos")
    photos = tmp_path / "photos"
    photos.mkdir()
    import cv2

    for i, im in enumerate(make_images(8, seed=40)):
        cv2.imwrite(str(photos / f"p{i}.png"), im[:, :, ::-1])
    with pytest.raises(ValidationError, match=r"keeps fp32's top-1 class on .*% of 4 held-out images \(required "
                                              r"101%\); nothing written \(--force writes it anyway\)"):
        quantize_export(out, ["classify"], images=str(photos), n_calibration=4, n_check=4, min_top1=1.01)
    assert (out / MANIFEST_NAME).read_text() == before and not list(out.glob("*.int8.onnx"))
    report = quantize_export(out, ["classify"], images=str(photos), n_calibration=4, n_check=4, min_top1=1.01,
                             force=True)
    q = json.loads((out / MANIFEST_NAME).read_text())["precisions"]["int8"]
    assert q["quantization"]["forced"] is True and q["quantization"]["calibration_images"] == f"8 images from {photos}"
    assert report["classify"]["top1_agreement"] < 1.01 and (out / "classify.int8.onnx").is_file()
    assert "written anyway (--force)" in capsys.readouterr().err


def test_clip_family_quantizes_with_its_text_input(tiny_artifacts, tmp_path):
    out = tmp_path / "clip"
    shutil.copytree(tiny_artifacts.out_dir, out)
    report = quantize_export(out, ["classify"], n_calibration=4, n_check=4, generated_calibration=True, min_top1=0.5)
    assert report["classify"]["n_check"] == 4
    e = Explainer(load_artifacts(out), precision="int8").explain(make_images(1)[0])
    assert e.saliency.shape == (128, 128)
