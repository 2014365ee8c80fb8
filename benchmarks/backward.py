"""Generated backward vs the hand-written heads: two exports of the same model side by side.

    python -m benchmarks.backward --pair RN50 BEFORE/RN50 AFTER/RN50 [--pair NAME BEFORE AFTER ...]
        [--graphs explain,head_grad] [--batches 1,8] [--runs 7] [--threads 2] [--json FILE]

BEFORE is an export whose explain.onnx / head_grad.onnx carry a backward written by hand in torch (exports made
before the generated one, e.g. by commit b8796c0), AFTER one whose backward export/onnx_grad.py generated. Per
graph: node count, file size, GFLOP per image (benchmarks.flops.graph_flops at batch 1: the arithmetic, which no
load changes), ONNX Runtime CPU latency at each batch size (median and 10th percentile of `--runs` after one
warm-up; the two exports' runs interleaved, so both see the same load; on a shared machine the 10th percentile is
the closer to an unloaded run), the largest difference between the two exports'
outputs on the same inputs (gradients in units of their max |value|), and each manifest's validation summary
(the export's own comparison with torch autograd).

Inputs: generated photo-like images preprocessed with the export's policy; explain.onnx gets them with target -1
(each image's top-1 class), head_grad.onnx the activations features.onnx gives for them, times 0.5 (a point on
decomcam-ig's path); a CLIP export gets its default class set as `text`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from .common import (command_line, describe_machine, fmt, format_table, load_average, machine_info,
                     photo_like_batch, write_json)
from .flops import graph_flops


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(art, batch: int, threads: int) -> dict[str, dict]:
    """{graph: feed} for explain and head_grad at `batch` images (module docstring)."""
    x = np.stack([art.preprocess_image(im)[0] for im in photo_like_batch(batch, seed=7)]).astype(np.float32)
    extra = {"text": art.load_class_set().embeddings} if art.text_input else {}
    target = np.full(batch, -1, np.int64)
    feat = _session(art.graph_path("features"), threads)
    act = feat.run(["activations"], {"image": x, **extra})[0]
    return {"explain": {"image": x, **extra, "target": target},
            "head_grad": {"activations": (0.5 * act).astype(np.float32), **extra, "target": target}}


def _max_diff(a: dict, b: dict) -> dict:
    """Per output, max |a - b| over max |b|."""
    return {k: float(np.abs(a[k] - b[k]).max() / max(float(np.abs(b[k]).max()), 1e-30)) for k in b}


def compare_pair(name: str, before: Path, after: Path, graphs, batches, runs: int, threads: int) -> list[dict]:
    from runtime.artifacts import load_artifacts

    arts = {"before": load_artifacts(before), "after": load_artifacts(after)}
    rows = []
    for graph in graphs:
        paths = {k: a.graph_path(graph) for k, a in arts.items()}
        sessions = {k: _session(p, threads) for k, p in paths.items()}
        validation = {k: (a.manifest.get("validation") or {}).get("max", {}).get(f"{graph}.gradients", {})
                      for k, a in arts.items()}
        classes = len(arts["after"].load_class_set().labels) if arts["after"].text_input else None
        row = {"model": name, "graph": graph,
               "nodes": {k: node_count(p) for k, p in paths.items()},
               "gflop_per_image": {k: graph_flops(p, 1, classes)["total"] / 1e9 for k, p in paths.items()},
               "bytes": {k: p.stat().st_size for k, p in paths.items()},
               "validation_gradients": validation, "latency_ms": {}, "latency_p10_ms": {},
               "outputs_max_rel_diff": {}}
        for batch in batches:
            feed = _feeds(arts["after"], batch, threads)[graph]
            outs = {}
            for k, s in sessions.items():   # warm-up, and the outputs compared
                names = [o.name for o in s.get_outputs()]
                outs[k] = dict(zip(names, s.run(None, feed)))
            row["outputs_max_rel_diff"][batch] = _max_diff(outs["after"], outs["before"])
            times = {"before": [], "after": []}
            for r in range(runs):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for k in order:
                    t = time.perf_counter()
                    sessions[k].run(None, feed)
                    times[k].append(time.perf_counter() - t)
            row["latency_ms"][batch] = {k: float(np.median(v) * 1e3) for k, v in times.items()}
            row["latency_p10_ms"][batch] = {k: float(np.percentile(v, 10) * 1e3) for k, v in times.items()}
        rows.append(row)
    return rows


def tables(rows: list[dict], batches) -> str:
    head = ["model", "graph", "nodes before", "nodes after", "MB before", "MB after", "GFLOP before", "GFLOP after"]
    for b in batches:
        head += [f"ms b{b} before (p10)", f"ms b{b} after (p10)"]
    head += ["grad diff", "valid. max abs before", "valid. max abs after"]
    body = []
    for r in rows:
        line = [r["model"], r["graph"], r["nodes"]["before"], r["nodes"]["after"],
                fmt(r["bytes"]["before"] / 1e6, 2), fmt(r["bytes"]["after"] / 1e6, 2),
                fmt(r["gflop_per_image"]["before"], 4), fmt(r["gflop_per_image"]["after"], 4)]
        for b in batches:
            lat, low = r["latency_ms"][b], r["latency_p10_ms"][b]
            line += [f"{fmt(lat[k])} ({fmt(low[k])})" for k in ("before", "after")]
        diff = max(d.get("gradients", 0.0) for d in r["outputs_max_rel_diff"].values())
        vb, va = r["validation_gradients"]["before"], r["validation_gradients"]["after"]
        line += [f"{diff:.1e}", f"{vb.get('max_abs', float('nan')):.2e}", f"{va.get('max_abs', float('nan')):.2e}"]
        body.append(line)
    return format_table(head, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backward", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "BEFORE", "AFTER"),
                   help="a model name and its two export folders (hand-written backward, generated backward)")
    p.add_argument("--graphs", default="explain,head_grad")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    graphs = [g for g in args.graphs.split(",") if g]
    batches = [int(b) for b in args.batches.split(",") if b]
    info = machine_info(args.threads)
    start = load_average()
    rows = []
    for name, before, after in args.pair:
        rows += compare_pair(name, Path(before), Path(after), graphs, batches, args.runs, args.threads)
    info["load_average"] = {"start": start, "end": load_average()}
    table = tables(rows, batches)
    print(describe_machine(info))
    print(table)
    write_json(args.json, {"benchmark": "backward", "command": command_line("benchmarks.backward", argv),
                           "machine": info, "runs": args.runs, "threads": args.threads, "table": table,
                           "results": rows})
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["compare_pair", "tables", "node_count"]
