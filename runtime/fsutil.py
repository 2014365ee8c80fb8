"""Safe file writing: atomic replacement through temporaries that cannot be hijacked, and their clean-up.

Every file the toolkit writes (runtime outputs, export graphs, manifests, class sets, caches, reports)
goes through ``atomic_write`` / ``atomic_open`` / ``temp_dir`` here:

    * the temporary lives in the destination folder (so ``os.replace`` is an atomic rename on one file
      system) under a name of fixed length ``.decomcam-<node>-<pid>-<random>.tmp``: ``node`` identifies
      the machine, its boot and the PID namespace of the writer (``node_id``), ``random`` is 64 bits;
    * it is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted at that name makes
      the creation fail instead of writing through it (a new random name is then tried);
    * the writer holds an exclusive ``flock`` on it for as long as it writes;
    * it is renamed over the destination with ``os.replace`` (a symlink at the destination is replaced,
      never followed), optionally after ``fsync``;
    * on any failure, Ctrl-C included, the temporary is removed.

A run killed with SIGKILL cannot clean up. ``remove_stale_temporaries(folder)`` removes what such a run
left, and only what is provably a dead writer's temporary (the rule, documented in docs/cli.md):
    * the name matches the current pattern exactly, and it is a regular file (never a folder, never a
      symlink) owned by this user;
    * nobody holds its lock (a live writer on this kernel, in any PID namespace or container, does);
    * and its writer is provably gone: its ``node`` is this one and its pid no longer exists here, or,
      for a writer elsewhere (another container, node or boot, where a pid cannot be checked), the file
      has not been modified for ``FOREIGN_STALE_AFTER_S`` (24 hours).
Anything else, files of earlier naming schemes and the user's own files included, is never touched.
Temporary folders (``temp_dir``, the export's) are never removed by it: ``stale_temporary_folders`` lists
those left by dead writers so that a caller can name them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path

TEMP_PREFIX = ".decomcam-"
TEMP_SUFFIX = ".tmp"
FOREIGN_STALE_AFTER_S = 24 * 3600  # a temporary of another node/namespace, untouched this long and unlocked, is stale
_TEMP_RE = re.compile(rf"^{re.escape(TEMP_PREFIX)}([0-9a-f]{{8}})-(\d{{1,10}})-[0-9a-f]{{16}}{re.escape(TEMP_SUFFIX)}$")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_NODE: tuple[int, str] | None = None  # (pid it was computed in, node id)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def node_id() -> str:
    """8 hex digits naming where this process's pids mean something: the host name, the kernel's boot id
    and this process's PID namespace. Two processes with the same node id see the same pids."""
    global _NODE
    pid = os.getpid()
    if _NODE is None or _NODE[0] != pid:  # recomputed after a fork (the child may be in a new namespace)
        try:
            pidns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            pidns = "?"
        key = "\0".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), pidns))
        _NODE = (pid, hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:8])
    return _NODE[1]


def temp_name() -> str:
    """A fresh temporary name: fixed prefix and suffix, this node, this process's pid, 64 random bits."""
    return f"{TEMP_PREFIX}{node_id()}-{os.getpid()}-{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _create_temp(folder: Path, mode: int = 0o666) -> tuple[int, Path]:
    """Exclusively create a new temporary file in `folder` (never through a symlink) and lock it: (fd, path)."""
    for _ in range(100):
        path = folder / temp_name()
        try:
            fd = os.open(path, _OPEN_FLAGS, mode)
        except FileExistsError:  # a planted file or link, or (astronomically unlikely) a collision
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while it is written: proof of a live writer
        except OSError:  # a file system without flock: the age rule still protects it
            pass
        return fd, path
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
            os.replace(tmp, path)  # while the lock is still held
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
    """Create a private (0700) temporary folder in `folder` with a recognisable name; the caller removes it
    (``remove_stale_temporaries`` never does)."""
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


def _pid_gone(pid: int) -> bool:
    """True only when no process `pid` exists in this PID namespace."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else (PermissionError), or cannot tell
        return False
    return False


def _writer_gone(name: str, mtime: float, now: float) -> bool:
    m = _TEMP_RE.match(name)
    if m is None:
        return False
    if m.group(1) == node_id():
        return _pid_gone(int(m.group(2)))
    return now - mtime > FOREIGN_STALE_AFTER_S  # another node or namespace: its pids cannot be checked here


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files left in `folder` by writers that provably no longer exist (the rule is in
    the module docstring); returns what was removed. Folders, symlinks, other users' files and every name
    that is not exactly this module's pattern are left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if not is_temp_name(e.name):
            continue
        try:
            st = os.lstat(e.path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        if not _writer_gone(e.name, st.st_mtime, now):
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            except OSError:
                pass      # no flock on this file system: the pid or age rule decided
            cur = os.lstat(e.path)
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def stale_temporary_folders(folder: str | os.PathLike) -> list[Path]:
    """Temporary folders (``temp_dir``) in `folder` whose writers are provably gone (same rule as for
    files, without a lock): listed, never removed, so that a caller can name them to the user."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    now = time.time()
    for e in entries:
        if not is_temp_name(e.name):
            continue
        try:
            st = os.lstat(e.path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and _writer_gone(e.name, st.st_mtime, now):
            out.append(Path(e.path))
    return sorted(out)
