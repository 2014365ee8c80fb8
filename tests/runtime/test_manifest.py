"""One manifest schema (runtime/manifest.py): a malformed manifest fails at load naming the field, is one line
and exit 2 in the CLI; optional fields of other families are accepted; the preprocess settings are used."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

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


