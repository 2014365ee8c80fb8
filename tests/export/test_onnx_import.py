"""export/onnx_import.py and `python -m export onnx`: any ONNX classifier in, the pooled-linear family's graphs out.

    end to end   a tiny torchvision ResNet exported with plain torch.onnx.export (fixed batch 1), imported by the CLI
                 in a process that never imports torch; the runtime explains with it; its saliency equals the
                 registry export of the same weights (traced by torch.onnx's other exporter)
    the cut      auto-detection (plain CNN, residual net, a graph ending in Softmax), --list-targets, the block
                 interior refused, a baked batch rewritten or refused
    errors       one line each, exit 1 (model problems) or 2 (--out), nothing written
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_import import ImportError_, Preprocess, candidates, choose_target, import_onnx, read_source
from runtime.artifacts import load_artifacts
from runtime.spec import FAMILIES, MANIFEST_NAME
from tests.conftest import make_images

REPO = Path(__file__).resolve().parents[2]
PEARSON = 0.9999
VOC10 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow")


# -- tiny graphs built with onnx.helper -----------------------------------------------------------------------------

def _w(*shape, seed=0, scale=0.3):
    return numpy_helper.from_array((np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32))


def _graph(nodes, inits, batch=1, size=16, opset=13, output="y", input_name="pixel_values"):
    """`input_name` [batch, 3, size, size] -> `output` (float32)."""
    tensors = []
    for name, arr in inits.items():
        t = arr if isinstance(arr, onnx.TensorProto) else numpy_helper.from_array(np.asarray(arr))
        t.name = name
        tensors.append(t)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                     [batch, 3, size, size])],
                          [helper.make_empty_tensor_value_info(output)], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)   # the output's declared type, as exporters write it
    out = next((v for v in inferred.graph.value_info if v.name == output), None)
    if out is not None:
        m.graph.output[0].CopyFrom(out)
    return m


def plain_cnn(softmax=False, head=None, reshape=None, opset=13):
    """conv-relu-maxpool-conv-relu [8, 8, 8] -> GAP -> flatten (or a Reshape) -> head (default: Gemm to 5 classes)
    [-> Softmax]; no skip connections."""
    P = "pixel_values"
    nodes = [helper.make_node("Conv", [P, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap")]
    inits = {"w1": _w(8, 3, 3, 3, seed=1), "b1": _w(8, seed=2), "w2": _w(8, 8, 3, 3, seed=3), "b2": _w(8, seed=4),
             "fc_w": _w(5, 8, seed=5, scale=1.0), "fc_b": _w(5, seed=6)}
    if reshape is None:
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    else:
        nodes += reshape
    out = "logits" if softmax else "y"
    nodes += head or [helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [out], transB=1, name="fc")]
    if softmax:
        nodes.append(helper.make_node("Softmax", [out], ["y"], axis=1, name="softmax"))
    return _graph(nodes, inits, opset=opset)


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _main(argv, capsys):
    from export.__main__ import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


# -- the tiny ResNet: torch export, CLI import, registry export -----------------------------------------------------

@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """resnet-tiny (seeded random weights, live BatchNorm) exported with plain torch.onnx.export (TorchScript
    exporter, fixed batch 1, input 'input.1'), imported by `python -m export onnx` in a subprocess that asserts torch
    is never imported, and exported from the registry (the dynamo exporter, the same generated backward) for
    comparison."""
    import torch

    from export.models import load_model
    from export.onnx_export import export_model

    root = tmp_path_factory.mktemp("onnx-import")
    lm = load_model("resnet-tiny", "none")
    path = root / "resnet_tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm.model.model.eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False,
                          opset_version=17, input_names=["input.1"], output_names=["fc_out"])
    labels = root / "voc10.txt"
    labels.write_text("".join(f"{n}\n" for n in VOC10))
    out = root / "imported"
    code = ("import sys\nfrom export.__main__ import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'python -m export onnx imported torch'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "onnx", str(path), "--out", str(out), "--labels", str(labels),
                           "--resize-size", "64"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    registry = export_model(lm, [], root / "registry", labels_name="voc10")
    return {"lm": lm, "path": path, "out": out, "proc": proc, "registry": registry, "root": root}


def test_cli_import_runs_without_torch_and_writes_the_pooled_linear_family(resnet):
    out, proc = resnet["out"], resnet["proc"]
    assert "made dynamic" in proc.stderr   # torch's export fixed the batch at 1
    assert "target layer (auto" in proc.stderr and "/layer4/layer4.0/relu_1/Relu_output_0" in proc.stderr
    assert "ImageNet defaults" in proc.stderr and "gradients: central differences" in proc.stderr
    m = json.loads((out / MANIFEST_NAME).read_text())
    reg = resnet["registry"].manifest
    assert m["family"] == "pooled-linear" and m["target_layer"] == "/layer4/layer4.0/relu_1/Relu_output_0"
    assert m["dims"] == {**reg["dims"]} and m["input_size"] == 64
    assert m["preprocess"] == reg["preprocess"] and m["mean"] == reg["mean"] and m["std"] == reg["std"]
    assert m["default_class_set"] == "voc10" and m["class_sets"]["voc10"]["count"] == 10
    assert m["source"]["input"] == "input.1" and m["source"]["batch"] == 1
    grad = m["validation"]["gradients"]
    assert grad["precision"] == "float64" and grad["max_error"] <= grad["tolerance"] == 1e-3
    art = load_artifacts(out, graphs=("explain", "classify", "head", "features", "head_grad"))
    for g in ("explain", "classify", "head", "features", "head_grad"):
        assert m["graphs"][g]["inputs"] == FAMILIES["pooled-linear"].graphs[g].to_json()["inputs"]
        assert m["graphs"][g]["outputs"] == FAMILIES["pooled-linear"].graphs[g].to_json()["outputs"]
    assert art.load_class_set().labels == list(VOC10)
    assert not [p for p in out.iterdir() if p.name.startswith(".decomcam-")]


def test_runtime_cli_explains_the_imported_model(resnet, tmp_path):
    import cv2

    from runtime.explain import main as explain_main

    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), make_images(1, seed=5)[0][:, :, ::-1])
    for method in ("gradcam", "decomcam", "decomcam-ig"):
        dest = tmp_path / method
        code = explain_main([str(img), "--artifacts", str(resnet["out"]), "--out", str(dest), "--method", method,
                             "--quiet"])
        assert code == 0
        j = json.loads((dest / "photo.json").read_text())
        assert j["method"] == method and j["target"]["name"] in VOC10
        assert (dest / "photo.overlay.png").is_file()


def _pearson(a, b):
    assert a.std() > 1e-4 and b.std() > 1e-4, "a constant map compares nothing"
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_imported_saliency_equals_the_registry_export_of_the_same_weights(resnet):
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer

    imgs = make_images(3, seed=11)
    opts = EngineOptions(allow_spinning=False)
    ours = Explainer.from_artifacts(resnet["out"], engine_options=opts)
    reg = Explainer.from_artifacts(resnet["registry"].out_dir, engine_options=opts)
    for method in ("gradcam", "decomcam", "decomcam-ig"):
        a = ours.explain_arrays(imgs, method=method)
        b = reg.explain_arrays(imgs, method=method)
        for x, y in zip(a, b):
            assert x.target == y.target
            assert _pearson(x.saliency, y.saliency) >= PEARSON, method
    # the graphs themselves: the import of the TorchScript exporter's graph vs the registry's dynamo export
    import onnxruntime as ort

    x = np.stack([load_artifacts(resnet["out"]).preprocess_image(im)[0] for im in imgs])
    t = np.array([-1, 3, 7], np.int64)
    runs = [ort.InferenceSession(str(d / "explain.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "target": t}) for d in (resnet["out"], resnet["registry"].out_dir)]
    for ours_out, reg_out in zip(*runs):
        assert np.abs(ours_out - reg_out).max() <= 1e-5 * np.abs(reg_out).max()


def test_a_head_not_linear_in_the_activations_matches_torch_autograd(tmp_path):
    """mobilenet-tiny-lastblock: the target is the last inverted-residual block, and the head runs a 1x1 conv,
    BatchNorm and Hardswish at every position before the pooling. The reference is torch autograd on the
    unmodified model (a forward hook at the target layer)."""
    import onnxruntime as ort
    import torch

    from export.models import load_model

    lm = load_model("mobilenet-tiny-lastblock", "none")
    path = tmp_path / "mnv3.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm.model.model.eval(), (torch.zeros(1, 3, 96, 96),), str(path), dynamo=False,
                          opset_version=17)
    res = import_onnx(path, tmp_path / "imported", target_layer="/features/features.11/Add_output_0",
                      pre=Preprocess(resize_size=96))
    art = load_artifacts(res.out_dir)
    x = np.stack([art.preprocess_image(im)[0] for im in make_images(3, seed=2)])
    t = np.array([-1, 2, 9], np.int64)
    ours = ort.InferenceSession(str(res.out_dir / "explain.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "target": t})
    theirs = [v.numpy() for v in lm.model.autograd(torch.from_numpy(x), torch.from_numpy(t))]
    assert res.manifest["dims"]["C"] == theirs[1].shape[1] == 24
    for a, b in zip(ours, theirs):   # logits, activations, gradients
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_a_graph_from_the_dynamo_exporter(resnet, tmp_path):
    """torch.onnx.export(dynamo=True): opset 18, external data, another op mix, and a Reshape(allowzero=1) that
    bakes the fixed batch ([1, 512]): rewritten to [-1, 512]. Same logits and gradients as the TorchScript one."""
    import onnxruntime as ort
    import torch

    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet["lm"].model.model.eval(), (torch.zeros(1, 3, 64, 64),), str(path), dynamo=True,
                          opset_version=18, verbose=False)
    res = import_onnx(path, tmp_path / "o", pre=Preprocess(resize_size=64))
    assert res.manifest["source"]["reshapes_rewritten"] and res.manifest["target_layer"] != ""
    x = np.stack([load_artifacts(res.out_dir).preprocess_image(im)[0] for im in make_images(3, seed=4)])
    t = np.array([-1, 1, 2], np.int64)
    a, b = (ort.InferenceSession(str(d / "explain.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x, "target": t}) for d in (res.out_dir, resnet["out"]))
    for u, v in zip(a, b):
        assert np.abs(u - v).max() <= 1e-5 * np.abs(v).max()


def test_list_targets_prints_candidates_with_shapes(resnet, capsys):
    from export.__main__ import main

    assert main(["onnx", str(resnet["path"]), "--list-targets"]) == 0
    out = capsys.readouterr().out
    auto = [ln for ln in out.splitlines() if ln.endswith("<- auto")]
    assert len(auto) == 1 and "/layer4/layer4.0/relu_1/Relu_output_0" in auto[0] and "[batch, 512, 2, 2]" in auto[0]
    assert "/layer3/layer3.0/Add_output_0" in out and "after the pooling" in out
    assert "/layer4/layer4.0/relu/Relu_output_0" not in out   # inside the last block: a skip goes around it


def test_a_tensor_inside_a_residual_block_is_refused_naming_the_skip(resnet, capsys, tmp_path):
    code, err = _main(["onnx", str(resnet["path"]), "--out", str(tmp_path / "o"), "--target-layer",
                       "/layer4/layer4.0/relu/Relu_output_0"], capsys)
    line = _error_line(err)
    assert code == 1 and "inside a residual block" in line
    assert "skip connection '/layer4/layer4.0/downsample/downsample.0/Conv_output_0'" in line
    assert "into node '/layer4/layer4.0/Add' (Add)" in line
    assert not (tmp_path / "o").exists()


def test_an_earlier_target_layer_validates_with_a_deeper_head(resnet, tmp_path):
    res = import_onnx(resnet["path"], tmp_path / "l3", target_layer="/layer3/layer3.0/Add_output_0",
                      pre=Preprocess(resize_size=64))
    m = res.manifest
    assert m["dims"]["C"] == 256 and (m["dims"]["h"], m["dims"]["w"]) == (4, 4)
    assert m["source"]["target_layer"]["chosen"] == "given"
    assert m["validation"]["gradients"]["max_error"] <= 1e-3
    head = onnx.load(str(tmp_path / "l3" / "head.onnx"))
    assert {"Conv", "Add", "Relu"} <= {n.op_type for n in head.graph.node}   # layer4 is in the head now


# -- auto-detection and the cut on built graphs ---------------------------------------------------------------------

def test_plain_cnn_ending_in_softmax_explains_the_logits_before_it(tmp_path, capsys):
    path = _save(plain_cnn(softmax=True), tmp_path / "cnn.onnx")
    src = read_source(path)
    assert src.logits == "logits" and src.softmax == "Softmax" and src.size == 16
    assert [c.name for c in candidates(src)] == ["c1", "r1", "p1", "c2", "r2", "gap"]
    assert choose_target(src).name == "r2"
    from export.__main__ import main

    assert main(["onnx", str(path), "--out", str(tmp_path / "o"), "--size", "16", "--resize", "stretch"]) == 0
    err = capsys.readouterr().err
    assert "ends in Softmax: explaining the logits before it ('logits')" in err
    m = json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())
    assert m["source"]["softmax_removed"] == "Softmax" and m["target_layer"] == "r2"
    assert m["preprocess"] == {"resize": "stretch", "resize_size": 16, "interpolation": "bilinear"}
    assert m["opset"] == 17   # opset 13 converted for the backward's ScatterElements(reduction="add")
    assert m["class_sets"]["labels"]["count"] == 5
    assert (tmp_path / "o" / "classes" / "labels.txt").read_text().splitlines() == [f"class_{i}" for i in range(5)]


def test_a_baked_batch_in_a_reshape_is_rewritten(tmp_path):
    shape = numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    model = plain_cnn(reshape=[helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="view")])
    model.graph.initializer.append(shape)
    res = import_onnx(_save(model, tmp_path / "baked.onnx"), tmp_path / "o")
    assert res.manifest["source"]["reshapes_rewritten"] == ["view"]
    assert res.report["sizes"] == [[1, 5], [3, 5]]   # ran at batch 3


def _bad_models():
    bad_reshape = plain_cnn(reshape=[helper.make_node("Reshape", ["gap", "shape"], ["col"], name="view"),
                                     helper.make_node("Transpose", ["col"], ["flat"], perm=[1, 0])])
    bad_reshape.graph.initializer.append(numpy_helper.from_array(np.array([8, 1], np.int64), "shape"))
    no_spatial = _graph([helper.make_node("GlobalAveragePool", ["pixel_values"], ["gap"]),
                         helper.make_node("Flatten", ["gap"], ["flat"]),
                         helper.make_node("Gemm", ["flat", "w", "b"], ["y"], transB=1)],
                        {"w": _w(4, 3, seed=7), "b": _w(4, seed=8)})
    einsum = plain_cnn(head=[helper.make_node("Einsum", ["flat", "fc_w"], ["y"], equation="bc,kc->bk",
                                              name="my_einsum")], opset=17)
    return {
        "no-candidate": (no_spatial, [], "no target-layer candidate"),
        "unsupported-op": (einsum, [], "node 'my_einsum' (Einsum) is on the path from 'activations' to 'logits' "
                                       "and has no gradient rule"),
        "unknown-target": (plain_cnn(), ["--target-layer", "nope"], "--target-layer 'nope': no tensor of that name"),
        "not-4d-target": (plain_cnn(), ["--target-layer", "flat"], "--target-layer 'flat': not a 4-D tensor"),
        "baked-batch": (bad_reshape, [], "Reshape node 'view' bakes the batch into its target shape [8, 1]"),
        "size-differs": (plain_cnn(), ["--size", "32"], "input 'pixel_values' is fixed at 16x16; --size 32 differs"),
    }


@pytest.mark.parametrize("case", ["no-candidate", "unsupported-op", "unknown-target", "not-4d-target", "baked-batch",
                                  "size-differs"])
def test_model_problems_are_one_line_exit_1_and_write_nothing(case, tmp_path, capsys):
    model, extra, message = _bad_models()[case]
    path = _save(model, tmp_path / "m.onnx")
    code, err = _main(["onnx", str(path), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 1 and message in _error_line(err)
    assert not (tmp_path / "o").exists()


def test_labels_count_out_folder_and_a_list_without_spatial_candidates(tmp_path, capsys):
    path = _save(plain_cnn(), tmp_path / "m.onnx")
    labels = tmp_path / "names.txt"
    labels.write_text("a\nb\nc\n")
    code, err = _main(["onnx", str(path), "--out", str(tmp_path / "o"), "--labels", str(labels)], capsys)
    assert code == 1 and f"{labels}: 3 labels for a classifier with 5 outputs" in _error_line(err)
    assert not (tmp_path / "o").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _main(["onnx", str(path), "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot create or write the artifacts folder" in _error_line(err)
    no_spatial = _bad_models()["no-candidate"][0]
    from export.__main__ import main

    assert main(["onnx", str(_save(no_spatial, tmp_path / "n.onnx")), "--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "gap" in out and "--target-layer auto finds no candidate" in out


def test_a_wrong_gradient_fails_validation_and_writes_nothing(tmp_path, monkeypatch):
    """A rule that forgets GlobalAveragePool's 1 / (h w): explain and head_grad agree with each other, only the
    central differences catch it; nothing is written."""
    from export import onnx_grad
    from export.writing import ValidationError

    def wrong(e, node, gy):
        return [e.op("Expand", [gy[0], e.shape_of(node.input[0])])]

    monkeypatch.setitem(onnx_grad.RULES, "GlobalAveragePool", wrong)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ValidationError, match=r"head_grad\.gradients .*central differences of head\.onnx in float64"):
        import_onnx(_save(plain_cnn(), tmp_path / "m.onnx"), out)
    assert list(out.iterdir()) == []


def test_shapes_from_running_the_graph_where_inference_gives_none(tmp_path, monkeypatch):
    """With ONNX shape inference returning nothing, the shapes on the path come from two ORT runs (batch 2 and 3)
    and the import, the backward and the checks go through the same."""
    path = _save(plain_cnn(opset=17), tmp_path / "m.onnx")
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda model, *a, **k: model)
    src = read_source(path)
    assert any("their shapes come from running the graph" in n for n in src.notes)
    assert choose_target(src).name == "r2" and choose_target(src).dims == ["batch", 8, 8, 8]
    res = import_onnx(path, tmp_path / "o")
    assert res.manifest["validation"]["gradients"]["max_error"] <= 1e-3


def test_preprocess_defaults_are_imagenet_224_from_256():
    pre = Preprocess()
    assert pre.resolved(224) == {"resize": "crop", "resize_size": 256, "interpolation": "bilinear"}
    assert (pre.mean, pre.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert Preprocess(crop_pct=0.9).resolved(224)["resize_size"] == 248
    with pytest.raises(ImportError_, match="give one"):
        Preprocess(crop_pct=0.9, resize_size=256).resolved(224)
    with pytest.raises(ImportError_, match=r"--mean \[123.0, 117.0, 104.0\]: each value must be in \[0, 1\]"):
        Preprocess(mean=(123.0, 117.0, 104.0)).resolved(224)
