"""Safe file writing: atomic replacement through temporaries that cannot be hijacked, and their clean-up.

Every file the toolkit writes (runtime outputs, export graphs, manifests, class sets, caches, reports)
goes through ``atomic_write`` / ``atomic_open`` / ``temp_dir`` here:

    * the temporary lives in the destination folder (so ``os.replace`` is an atomic rename on one file
      system) under a random name ``.decomcam-<pid>-<random>.tmp`` of fixed length (a long destination
      name never makes the temporary name too long);
    * it is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted at that name makes
      the creation fail instead of writing through it (a new random name is then tried);
    * it is renamed over the destination with ``os.replace`` (a symlink at the destination is replaced,
      never followed), optionally after ``fsync``;
    * on any failure, Ctrl-C included, the temporary is removed.

A run killed with SIGKILL cannot clean up; ``remove_stale_temporaries(folder)`` removes the temporaries
whose owning process no longer exists (the pid is in the name), so concurrent live runs are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

TEMP_PREFIX = ".decomcam-"
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-[0-9a-f]{{16}}{re.escape(TEMP_SUFFIX)}$")
_LEGACY_RE = re.compile(r"^\..+\.(?:part|tmp)(\d+)(?:\.npy)?$")  # `.NAME.partPID` of earlier versions
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temp_name() -> str:
    """A fresh temporary name: fixed prefix and suffix, this process's pid, 64 random bits."""
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _create_temp(folder: Path, mode: int = 0o666) -> tuple[int, Path]:
    """Exclusively create a new temporary file in `folder` (never through a symlink): (fd, path)."""
    for _ in range(100):
        path = folder / temp_name()
        try:
            return os.open(path, _OPEN_FLAGS, mode), path
        except FileExistsError:  # a planted file or link, or (astronomically unlikely) a collision
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(folder))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = False, encoding: str | None = None):
    """Open a temporary next to `path` for writing; on a clean exit it replaces `path`, else it is removed.

        with atomic_open(out / "x.npy") as f:
            np.save(f, array)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = _create_temp(path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically (see the module docstring)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def temp_dir(folder: str | os.PathLike) -> Path:
    """Create a private (0700) temporary folder in `folder` with a recognisable name; the caller removes it."""
    folder = Path(folder)
    for _ in range(100):
        path = folder / temp_name()
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary folder", str(folder))


def check_writable(folder: str | os.PathLike) -> None:
    """Raise OSError unless a file can be created in `folder` (creates and removes a temporary)."""
    fd, path = _create_temp(Path(folder))
    os.close(fd)
    os.unlink(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries (files or folders) left in `folder` by processes that no longer exist.

    Only names made by ``temp_name`` (and the `.NAME.partPID` files of earlier versions) are considered; a symlink is removed, never followed. Returns what was
    removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name) or _LEGACY_RE.match(e.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            st = os.lstat(e.path)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed
