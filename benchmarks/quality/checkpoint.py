"""A run's checkpoint: per-photo records appended to a JSON-lines side file, so that a killed run resumes.

    FILE.checkpoint.jsonl   line 1: {"checkpoint": KIND, "key": {...}}  what the records were made of
                            then one line per photo: {"row": i, "record": {...}} or {"row": i, "bad": {...}}

The header is written through ``runtime.fsutil.atomic_write`` (the file appears whole or not at all). Each
record is one ``write`` of one line on a descriptor opened with ``O_APPEND`` (the kernel appends it at the
end in one piece; a run killed with SIGKILL stops between two writes). A line cut short by a crash of the
machine (no final newline, or not JSON) is dropped when the file is read, and the file is rewritten
without it, through ``atomic_write``, before anything is appended. The run holds an exclusive ``flock`` on
the file while it appends: a second run on the same file is refused.

Resuming: the same key (the settings the numbers depend on) continues where the file ends; another key is
refused with one line naming what differs. The caller removes the file once the results are written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from runtime.fsutil import atomic_write

__all__ = ["Checkpoint", "CheckpointError", "checkpoint_path", "read_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (other settings, another run writing it, unreadable)."""


def checkpoint_path(json_path) -> Path:
    """FILE.json -> FILE.checkpoint.jsonl (any other name gets the suffix appended)."""
    p = Path(json_path)
    stem = p.name[:-5] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".checkpoint.jsonl")


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in old or k not in new:
                out.append(f"{prefix}{k}")
            else:
                out += _diff(old[k], new[k], f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(root)"]


class Checkpoint:
    """Records of one run by row, read from and appended to ``path``.

    ``open()`` reads what an earlier run with the same ``key`` left (dict row -> entry) and takes the lock;
    ``append(row, record=..., bad=...)`` adds one photo; ``close()`` releases; ``remove()`` deletes the file.
    """

    def __init__(self, path, kind: str, key: dict):
        self.path = Path(path)
        self.kind = kind
        self.key = json.loads(json.dumps(key))  # as it reads back
        self._fd: int | None = None
        self._created = False   # this open wrote the file (no earlier run's)
        self._appended = 0
        self.entries: dict[int, dict] = {}

    def _header(self) -> str:
        return json.dumps({"checkpoint": self.kind, "key": self.key}, sort_keys=True) + "\n"

    def _read(self) -> tuple[dict[int, dict], bool]:
        """(entries by row, whether the file had to be trimmed). Raises CheckpointError on another key."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, False
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the checkpoint ({e.strerror})") from None
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: after the last newline (empty when the file ends in one)
        try:
            head = json.loads(complete[0]) if complete else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("checkpoint") != self.kind or "key" not in head:
            raise CheckpointError(f"{self.path}: not a checkpoint of 'benchmarks.quality {self.kind}'; remove it "
                                  f"or choose another --json")
        if head["key"] != self.key:
            what = ", ".join(_diff(head["key"], self.key)[:6])
            raise CheckpointError(f"{self.path}: a checkpoint of this command with other settings ({what} differ); "
                                  f"rerun with the same arguments to resume, or remove it to start over")
        entries: dict[int, dict] = {}
        trimmed = bool(tail)
        for n, line in enumerate(complete[1:], start=2):
            try:
                e = json.loads(line)
                row = int(e["row"])
                if ("record" in e) == ("bad" in e):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                if n == len(complete):       # a torn last line: dropped
                    trimmed = True
                    break
                raise CheckpointError(f"{self.path}:{n}: not a record line; remove the file to start over") from None
            entries[row] = e
        return entries, trimmed

    def open(self) -> dict[int, dict]:
        """Entries an earlier run left (row -> {"row", "record"} or {"row", "bad"}); creates the file when
        there is none. Holds the append lock until ``close``."""
        entries, trimmed = self._read()
        self._created = not self.path.exists()
        if self._created or trimmed:
            body = self._header() + "".join(json.dumps(entries[r], sort_keys=True) + "\n" for r in sorted(entries))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, body)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointError(f"{self.path}: another run is writing this checkpoint") from None
            raise
        self._fd = fd
        # The file may have been replaced between the read and the open: read again under the lock.
        again, trimmed = self._read()
        if trimmed or again.keys() != entries.keys():
            self.close()
            raise CheckpointError(f"{self.path}: the checkpoint changed while it was opened; rerun")
        self.entries = entries
        return entries

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def append(self, row: int, record: dict | None = None, bad: dict | None = None) -> None:
        if self._fd is None:
            raise RuntimeError("checkpoint not open")
        entry = {"row": int(row), "record": record} if bad is None else {"row": int(row), "bad": bad}
        data = (json.dumps(entry, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes the whole line in one write; the loop only guards a short write
            n = os.write(self._fd, view)
            view = view[n:]
        self._appended += 1

    def close(self) -> None:
        """Release the lock. A checkpoint this open created and nothing was appended to (a run that stopped
        before its first photo, e.g. on a usage error) is removed: it holds no work and would only refuse the
        corrected command's settings."""
        if self._fd is not None:
            if self._created and not self._appended:   # still under the lock, so no other run has opened it
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            os.close(self._fd)  # releases the lock
            self._fd = None

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def read_checkpoint(path, kind: str) -> tuple[dict, dict[int, dict]]:
    """(key, entries by row) of a checkpoint, read only (a running or a killed run's): what has been scored so far."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
        key = head["key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: not a checkpoint of 'benchmarks.quality {kind}'") from None
    entries, _ = Checkpoint(path, kind, key)._read()
    return key, entries
