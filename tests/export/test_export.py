"""Export: parity of every graph with PyTorch, really dynamic axes, manifests, class sets, error paths."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main as export_main
from export.classes import ClassSetError, class_set_from_names, get_class_set, resolve_templates
from export.graphs import ExplainModule, PoolHead, Trunk, autograd_reference
from export.models import (ModelError, PretrainedUnavailable, has_live_residuals, list_models, load_checkpoint,
                           load_model)
from export.onnx_export import (ValidationError, _check_structure, _references, export_model,
                                model_dims, ops_used, sample_inputs)
from runtime.artifacts import ArtifactsError, load_artifacts
from runtime.spec import GRAPHS, HEAD, MANIFEST_NAME


def run_graph(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed)))


def test_hand_written_backward_matches_autograd_float64(tiny):
    m = load_model("RN-tiny", "none", seed=3).model.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 128, 128, generator=g, dtype=torch.float64)
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=g, dtype=torch.float64), dim=-1)
    tgt = torch.tensor([0, -1, 4])
    ref = autograd_reference(m, x, text, tgt)
    out = ExplainModule(m).double()(x, text, tgt)
    for r, o in zip(ref, out):
        np.testing.assert_allclose(o.detach().numpy(), r.numpy(), rtol=1e-9, atol=1e-12 * float(r.abs().max()))


def test_random_model_has_live_residual_branches(tiny):
    assert has_live_residuals(tiny.model)
    import open_clip

    fresh = open_clip.create_model("RN-tiny", pretrained=None)
    assert not has_live_residuals(fresh)  # open_clip zeroes bn3.weight: why the test models are randomised


def test_export_report_and_manifest(tiny_artifacts):
    res = tiny_artifacts
    rows = res.report["rows"]
    assert {(r["graph"], r["output"]) for r in rows} >= {("explain", "logits"), ("explain", "activations"),
                                                          ("explain", "gradients"), ("classify", "logits"),
                                                          ("head", "logits")}
    assert {r["batch"] for r in rows} == {1, 3}
    assert all(r["ok"] and r["cosine"] > 0.99999 for r in rows)
    m = json.loads((res.out_dir / MANIFEST_NAME).read_text())
    for key in ("model", "pretrained_id", "target_layer", "input_size", "mean", "std", "logit_scale", "opset",
                "versions", "graphs", "class_sets", "validation"):
        assert key in m, key
    assert m["model"] == "RN-tiny" and m["pretrained_id"] == "none:seed=0" and m["random_weights"] is True
    assert set(m["versions"]) >= {"torch", "open_clip", "onnx"}
    for name, entry in m["graphs"].items():
        path = res.out_dir / entry["file"]
        assert entry["sha256"] and path.stat().st_size == entry["bytes"]
        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        assert props["model"] == "RN-tiny" and props["decomcam.graph"] == name
        assert json.loads(props["decomcam.io"]) == GRAPHS[name].to_json()
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        onnx.checker.check_model(model, full_check=True)
    assert m["class_sets"]["voc"]["count"] == 20
    emb = np.load(res.out_dir / m["class_sets"]["voc"]["embeddings"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_explain_ops_are_standard(tiny_artifacts):
    ops = ops_used(tiny_artifacts.out_dir / "explain.onnx")
    assert all(o.startswith("ai.onnx::") for o in ops)
    assert "ai.onnx::Softmax" in ops and "ai.onnx::MatMul" in ops


@pytest.mark.parametrize("batch, n_classes", [(5, 2), (2, 11), (1, 1)])
def test_written_graphs_are_dynamic_in_batch_and_L(tiny, tiny_artifacts, batch, n_classes):
    feed = sample_inputs(tiny, batch, n_classes, seed=99 + batch)
    refs = _references(tiny, feed)
    out = run_graph(tiny_artifacts.out_dir / "explain.onnx", {k: feed[k].numpy() for k in ("image", "text", "target")})
    assert out["logits"].shape == (batch, n_classes)
    np.testing.assert_allclose(out["logits"], refs["explain"]["logits"], atol=1e-3 * np.abs(out["logits"]).max())
    g, gr = out["gradients"], refs["explain"]["gradients"]
    assert np.linalg.norm(g - gr) <= 1e-3 * np.linalg.norm(gr)
    head = run_graph(tiny_artifacts.out_dir / "head.onnx",
                     {"activations": refs["head"]["_activations"], "text": feed["text"].numpy()})
    np.testing.assert_allclose(head["logits"], refs["head"]["logits"], rtol=1e-4, atol=1e-4)


def test_negative_target_explains_top1(tiny, tiny_artifacts):
    feed = sample_inputs(tiny, 2, 6, seed=7)
    image, text = feed["image"].numpy(), feed["text"].numpy()
    a = run_graph(tiny_artifacts.out_dir / "explain.onnx", {"image": image, "text": text, "target": np.array([-1, -1])})
    top = a["logits"].argmax(1)
    b = run_graph(tiny_artifacts.out_dir / "explain.onnx", {"image": image, "text": text, "target": top})
    np.testing.assert_array_equal(a["gradients"], b["gradients"])


def test_baked_batch_dimension_fails_the_check(tiny, tmp_path):
    # Export the head without dynamic shapes: the structural check must name the baked axis.
    head = PoolHead(tiny.model.visual.attnpool, 100.0)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, activations, text):
            return self.head(activations, text)

    dims = model_dims(tiny)
    a = torch.randn(2, dims["C"], dims["h"], dims["w"])
    text = torch.nn.functional.normalize(torch.randn(5, dims["D"]), dim=-1)
    path = tmp_path / "head.onnx"
    torch.onnx.export(Head(), (a, text), str(path), input_names=HEAD.input_names, output_names=HEAD.output_names,
                      dynamo=True, opset_version=20)
    fails = _check_structure(path, HEAD, dims)
    assert any("baked" in f["reason"] and "batch" in f["reason"] for f in fails)


def test_validation_failure_raises_one_error_listing_outputs_and_writes_nothing(tiny, tmp_path, monkeypatch):
    from runtime import spec

    strict = {k: spec.Tolerance(atol=0.0, rtol=0.0) for k in ("logits", "activations", "gradients")}
    monkeypatch.setitem(spec.EXPLAIN.tolerances, "gradients", strict["gradients"])
    monkeypatch.setitem(spec.EXPLAIN.tolerances, "logits", strict["logits"])
    out = tmp_path / "bad"
    with pytest.raises(ValidationError, match=r"(?s)ONNX validation failed:.*explain\.logits at batch=1 L=3: max abs") as ei:
        export_model(tiny, [get_class_set("voc")], out)
    failed = {(f["graph"], f["output"]) for f in ei.value.failures}
    assert ("explain", "gradients") in failed and ("explain", "logits") in failed
    assert not list(out.glob("*.onnx")) and not (out / MANIFEST_NAME).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".export-tmp")]


def test_classes_subcommand_adds_a_set_without_touching_graphs(tiny_artifacts, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, art)
    before = {p.name: p.stat().st_mtime_ns for p in art.glob("*.onnx")}
    assert export_main(["classes", "--artifacts", str(art), "--names", "cat, dog ,bird", "--name", "pets"]) == 0
    names = tmp_path / "names.txt"
    names.write_text("# animals\nhorse\ncow\n\nsheep\n")
    assert export_main(["classes", "--artifacts", str(art), "--file", str(names), "--template", "photo",
                        "--default"]) == 0
    m = json.loads((art / MANIFEST_NAME).read_text())
    assert m["class_sets"]["pets"]["count"] == 3 and m["class_sets"]["names"]["count"] == 3
    assert m["class_sets"]["names"]["templates"] == ["a photo of a {}."]
    assert m["default_class_set"] == "names"
    assert {p.name: p.stat().st_mtime_ns for p in art.glob("*.onnx")} == before
    a = load_artifacts(art)
    cs = a.load_class_set("pets")
    assert cs.labels == ["cat", "dog", "bird"] and cs.embeddings.shape == (3, a.dims["D"])
    assert a.load_class_set().name == "names"


def test_runtime_refuses_a_graph_whose_sha256_does_not_match(tiny_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, art)
    load_artifacts(art)
    with open(art / "classify.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactsError, match=r"classify\.onnx: sha256 .* does not match the manifest"):
        load_artifacts(art)


def test_registry_lists_every_clip_resnet():
    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"} <= set(list_models())
    with pytest.raises(ModelError, match=r"unknown model 'RN18'; valid models: RN50, RN101"):
        load_model("RN18", "none")


def test_offline_openai_is_a_clear_error(monkeypatch):
    import export.models as models

    monkeypatch.setattr(models, "_cached_tag_file", lambda *a: None)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(PretrainedUnavailable, match=r"--pretrained PATH, or --pretrained none"):
        load_model("RN50", "openai")


def test_tiny_config_has_no_pretrained_weights():
    with pytest.raises(ModelError, match="test config with no published weights"):
        load_model("RN-tiny", "openai")


def test_missing_checkpoint_path():
    with pytest.raises(ModelError, match="neither a tag .* nor an existing file"):
        load_model("RN-tiny", "/nonexistent/ckpt.pt")


def test_checkpoint_round_trip_and_wrong_architecture(tiny, tmp_path):
    good = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, good)
    lm = load_model("RN-tiny", str(good))
    assert lm.pretrained_id.startswith("sha256:") and not lm.random_weights
    for a, b in zip(lm.model.state_dict().values(), tiny.model.state_dict().values()):
        assert torch.equal(a, b)
    other = load_model("RN-tiny-96", "none").model
    bad = tmp_path / "other.pt"
    torch.save(other.state_dict(), bad)
    with pytest.raises(ModelError, match=r"other\.pt: checkpoint does not fit this architecture; .*shape mismatch"):
        load_model("RN-tiny", str(bad))
    partial = tmp_path / "partial.pt"
    sd = dict(tiny.model.state_dict())
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, partial)
    with pytest.raises(ModelError, match=r"missing keys: logit_scale; unexpected keys: extra\.weight"):
        load_model("RN-tiny", str(partial))


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    evil = tmp_path / "evil.pt"

    import fractions

    # An arbitrary Python object: a weights_only load refuses to unpickle it (a full unpickle would run code).
    torch.save({"state_dict": fractions.Fraction(1, 3)}, evil)
    with pytest.raises(ModelError, match=r"evil\.pt: not a loadable checkpoint"):
        load_checkpoint(load_model("RN-tiny", "none").model, evil)


def test_class_set_errors(tmp_path):
    with pytest.raises(ClassSetError, match="neither a built-in set"):
        get_class_set("cifar")
    with pytest.raises(ClassSetError, match=r"must contain '\{\}'"):
        resolve_templates("a photo")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(ClassSetError, match="no class names"):
        get_class_set(str(empty))
    with pytest.raises(ClassSetError, match="duplicate class names: cat"):
        class_set_from_names(["cat", "dog", "cat"], "x")
    assert get_class_set("voc").templates == ("the {} in the picture",)
    assert len(get_class_set("imagenet").labels) == 1000
    assert len(get_class_set("voc", "imagenet").templates) == 80


def test_embeddings_are_cached(tiny, monkeypatch, tmp_path):
    from export import classes

    monkeypatch.setenv("DECOMCAM_CACHE", str(tmp_path))
    cs = class_set_from_names(["red", "green"], "c")
    a = classes.text_embeddings(tiny.model, tiny.name, tiny.pretrained_id, cs)
    files = list((tmp_path / "embeddings").glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(np.load(files[0]), a)
    monkeypatch.setattr(tiny.model, "encode_text", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(classes.text_embeddings(tiny.model, tiny.name, tiny.pretrained_id, cs), a)


def test_unsupported_target_layer(tiny):
    with pytest.raises(ValueError, match="target layer 'layer3' is not supported"):
        Trunk(tiny.model.visual, "layer3")


def test_cli_reports_errors_in_one_line(capsys):
    assert export_main(["--model", "RN18", "--pretrained", "none", "--out", "/tmp/never"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'RN18'") and err.count("\n") == 1


@pytest.fixture(scope="module")
def rn50_export(tmp_path_factory):
    lm = load_model("RN50", "none")
    t = time.perf_counter()
    res = export_model(lm, [get_class_set("voc")], tmp_path_factory.mktemp("rn50"))
    res.seconds["wall"] = time.perf_counter() - t
    return lm, res


def test_rn50_exports_and_validates(rn50_export):
    lm, res = rn50_export
    assert all(r["ok"] for r in res.report["rows"])
    m = res.manifest
    assert m["dims"] == {"H": 224, "W": 224, "C": 2048, "h": 7, "w": 7, "D": 1024}
    assert m["graphs"]["explain"]["bytes"] > 100e6
    a = load_artifacts(res.out_dir)
    assert a.input_size == 224 and a.load_class_set().embeddings.shape == (20, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("RN101", 224), ("RN50x4", 288), ("RN50x16", 384), ("RN50x64", 448)])
def test_large_models_export_and_validate(name, size, tmp_path):
    lm = load_model(name, "none")
    t = time.perf_counter()
    res = export_model(lm, [get_class_set("voc")], tmp_path / name)
    dt = time.perf_counter() - t
    assert res.manifest["input_size"] == size
    assert all(r["ok"] for r in res.report["rows"])
    sizes = {k: v["bytes"] for k, v in res.manifest["graphs"].items()}
    print(f"\n{name}: export+validate {dt:.1f} s, graphs {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items())}")
