"""Class sets (export/classes.py) against a hostile user: names are plain identifiers, class names hold no line
breaks or control characters, an exported set round-trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.__main__ import main as export_main
from export.classes import ClassSetError, class_set_from_names, get_class_set
from runtime.artifacts import load_artifacts, sha256_path


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


