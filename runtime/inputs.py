"""Inputs: local files, folders and globs, filesystem URIs; the output name of each; reading a source.

    expand_inputs(["photos/", "a.jpg", "shots/**/*.png"], exclude=out)  -> paths, problems
    list_sources([... , "s3://bucket/photos/"], exclude=out)            -> sources, problems (URIs too)
    output_items(sources)                                               -> [Item(source, stem)]
    read_source(source, max_bytes)                                      -> the file's bytes (ImageError)

Folders are searched recursively for image extensions; globs match per path component (`**` is any depth);
walks follow directory symlinks but never enter a folder twice, stop past MAX_WALK_ENTRIES entries or
MAX_WALK_DEPTH levels, and never enter `exclude` (the output folder). A folder URI (s3://, gs://, hdfs://,
any pyarrow filesystem) is listed recursively.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MAX_WALK_ENTRIES = 1_000_000  # folder and glob walks stop (with an error) past this many directory entries
MAX_WALK_DEPTH = 64           # and never go deeper than this
NAME_MAX = 255                # bytes in a file name (Linux, macOS, Windows)
LONGEST_SUFFIX = len(".components.png")


@dataclass(frozen=True)
class Item:
    """One input: its source (a local path or a filesystem URI, as listed) and its output name."""
    source: str
    stem: str

    @property
    def path(self) -> Path:
        return Path(self.source)

    @property
    def identity(self) -> str:
        """What names this input across runs: the resolved local path, or the URI."""
        return self.source if is_uri(self.source) else os.path.realpath(self.source)

    def tagged_stem(self) -> str:
        """The output name with a short hash of the input's identity (for names shared by several inputs)."""
        tag = hashlib.sha1(self.identity.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        base = _base_stem(self.source)
        if len(base.encode("utf-8", "surrogateescape")) + LONGEST_SUFFIX + 9 > NAME_MAX:
            return _shorten(base, tag)
        return f"{base}-{tag}"


def is_uri(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


class WalkLimit(RuntimeError):
    pass


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def walk_files(root: Path, skip: set | frozenset = frozenset(), descend=None):
    """Yield (relative parts, path) of the regular files under `root`, in name order.

    Directory symlinks are followed, but no folder is entered twice (by device and inode), so a symlink
    loop ends; folders in `skip` (device, inode) are not entered; `descend(parts)` may prune. At most
    MAX_WALK_ENTRIES entries are looked at and MAX_WALK_DEPTH levels entered, else WalkLimit."""
    try:
        seen = {_key(os.stat(root))}
    except OSError:
        return
    stack, count = [(root, ())], 0
    while stack:
        folder, rel = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            count += 1
            if count > MAX_WALK_ENTRIES:
                raise WalkLimit(f"stopped after {MAX_WALK_ENTRIES:,} entries; give a narrower folder or pattern")
            try:
                st = os.stat(e.path)  # follows symlinks; a dangling link is skipped
            except OSError:
                continue
            parts = rel + (e.name,)
            if stat.S_ISDIR(st.st_mode):
                k = _key(st)
                if k in seen or k in skip or (descend is not None and not descend(parts)):
                    continue
                if len(parts) > MAX_WALK_DEPTH:
                    raise WalkLimit(f"more than {MAX_WALK_DEPTH} folder levels; give a narrower folder or pattern")
                seen.add(k)
                subdirs.append((Path(e.path), parts))
            elif stat.S_ISREG(st.st_mode):
                yield parts, Path(e.path)
        stack.extend(reversed(subdirs))


def _match(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Glob semantics per path component: `**` is zero or more folders; `*`, `?` and `[...]` do not match a
    leading dot unless the pattern component starts with one."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    if not parts or (parts[0].startswith(".") and not pats[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def _glob(spec: str, skip) -> list[Path]:
    parts = Path(spec).parts
    n = next(i for i, s in enumerate(parts) if glob.has_magic(s))
    base, pats = Path(*parts[:n]) if n else Path("."), tuple(parts[n:])
    if "**" not in pats and not base.is_dir():
        return []
    if "**" in pats:
        descend = None
    else:
        descend = lambda rel: len(rel) < len(pats) and _match_prefix(rel, pats)  # noqa: E731
    found = [p if n else Path(os.path.relpath(p)) for rel, p in walk_files(base, skip, descend) if _match(rel, pats)]
    return sorted(found)


def _match_prefix(rel: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    return all(fnmatch.fnmatchcase(r, p) and not (r.startswith(".") and not p.startswith("."))
               for r, p in zip(rel, pats))


def expand_inputs(specs: list[str], exclude: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Local files, folders (recursive, image extensions) and globs -> (paths, [(spec, problem)]).

    Folders and globs never enter `exclude` (the output folder), so a rerun does not explain its own outputs."""
    paths, problems, seen = [], [], set()
    skip = set()
    if exclude is not None:
        try:
            skip.add(_key(os.stat(exclude)))
        except OSError:
            pass

    def add(p: Path):
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for spec in specs:
        p = Path(spec)
        try:
            if p.is_dir():
                found = [q for _, q in walk_files(p, skip) if q.suffix.lower() in IMAGE_EXTENSIONS]
                if not found:
                    problems.append((spec, "folder holds no images"))
                for q in found:
                    add(q)
            elif p.exists() or p.is_symlink():
                add(p)
            elif glob.has_magic(spec):
                found = _glob(spec, skip)
                if not found:
                    problems.append((spec, "glob matches no files"))
                for q in found:
                    add(q)
            else:
                problems.append((spec, "no such file or folder"))
        except WalkLimit as e:
            problems.append((spec, str(e)))
    return paths, problems


def list_sources(specs: list[str], exclude: Path | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Local files/folders/globs (as expand_inputs) and filesystem URIs -> (sources, [(spec, problem)])."""
    local = [s[len("file://"):] if s.startswith("file://") else s for s in specs if not is_uri(s)]
    paths, problems = expand_inputs(local, exclude=exclude) if local else ([], [])
    out = [str(p) for p in paths]
    for spec in (s for s in specs if is_uri(s)):
        try:
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(spec)
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                files = sorted(f.path for f in found if f.type == pafs.FileType.File
                               and os.path.splitext(f.path)[1].lower() in IMAGE_EXTENSIONS)
                scheme = spec.split("://", 1)[0]
                if not files:
                    problems.append((spec, "folder holds no images"))
                out.extend(f"{scheme}://{f}" for f in files)
            elif info.type == pafs.FileType.File:
                out.append(spec)
            else:
                problems.append((spec, "no such file or folder"))
        except Exception as e:  # pyarrow raises OSError, ValueError, ArrowInvalid... per filesystem
            problems.append((spec, f"cannot list ({type(e).__name__}: {str(e).splitlines()[0][:200]})"))
    return out, problems


def _base_stem(source: str) -> str:
    if is_uri(source):
        return PurePosixPath(source.split("://", 1)[1]).stem
    return Path(source).stem


def _shorten(stem: str, tag: str) -> str:
    """`stem` cut (on a UTF-8 boundary) so that stem-tag plus the longest output suffix fits NAME_MAX."""
    room = NAME_MAX - LONGEST_SUFFIX - len(tag) - 1
    return stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore") + "-" + tag


def output_items(sources: list) -> list[Item]:
    """NAME = the file's stem; a stem shared by several inputs, or too long for the output names, gets a
    short hash of the input's identity (Item.tagged_stem)."""
    sources = [str(s) for s in sources]
    counts: dict[str, int] = {}
    for s in sources:
        counts[_base_stem(s)] = counts.get(_base_stem(s), 0) + 1
    items = []
    for s in sources:
        stem = _base_stem(s)
        item = Item(s, stem)
        if len(stem.encode("utf-8", "surrogateescape")) + LONGEST_SUFFIX > NAME_MAX or counts[stem] > 1:
            item = Item(s, item.tagged_stem())
        items.append(item)
    return items


def read_source(source: str, max_bytes: int) -> bytes:
    """The bytes of a local regular file or a URI's object, at most `max_bytes` (runtime.images.ImageError
    otherwise, one line naming the source)."""
    from .images import ImageError, read_file_capped
    from .names import show

    if not is_uri(source):
        return read_file_capped(source[len("file://"):] if source.startswith("file://") else source, max_bytes)
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise ImageError(f"{show(source)}: not a regular file")
        if info.size is not None and info.size > max_bytes:
            raise ImageError(f"{show(source)}: {info.size:,} bytes is over the file size limit max_bytes={max_bytes:,}")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except ImageError:
        raise
    except Exception as e:  # pyarrow's OSError / ArrowInvalid per filesystem
        raise ImageError(f"{show(source)}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{show(source)}: grew past the file size limit max_bytes={max_bytes:,} while being read")
    return data
