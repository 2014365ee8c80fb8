"""`python -m export onnx` on graphs that did not come from torch.onnx, on a real model, and on what the coverage
benchmark (benchmarks/coverage.py) found in torchvision's and timm's CNNs.

    keras-like   a CNN written with onnx.helper the way Keras + tf2onnx write one: a channels-last input
                 [N, H, W, 3] and a Transpose to NCHW, Conv / BatchNormalization / Relu, a head that either pools
                 (GlobalAveragePool) or goes back to channels-last (Transpose, ReduceMean over h, w), then MatMul +
                 Add and a Softmax; imported, validated, and its gradients against the head's closed form
                 (global average pooling + a linear layer: d logit_t / dA = W[:, t] / (h w) at every position)
    tf2onnx      a Keras model converted by tf2onnx (skipped where tensorflow and tf2onnx are not installed: they
                 are optional and large)
    real weights EfficientNet-Lite0 with its ImageNet weights, exported with plain torch.onnx.export and imported:
                 every method's saliency equals the registry export's on a real photo and generated images
    coverage     shapes that ONNX shape inference leaves partly unknown (a Pad or Reshape whose amounts are
                 computed: ShuffleNet's channel shuffle, EfficientNet-Lite's same padding) come from running the
                 graph; where activations vanish next to a bias (random weights) the gradient check scales the
                 points up (or raises its step) above the logits' rounding, without crossing a deep head's ReLU
                 kinks, and still catches a wrong gradient there
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.onnx_import import (
    ImportError_,
    Preprocess,
    candidates,
    choose_target,
    import_onnx,
    read_source,
)
from runtime.spec import MANIFEST_NAME
from tests.conftest import make_images

REPO = Path(__file__).resolve().parents[2]
PEARSON = 0.9999
K = 6


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def keras_like_cnn(head: str = "gap", size: int = 32, batch="unk__0") -> tuple[onnx.ModelProto, dict]:
    """input_1 [batch, size, size, 3] -> Transpose -> conv-bn-relu -> conv(stride 2)-bn-relu [8, size/2, size/2]
    -> head -> MatMul + Add -> Softmax (Keras' classifier layer). head: "gap" (GlobalAveragePool, Flatten) or
    "nhwc" (Transpose back to channels-last, ReduceMean over axes 1, 2: what tf2onnx writes for Keras'
    GlobalAveragePooling2D)."""
    rng = np.random.default_rng(3)
    w = {"k1": rng.normal(size=(8, 3, 3, 3)) * 0.4, "b1": rng.normal(size=8) * 0.1,
         "g1": 1 + 0.2 * rng.normal(size=8), "be1": 0.1 * rng.normal(size=8), "m1": 0.1 * rng.normal(size=8),
         "v1": 0.5 + rng.random(8),
         "k2": rng.normal(size=(8, 8, 3, 3)) * 0.25, "g2": 1 + 0.2 * rng.normal(size=8),
         "be2": 0.1 * rng.normal(size=8), "m2": 0.1 * rng.normal(size=8), "v2": 0.5 + rng.random(8),
         "dense_w": rng.normal(size=(8, K)), "dense_b": rng.normal(size=K) * 0.1}
    nodes = [helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["nchw", "k1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], epsilon=1e-3, name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], epsilon=1e-3, name="bn2"),
             helper.make_node("Relu", ["n2"], ["features"], name="relu2")]
    if head == "gap":
        nodes += [helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="gap"),
                  helper.make_node("Reshape", ["gap", "flat_shape"], ["pooled"], name="flatten")]
    else:
        nodes += [helper.make_node("Transpose", ["features"], ["nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
                  helper.make_node("ReduceMean", ["nhwc", "axes"], ["pooled"], keepdims=0, name="gap")]
    nodes += [helper.make_node("MatMul", ["pooled", "dense_w"], ["mm"], name="dense/MatMul"),
              helper.make_node("Add", ["mm", "dense_b"], ["logits_raw"], name="dense/BiasAdd"),
              helper.make_node("Softmax", ["logits_raw"], ["dense"], axis=-1, name="dense/Softmax")]
    tensors = [_init(k, v) for k, v in w.items()]
    if head == "gap":
        tensors.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "flat_shape"))
    else:
        tensors.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    g = helper.make_graph(nodes, "keras_like", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                              [batch, size, size, 3])],
                          [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [batch, K])], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="tf2onnx-like")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, {k: np.asarray(v, np.float32) for k, v in w.items()}


def _closed_form_check(out: Path, w: dict, images):
    """explain.onnx's gradients against d logit_t / dA = W[:, t] / (h w) (GAP + linear head), its logits against
    the user's graph (before the Softmax) fed channels-last."""
    from runtime.artifacts import load_artifacts

    art = load_artifacts(out)
    x = np.stack([art.preprocess_image(im)[0] for im in images])
    t = np.array([-1] + list(range(len(images) - 1)), np.int64)
    sess = ort.InferenceSession(str(out / "explain.onnx"), providers=["CPUExecutionProvider"])
    logits, acts, grads = sess.run(["logits", "activations", "gradients"], {"image": x, "target": t})
    tt = np.where(t < 0, logits.argmax(1), t)
    h, w_ = acts.shape[2:]
    expect = (w["dense_w"][:, tt].T / (h * w_))[:, :, None, None] * np.ones_like(acts)
    assert np.abs(grads - expect).max() <= 1e-6 * np.abs(expect).max()
    # logits: the dense layer on the pooled activations (an independent forward of the head)
    ref = acts.mean((2, 3)) @ w["dense_w"] + w["dense_b"]
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    return art, logits


@pytest.mark.parametrize("head", ["gap", "nhwc"])
def test_a_keras_like_channels_last_cnn_is_imported_and_validated(head, tmp_path, capsys):
    from export.__main__ import main

    model, w = keras_like_cnn(head)
    path = tmp_path / "keras_like.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "art"
    code = main(["onnx", str(path), "--out", str(out), "--size", "32", "--resize", "stretch"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "channels-last [N, H, W, 3]" in err and "ends in Softmax" in err
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["source"]["layout"] == "NHWC" and m["source"]["input"] == "input_1"
    assert m["target_layer"] == "features"     # the NCHW feature map, never the channels-last copy of the head
    assert m["dims"] == {"C": 8, "h": 16, "w": 16, "K": K, "H": 32, "W": 32}
    assert m["validation"]["gradients"]["max_error"] <= 1e-3
    images = make_images(3, seed=4)
    art, logits = _closed_form_check(out, w, images)
    # and the user's unmodified graph, fed channels-last, gives the softmax of the same logits
    x = np.stack([art.preprocess_image(im)[0] for im in images])
    (probs,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_1": x.transpose(0, 2, 3, 1).copy()})
    e = np.exp(logits - logits.max(1, keepdims=True))
    assert np.abs(probs - e / e.sum(1, keepdims=True)).max() <= 1e-6


def test_a_channels_last_copy_is_not_a_target_candidate(tmp_path):
    model, _ = keras_like_cnn("nhwc")
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    src = read_source(path)
    names = [c.name for c in candidates(src)]
    assert names[-1] == "features" and "nhwc" not in names
    assert "input_1" not in names   # the user's channels-last input, now computed from the NCHW image
    with pytest.raises(ImportError_, match=r"--target-layer 'nhwc': its axes are in the order NhwC, not \[batch, C, h, "
                                           r"w\]"):
        choose_target(src, "nhwc")


def test_a_fixed_size_channels_last_input_sets_the_size_and_an_odd_layout_is_refused(tmp_path):
    model, _ = keras_like_cnn("gap", size=24, batch=1)
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    res = import_onnx(path, tmp_path / "out", pre=Preprocess(resize="stretch"))
    assert res.manifest["input_size"] == 24 and res.manifest["source"]["batch"] == 1
    bad, _ = keras_like_cnn("gap")
    bad.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 4
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ImportError_, match=r"must be an image batch \[N, 3, H, W\] or \[N, H, W, 3\]"):
        read_source(tmp_path / "bad.onnx")


def test_a_keras_model_through_tf2onnx(tmp_path):
    """Optional: tensorflow and tf2onnx are large and not among the project's extras."""
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed (optional: pip install "
                                                  "tensorflow-cpu tf2onnx)")
    tf2onnx = pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (optional)")
    keras = tf.keras
    tf.random.set_seed(0)
    inp = keras.Input((32, 32, 3), name="pixels")
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(K, activation="softmax")(x)
    km = keras.Model(inp, out)
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="pixels"),)
    proto, _ = tf2onnx.convert.from_keras(km, input_signature=spec, opset=17)
    path = tmp_path / "keras.onnx"
    onnx.save(proto, str(path))
    res = import_onnx(path, tmp_path / "out", pre=Preprocess(size=32, resize="stretch"))
    assert res.manifest["source"]["layout"] == "NHWC"
    assert res.manifest["dims"]["C"] == 8 and res.manifest["dims"]["h"] == 16
    dense_w, dense_b = km.layers[-1].get_weights()
    _closed_form_check(res.out_dir, {"dense_w": dense_w, "dense_b": dense_b}, make_images(2, seed=8))


# -- EfficientNet-Lite0, real weights: plain torch.onnx.export, imported, every method --------------------------------

@pytest.fixture(scope="module")
def lite0_imported(real_lite0, tmp_path_factory):
    """The real Lite0 exported with plain torch.onnx.export (the TorchScript exporter, dynamic batch) and imported
    with the registry export's preprocessing given on the command line."""
    import torch

    from export.__main__ import main

    lm, reg = real_lite0
    root = tmp_path_factory.mktemp("lite0-import")
    path = root / "lite0.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm.model.model.eval(), (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    rm = json.loads((reg / MANIFEST_NAME).read_text())
    pre = rm["preprocess"]
    labels = root / "imagenet.txt"
    from runtime.artifacts import load_artifacts

    labels.write_text("".join(f"{n}\n" for n in load_artifacts(reg).load_class_set().labels))
    out = root / "imported"
    code = main(["onnx", str(path), "--out", str(out), "--size", str(rm["input_size"]),
                 "--resize", pre["resize"], "--resize-size", str(pre["resize_size"]),
                 "--interpolation", pre["interpolation"], "--mean", ",".join(map(str, rm["mean"])),
                 "--std", ",".join(map(str, rm["std"])), "--labels", str(labels)])
    assert code == 0
    return out, reg


def _pearson(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    assert a.std() > 1e-6 and b.std() > 1e-6, "a constant map compares nothing"
    return float(np.corrcoef(a, b)[0, 1])


def test_real_lite0_imported_target_and_preprocessing_are_the_registry_exports(lite0_imported):
    out, reg = lite0_imported
    m, r = (json.loads((d / MANIFEST_NAME).read_text()) for d in (out, reg))
    assert m["dims"] == r["dims"] and m["preprocess"] == r["preprocess"]
    assert m["mean"] == r["mean"] and m["std"] == r["std"] and m["input_size"] == r["input_size"]
    assert m["target_layer"].endswith("Clip_output_0")   # _conv_head -> _bn1 -> ReLU6, as the registry's
    assert m["validation"]["gradients"]["max_error"] <= 1e-3


def _same_saliency(lite0_imported, methods, images):
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer

    out, reg = lite0_imported
    opts = EngineOptions(allow_spinning=False)
    ours = Explainer.from_artifacts(out, engine_options=opts)
    theirs = Explainer.from_artifacts(reg, engine_options=opts)
    for method in methods:
        a = ours.explain_arrays(images, method=method)
        b = theirs.explain_arrays(images, method=method)
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.target == y.target, method
            r = _pearson(x.saliency, y.saliency)
            assert r >= PEARSON, f"{method} image {i}: Pearson {r:.8f}"
    return ours


SCORE_CAMS = ("scorecam", "scorecam++")   # a classifier forward per live channel: 1280 for Lite0


def test_real_lite0_every_method_equals_the_registry_export_on_real_and_generated_photos(lite0_imported):
    """Every method but the two Score-CAMs (the `slow` test below; benchmarks/coverage.py measures all of them on
    real ImageNet validation photos) on the repository's real photo and two generated images."""
    from runtime.images import load_image
    from runtime.methods import list_methods

    cat = load_image(REPO / "samples" / "cat.jpg")
    methods = list_methods()
    assert {"decomcam", "decomcam-authors", "decomcam-ig", "gradcam", *SCORE_CAMS} <= set(methods)
    assert len(methods) == 13
    ours = _same_saliency(lite0_imported, [m for m in methods if m not in SCORE_CAMS], [cat] + make_images(2, seed=21))
    top = ours.explain_arrays([cat], method="gradcam")[0]
    assert top.top5[0][0] in ("tabby cat", "tiger cat", "Egyptian Mau"), top.top5   # the real labels, a cat


@pytest.mark.slow
def test_real_lite0_score_cams_equal_the_registry_export_on_the_real_photo(lite0_imported):
    from runtime.images import load_image

    _same_saliency(lite0_imported, SCORE_CAMS, [load_image(REPO / "samples" / "cat.jpg")])


# -- what the coverage run found ------------------------------------------------------------------------------------

def _computed_pad_cnn():
    """conv-relu, then a Pad whose amounts are computed from the input's shape (ONNX shape inference cannot follow
    them: every later spatial size is unknown to it), conv-relu [8, h, w], GAP, Gemm."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Shape", ["r1"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["sf", "big"], ["q"]),
             helper.make_node("Floor", ["q"], ["z"]),                                   # zeros, as far as we know
             helper.make_node("Concat", ["z", "z"], ["zz"], axis=0),
             helper.make_node("Add", ["zz", "pad_one"], ["pf"]),
             helper.make_node("Cast", ["pf"], ["pads"], to=TensorProto.INT64),         # [0, 0, 1, 1, 0, 0, 1, 1]
             helper.make_node("Pad", ["r1", "pads"], ["p1"]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    inits = [_init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.4), _init("w2", rng.normal(size=(8, 8, 3, 3)) * 0.3),
             _init("big", [1e6]), _init("pad_one", [0, 0, 1, 1, 0, 0, 1, 1]),
             _init("fc_w", rng.normal(size=(K, 8))), _init("fc_b", rng.normal(size=K))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", K])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_partly_unknown_shapes_come_from_running_the_graph(tmp_path):
    m = _computed_pad_cnn()
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    r2 = next(v for v in inferred.graph.value_info if v.name == "r2")
    assert not r2.type.tensor_type.shape.dim[2].HasField("dim_value"), "inference now follows the pads: rewrite"
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    src = read_source(path)
    assert any("partly unknown; their shapes come from running the graph" in n for n in src.notes)
    t = choose_target(src)
    assert t.name == "r2" and t.dims == ["batch", 8, 8, 8]    # (16 + 2 - 3) // 2 + 1
    res = import_onnx(path, tmp_path / "out", pre=Preprocess(resize="stretch"))
    assert res.manifest["validation"]["gradients"]["max_error"] <= 1e-3


class _Session:
    """A head_grad session stand-in: the closed-form logits and gradients of GAP + Gemm, optionally wrong."""

    def __init__(self, w, b, scale=1.0):
        self.w, self.b, self.scale = w, b, scale

    def run(self, names, feed):
        a = feed["activations"].astype(np.float64)
        logits = a.mean((2, 3)) @ self.w.T + self.b
        t = np.where(feed["target"] < 0, logits.argmax(1), feed["target"])
        hw = a.shape[2] * a.shape[3]
        g = (self.w[t] / hw)[:, :, None, None] * np.ones_like(a) * self.scale
        return logits.astype(np.float32), g.astype(np.float32)


def test_gradient_check_steps_above_rounding_where_activations_vanish_next_to_a_bias(monkeypatch):
    """GoogLeNet with random weights: activations ~1e-11 at the last block, logits ~ the bias. A step of 1e-9 |A|
    would move the logit by less than its rounding; the check scales the points up (up to RESCALE_MAX_RMS), or,
    where it may not, raises the step to what float64 can resolve."""
    import export.onnx_import as oi
    from export.onnx_import import check_gradients

    rng = np.random.default_rng(0)
    c, hw = 16, 3
    w, b = rng.normal(size=(K, c)) * 0.01, np.full(K, 0.03) + rng.normal(size=K) * 1e-3
    nodes = [helper.make_node("GlobalAveragePool", ["activations"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("activations", TensorProto.FLOAT,
                                                                        ["batch", c, hw, hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])],
                          [_init("w", w), _init("b", b)])
    head = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    head.ir_version = 8
    w32, b32 = w.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    points = (np.abs(rng.normal(size=(2, c, hw, hw))) * 1e-11).astype(np.float32)
    target = np.array([-1, 2], np.int64)
    ok = check_gradients(head, _Session(w32, b32), points, target)
    assert ok["ok"] and ok["points_rescaled"] == 2 and ok["steps_raised_for_rounding"] == 0, ok
    assert ok["max_error"] <= 1e-5, ok
    wrong = check_gradients(head, _Session(w32, b32, scale=1.01), points, target)
    assert not wrong["ok"] and wrong["max_error"] > 5e-3
    monkeypatch.setattr(oi, "RESCALE_MAX_RMS", 0.0)
    raised = check_gradients(head, _Session(w32, b32), points, target)
    assert raised["ok"] and raised["points_rescaled"] == 0 and raised["steps_raised_for_rounding"] == 2, raised
    assert raised["max_error"] <= 1e-5, raised
    wrong = check_gradients(head, _Session(w32, b32, scale=1.01), points, target)
    assert not wrong["ok"] and wrong["max_error"] > 5e-3
    monkeypatch.undo()
    # at ordinary activations the step is the usual 1e-6 |A|
    usual = check_gradients(head, _Session(w32, b32), points * 1e11, target)
    assert usual["ok"] and usual["steps_raised_for_rounding"] == 0


class _ScaledGradients:
    """A head_grad session whose gradients are off by a factor (a wrong backward)."""

    def __init__(self, sess, scale):
        self.sess, self.scale = sess, scale

    def run(self, names, feed):
        logits, grads = self.sess.run(names, feed)
        return logits, grads * np.float32(self.scale)


def test_gradient_check_scales_up_vanishing_activations_where_the_raised_step_would_cross_relu_kinks():
    """Inception v4 (timm, random weights) at 96 px: activations ~1e-8 at the target, logits ~ the classifier's
    bias, and a head of Conv + ReLU blocks. float64 resolves the logit's change only at steps of ~1 % of |A| or
    more, which cross the head's ReLU kinks: a correct gradient failed (error 58 along the gradient). The check
    scales such points up, where a step of 1e-9 |A| is above the rounding; a wrong gradient still fails there."""
    from export.onnx_grad import target_gradient_graph
    from export.onnx_import import check_gradients

    rng = np.random.default_rng(3)
    c, hw = 8, 6
    nodes = [helper.make_node("Conv", ["activations", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("activations", TensorProto.FLOAT,
                                                                        ["batch", c, hw, hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])],
                          [_init("w1", rng.normal(size=(c, c, 3, 3)) * 0.3),
                           _init("w2", rng.normal(size=(c, c, 3, 3)) * 0.3),
                           _init("w", rng.normal(size=(K, c)) * 0.01), _init("b", np.full(K, 0.03))])
    head = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    head.ir_version = 8
    sess = ort.InferenceSession(target_gradient_graph(head, "activations", "logits").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    points = (np.abs(rng.normal(size=(2, c, hw, hw))) * 1e-10).astype(np.float32)
    target = np.array([-1, 2], np.int64)
    ok = check_gradients(head, sess, points, target)
    assert ok["ok"] and ok["max_error"] <= 1e-4, ok
    assert ok["points_rescaled"] == 2 and ok["steps_raised_for_rounding"] == 0, ok
    wrong = check_gradients(head, _ScaledGradients(sess, 1.01), points, target)
    assert not wrong["ok"] and wrong["max_error"] > 5e-3, wrong
    # at ordinary activations the points stay where they are
    usual = check_gradients(head, sess, points * 1e10, target)
    assert usual["ok"] and usual["points_rescaled"] == 0 and usual["steps_raised_for_rounding"] == 0, usual

def test_a_head_that_reads_the_input_batch_is_cut_at_the_feature_map(tmp_path):
    """EfficientNet-Lite's `x.view(inputs.size(0), -1)`: the head's Reshape reads the image's batch through Shape.
    A shape is no path of values: the feature map still dominates the logits, and in head.onnx the image's shape
    comes from the activations' batch."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Shape", ["x"], ["xs"], start=0, end=1),             # inputs.size(0)
             helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Concat", ["xs", "minus_one"], ["shape"], axis=0),
             helper.make_node("Reshape", ["g", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    inits = [_init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.4), _init("w2", rng.normal(size=(8, 8, 3, 3)) * 0.3),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             _init("fc_w", rng.normal(size=(K, 8))), _init("fc_b", rng.normal(size=K))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", K])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    src = read_source(path)
    assert [c.name for c in candidates(src)] == ["c1", "r1", "c2", "r2", "g"]
    res = import_onnx(path, tmp_path / "out", pre=Preprocess(resize="stretch"))
    assert res.manifest["target_layer"] == "r2"
    head = onnx.load(str(tmp_path / "out" / "head.onnx"))
    assert [i.name for i in head.graph.input] == ["activations"]
    sess = ort.InferenceSession(str(tmp_path / "out" / "head_grad.onnx"), providers=["CPUExecutionProvider"])
    a = np.abs(rng.normal(size=(3, 8, 12, 12))).astype(np.float32)
    logits, grads = sess.run(["logits", "gradients"], {"activations": a, "target": np.array([0, 1, 2], np.int64)})
    fc_w = numpy_helper.to_array(inits[3]).astype(np.float64)
    assert np.abs(logits - (a.mean((2, 3)) @ fc_w.T + numpy_helper.to_array(inits[4]))).max() <= 1e-5
    assert np.abs(grads - (fc_w[[0, 1, 2]] / 144)[:, :, None, None]).max() <= 1e-7


def test_repeated_labels_are_accepted_as_imagenet_has_them(tmp_path, capsys):
    """ImageNet-1k's standard names repeat "crane" and "maillot": the import takes them (a name takes its first
    index, as the runtime resolves it) and says so."""
    from export.onnx_import import read_label_file

    f = tmp_path / "names.txt"
    f.write_text("crane\ncat\ncrane\n")
    assert read_label_file(f, 3) == ("crane", "cat", "crane")
    assert "1 labels appear more than once (crane)" in capsys.readouterr().err
    with pytest.raises(ImportError_, match="2 labels for a classifier with 3 outputs"):
        read_label_file(_write(tmp_path / "two.txt", "a\nb\n"), 3)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_gradient_check_moves_off_a_maxpool_tie_of_zeros(monkeypatch):
    """Inception v3 at 96 px: the head max-pools the activations, which hold exact zeros after their ReLU; a window
    of zeros is a kink at the point itself (no central difference measures a gradient there). The check moves
    the points by TIE_BREAK of their RMS value first; without that it fails on a correct gradient."""
    import export.onnx_import as oi
    from export.onnx_grad import target_gradient_graph

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MaxPool", ["activations"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["mp"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("activations", TensorProto.FLOAT,
                                                                        ["batch", 4, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", K])],
                          [_init("w", rng.normal(size=(K, 4))), _init("b", rng.normal(size=K))])
    head = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    head.ir_version = 8
    sess = ort.InferenceSession(target_gradient_graph(head, "activations", "logits").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    points = np.maximum(rng.normal(size=(2, 4, 4, 4)), 0).astype(np.float32)
    points[:, :, :2, :2] = 0.0                       # a window of zeros in every channel
    target = np.array([-1, 1], np.int64)
    assert check_gradients_ok(oi, head, sess, points, target)
    monkeypatch.setattr(oi, "TIE_BREAK", 0.0)
    assert not check_gradients_ok(oi, head, sess, points, target)


def check_gradients_ok(oi, head, sess, points, target) -> bool:
    return oi.check_gradients(head, sess, points, target)["ok"]


def _head_net(kind):
    import torch
    import torch.nn.functional as F  # noqa: N812

    nn = torch.nn

    class _Upsample(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.mode = mode

        def forward(self, x):
            kw = {} if self.mode == "nearest" else {"align_corners": False}
            return F.interpolate(x, scale_factor=2, mode=self.mode, **kw)

    mid = {"groupnorm": [nn.GroupNorm(4, 8)],
           "upsample": [_Upsample("bilinear"), nn.Conv2d(8, 8, 3, padding=1), _Upsample("nearest")]}[kind]
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *mid, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, K)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_()
                m.bias.normal_()
    return net, {"groupnorm": "InstanceNormalization", "upsample": "Resize"}[kind]


@pytest.mark.parametrize("kind", ["groupnorm", "upsample"])
def test_a_head_with_groupnorm_or_upsampling_from_torch_is_differentiated(kind, tmp_path):
    """torch.onnx writes nn.GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, and
    F.interpolate as Resize: a head that holds them (a target layer chosen before them) is imported, and its
    gradients equal torch autograd's."""
    import torch

    torch.manual_seed(0)
    net, op = _head_net(kind)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    nodes = onnx.load(str(path)).graph.node
    assert op in {n.op_type for n in nodes}
    conv = next(n.output[0] for n in nodes if n.op_type == "Conv")
    res = import_onnx(path, tmp_path / "out", conv, Preprocess(resize="stretch"))
    assert res.manifest["validation"]["gradients"]["max_error"] <= 1e-3
    sess = ort.InferenceSession(str(tmp_path / "out" / "head_grad.onnx"), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(3).normal(size=(2, 8, 16, 16)).astype(np.float32)
    t = np.array([1, 4], np.int64)
    _, grads = sess.run(["logits", "gradients"], {"activations": a, "target": t})
    at = torch.from_numpy(a).double().requires_grad_(True)
    (ref,) = torch.autograd.grad(net[1:].double()(at)[torch.arange(2), torch.from_numpy(t)].sum(), at)
    assert np.abs(grads - ref.numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()
