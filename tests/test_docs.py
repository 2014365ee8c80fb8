"""The repository's Markdown documents: every relative link resolves to a file in the repository, every
`#anchor` names a heading of its target (GitHub's slugs), and no document names a path of one machine.

External http(s) links are allowed (not fetched: the tests run offline); any other scheme, and a relative
link that leaves the repository, is a failure."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folders that hold no documents of the project: environments, build outputs, results, carried kits
SKIP_DIRS = {".git", ".venv", "bench-results", "artifacts", "outputs", "data", "build", "node_modules",
             "__pycache__"}
FORBIDDEN = ("../shared", "/work/", "/tmp/", "/root/")   # paths of one machine, not of the repository

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK = re.compile(r"(?<!\\)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?"
                   r"(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def markdown_files(root: Path = ROOT) -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        out += [Path(folder) / f for f in sorted(files) if f.endswith(".md")]
    return sorted(out)


def prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans kept as plain text (their backticks
    dropped, brackets neutralised), so that code never counts as a link."""
    lines, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            lines.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            lines.append("")
            continue
        lines.append(line)
    return _CODE_SPAN.sub(lambda m: m.group(2).replace("[", "(").replace("]", ")"), "\n".join(lines))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text, lower-case, punctuation other than hyphens and
    underscores removed, spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)   # links -> their text
    text = re.sub(r"<[^>]+>", "", text)                                             # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)                                  # _emphasis_
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: its headings' slugs (repeats numbered -1, -2, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    out = set()
    text = path.read_text(encoding="utf-8")
    fence = None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        h = _HEADING.match(line)
        if h:
            s = slug(h.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    out.update(a.lower() for a in _HTML_ANCHOR.findall(text))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition of a file."""
    text = prose(path.read_text(encoding="utf-8"))
    found = []
    for rx in (_LINK, _REF_DEF):
        for m in rx.finditer(text):
            found.append((text.count("\n", 0, m.start()) + 1, m.group(2)))
    return sorted(found)


def problems_of(path: Path, root: Path = ROOT) -> list[str]:
    """Every broken link and machine path of one document, one line each."""
    rel = path.relative_to(root)
    out = []
    for line, target in links(path):
        where = f"{rel}:{line}: ({target})"
        if re.match(r"^https?://", target, re.IGNORECASE):
            continue                      # external: allowed, not fetched
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            out.append(f"{where}: a link with the scheme of another machine or program")
            continue
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            out.append(f"{where}: an absolute path (links must be relative to the document)")
            continue
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        try:
            dest.relative_to(root)
        except ValueError:
            out.append(f"{where}: leaves the repository")
            continue
        if not dest.exists():
            out.append(f"{where}: no such file {dest.relative_to(root)}")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                out.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor.lower() not in anchors(dest):
                out.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    text = path.read_text(encoding="utf-8")
    for bad in FORBIDDEN:
        for m in re.finditer(re.escape(bad), text):
            out.append(f"{rel}:{text.count(chr(10), 0, m.start()) + 1}: names a machine path ({bad!r})")
    return out


FILES = markdown_files()


def test_the_documents_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"README.md", "benchmarks/README.md", "docs/cli.md", "docs/gpu.md"} <= names, sorted(names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve_and_no_machine_paths(path):
    problems = problems_of(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("heading, expected", [
    ("Latency (`benchmarks.latency`)", "latency-benchmarkslatency"),
    ("Any CNN in: coverage (`benchmarks.coverage`)", "any-cnn-in-coverage-benchmarkscoverage"),
    ("What is in an export", "what-is-in-an-export"),
    ("`decomcam-ig`: the decomposition of path-integrated evidence",
     "decomcam-ig-the-decomposition-of-path-integrated-evidence"),
    ("The decomposition on the host (`runtime/decomcam.py`, `single_thread_blas`)",
     "the-decomposition-on-the-host-runtimedecomcampy-single_thread_blas"),
    ("One shape per graph call on the GPU (`EngineOptions.fixed_chunks`)",
     "one-shape-per-graph-call-on-the-gpu-engineoptionsfixed_chunks"),
])
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_is_found(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# A\n\n## Two words\n\nSee [b](b.md#nope), [self](#two-words), [gone](c.md), "
                   "[out](../x.md), `[code](nowhere.md)`, [web](https://example.org) and /tmp/x.\n\n"
                   "```\n[fenced](nowhere.md)\n```\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# B\n", encoding="utf-8")
    found = problems_of(doc, root=tmp_path)
    text = "\n".join(found)
    assert "no heading with anchor #nope" in text
    assert "no such file c.md" in text
    assert "leaves the repository" in text
    assert "'/tmp/'" in text
    assert "nowhere.md" not in text and "two-words" not in text and "example.org" not in text
    assert len(found) == 4, found
