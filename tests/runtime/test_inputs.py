"""runtime/inputs.py through the command line: folder and glob walks (symlink loops, the standard library's
glob semantics), the output folder never walked, and output names too long for the file system."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.test_cli import run_cli, write_good


def art(tiny_artifacts) -> list[str]:
    return ["--artifacts", str(tiny_artifacts.out_dir)]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.timeout(60)
def test_recursive_glob_and_folder_survive_a_symlink_loop(tiny_artifacts, tmp_path, capsys, monkeypatch):
    d1 = tmp_path / "d1"
    write_good(d1 / "sub", 1)
    (d1 / "sub" / "loop").symlink_to(d1, target_is_directory=True)
    (d1 / "sub" / "loop2").symlink_to(d1 / "sub", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for spec in ("d1/**/*.png", "d1", str(d1 / "**" / "*.png")):
        out = tmp_path / f"out-{len(spec)}"
        code, stdout, err = run_cli([spec, *art(tiny_artifacts), "--out", out], capsys)
        assert code == 0, (spec, err)
        assert "explained 1 of 1" in stdout and [p.name for p in out.glob("*.json")] == ["good0.json"]


def test_glob_semantics_match_the_standard_library(tmp_path, monkeypatch):
    from runtime.inputs import expand_inputs

    for rel in ("a.png", "b.jpg", "s/c.png", "s/t/d.png", ".h/e.png", "s/.f.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    import glob

    for spec in ("*.png", "**/*.png", "s/*.png", "s/**/*.png", "*/*.png", "**", "s/t/?.png", "[ab].*"):
        want = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        got, _ = expand_inputs([spec])
        assert sorted(got) == want, spec


def test_out_inside_an_input_folder_is_not_explained_again(tiny_artifacts, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_good(folder, 2)
    out = folder / "explained"
    for spec in (folder, str(folder / "**" / "*.png")):
        for _ in range(2):
            code, stdout, err = run_cli([spec, *art(tiny_artifacts), "--out", out], capsys)
            assert code == 0, err
        assert "explained 0 of 2 inputs" in stdout and "2 skipped" in stdout
        assert sorted(p.name for p in out.glob("*.json")) == ["good0.json", "good1.json"]


def test_long_input_names(tiny_artifacts, tmp_path, capsys):
    import shutil

    src = write_good(tmp_path / "src", 1)[0]
    folder = tmp_path / "in"
    folder.mkdir()
    n244 = folder / ("a" * 240 + ".png")   # 244 bytes: the outputs fit exactly in 255
    n255 = folder / ("b" * 251 + ".png")   # 255 bytes: the output names are shortened, with a hash
    for p in (n244, n255):
        shutil.copy(src, p)
    out = tmp_path / "out"
    code, _, err = run_cli([n244, n255, *art(tiny_artifacts), "--out", out], capsys)
    assert code == 0, err
    assert (out / f"{'a' * 240}.components.png").is_file()
    short = [p.name for p in out.glob("b*.json")]
    assert len(short) == 1 and len(short[0].encode()) <= 255 - len(".components.png") + len(".json")
