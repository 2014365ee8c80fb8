"""`python -m runtime.explain` against a hostile user: planted symlinks, devices and FIFOs as inputs, symlink
loops, interrupts, odd output folders, out-of-range options, outputs inside the input folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.explain import main as explain_main
from tests.runtime.test_cli import OUTPUTS, ROOT, leftovers, run_cli, write_good


def art(tiny_artifacts) -> list[str]:
    return ["--artifacts", str(tiny_artifacts.out_dir)]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# -- 1. temporaries ---------------------------------------------------------------------------------

def test_symlinks_planted_at_the_old_temporary_names_are_not_followed(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for s in OUTPUTS:  # the predictable `.NAME.partPID` names of earlier versions
        (out / f".{img.stem}{s}.part{os.getpid()}").symlink_to(victim)
    code, _, err = run_cli([img, *art(tiny_artifacts), "--out", out], capsys)
    assert code == 0, err
    assert victim.read_text() == "precious"
    for s in OUTPUTS:
        assert (out / f"{img.stem}{s}").is_file() and not (out / f"{img.stem}{s}").is_symlink()


def test_export_writes_do_not_follow_planted_symlinks(tiny, tiny_artifacts, tmp_path):
    import shutil

    from export.classes import class_set_from_names
    from export.onnx_export import add_class_set

    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    pid = os.getpid()
    for name in (f".manifest.json.tmp{pid}", f"classes/.pets.tmp{pid}.npy", f"classes/.pets.txt.tmp{pid}"):
        (a / name).symlink_to(victim)
    add_class_set(a, tiny, class_set_from_names(["cat", "dog"], "pets"))
    assert victim.read_text() == "precious"
    assert "pets" in json.loads((a / "manifest.json").read_text())["class_sets"]


# -- 2. devices, FIFOs, huge files ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_devices_and_fifos_are_refused_without_reading_or_blocking(tiny_artifacts, tmp_path, capsys):
    good = write_good(tmp_path / "in", 1)[0]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, stdout, err = run_cli(["/dev/zero", fifo, good, *art(tiny_artifacts), "--out", tmp_path / "out"], capsys)
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 2, lines
    assert "/dev/zero: is a character device; only regular image files are read" in lines[0]
    assert "pipe.png: is a FIFO" in lines[1]
    assert (tmp_path / "out" / "good0.json").is_file() and "explained 1 of 3" in stdout


def test_max_bytes_refuses_big_files_before_reading(tiny_artifacts, tmp_path, capsys):
    good = write_good(tmp_path / "in", 1)[0]
    size = good.stat().st_size
    code, _, err = run_cli([good, *art(tiny_artifacts), "--out", tmp_path / "out", "--max-bytes", size - 1], capsys)
    assert code == 1 and f"{size:,} bytes is over the file size limit max_bytes={size - 1:,}" in err
    code, _, err = run_cli([good, *art(tiny_artifacts), "--out", tmp_path / "out", "--max-bytes", size], capsys)
    assert code == 0, err


# -- 3. symlink loops -------------------------------------------------------------------------------

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


# -- 12. interrupts, leftovers of a killed run, long names ------------------------------------------

@pytest.mark.parametrize("how, code_, word", [("int", 130, "interrupted (Ctrl-C)"), ("term", 143, "terminated (SIGTERM)")])
def test_interrupt_is_one_line_and_leaves_no_temporaries(tiny_artifacts, tmp_path, capsys, monkeypatch, how, code_, word):
    import runtime.render as render

    imgs = write_good(tmp_path / "in", 2)
    real = render.npz_bytes

    sent = []

    def interrupted(exp):
        if how == "int":
            raise KeyboardInterrupt
        if not sent:  # one SIGTERM, sent while the pictures are encoded (a thread of the image pool)
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(exp)

    monkeypatch.setattr(render, "npz_bytes", interrupted)
    code, _, err = run_cli([*imgs, *art(tiny_artifacts), "--out", tmp_path / "out"], capsys)
    assert code == code_
    assert "Traceback" not in err and [ln for ln in err.splitlines() if word in ln] == [
        f"{word}: finished outputs are kept; rerun the same command to resume"]
    assert not leftovers(tmp_path / "out")


def test_real_sigint_in_a_subprocess(tiny_artifacts, tmp_path):
    """A real Ctrl-C (SIGINT) while the CLI runs: exit 130, one line, no traceback. The child starts with
    Python's own SIGINT handler, as under an interactive shell: a suite launched in the background (nohup,
    `&` without job control) inherits SIGINT ignored, and Python keeps it ignored."""
    imgs = write_good(tmp_path / "in", 2)
    code = ("import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import runtime.render as r\n"
            "r.write_payloads = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)\n"
            "from runtime.explain import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, imgs), *art(tiny_artifacts), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_and_nothing_else(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "out"
    code = ("import os, signal, sys\nfrom runtime.fsutil import atomic_open\n"
            "with atomic_open(sys.argv[1]) as f:\n    f.write(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    out.mkdir()
    subprocess.run([sys.executable, "-c", code, str(out / "good0.npz")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    (out / f".good0.json.part{4194303}").write_bytes(b"half")  # an earlier naming: not provably ours, kept
    assert len(os.listdir(out)) == 2
    img = write_good(tmp_path / "in", 1)[0]
    assert run_cli([img, *art(tiny_artifacts), "--out", out], capsys)[0] == 0
    assert sorted(os.listdir(out)) == sorted([f".good0.json.part{4194303}"] + [f"good0{s}" for s in OUTPUTS])


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


# -- 7. --out that cannot be used -------------------------------------------------------------------

def test_unusable_out_is_one_line_exit_2(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, frag in ((afile, "cannot create the output folder"), (afile / "sub", "cannot create the output folder"),
                      ("/proc/decomcam-out", "cannot create the output folder")):
        code, _, err = run_cli([img, *art(tiny_artifacts), "--out", out], capsys)
        assert code == 2, (out, err)
        assert error_lines(err) == [ln for ln in err.splitlines() if not ln.startswith("note:")]
        assert len(error_lines(err)) == 1 and f"--out {out}: {frag}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line_exit_2(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, _, err = run_cli([img, *art(tiny_artifacts), "--out", ro], capsys)
    assert code == 2 and "cannot write in the output folder" in err


# -- 11. options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt, value, rng", [
    ("--group", "-2", "[1, 4,096]"), ("--group", "0", "[1, 4,096]"), ("--max-pixels", "0", "[1, "),
    ("--max-pixels", "-1", "[1, "), ("--max-bytes", "0", "[1, "), ("--blur-sigma", "inf", "(0, 1000]"),
    ("--blur-sigma", "nan", "(0, 1000]"), ("--blur-sigma", "0", "(0, 1000]"), ("--threads", "-1", "[1, 1,024]"),
    ("--threads", "0", "[1, 1,024]"), ("--batch-size", "0", "[1, 4,096]"), ("--top-p", "0", "[1, 4,096]"),
    ("--device-id", "-1", "[0, 1,023]"), ("--top-p", "many", "expected an integer"),
])
def test_options_are_validated_at_parse_time(tiny_artifacts, capsys, opt, value, rng):
    with pytest.raises(SystemExit) as e:
        explain_main(["x.jpg", *art(tiny_artifacts), opt, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: argument {opt}:") and rng in err


# -- 13. --out inside an input folder ---------------------------------------------------------------

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


# -- 9. graphs a method needs are checked up front --------------------------------------------------

@pytest.mark.parametrize("method, graph", [("ablationcam", "head.onnx"), ("eigencam", "features.onnx")])
def test_missing_or_tampered_method_graph_is_exit_2_before_any_image(tiny_artifacts, tmp_path, capsys, method, graph):
    import shutil

    imgs = write_good(tmp_path / "in", 2)
    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    with open(a / graph, "ab") as f:
        f.write(b"\0")
    code, stdout, err = run_cli([*imgs, "--artifacts", a, "--out", tmp_path / "o", "--method", method], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{graph}: sha256" in err
    (a / graph).unlink()
    code, stdout, err = run_cli([*imgs, "--artifacts", a, "--out", tmp_path / "o", "--method", method], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{graph}: graph file missing" in err
    assert not (tmp_path / "o").exists()


# -- 15. progress bar --------------------------------------------------------------------------------

def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tiny_artifacts, tmp_path, capsys, monkeypatch):
    import io

    imgs = write_good(tmp_path / "in", 3)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for quiet in (False, True):
        fake = Tty()
        monkeypatch.setattr(sys, "stderr", fake)
        args = [*imgs, *art(tiny_artifacts), "--out", tmp_path / f"o{quiet}", *(["--quiet"] if quiet else [])]
        assert explain_main([str(a) for a in args]) == 0
        monkeypatch.undo()
        text = fake.getvalue()
        assert ("3/3" in text) == (not quiet), text
        assert ("img/s" in text) == (not quiet)
