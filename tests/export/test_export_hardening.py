"""Export and artifacts against a hostile user: class-set names and labels, class-set files checked before
use, one manifest schema, checkpoints that are not checkpoints, an --out that is a file."""

from __future__ import annotations

import copy
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from export.__main__ import main as export_main
from export.classes import ClassSetError, class_set_from_names, get_class_set
from export.models import ModelError, load_checkpoint, load_model
from runtime.artifacts import ArtifactsError, load_artifacts, sha256_path
from runtime.manifest import ManifestError, validate_manifest
from tests.runtime.test_cli import run_cli, write_good


@pytest.fixture
def art(tiny_artifacts, tmp_path) -> Path:
    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    return a


def edit_manifest(a: Path, fn) -> None:
    m = json.loads((a / "manifest.json").read_text())
    m = fn(m)
    (a / "manifest.json").write_text(json.dumps(m))


# -- 4. class-set names -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/../../X", "../../escape", "a/b", "", "-x", "a b", "x" * 65, "é"])
def test_class_set_names_are_plain_identifiers(art, capsys, name, tmp_path):
    before = set(Path("/").iterdir())
    code = export_main(["classes", "--artifacts", str(art), "--names", "cat,dog", f"--name={name}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "is not a plain identifier" in err
    assert set(Path("/").iterdir()) == before and sorted(p.name for p in (art / "classes").iterdir()) == ["voc.npy", "voc.txt"]


def test_class_set_name_from_a_file_stem_is_checked(tmp_path):
    f = tmp_path / "my classes.txt"
    f.write_text("cat\ndog\n")
    with pytest.raises(ClassSetError, match=r"'my classes' is not a plain identifier .* choose one with --name"):
        get_class_set(str(f))
    assert get_class_set(str(f), name="mine").name == "mine"


# -- 6. control characters in class names -----------------------------------------------------------

@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "tab\there", "nel\x85x", "ls\u2028x", "nul\0"])
def test_class_names_with_line_breaks_or_controls_are_refused(bad, tmp_path):
    with pytest.raises(ClassSetError, match="contains a line break or control character"):
        class_set_from_names(["cat", bad], "pets")
    if "\n" not in bad and "\r" not in bad:
        f = tmp_path / "pets.txt"
        f.write_text(f"cat\n{bad}\n", encoding="utf-8")
        with pytest.raises(ClassSetError, match="contains a line break or control character"):
            get_class_set(str(f))


def test_exported_class_set_round_trips(tiny, art):
    from export.onnx_export import add_class_set

    names = ["tabby cat", "Straße", "日本", "a,b"[:1]]
    add_class_set(art, tiny, class_set_from_names(names, "pets"))
    entry = json.loads((art / "manifest.json").read_text())["class_sets"]["pets"]
    assert entry["labels_sha256"] == sha256_path(art / "classes" / "pets.txt")
    assert load_artifacts(art).load_class_set("pets").labels == names


# -- 5. class-set files are checked before use ------------------------------------------------------

def test_reordered_embeddings_are_refused(art):
    npy = art / "classes" / "voc.npy"
    np.save(npy, np.load(npy)[::-1])
    with pytest.raises(ArtifactsError, match=r"voc\.npy: sha256 .* does not match the manifest"):
        load_artifacts(art).load_class_set("voc")


def test_altered_labels_are_refused(art):
    lab = art / "classes" / "voc.txt"
    lines = lab.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    lab.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactsError, match=r"voc\.txt: sha256 does not match the manifest's labels_sha256"):
        load_artifacts(art).load_class_set("voc")


@pytest.mark.parametrize("array, match", [
    (np.array([["x"] * 64] * 20), "dtype <U1, expected a float type"),
    (np.ones((20, 64), np.int64), "dtype int64, expected a float type"),
    (np.ones((20, 64), np.complex64), "dtype complex64, expected a float type"),
    (np.ones((20, 63), np.float32), r"shape \(20, 63\), expected \(20, 64\)"),
    (np.array([None] * 20, dtype=object), "dtype object"),
])
def test_embeddings_of_the_wrong_dtype_or_shape_are_refused(art, array, match):
    npy = art / "classes" / "voc.npy"
    np.save(npy, array, allow_pickle=True)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match=match):
        load_artifacts(art).load_class_set("voc")


def test_header_claiming_a_huge_shape_is_refused_before_reading(art):
    npy = art / "classes" / "voc.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (20, 1 << 40)}
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match=r"shape \(20, 1099511627776\), expected \(20, 64\)"):
        load_artifacts(art).load_class_set("voc")
    header["shape"] = (20, 64)
    with open(npy, "wb") as f:  # right header, truncated data
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match="file size does not match its header"):
        load_artifacts(art).load_class_set("voc")


def test_cli_refuses_tampered_class_set_with_exit_2(art, tmp_path, capsys):
    npy = art / "classes" / "voc.npy"
    np.save(npy, np.load(npy)[::-1])
    img = write_good(tmp_path / "in", 1)[0]
    code, _, err = run_cli([img, "--artifacts", art, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "voc.npy: sha256" in err and err.count("error:") == 1


# -- 8. one manifest schema -------------------------------------------------------------------------

def _drop(path):
    def fn(m):
        *head, last = path
        d = m
        for k in head:
            d = d[k]
        del d[last]
        return m
    return fn


def _set(path, value):
    def fn(m):
        *head, last = path
        d = m
        for k in head:
            d = d[k]
        d[last] = value
        return m
    return fn


BAD_MANIFESTS = [
    (_drop(("graphs", "explain", "file")), "field 'graphs.explain.file': missing"),
    (_drop(("graphs", "classify", "sha256")), "field 'graphs.classify.sha256': missing"),
    (_set(("graphs", "explain", "sha256"), "abc"), "field 'graphs.explain.sha256': expected 64 lowercase hex digits"),
    (_set(("graphs",), ["explain.onnx"]), "field 'graphs': expected an object, got list"),
    (lambda m: None, "the manifest must be a JSON object, got NoneType"),
    (lambda m: [m], "the manifest must be a JSON object, got list"),
    (_set(("input_size",), 0), r"field 'input_size': 0 is out of range \(valid: >= 1 and <= 4096\)"),
    (_set(("input_size",), 100000), "field 'input_size': 100000 is out of range"),
    (_set(("input_size",), "224"), "field 'input_size': expected an integer, got str"),
    (_set(("input_size",), True), "field 'input_size': expected an integer, got bool"),
    (_set(("mean",), [0.5, 0.5]), "field 'mean': expected 3 values, got 2"),
    (_set(("std",), [0.2, 0, 0.2]), r"field 'std\[1\]': 0 is out of range \(valid: > 0"),
    (_set(("std",), [0.2, "x", 0.2]), r"field 'std\[1\]': expected a number, got str"),
    (_set(("logit_scale",), "100"), "field 'logit_scale': expected a number"),
    (_set(("logit_scale",), float("nan")), "field 'logit_scale': expected a finite number"),
    (_set(("dims", "C"), 0), "field 'dims.C': 0 is out of range"),
    (_drop(("dims", "h")), "field 'dims.h': missing"),
    (_set(("format_version",), 7), "field 'format_version': 7 is not one of 1"),
    (_set(("family",), "vit"), "field 'family': 'vit' is not one of 'clip', 'pooled-linear'"),
    (_set(("preprocess",), {"resize": "pad"}), "field 'preprocess.resize': 'pad' is not one of"),
    (_set(("preprocess",), {"resize_size": 0}), "field 'preprocess.resize_size': 0 is out of range"),
    (_set(("preprocess",), {"interpolation": "lanczos"}), "field 'preprocess.interpolation'"),
    (_set(("preprocess",), {"resize_size": 100}), "field 'preprocess.resize_size': 100 is smaller than input_size 128"),
    (_set(("graphs", "explain", "file"), "../../etc/passwd"), "field 'graphs.explain.file': expected a relative path inside"),
    (_set(("class_sets", "voc", "labels"), "/etc/passwd"), "field 'class_sets.voc.labels': expected a relative path"),
    (_drop(("class_sets", "voc", "embeddings")), "field 'class_sets.voc.embeddings': missing \\(needed by the clip"),
    (_drop(("class_sets", "voc", "sha256")), "field 'class_sets.voc.sha256': missing"),
    (_set(("default_class_set",), "imagenet"), "field 'default_class_set': 'imagenet' is not one of the class sets"),
    (lambda m: (m["class_sets"].update({"../x": m["class_sets"]["voc"]}), m)[1], "field 'class_sets': name '../x' is not a plain identifier"),
]


@pytest.mark.parametrize("fn, match", BAD_MANIFESTS)
def test_malformed_manifests_fail_at_load_naming_the_field(tiny_artifacts, fn, match):
    m = fn(copy.deepcopy(tiny_artifacts.manifest))
    with pytest.raises(ManifestError, match=r"^x/manifest\.json: " + match):
        validate_manifest(m, "x/manifest.json")


def test_malformed_manifest_is_one_line_exit_2_in_the_cli(art, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    for fn, frag in ((_set(("input_size",), 100000), "field 'input_size'"), (_drop(("graphs", "explain", "file")),
                     "field 'graphs.explain.file'"), (lambda m: None, "must be a JSON object")):
        shutil.copy(tmp_path / "art" / "manifest.json", tmp_path / "m.bak")
        edit_manifest(art, fn)
        code, _, err = run_cli([img, "--artifacts", art, "--out", tmp_path / "o"], capsys)
        assert code == 2 and err.count("error:") == 1 and "manifest.json: " in err and frag in err, err
        shutil.copy(tmp_path / "m.bak", tmp_path / "art" / "manifest.json")


def test_optional_fields_of_other_families_are_accepted(tiny_artifacts):
    m = copy.deepcopy(tiny_artifacts.manifest)
    m["family"] = "pooled-linear"
    m["preprocess"] = {"resize": "crop", "resize_size": 232, "interpolation": "bilinear"}
    m["class_sets"]["voc"].pop("embeddings")
    m["class_sets"]["voc"].pop("sha256")
    del m["dims"]["D"]
    for g in m["graphs"].values():
        g["inputs"] = [t for t in g["inputs"] if t["name"] != "text"]
    assert validate_manifest(m) is m


def test_manifest_preprocess_settings_are_used(art):
    """preprocess.resize_size / interpolation in the manifest reach runtime.images.preprocess."""
    from runtime.explainer import Explainer
    from runtime.images import preprocess
    from tests.conftest import make_images

    edit_manifest(art, _set(("preprocess",), {"resize_size": 160, "interpolation": "bilinear"}))
    ex = Explainer.from_artifacts(art)
    rgb = make_images(1, seed=5)[0]                       # 150 x 200
    e = ex.explain(rgb, top_p=2)
    x, g = preprocess(rgb, 128, ex.artifacts.mean, ex.artifacts.std, resize_size=160, interpolation="bilinear")
    assert e.geometry == g and round(g.scale_h * 150) == 160
    np.testing.assert_array_equal(e.input_rgb, np.asarray(
        np.clip(np.rint((x.transpose(1, 2, 0) * np.float32(ex.artifacts.std) + np.float32(ex.artifacts.mean)) * 255),
                0, 255), np.uint8))


# -- 10. checkpoints that are not checkpoints -------------------------------------------------------

def test_broken_checkpoints_are_one_line_model_errors(tiny, tmp_path):
    from safetensors.torch import save_file

    model = load_model("RN-tiny", "none").model
    cases = {}
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = r"empty file \(0 bytes\)"
    (tmp_path / "zero.pt").write_bytes(b"\0" * 10)
    cases["zero.pt"] = "not a loadable checkpoint"
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["cut.safetensors"] = r"not a loadable \.safetensors file \(SafetensorError"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 100)
    cases["junk.safetensors"] = r"not a loadable \.safetensors file"
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
        z.writestr("archive/constants.pkl", b"garbage")
        z.writestr("archive/data.pkl", b"garbage")
    cases["script.pt"] = "a TorchScript archive, refused: loading one can run code stored in it"
    (tmp_path / "tensor.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "tensor.pt")
    cases["tensor.pt"] = "expected a state dict of named tensors, found list"
    for name, match in cases.items():
        with pytest.raises(ModelError, match=rf"{name}: {match}") as e:
            load_checkpoint(model, tmp_path / name)
        assert "\n" not in str(e.value)
    load_checkpoint(model, good)  # the intact file loads


def test_export_cli_checkpoint_error_is_one_line(tmp_path, capsys):
    """One line, exit 1, and no empty --out folder left behind (a failed export left one)."""
    (tmp_path / "empty.pt").write_bytes(b"")
    code = export_main(["--model", "RN-tiny", "--pretrained", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "empty file" in err
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()                                   # a folder that was there before stays
    assert export_main(["--model", "RN-tiny", "--pretrained", str(tmp_path / "empty.pt"), "--out",
                        str(tmp_path / "b")]) == 1
    assert (tmp_path / "b").is_dir()


def test_a_pickle_checkpoint_is_one_line(tmp_path, capfd):
    """torch.load's 2-line UserWarning came before the one-line error."""
    torch.save({"layer": object()}, tmp_path / "pickled.pt")
    code = export_main(["--model", "resnet-tiny", "--pretrained", str(tmp_path / "pickled.pt"), "--out",
                        str(tmp_path / "a")])
    err = capfd.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pickled.pt: not a loadable checkpoint" in err, err


def test_torchscript_code_never_runs(tmp_path, capfd):
    """A TorchScript checkpoint whose __setstate__ prints: it ran before the "does not fit" refusal. Now the
    archive is refused from its zip listing, before anything is loaded."""
    from typing import Tuple

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.zeros(1)

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
            print("CHECKPOINT CODE RAN")
            self.w = state[0]
            self.training = state[1]

    torch.jit.save(torch.jit.script(Evil()), str(tmp_path / "evil.pt"))
    torch.jit.load(str(tmp_path / "evil.pt"))                  # the archive's code does run when loaded
    assert "CHECKPOINT CODE RAN" in capfd.readouterr().out
    for model in ("resnet-tiny", "RN-tiny"):
        code = export_main(["--model", model, "--pretrained", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "a")])
        out, err = capfd.readouterr()
        assert code == 1 and "CHECKPOINT CODE RAN" not in out + err
        assert err.count("\n") == 1 and "evil.pt: a TorchScript archive, refused" in err


# -- 7. export --out that is a file -----------------------------------------------------------------

@pytest.mark.parametrize("sub", ["", "below"])
def test_export_out_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys, sub):
    f = tmp_path / "afile"
    f.write_text("x")
    out = f / sub if sub else f
    code = export_main(["--model", "RN-tiny", "--pretrained", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--out {out}: cannot create or write the artifacts folder" in err
