"""Writing an artifacts folder, shared by every exporter (export/onnx_export.py from torch, export/onnx_import.py from
a user's ONNX graph): the export errors, the structural check of a written graph, output comparison, the manifest's
graph entries, the fixed-class labels and the final install (graphs renamed into place, then the manifest).

Imports onnx, numpy and runtime/ only (no torch): `python -m export onnx` runs without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx

from runtime.artifacts import sha256_path
from runtime.fsutil import atomic_write, remove_stale_temporaries
from runtime.manifest import SET_NAME, SET_NAME_RULE
from runtime.spec import MANIFEST_NAME, GraphSpec


class ExportError(RuntimeError):
    """The export could not produce valid graphs."""


class ValidationError(ExportError):
    """ORT and the reference disagree; `failures` lists every failing output with its max differences."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        lines = [
            f"  {f['graph']}.{f['output']} at batch={f['batch']} L={f['L']}: max abs {f['max_abs']:.3g}, "
            f"max rel {f['max_rel']:.3g} (allowed atol {f['atol']:g}*scale + rtol {f['rtol']:g})"
            + (f" [{f['reason']}]" if f.get("reason") else "")
            for f in failures
        ]
        super().__init__("ONNX validation failed:\n" + "\n".join(lines))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_structure(path: Path, spec: GraphSpec, dims: dict[str, int]) -> list[dict]:
    """onnx.checker full check, standard-domain ops only, and declared (symbolic) axes in the file."""
    fails = []
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # checker raises several types
        fails.append({"graph": spec.name, "output": "*", "reason": f"onnx.checker: {str(e).splitlines()[0]}"})
    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if domains:
        fails.append({"graph": spec.name, "output": "*", "reason": f"non-standard op domains: {domains}"})
    declared = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = declared.get(vi.name)
        if t is None:
            fails.append({"graph": spec.name, "output": vi.name, "reason": "undeclared graph input/output"})
            continue
        for axis, dim in zip(t.axes, vi.type.tensor_type.shape.dim):
            if axis in ("batch", "L") and not dim.dim_param:
                fails.append({"graph": spec.name, "output": vi.name,
                              "reason": f"axis '{axis}' is baked to {dim.dim_value}"})
            elif axis not in ("batch", "L") and dim.dim_value != dims[axis]:
                fails.append({"graph": spec.name, "output": vi.name,
                              "reason": f"axis '{axis}' is {dim.dim_value or dim.dim_param}, expected {dims[axis]}"})
    return fails


def compare(ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    """Per-output comparison; `ok` when every element is within atol*max|ref| + rtol*|ref|."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(ort_out, np.float64)
    if out.shape != ref.shape:
        return {"ok": False, "max_abs": float("inf"), "max_rel": float("inf"), "cosine": float("nan"),
                "reason": f"shape {out.shape} != {ref.shape}"}
    diff = np.abs(out - ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    ok = bool(np.all(diff <= atol * scale + rtol * np.abs(ref))) and bool(np.all(np.isfinite(out)))
    denom = np.linalg.norm(out) * np.linalg.norm(ref)
    return {
        "ok": ok,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float((diff / np.maximum(np.abs(ref), 1e-12 + 1e-6 * scale)).max()) if diff.size else 0.0,
        "cosine": float((out * ref).sum() / denom) if denom > 0 else 1.0,
        "scale": scale,
    }


def summarise(report: dict) -> dict:
    """{graph.output: worst max_abs, max_rel, min_cosine} over a validation report's rows."""
    out: dict[str, dict] = {}
    for r in report["rows"]:
        k = f"{r['graph']}.{r['output']}"
        cur = out.setdefault(k, {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0})
        cur["max_abs"] = max(cur["max_abs"], r["max_abs"])
        cur["max_rel"] = max(cur["max_rel"], r["max_rel"])
        cur["min_cosine"] = min(cur["min_cosine"], r["cosine"])
    return out


def write_labels(out_dir: Path, name: str, labels: list[str]) -> dict:
    """The fixed class names of a pooled-linear export, one per line in output order (no embeddings)."""
    if not isinstance(name, str) or not SET_NAME.match(name):
        raise ExportError(f"class set name {name!r} is not a plain identifier ({SET_NAME_RULE})")
    cdir = out_dir / "classes"
    cdir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cdir)
    data = ("\n".join(labels) + "\n").encode("utf-8")
    atomic_write(cdir / f"{name}.txt", data)
    return {"labels": f"classes/{name}.txt", "count": len(labels), "labels_sha256": hashlib.sha256(data).hexdigest()}


def graph_entries(paths: dict[str, Path], graph_specs: dict[str, GraphSpec], manifest: dict) -> dict:
    """Stamp each written graph with the manifest's fields (ONNX metadata: decomcam.graph, decomcam.io and the
    manifest so far) and return the manifest's `graphs` entries: file, sha256, bytes and the I/O contract."""
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in manifest.items()}
    graphs = {}
    for name, p in paths.items():
        model = onnx.load(str(p))
        onnx.helper.set_model_props(model, {**meta, "decomcam.graph": name,
                                            "decomcam.io": json.dumps(graph_specs[name].to_json())})
        onnx.save(model, str(p))
        graphs[name] = {"file": graph_specs[name].filename, "sha256": sha256_path(p), "bytes": p.stat().st_size,
                        **graph_specs[name].to_json()}
    return graphs


def install(out_dir: Path, paths: dict[str, Path], graph_specs: dict[str, GraphSpec], manifest: dict) -> None:
    """Rename the validated graphs (written in a temporary folder of out_dir) into place, then write the manifest
    atomically: a reader sees the old export or the new one, never a manifest naming graphs not yet there."""
    for name, p in paths.items():
        os.replace(p, out_dir / graph_specs[name].filename)
    atomic_write(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2))
