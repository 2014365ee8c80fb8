"""runtime.fsutil: temporaries that cannot be hijacked, atomic replacement, stale clean-up; and every file
written by runtime/ and export/ goes through it."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import fsutil
from tests.runtime.test_cli import OUTPUTS, run_cli, write_good

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_write_replaces_and_leaves_nothing(tmp_path):
    dest = tmp_path / "a.bin"
    fsutil.atomic_write(dest, b"one")
    fsutil.atomic_write(dest, "two")
    assert dest.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failure_inside_atomic_open_removes_the_temporary(tmp_path):
    dest = tmp_path / "a.npy"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_open(dest) as f:
            np.save(f, np.zeros(3))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_planted_symlink_at_the_temporary_name_is_never_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    names = iter(["0123456789abcdef", "fedcba9876543210"])
    monkeypatch.setattr(fsutil.secrets, "token_hex", lambda n: next(names))
    planted = tmp_path / f"{fsutil.TEMP_PREFIX}{os.getpid()}-0123456789abcdef{fsutil.TEMP_SUFFIX}"
    planted.symlink_to(victim)
    fsutil.atomic_write(tmp_path / "out.json", b"{}")
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.json").read_bytes() == b"{}" and not (tmp_path / "out.json").is_symlink()
    assert planted.is_symlink()  # someone else's link is left as it is


def test_temporary_name_has_a_fixed_short_length(tmp_path):
    long_name = "x" * 250 + ".png"
    fsutil.atomic_write(tmp_path / long_name, b"1")  # a `.NAME.partPID` temporary would be over 255 bytes
    assert (tmp_path / long_name).read_bytes() == b"1"
    assert len(fsutil.temp_name()) < 48 and fsutil.is_temp_name(fsutil.temp_name())


def _killed_writer(tmp_path) -> str:
    """A subprocess killed with SIGKILL while writing tmp_path/x.png: the name of the temporary it left."""
    code = ("import os, signal, sys\nfrom runtime.fsutil import atomic_open\n"
            "with atomic_open(sys.argv[1]) as f:\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)]
    assert len(left) == 1 and not (tmp_path / "x.png").exists()
    return left[0]


def test_stale_temporaries_of_a_killed_process_are_removed_but_live_ones_kept(tmp_path):
    dead = _killed_writer(tmp_path)
    (tmp_path / fsutil.temp_dir(tmp_path).name / "g.onnx").write_bytes(b"")  # a live folder of this process
    mine = tmp_path / fsutil.temp_name()
    mine.write_bytes(b"")                                       # a live file of this process
    removed = {p.name for p in fsutil.remove_stale_temporaries(tmp_path)}
    assert removed == {dead}
    assert mine.exists() and len([n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)]) == 2


def test_the_users_files_and_folders_are_never_removed(tmp_path):
    """Names of earlier schemes (`.NAME.partPID`, `.NAME.tmpPID`), folders, symlinks and look-alikes are not
    this tool's provable temporaries: the clean-up leaves every one of them, whatever their pid."""
    (tmp_path / ".thesis.part99999").mkdir()
    (tmp_path / ".thesis.part99999" / "ch1.tex").write_text("work")
    (tmp_path / ".notes.tmp4000000").write_text("n")
    (tmp_path / ".old.json.part4194303").write_bytes(b"")
    dead_pid = 4194303  # beyond the default pid_max: no such process
    folder = tmp_path / f"{fsutil.TEMP_PREFIX}{fsutil.node_id()}-{dead_pid}-0123456789abcdef{fsutil.TEMP_SUFFIX}"
    folder.mkdir()
    (folder / "kept").write_text("k")
    target = tmp_path / "precious.txt"
    target.write_text("p")
    link = tmp_path / f"{fsutil.TEMP_PREFIX}{fsutil.node_id()}-{dead_pid}-fedcba9876543210{fsutil.TEMP_SUFFIX}"
    link.symlink_to(target)
    (tmp_path / f"{fsutil.TEMP_PREFIX}{dead_pid}-0123456789abcdef{fsutil.TEMP_SUFFIX}").write_text("x")  # no node
    before = sorted(os.listdir(tmp_path))
    assert fsutil.remove_stale_temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / ".thesis.part99999" / "ch1.tex").read_text() == "work" and target.read_text() == "p"
    assert fsutil.stale_temporary_folders(tmp_path) == [folder]  # named to the user, not removed


def test_the_cli_leaves_the_users_files_in_out(tmp_path, resnet_tiny_artifacts):
    """The probe's case: a folder and a file of the user's in --out, named like an earlier temporary scheme."""
    out = tmp_path / "o"
    (out / ".thesis.part99999").mkdir(parents=True)
    (out / ".thesis.part99999" / "ch1.tex").write_text("work")
    (out / ".notes.tmp4000000").write_text("n")
    img = tmp_path / "img.png"
    import cv2
    cv2.imwrite(str(img), np.full((40, 50, 3), 90, np.uint8))
    r = subprocess.run([sys.executable, "-m", "runtime.explain", str(img), "--artifacts", str(resnet_tiny_artifacts),
                        "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / ".thesis.part99999" / "ch1.tex").read_text() == "work"
    assert (out / ".notes.tmp4000000").read_text() == "n"


def _foreign(tmp_path, age_s: float) -> Path:
    """A temporary named by a writer of another node or PID namespace, last modified age_s ago."""
    other = "0" * 8 if fsutil.node_id() != "0" * 8 else "1" * 8
    p = tmp_path / f"{fsutil.TEMP_PREFIX}{other}-{os.getpid()}-{secrets.token_hex(8)}{fsutil.TEMP_SUFFIX}"
    p.write_bytes(b"half")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_a_foreign_writers_temporary_is_kept_until_old_and_unlocked(tmp_path):
    """A writer in another PID namespace or on another node: its pid means nothing here, so only an old
    (FOREIGN_STALE_AFTER_S) and unlocked temporary is removed."""
    recent = _foreign(tmp_path, 60)
    old = _foreign(tmp_path, fsutil.FOREIGN_STALE_AFTER_S + 60)
    old_locked = _foreign(tmp_path, fsutil.FOREIGN_STALE_AFTER_S + 60)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); sys.stdin.read()", str(old_locked)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = fsutil.remove_stale_temporaries(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [old]
    assert recent.exists() and old_locked.exists() and not old.exists()


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid (root or user namespaces)")
def test_a_live_run_in_another_pid_namespace_keeps_its_temporary(tmp_path):
    """The probe's case: a live writer, and a clean-up run in a new PID namespace (a container, or a Ray
    worker on another node) where the writer's pid does not exist or is another process."""
    code = ("import sys, time\nfrom runtime.fsutil import atomic_open\n"
            "with atomic_open(sys.argv[1]) as f:\n    f.write(b'half'); f.flush(); print('writing', flush=True); "
            "time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x.png")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert writer.stdout.readline().strip() == "writing"
        live = [n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)]
        clean = ("import sys\nfrom runtime.fsutil import remove_stale_temporaries\n"
                 "print(len(remove_stale_temporaries(sys.argv[1])))")
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", clean, str(tmp_path)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "0"
        assert [n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)] == live
    finally:
        writer.kill()
        writer.wait()


_RAW_WRITE = re.compile(
    r"""(\.write_(text|bytes)\(|\bopen\([^)]*["'][wax]b?\+?["']|np\.save[z]?\(\s*(str\(|tmp|path|p\b|[a-z_]+_path)"""
    r"""|os\.replace\(|torch\.save\([^)]*,\s*(tmp|path|str\())""")


def test_every_file_write_goes_through_fsutil():
    """runtime/ and export/ write files only with runtime.fsutil (np.save to an in-memory buffer or to an
    atomic_open handle is fine); fsutil itself and the export's private temporary folder are the exceptions."""
    allowed = {("export/writing.py", "os.replace(p, out_dir / graph_specs[name].filename)"),
               ("export/quantize.py", 'os.replace(tmp / entry["file"], dst)'),
               ("export/precision.py", "os.replace(p, final)   # out of the private temporary folder")}
    hits = []
    for pkg in ("runtime", "export"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "runtime/fsutil.py":
                continue
            for line in path.read_text().splitlines():
                if _RAW_WRITE.search(line) and not any(rel == a and s in line for a, s in allowed):
                    hits.append(f"{rel}: {line.strip()}")
    assert hits == []


# -- through the command line ---------------------------------------------------------------------


def art(tiny_artifacts) -> list[str]:
    return ["--artifacts", str(tiny_artifacts.out_dir)]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


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
