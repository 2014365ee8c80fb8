"""`index.html` in the output folder: one card per explained image, and a summary of the run.

Each card shows the overlay, the component maps (with each component's weight and explained variance),
the top-5 classes, the method, engine, target and timings, read back from NAME.json. The summary counts
the images and lists every failure with its one-line reason. The page is self-contained: inline CSS, no
script, no network resource; images are relative links (percent-encoded), and every text taken from a
file name, class name or error message is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from .fsutil import atomic_write
from .names import one_line, show

REPORT_NAME = "index.html"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;background:#f4f4f4;color:#222}
h1{font-size:1.4em}.summary{background:#fff;padding:1em;border-radius:6px;margin-bottom:1.5em}
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{background:#fff;border-radius:6px;padding:1em;max-width:900px}
.card h2{font-size:1em;word-break:break-all;margin:0 0 .5em}.pics{display:flex;flex-wrap:wrap;gap:.5em}
.pics img{max-height:360px;max-width:100%;border:1px solid #ccc}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}
.fail{color:#a00}.note{color:#a00;font-weight:bold}
"""


def _e(v) -> str:
    text = str(v).encode("utf-8", "backslashreplace").decode("utf-8")   # no lone surrogate reaches the page
    return html.escape(text, quote=True)


def _src(name: str) -> str:
    # a relative URL of the file's bytes: '#', '?', '%', spaces and bytes that are not UTF-8 percent-encoded
    return _e(quote(os.fsencode(name)))


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _card(stem: str, source: str, summary: dict) -> str:
    top5 = "".join(f"<tr><td class=l>{_e(t['class'])}</td><td>{_num(t['probability'])}</td></tr>"
                   for t in summary.get("top5") or [])
    weights, ev = summary.get("weights"), summary.get("explained_variance")
    comps = ""
    if weights:
        rows = "".join(f"<tr><td>{i + 1}</td><td>{_num(w)}</td><td>{_num(ev[i] if ev else None)}</td></tr>"
                       for i, w in enumerate(weights))
        comps = f"<table><tr><th>component</th><th>weight</th><th>explained variance</th></tr>{rows}</table>"
    timings = ", ".join(f"{_e(k)} {float(v):.1f} ms" for k, v in (summary.get("timings_ms") or {}).items())
    target = summary.get("target") or {}
    note = '<p class=note>random weights: the maps show the method, not a trained model</p>' \
        if summary.get("random_weights") else ""
    return (
        f"<section class=card><h2>{_e(source)}</h2>{note}"
        f"<p>method <b>{_e(summary.get('method'))}</b> on <b>{_e(summary.get('engine', '?'))}</b>; "
        f"target <b>{_e(target.get('name'))}</b> (class {_e(target.get('index'))})</p>"
        f"<div class=pics><img src=\"{_src(stem + '.overlay.png')}\" alt=\"overlay\">"
        f"<img src=\"{_src(stem + '.components.png')}\" alt=\"component maps\"></div>"
        f"{comps}<table><tr><th class=l>top-5 class</th><th>probability</th></tr>{top5}</table>"
        f"<p>timings: {timings or '-'}</p></section>"
    )


def write_report(out_dir: str | os.PathLike, outcomes, problems: list[tuple[str, str]] = (), title: str = "") -> Path:
    """Write out_dir/index.html: a card per explained or skipped input (runtime.batch.Outcome: its NAME.json,
    pictures and numbers) and the failures (failed Outcomes, and `problems`, [(input spec, one-line reason)]).
    Every name is shown through runtime.names.show, so a name that is not UTF-8 or holds control characters
    is displayed escaped and linked by its bytes. Returns the path."""
    out_dir = Path(out_dir)
    cards, missing, failures = [], 0, [(show(spec), msg) for spec, msg in problems]
    for o in outcomes:
        if o.status == "failed":
            failures.append((show(o.item.source), o.error))
            continue
        summary = o.summary
        if summary is None:
            try:
                summary = json.loads((out_dir / f"{o.stem}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                missing += 1
                continue
        cards.append(_card(o.stem, show(o.item.source), summary))
    fails = "".join(f"<li><b>{_e(name)}</b>: {_e(one_line(reason))}</li>" for name, reason in failures)
    fails = f"<h2 class=fail>Failures</h2><ul class=fail>{fails}</ul>" if fails else ""
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>decomcam report: {_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>decomcam report: {_e(title)}</h1><div class=summary>"
        f"<p>{len(cards)} explained, {len(failures)} failed"
        f"{f', {missing} without outputs' if missing else ''}; written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"
        f"{fails}</div><div class=cards>{''.join(cards)}</div></body></html>\n"
    )
    path = out_dir / REPORT_NAME
    atomic_write(path, page)
    return path
