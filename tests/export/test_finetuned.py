"""Fine-tuned registry checkpoints: `python -m export --model NAME --pretrained CKPT [--labels FILE]` where the
checkpoint's classifier has K outputs of its own (e.g. torchvision.models.resnet18(num_classes=5) fine-tuned).

    K             read from the checkpoint's weight of the entry's last Linear, found from the architecture (every
                  pooled-linear entry), named in the log with its shape
    labels        --labels FILE (its count must be K) or class_0 .. class_{K-1}
    exports       resnet-tiny, mobilenet-tiny and mobilenet-tiny-lastblock with a K = 5 checkpoint through the CLI,
                  the logits against the torchvision module built here with the checkpoint loaded, and
                  `python -m runtime.explain` on each
    errors        a checkpoint whose other layers do not fit names its keys; a label count that is not K
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export.models import ModelError, list_models, load_model, model_info
from runtime.spec import MANIFEST_NAME
from tests.conftest import make_images

NAMES = ("ant", "bee", "cat", "dog", "eel")


def _main(argv, capsys):
    from export.__main__ import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _error_line(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


def _fine_tuned(name: str, k: int = 5, seed: int = 7) -> nn.Module:
    """The registry's seeded model (live BatchNorm) with its last Linear replaced by a K-class one, as fine-tuning
    leaves it: torchvision's own module, its state dict what a user saves."""
    model = load_model(name, "none").model.model
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, k)
        last = model.fc
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, k)
        last = model.classifier[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) / last.in_features ** 0.5)
        last.bias.copy_(0.1 * torch.randn(k, generator=g))
    return model.eval()


def _independent(name: str, k: int) -> nn.Module:
    """The same architecture built here from torchvision, not through the registry."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    if name == "resnet-tiny":
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=k).eval()
    return torchvision.models.mobilenet_v3_small(width_mult=0.25, num_classes=k).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """K = 5 checkpoints of resnet-tiny and mobilenet-tiny (also loaded by mobilenet-tiny-lastblock: same weights),
    exported by the CLI; mobilenet-tiny without --labels."""
    import contextlib
    import io

    from export.__main__ import main

    root = tmp_path_factory.mktemp("finetuned")
    labels = root / "animals.txt"
    labels.write_text("".join(f"{n}\n" for n in NAMES))
    ckpts = {}
    for base in ("resnet-tiny", "mobilenet-tiny"):
        ckpts[base] = root / f"{base}-5.pt"
        torch.save(_fine_tuned(base).state_dict(), ckpts[base])
    runs = {}
    for name, base, with_labels in (("resnet-tiny", "resnet-tiny", True), ("mobilenet-tiny", "mobilenet-tiny", False),
                                    ("mobilenet-tiny-lastblock", "mobilenet-tiny", True)):
        out = root / name
        err = io.StringIO()
        argv = ["--model", name, "--pretrained", str(ckpts[base]), "--out", str(out)]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv + (["--labels", str(labels)] if with_labels else []))
        assert code == 0, err.getvalue()
        runs[name] = {"out": out, "ckpt": ckpts[base], "log": err.getvalue(), "labels": with_labels}
    return runs


@pytest.mark.parametrize("name,tensor", [("resnet-tiny", "fc.weight [5, 512]"),
                                         ("mobilenet-tiny", "classifier.3.weight [5, 256]"),
                                         ("mobilenet-tiny-lastblock", "classifier.3.weight [5, 256]")])
def test_k_is_read_from_the_checkpoint_and_named_in_the_log(exports, name, tensor):
    run = exports[name]
    assert f"{name}: 5 classes, read from the checkpoint's last layer {tensor}" in run["log"]
    assert f"{name}: 5 classes named " + ("from " if run["labels"] else "class_0 .. class_4") in run["log"]
    m = json.loads((run["out"] / MANIFEST_NAME).read_text())
    assert m["dims"]["K"] == 5 and m["pretrained"] == str(run["ckpt"]) and m["random_weights"] is False
    cs = "animals" if run["labels"] else "labels"
    assert m["default_class_set"] == cs and list(m["class_sets"]) == [cs]
    expected = list(NAMES) if run["labels"] else [f"class_{i}" for i in range(5)]
    assert (run["out"] / "classes" / f"{cs}.txt").read_text().splitlines() == expected


@pytest.mark.parametrize("name", ["resnet-tiny", "mobilenet-tiny", "mobilenet-tiny-lastblock"])
def test_the_export_computes_the_checkpoints_classifier(exports, name):
    """classify.onnx against the architecture built here with the checkpoint loaded by torch: the fine-tuned
    head's weights are the ones exported (float32 engines: 1e-4 of the logits' scale)."""
    import onnxruntime as ort

    from runtime.artifacts import load_artifacts

    run = exports[name]
    module = _independent(name.replace("-lastblock", ""), 5)
    module.load_state_dict(torch.load(run["ckpt"], weights_only=True))
    art = load_artifacts(run["out"])
    x = np.stack([art.preprocess_image(im)[0] for im in make_images(3, seed=9)])
    ours = ort.InferenceSession(str(run["out"] / "classify.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x})[0]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert ours.shape == (3, 5)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["resnet-tiny", "mobilenet-tiny", "mobilenet-tiny-lastblock"])
def test_runtime_explains_the_fine_tuned_export(exports, name, tmp_path):
    import cv2

    from runtime.explain import main as explain_main

    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), make_images(1, seed=4)[0][:, :, ::-1])
    names = NAMES if exports[name]["labels"] else tuple(f"class_{i}" for i in range(5))
    for method in ("gradcam", "decomcam"):
        dest = tmp_path / method
        assert explain_main([str(img), "--artifacts", str(exports[name]["out"]), "--out", str(dest), "--method",
                             method, "--quiet"]) == 0
        j = json.loads((dest / "photo.json").read_text())
        assert j["method"] == method and j["target"]["name"] in names
        assert sorted(t["class"] for t in j["top5"]) == sorted(names)   # K = 5: the top-5 is every class


def test_a_label_count_that_is_not_k_is_one_line(exports, tmp_path, capsys):
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    code, err = _main(["--model", "resnet-tiny", "--pretrained", str(exports["resnet-tiny"]["ckpt"]), "--labels",
                       str(three), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and f"{three}: 3 labels for a classifier with 5 outputs" in _error_line(err)
    assert not (tmp_path / "o").exists()


def test_other_layers_that_do_not_fit_are_still_refused_by_name(tmp_path, capsys):
    sd = _fine_tuned("resnet-tiny").state_dict()
    sd["conv1.weight"] = sd["conv1.weight"][:, :, :5, :5].clone()     # a 5x5 stem: another architecture
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    code, err = _main(["--model", "resnet-tiny", "--pretrained", str(bad), "--out", str(tmp_path / "o")], capsys)
    line = _error_line(err)
    assert code == 1 and "checkpoint does not fit this architecture; shape mismatch: conv1.weight [64, 3, 5, 5] " \
                         "(the model's [64, 3, 7, 7])" in line
    assert "fc." not in line and not (tmp_path / "o").exists()
    other = tmp_path / "mobilenet.pt"
    torch.save(_fine_tuned("mobilenet-tiny").state_dict(), other)
    with pytest.raises(ModelError, match=r"mobilenet\.pt: checkpoint does not fit this architecture; missing keys: "
                                         r"bn1\.bias.*; unexpected keys: classifier\.0\.bias"):
        load_model("resnet-tiny", str(other))


def test_a_checkpoint_with_the_registry_k_keeps_the_registry_labels(tmp_path):
    ck = tmp_path / "r10.pt"
    torch.save(load_model("resnet-tiny", "none", seed=2).model.model.state_dict(), ck)
    lm = load_model("resnet-tiny", str(ck))
    assert lm.model.num_classes == 10 and lm.labels[0] == "aeroplane" and lm.labels_name == "voc10"


POOLED = list_models(family="pooled-linear")
LAST_LINEAR = {"tv:resnet18": "fc", "tv:resnet50": "fc", "tiny:resnet": "fc", "tv:efficientnet_b0": "classifier.1",
               "tv:mobilenet_v3_large": "classifier.3", "tiny:mobilenet": "classifier.3",
               "tv:convnext_tiny": "classifier.2", "tiny:convnext": "classifier.2"}


@pytest.mark.parametrize("name", POOLED)
def test_every_pooled_entry_finds_its_last_linear_from_the_architecture(name):
    """The classifier's last Linear of each entry, found among the head modules its split declares; the expected
    names are torchvision's and EfficientNet-Lite's own attribute paths."""
    from export.architectures import _build, classifier_layer

    arch = model_info(name).arch
    base = arch.removesuffix(":lastblock")
    with torch.random.fork_rng():
        model, parts = _build(arch, 3)
    layer, lin = classifier_layer(model, parts(model))
    assert layer == LAST_LINEAR.get(base, "_fc") and lin.out_features == 3
    assert model.get_submodule(layer) is lin


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in POOLED if not model_info(n).tiny])
def test_every_pooled_entry_loads_a_checkpoint_fine_tuned_for_7_classes(name, tmp_path):
    """A checkpoint of the entry's architecture with 7 outputs (built here, the classifier's constructor argument)
    loads, and the model computes 7 logits equal to the checkpoint module's."""
    from export.architectures import _build

    with torch.random.fork_rng():
        torch.manual_seed(1)
        module, _ = _build(model_info(name).arch, 7)
    ck = tmp_path / "k7.pt"
    torch.save(module.state_dict(), ck)
    lm = load_model(name, str(ck))
    assert lm.model.num_classes == 7 and lm.labels == tuple(f"class_{i}" for i in range(7))
    x = torch.randn(1, 3, lm.image_size, lm.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), module.eval()(x), rtol=1e-5, atol=1e-5)
