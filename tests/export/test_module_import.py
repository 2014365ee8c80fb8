"""export/module_import.py and `python -m export module`: any PyTorch classifier in, the pooled-linear family's graphs
out.

    API          a tiny torchvision-style ResNet defined here (train mode, live BatchNorm), export_module with label
                 names and the torchscript exporter; torchvision's resnet18 at 64 px; the explain graph's gradients
                 against torch autograd computed here, independently of the export's own check
    CLI          the factory string, --checkpoint, --labels, the default (dynamo) exporter, an earlier target layer
                 (a head with a residual block and ReLU kinks); `python -m runtime.explain` on the result
    errors       one line each, exit 1 (factory, checkpoint, target layer, labels) or 2 (--out), nothing written
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.onnx_import import Preprocess
from runtime.spec import FAMILIES, MANIFEST_NAME
from tests.conftest import make_images

HERE = "tests.export.test_module_import"
NAMES = ("ant", "bee", "cat", "dog", "eel")


# -- models (factories for the CLI: `tests.export.test_module_import:NAME`) ------------------------------------------

class Block(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, `out += identity` in place, an inplace ReLU shared twice."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyNet(nn.Module):
    """32x32 -> stem (stride 2) -> layer1 [8, 16, 16] -> layer2 [16, 8, 8] -> pool, dropout, fc -> 5 logits."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def tiny_net(seed=0):
    """A TinyNet with seeded weights and live BatchNorm (random affine, statistics from three batches), returned in
    train mode as a freshly trained model would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = TinyNet()
    with torch.no_grad():
        for bn in [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]:
            bn.momentum = None
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(0.0, 0.1, generator=g)
        for _ in range(3):
            m(torch.rand(4, 3, 32, 32, generator=g) * 4 - 2)
    return m


def resnet18_5():
    import torchvision

    return torchvision.models.resnet18(num_classes=5)


class TupleNet(TinyNet):
    def forward(self, x):
        return super().forward(x), x


def tuple_net():
    return TupleNet()


def not_a_module():
    return {"fc": 1}


class FlatNet(nn.Module):
    """A head that flattens the feature map into a Linear: only its own input size fits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


# -- helpers --------------------------------------------------------------------------------------------------------

def _main(argv, capsys):
    from export.__main__ import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


def _autograd(module, layer, x, t):
    """Logits, the layer's output and d logits[b, t_b] / d output by torch autograd (forward hook), computed here."""
    got = []
    handle = layer.register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        xt = torch.from_numpy(x).requires_grad_(True)
        logits = module(xt)
        (g,) = torch.autograd.grad(logits[torch.arange(len(t)), torch.from_numpy(t)].sum(), got[0])
    finally:
        handle.remove()
    return logits.detach().numpy(), got[0].detach().numpy(), g.numpy()


def _explain(out_dir, x, target):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(out_dir) / "explain.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits", "activations", "gradients"], {"image": x, "target": target})


def _photos(out_dir, n, seed):
    from runtime.artifacts import load_artifacts

    art = load_artifacts(out_dir)
    return np.stack([art.preprocess_image(im)[0] for im in make_images(n, seed=seed)])


def _close(a, b, atol, rtol):
    """|a - b| <= atol max|b| + rtol |b| everywhere."""
    return bool(np.all(np.abs(a - b) <= atol * np.abs(b).max() + rtol * np.abs(b)))


# -- the API --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from export import export_module

    module = tiny_net()
    assert module.training
    out = tmp_path_factory.mktemp("module") / "tiny"
    res = export_module(module, out, target_layer="layer2", input_size=32, labels=list(NAMES),
                        preprocess=Preprocess(resize_size=32), exporter="torchscript")
    return module, res


def test_api_writes_the_pooled_linear_family_with_the_module_in_eval_mode(tiny, capsys):
    module, res = tiny
    m = json.loads((res.out_dir / MANIFEST_NAME).read_text())
    assert not module.training and not any(x.training for x in module.modules())
    assert m["family"] == "pooled-linear" and m["model"] == "TinyNet" and m["target_layer"] == "layer2"
    assert m["dims"] == {"C": 16, "h": 8, "w": 8, "K": 5, "H": 32, "W": 32}
    assert m["preprocess"] == {"resize": "crop", "resize_size": 32, "interpolation": "bilinear"}
    assert m["class_sets"]["labels"]["count"] == 5 and m["default_class_set"] == "labels"
    assert (res.out_dir / "classes" / "labels.txt").read_text().split() == list(NAMES)
    assert m["source"]["module"] == f"{HERE}.TinyNet" and m["source"]["target_module"] == "layer2"
    assert m["source"]["eval_mode_set"] is True and m["opset"] == 20 and m["versions"]["torch"] == torch.__version__
    assert m["pretrained"] == "module" and m["random_weights"] is False
    for g in ("explain", "classify", "head", "features", "head_grad"):
        assert m["graphs"][g]["inputs"] == FAMILIES["pooled-linear"].graphs[g].to_json()["inputs"]
        assert (res.out_dir / m["graphs"][g]["file"]).is_file()
    assert not [p for p in res.out_dir.iterdir() if p.name.startswith(".decomcam-")]


def test_torch_autograd_check_is_in_the_manifest_within_its_tolerances(tiny):
    _, res = tiny
    t = res.manifest["validation"]["torch_autograd"]
    assert t["sizes"] == [[1, 5], [3, 5]] and t["graph"] == "explain"
    spec = FAMILIES["pooled-linear"].graphs["explain"].tolerances
    assert t["tolerance"] == {k: {"atol": v.atol, "rtol": v.rtol} for k, v in spec.items()}
    for out in ("logits", "gradients"):   # within rtol alone, a stricter bound than atol * scale + rtol * |ref|
        assert t["max"][out]["max_rel"] <= t["tolerance"][out]["rtol"]
    for out in ("logits", "activations", "gradients"):
        assert t["max"][out]["min_cosine"] >= 0.999999
    assert t["whole_model_gradient_min_cosine"] >= t["whole_model_gradient_cosine_floor"] == 0.999
    g = res.manifest["validation"]["gradients"]
    assert g["precision"] == "float64" and g["max_error"] <= g["tolerance"] == 1e-3


def test_explain_gradients_equal_torch_autograd_on_the_module(tiny):
    """Independent of the export's own check: new photos, targets chosen here, a hook and autograd written here.
    Tolerances: logits and activations 1e-5 of their scale (float32, ORT vs torch), gradients 1e-5 of their scale
    plus 1e-4 relative (a GAP + Linear head: the gradient is W[t] / (h w) whatever A)."""
    module, res = tiny
    x = _photos(res.out_dir, 4, seed=21)
    target = np.array([-1, 0, 3, 4], np.int64)
    logits, acts, grads = _explain(res.out_dir, x, target)
    t = np.where(target < 0, logits.argmax(1), target)
    ref_logits, ref_acts, ref_grads = _autograd(module, module.layer2, x, t)
    assert _close(logits, ref_logits, 1e-5, 0) and _close(acts, ref_acts, 1e-5, 0)
    assert _close(grads, ref_grads, 1e-5, 1e-4)
    w = module.fc.weight.detach().numpy()
    np.testing.assert_allclose(grads[:, :, 0, 0], w[t] / 64, rtol=1e-5, atol=1e-8)   # d y_t / dA = W[t] / (h w)


def test_torchvision_resnet18_at_a_small_input(tmp_path):
    from export import export_module

    module = resnet18_5()
    res = export_module(module, tmp_path / "r18", "layer4", 64, preprocess=Preprocess(resize_size=64),
                        exporter="torchscript")
    m = res.manifest
    assert (m["dims"]["C"], m["dims"]["h"], m["dims"]["K"]) == (512, 2, 5) and m["target_layer"] == "layer4"
    assert m["class_sets"]["labels"]["count"] == 5
    x = _photos(res.out_dir, 2, seed=3)
    target = np.array([-1, 2], np.int64)
    logits, _, grads = _explain(res.out_dir, x, target)
    ref_logits, _, ref_grads = _autograd(module, module.layer4, x, np.where(target < 0, logits.argmax(1), target))
    assert _close(logits, ref_logits, 1e-4, 0) and _close(grads, ref_grads, 1e-5, 1e-4)


# -- the CLI --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """`python -m export module` in this process: the tiny ResNet's factory, a checkpoint of other weights, a label
    file, target layer1 (layer2 is in the head: a residual block with ReLUs), the default exporter (dynamo)."""
    import contextlib
    import io

    from export.__main__ import main

    root = tmp_path_factory.mktemp("module-cli")
    ck = root / "tiny.pt"
    torch.save(tiny_net(seed=5).state_dict(), ck)
    labels = root / "animals.txt"
    labels.write_text("".join(f"{n}\n" for n in NAMES))
    out = root / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as so:
        code = main(["module", f"{HERE}:tiny_net", "--checkpoint", str(ck), "--target-layer", "layer1", "--size", "32",
                     "--resize-size", "32", "--labels", str(labels), "--out", str(out)])
    assert code == 0, err.getvalue()
    return {"root": root, "out": out, "ck": ck, "err": err.getvalue(), "stdout": so.getvalue()}


def test_cli_exports_the_factory_with_its_checkpoint(cli):
    m = json.loads((cli["out"] / MANIFEST_NAME).read_text())
    assert m["target_layer"] == "layer1" and m["dims"]["C"] == 8 and (m["dims"]["h"], m["dims"]["w"]) == (16, 16)
    assert m["source"]["module"] == f"{HERE}:tiny_net" and m["source"]["exporter"] == "torch.onnx.export (dynamo)"
    assert m["pretrained"] == str(cli["ck"]) and m["pretrained_id"].startswith("sha256:")
    assert m["default_class_set"] == "animals"
    assert "put in eval mode" in cli["err"] and "explain.onnx against torch autograd on the module" in cli["err"]
    assert "explain.onnx vs torch autograd" in cli["stdout"]
    # the checkpoint's weights, not the factory's: an independent module with the checkpoint loaded
    module = TinyNet().eval()
    module.load_state_dict(torch.load(cli["ck"], weights_only=True))
    x = _photos(cli["out"], 3, seed=8)
    target = np.array([-1, 1, 4], np.int64)
    logits, acts, grads = _explain(cli["out"], x, target)
    ref_logits, ref_acts, ref_grads = _autograd(module, module.layer1, x, np.where(target < 0, logits.argmax(1),
                                                                                    target))
    assert _close(logits, ref_logits, 1e-4, 0) and _close(acts, ref_acts, 1e-5, 0)
    # the head is layer2 (ReLUs): the gradient moves with A, compared at nearly the same A (float32 rounding)
    assert _close(grads, ref_grads, 1e-4, 1e-3)
    assert np.abs(grads[0] - grads[0].mean()).max() > 1e-3 * np.abs(grads[0]).max()   # not a constant map


def test_runtime_explains_the_module_export(cli, tmp_path):
    import cv2

    from runtime.explain import main as explain_main

    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), make_images(1, seed=6)[0][:, :, ::-1])
    for method in ("gradcam", "decomcam", "decomcam-ig"):
        dest = tmp_path / method
        assert explain_main([str(img), "--artifacts", str(cli["out"]), "--out", str(dest), "--method", method,
                             "--quiet"]) == 0
        j = json.loads((dest / "photo.json").read_text())
        assert j["method"] == method and j["target"]["name"] in NAMES
        assert (dest / "photo.overlay.png").is_file()


# -- errors ---------------------------------------------------------------------------------------------------------

def _errors(root: Path) -> dict:
    ck10 = root / "r18_10.pt"
    if not ck10.exists():
        import torchvision

        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ck10)
    scripted = root / "scripted.pt"
    if not scripted.exists():
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    three = root / "three.txt"
    three.write_text("a\nb\nc\n")
    fast = ["--size", "32", "--exporter", "torchscript"]
    return {
        "no-colon": (["torchvision.models.resnet18"], "expected 'package.module:callable'"),
        "no-module": (["no_such_package_xyz.models:net"], "cannot import 'no_such_package_xyz.models'"),
        "no-attribute": ([f"{HERE}:tiny_nett"], f"'{HERE}' has no attribute 'tiny_nett' (close names: tiny_net"),
        "factory-raises": (["torchvision.models:ResNet"], "failed when called with no arguments (TypeError"),
        "not-a-module": ([f"{HERE}:not_a_module"], "returned a dict, not a torch.nn.Module"),
        "checkpoint-keys": ([f"{HERE}:resnet18_5", "--checkpoint", str(ck10)],
                            "checkpoint does not fit this architecture; shape mismatch: fc.bias [10] (the model's [5])"),
        "torchscript-archive": ([f"{HERE}:tiny_net", "--checkpoint", str(scripted)],
                                "a TorchScript archive, refused"),
        "unknown-layer": ([f"{HERE}:tiny_net", "--target-layer", "layer3", *fast],
                          "--target-layer 'layer3': no submodule of that name in TinyNet (close names: layer2, layer1"),
        "not-4d": ([f"{HERE}:tiny_net", "--target-layer", "fc", *fast],
                   "--target-layer 'fc': its output [2, 5] is not a feature map [N, C, h, w]"),
        "in-place": ([f"{HERE}:tiny_net", "--target-layer", "layer2.bn2", *fast],
                     "--target-layer 'layer2.bn2': its output is modified in place later in the forward"),
        "runs-twice": ([f"{HERE}:tiny_net", "--target-layer", "layer2.relu", *fast],
                       "--target-layer 'layer2.relu': runs 2 times in one forward"),
        "residual": ([f"{HERE}:tiny_net", "--target-layer", "layer2.conv1", *fast],
                     "--target-layer 'layer2.conv1': the tensor is inside a residual block: the skip connection"),
        "not-logits": ([f"{HERE}:tuple_net", "--target-layer", "layer2", *fast],
                       "the module returns tuple, not logits [N, K]"),
        "labels": ([f"{HERE}:tiny_net", "--target-layer", "layer2", "--labels", str(three), *fast],
                   f"{three}: 3 labels for a classifier with 5 outputs"),
    }


@pytest.mark.parametrize("case", ["no-colon", "no-module", "no-attribute", "factory-raises", "not-a-module",
                                  "checkpoint-keys", "torchscript-archive", "unknown-layer", "not-4d", "in-place",
                                  "runs-twice", "residual", "not-logits", "labels"])
def test_problems_are_one_line_exit_1_and_write_nothing(case, tmp_path_factory, capsys):
    root = tmp_path_factory.getbasetemp() / "module-errors"
    root.mkdir(exist_ok=True)
    argv, message = _errors(root)[case]
    out = root / f"out-{case}"
    code, _, err = _main(["module", *argv, "--out", str(out)], capsys)
    line = _error_line(err)
    assert code == 1 and message in line, line
    assert not out.exists()


def test_residual_refusal_names_the_skip_and_the_enclosing_blocks(tmp_path, capsys):
    code, _, err = _main(["module", f"{HERE}:tiny_net", "--target-layer", "layer2.conv1", "--size", "32",
                          "--exporter", "torchscript", "--out", str(tmp_path / "o")], capsys)
    line = _error_line(err)
    assert code == 1 and "downsample" in line and "(Add)" in line
    assert "e.g. the block or stage around it: 'layer2'" in line


def test_an_out_folder_that_cannot_be_created_is_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _main(["module", f"{HERE}:tiny_net", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot create or write the artifacts folder" in _error_line(err)


def test_api_argument_errors(tmp_path):
    from export.module_import import ModuleExportError, export_module, load_factory

    with pytest.raises(ModuleExportError, match=r"preprocess.size 64 differs from input_size 32"):
        export_module(tiny_net(), tmp_path / "a", "layer2", 32, preprocess=Preprocess(size=64))
    with pytest.raises(ModuleExportError, match=r"exporter 'onnx2': valid exporters are dynamo, torchscript"):
        export_module(tiny_net(), tmp_path / "a", "layer2", 32, exporter="onnx2")
    with pytest.raises(ModuleExportError, match=r"the module's forward fails on an input \[2, 3, 64, 64\] "
                                                r"\(RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        export_module(FlatNet(), tmp_path / "a", "features", 64)
    with pytest.raises(ModuleExportError, match=r"labels: 2 labels for a classifier with 5 outputs"):
        export_module(tiny_net(), tmp_path / "a", "layer2", 32, labels=["a", "b"])
    with pytest.raises(ModuleExportError, match=r"expected a torch.nn.Module, got a str"):
        export_module("resnet18", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert isinstance(load_factory(f"{HERE}:tiny_net"), TinyNet)
