"""runtime/artifacts.py and runtime/manifest.py against malformed or contradictory exports: one line naming
manifest.json (or the graph), exit 2, before any image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.runtime.test_cli import run_cli, write_good


def _copy(src, dest: Path, edit=None, raw: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if raw is not None:
        (dest / "manifest.json").write_text(raw)
    elif edit is not None:
        man = json.loads((dest / "manifest.json").read_text())
        edit(man, dest)
        (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def _usage_error(art: Path, tmp_path, capsys, method: str = "decomcam") -> str:
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "o"
    code, stdout, err = run_cli([img, "--artifacts", art, "--out", out, "--method", method], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not (out / "good0.json").exists()
    return lines[0]


@pytest.mark.parametrize("raw, problem", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
    ('{"input_size": 1' + "0" * 5000 + "}", "not valid JSON (Exceeds the limit (4300 digits)"),
])
def test_unparsable_manifests_are_one_line(resnet_tiny_artifacts, tmp_path, capsys, raw, problem):
    """100,000 nested arrays (RecursionError, exit 1 with a traceback before) and a 5,000-digit integer (exit 2
    without naming manifest.json before)."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", raw=raw)
    line = _usage_error(art, tmp_path, capsys)
    assert line.startswith(f"error: {art / 'manifest.json'}: {problem}"), line


def test_a_huge_integer_is_a_field_error(resnet_tiny_artifacts, tmp_path, capsys):
    """A 400-digit input_size raised OverflowError (exit 1, traceback)."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", edit=lambda m, d: m.update(input_size=10 ** 400))
    line = _usage_error(art, tmp_path, capsys)
    assert line.startswith(f"error: {art / 'manifest.json'}: field 'input_size': 10000000000000000000... (401 "
                           f"digits) is out of range"), line


def _swap(man: dict, dest: Path) -> None:
    """explain.onnx replaced by classify.onnx, its sha256 updated in the manifest."""
    shutil.copy(dest / "classify.onnx", dest / "explain.onnx")
    man["graphs"]["explain"]["sha256"] = hashlib.sha256((dest / "explain.onnx").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit, method, problem", [
    (lambda m, d: m.update(input_size=m["input_size"] // 2), "decomcam",
     "manifest.json: field 'dims.H': 64 differs from input_size 32"),
    (lambda m, d: (m.update(input_size=m["input_size"] // 2),
                   m["dims"].update(H=m["input_size"], W=m["input_size"])), "decomcam",
     "classify.onnx: input 'image' axis H is 64 in the graph and 32 in manifest.json"),
    (_swap, "decomcam", "explain.onnx: has no input 'target'"),
    (lambda m, d: m["dims"].update(C=m["dims"]["C"] // 2), "gradcam",
     "explain.onnx: output 'activations' axis C is 512 in the graph and 256 in manifest.json"),
    (lambda m, d: m["dims"].update(h=m["dims"]["h"] + 1), "decomcam-ig",
     "features.onnx: output 'activations' axis h is 2 in the graph and 3 in manifest.json"),
    (lambda m, d: m["dims"].update(K=m["dims"]["K"] + 1), "scorecam",
     "classes/voc10.txt: 10 labels for a classifier with 11 classes"),
])
def test_a_manifest_that_contradicts_its_graphs_is_refused_at_load(resnet_tiny_artifacts, tmp_path, capsys, edit,
                                                                     method, problem):
    """input_size halved, explain.onnx swapped for classify.onnx with its sha256 updated, dims.C / h / K
    changed: before, each failed per image with exit 1, or not at all."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", edit=edit)
    line = _usage_error(art, tmp_path, capsys, method)
    assert problem in line, line
