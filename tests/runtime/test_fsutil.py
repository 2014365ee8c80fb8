"""runtime.fsutil: temporaries that cannot be hijacked, atomic replacement, stale clean-up; and every file
written by runtime/ and export/ goes through it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import fsutil

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


def test_stale_temporaries_of_a_killed_process_are_removed_but_live_ones_kept(tmp_path):
    code = ("import os, signal, sys\nfrom runtime.fsutil import atomic_open\n"
            "with atomic_open(sys.argv[1]) as f:\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)]
    assert len(left) == 1 and not (tmp_path / "x.png").exists()
    (tmp_path / ".old.json.part4194303").write_bytes(b"")      # the previous naming, pid beyond pid_max
    (tmp_path / fsutil.temp_dir(tmp_path).name / "g.onnx").write_bytes(b"")  # a live folder of this process
    mine = tmp_path / fsutil.temp_name()
    mine.write_bytes(b"")                                       # a live file of this process
    removed = {p.name for p in fsutil.remove_stale_temporaries(tmp_path)}
    assert removed == {left[0], ".old.json.part4194303"}
    assert mine.exists() and len([n for n in os.listdir(tmp_path) if fsutil.is_temp_name(n)]) == 2


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
