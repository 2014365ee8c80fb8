"""Export the five graphs, validate them against PyTorch, and write the manifest.

`export_model(...)` writes into an artifacts folder:
    explain.onnx, classify.onnx, head.onnx,  the graphs declared in runtime/spec.py
    features.onnx, head_grad.onnx
    classes/<set>.txt, classes/<set>.npy     class sets: label names and L2-normalised embeddings [L, D]
    manifest.json                            model, weights, preprocessing, dims, versions, graphs (sha256 +
                                             I/O spec), class sets and the validation report

Validation always runs before anything is called a success: ONNX Runtime (CPU) and PyTorch see the same
inputs at several (batch, L) sizes, including batch 1 and an odd batch. explain.onnx is compared with torch
autograd on the unmodified open_clip module, classify.onnx with open_clip's encode_image, head.onnx with
open_clip's attention pool, features.onnx with encode_image's logits and a layer4 forward hook, head_grad.onnx
with torch autograd through the unmodified head at scaled activations alpha * A (path_scales). Each output
passes when |ort - ref| <= atol * max|ref| + rtol * |ref| for every element (atol is in units of the
output's scale, so one table serves every model size). Running the written
files at sizes other than the traced ones also proves the dynamic axes are really dynamic. Every failure is
collected into one `ValidationError`; the graphs are written under temporary names and renamed only after
they pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from runtime.artifacts import sha256_path
from runtime.fsutil import atomic_open, atomic_write, remove_stale_temporaries, stale_temporary_folders, temp_dir
from runtime.names import show
from runtime.manifest import ManifestError, validate_manifest
from runtime.spec import CLASSIFY, EXPLAIN, FEATURES, HEAD, HEAD_GRAD, MANIFEST_NAME, MANIFEST_VERSION, GraphSpec, family

from .classes import ClassSet, check_set_name, text_embeddings
from .graphs import (ClassifyModule, ExplainModule, FeaturesModule, HeadGradModule, HeadModule, autograd_reference,
                     head_logits)
from .models import LoadedModel
from .pooled import PooledClassify, PooledExplain, PooledFeatures, PooledHeadGrad, PooledHeadGraph
from .writing import ExportError, ValidationError, compare, graph_entries, install, log, write_labels
from .writing import check_structure as _check_structure
from .writing import summarise as _summarise

OPSET = 20
# (batch, L) sizes the written graphs are run at. The export traces (2, 5); the others prove the axes are dynamic.
VALIDATION_SIZES = ((1, 3), (3, 7))
TRACE_SIZE = (2, 5)


def specs(lm: LoadedModel) -> dict[str, GraphSpec]:
    """The graph contracts of the model's family (runtime/spec.py)."""
    return family(lm.family).graphs


@torch.no_grad()
def model_dims(lm: LoadedModel) -> dict[str, int]:
    if lm.family == "pooled-linear":
        pm = lm.model
        a = pm.parts.trunk(torch.zeros(1, 3, lm.image_size, lm.image_size))
        _, c, h, w = a.shape
        return {"3": 3, "H": lm.image_size, "W": lm.image_size, "C": c, "h": h, "w": w, "K": pm.num_classes}
    v = lm.model.visual
    c = v.attnpool.k_proj.in_features
    side = lm.image_size // 32
    d = v.attnpool.c_proj.out_features
    return {"3": 3, "H": lm.image_size, "W": lm.image_size, "C": c, "h": side, "w": side, "D": d}


def sample_inputs(lm: LoadedModel, batch: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Smooth, image-like normalised inputs plus random unit class embeddings and targets."""
    g = torch.Generator().manual_seed(seed)
    s = lm.image_size
    low = torch.rand(batch, 3, 8, 8, generator=g)
    pix = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
    pix = (pix + 0.1 * torch.rand(batch, 3, s, s, generator=g)).clamp(0, 1)
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    dims = model_dims(lm)
    if lm.family == "pooled-linear":  # fixed classes: no text input, targets among the K outputs
        target = torch.randint(0, dims["K"], (batch,), generator=g)
        target[0] = -1
        return {"image": ((pix - mean) / std).float(), "target": target}
    text = torch.nn.functional.normalize(torch.randn(n_classes, dims["D"], generator=g), dim=-1)
    target = torch.randint(0, n_classes, (batch,), generator=g)
    target[0] = -1  # the top-1 path
    return {"image": ((pix - mean) / std).float(), "text": text, "target": target}


def _modules(lm: LoadedModel, target_layer: str):
    if lm.family == "pooled-linear":
        pm = lm.model
        return {"explain": PooledExplain(pm).eval(), "classify": PooledClassify(pm).eval(),
                "head": PooledHeadGraph(pm).eval(), "features": PooledFeatures(pm).eval(),
                "head_grad": PooledHeadGrad(pm).eval()}
    return {
        "explain": ExplainModule(lm.model, target_layer).eval(),
        "classify": ClassifyModule(lm.model, target_layer).eval(),
        "head": HeadModule(lm.model).eval(),
        "features": FeaturesModule(lm.model, target_layer).eval(),
        "head_grad": HeadGradModule(lm.model).eval(),
    }


def _export_one(module: torch.nn.Module, spec: GraphSpec, args: tuple, path: Path, opset: int) -> None:
    dims = {"batch": torch.export.Dim("batch"), "L": torch.export.Dim("L")}
    dyn = {t.name: {i: dims[a] for i, a in enumerate(t.axes) if a in dims} or None for t in spec.inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dyn, opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )


def path_scales(batch: int) -> torch.Tensor:
    """[batch, 1, 1, 1] factors (b + 1/2) / batch in (0, 1): head_grad.onnx is validated at alpha * A, off the
    activations the trunk produced, where decomcam-ig evaluates it."""
    return ((torch.arange(batch, dtype=torch.float32) + 0.5) / batch).view(batch, 1, 1, 1)


def eager_head(lm: LoadedModel, act: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """The unmodified head after the target layer on activations -> logits: open_clip's attention pool, L2
    normalisation and scaled cosine logits, or the classifier's own pooling and head modules."""
    return head_logits(lm.model, act, text)


def head_autograd(lm: LoadedModel, act: torch.Tensor, text: torch.Tensor | None, target: torch.Tensor):
    """(logits, d logits[b, t_b] / d act) of the unmodified head by torch autograd, t_b = target[b] or the top-1
    class where target[b] < 0."""
    a = act.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = eager_head(lm, a, text)
        t = torch.where(target < 0, logits.argmax(1), target)
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    return logits.detach(), grad.detach()


@torch.no_grad()
def _references(lm: LoadedModel, feed: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Independent PyTorch results from the unmodified module (open_clip's, or the classifier's own)."""
    m = lm.model
    text = feed.get("text")
    if lm.family == "pooled-linear":
        logits, act, grad = m.autograd(feed["image"], feed["target"])
    else:
        logits, act, grad = autograd_reference(m, feed["image"], text, feed["target"])
    head_logits = eager_head(lm, act, text)
    path = act * path_scales(act.shape[0])
    path_logits, path_grad = head_autograd(lm, path, text, feed["target"])
    return {
        "explain": {"logits": logits.numpy(), "activations": act.numpy(), "gradients": grad.numpy()},
        "classify": {"logits": logits.numpy()},
        "head": {"logits": head_logits.numpy(), "_activations": act.numpy()},
        "features": {"logits": logits.numpy(), "activations": act.numpy()},
        "head_grad": {"logits": path_logits.numpy(), "gradients": path_grad.numpy(), "_activations": path.numpy()},
    }


def validation_cases(lm: LoadedModel, sizes=VALIDATION_SIZES, seed: int = 1234):
    """Per validation size: (batch, L, the PyTorch references, {graph: its ORT inputs}). Every graph sees the
    same sample inputs; head.onnx gets the reference activations, head_grad.onnx those activations scaled by
    path_scales. A fixed-class model's L is its K."""
    graph_specs = specs(lm)
    if lm.family == "pooled-linear":  # L is the fixed K: validate at batch sizes only
        sizes = tuple((b, model_dims(lm)["K"]) for b, _ in sizes)
    for i, (b, l) in enumerate(sizes):
        feed = sample_inputs(lm, b, l, seed + i)
        refs = _references(lm, feed)
        arrays = {k: v.numpy() for k, v in feed.items()}
        feeds = {}
        for name, spec in graph_specs.items():
            acts = {"activations": refs[name]["_activations"].astype(np.float32)} if name in ("head", "head_grad") else {}
            feeds[name] = {t.name: {**arrays, **acts}[t.name] for t in spec.inputs}
        yield b, l, refs, feeds


def _has_local_kinks(lm: LoadedModel) -> bool:
    """A pooled model with position-wise ops before the pooling (export/pooled.py): there the gradient is
    piecewise in A at h w C' pre-activations, and activations that differ by float32 rounding (ORT's trunk vs
    torch's) can put one of them on the other side of a ReLU6 kink."""
    return lm.family == "pooled-linear" and len(getattr(lm.model, "local", ())) > 0


def _gradients_at(lm: LoadedModel, act: np.ndarray, target: np.ndarray) -> np.ndarray:
    """explain.gradients' reference for such a model: torch autograd through the unmodified head modules at
    the graph's own activations (the activations themselves are checked against the reference separately),
    so the hand-written backward is compared where the kinks fall the same way."""
    _, grad = head_autograd(lm, torch.from_numpy(np.ascontiguousarray(act, dtype=np.float32)), None,
                            torch.from_numpy(target))
    return grad.numpy()


#: explain.gradients of a model with local kinks must still point where the whole model's autograd gradient
#: at the reference activations does (fp32 graphs; one flipped kink moves one position's column a little).
WHOLE_MODEL_MIN_COSINE = 0.999


def references_for(lm: LoadedModel, name: str, outs: dict, feed: dict, refs: dict) -> tuple[dict, dict]:
    """(the references graph `name`'s outputs are compared with, {output: the whole-model reference kept as
    a cosine floor}). Only explain.gradients of a model with local kinks differs from refs[name]: its
    reference is the head's autograd at the graph's own activations (_gradients_at)."""
    ref = refs[name]
    if name == "explain" and _has_local_kinks(lm):
        at_own = _gradients_at(lm, outs["activations"], np.asarray(feed["target"]))
        return {**ref, "gradients": at_own}, {"gradients": ref["gradients"]}
    return ref, {}


def whole_model_floor(out: np.ndarray, whole: np.ndarray, min_cosine: float) -> dict:
    """The row's extra fields for an output compared at the graph's own activations: which reference, and
    the cosine against the whole model's autograd at the reference activations with its floor."""
    cos = compare(out, whole, float("inf"), 0.0)["cosine"]
    return {"reference": "head autograd at the graph's activations", "whole_model_cosine": cos,
            "whole_model_min_cosine": min_cosine, "whole_model_ok": bool(cos >= min_cosine)}


def validate_graphs(lm: LoadedModel, paths: dict[str, Path], sizes=VALIDATION_SIZES, seed: int = 1234,
                    spin: bool = True) -> dict:
    """Run the written graphs with ORT-CPU against PyTorch; raise ValidationError listing all failures."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    graph_specs = specs(lm)
    rows, failures = [], []
    for b, l, refs, feeds in validation_cases(lm, sizes, seed):
        for name, sess in sessions.items():
            spec = graph_specs[name]
            try:
                outs = dict(zip(spec.output_names, sess.run(spec.output_names, feeds[name])))
            except Exception as e:  # ORT raises its own exception types for shape errors
                failures.append({"graph": name, "output": "*", "batch": b, "L": l, "max_abs": float("inf"),
                                 "max_rel": float("inf"), "atol": 0, "rtol": 0,
                                 "reason": f"ORT run failed: {str(e).splitlines()[0][:200]}"})
                continue
            ref, whole = references_for(lm, name, outs, feeds[name], refs)
            for out_name, tol in spec.tolerances.items():
                r = compare(outs[out_name], ref[out_name], tol.atol, tol.rtol)
                if out_name in whole:
                    r = {**r, **whole_model_floor(outs[out_name], whole[out_name], WHOLE_MODEL_MIN_COSINE)}
                    r["ok"] = bool(r["ok"] and r["whole_model_ok"])
                row = {"graph": name, "output": out_name, "batch": b, "L": l, "atol": tol.atol, "rtol": tol.rtol, **r}
                rows.append(row)
                if not r["ok"]:
                    failures.append(row)
    if failures:
        raise ValidationError(failures)
    return {"sizes": [list(s) for s in sizes], "rows": rows}


def format_parity_table(report: dict) -> str:
    head = f"{'graph':<9} {'output':<12} {'batch':>5} {'L':>3} {'max_abs':>10} {'max_rel':>10} {'cosine':>12} {'scale':>9}  ok"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(
            f"{r['graph']:<9} {r['output']:<12} {r['batch']:>5} {r['L']:>3} {r['max_abs']:>10.2e} "
            f"{r['max_rel']:>10.2e} {r['cosine']:>12.9f} {r['scale']:>9.3g}  {'yes' if r['ok'] else 'NO'}"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import onnxruntime
    import open_clip

    try:
        import onnxscript

        oss = onnxscript.__version__
    except ImportError:  # onnxscript is needed by the exporter; report it if present
        oss = "absent"
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "onnx": onnx.__version__,
            "onnxscript": oss, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def write_class_set(out_dir: Path, cs: ClassSet, emb: np.ndarray) -> dict:
    cdir = out_dir / "classes"
    cdir.mkdir(parents=True, exist_ok=True)
    check_set_name(cs.name)
    remove_stale_temporaries(cdir)
    npy = cdir / f"{cs.name}.npy"
    with atomic_open(npy) as f:
        np.save(f, emb.astype(np.float32))
    labels = ("\n".join(cs.labels) + "\n").encode("utf-8")
    atomic_write(cdir / f"{cs.name}.txt", labels)
    return {"labels": f"classes/{cs.name}.txt", "embeddings": f"classes/{cs.name}.npy", "count": len(cs.labels),
            "templates": list(cs.templates), "sha256": sha256_path(npy),
            "labels_sha256": hashlib.sha256(labels).hexdigest()}


def add_class_set(artifacts: str | os.PathLike, lm: LoadedModel, cs: ClassSet, make_default: bool = False) -> dict:
    """Add (or replace) a class set in an existing export without touching the graphs."""
    out_dir = Path(artifacts)
    manifest = read_manifest_raw(out_dir)
    if manifest.get("family", "clip") != "clip":
        raise ExportError(f"{out_dir}: {manifest['model']} has fixed classes (family {manifest['family']}); "
                          f"class sets apply to CLIP exports only")
    if manifest["model"] != lm.name or manifest["pretrained_id"] != lm.pretrained_id:
        raise ExportError(f"{out_dir}: artifacts are for {manifest['model']} ({manifest['pretrained_id']}), "
                          f"not {lm.name} ({lm.pretrained_id})")
    emb = text_embeddings(lm.model, lm.name, lm.pretrained_id, cs)
    manifest["class_sets"][cs.name] = write_class_set(out_dir, cs, emb)
    if make_default or not manifest.get("default_class_set"):
        manifest["default_class_set"] = cs.name
    _atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest


def read_manifest_raw(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: no manifest; run `python -m export` first")
    try:
        return validate_manifest(json.loads(path.read_text(encoding="utf-8")), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    except ManifestError as e:
        raise ExportError(str(e)) from None


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    report: dict
    seconds: dict = field(default_factory=dict)


def export_model(lm: LoadedModel, class_sets: list[ClassSet], out_dir: str | os.PathLike,
                 target_layer: str | None = None, opset: int = OPSET, overwrite: bool = True,
                 embeddings: dict[str, np.ndarray] | None = None, labels_name: str | None = None) -> ExportResult:
    """Export, validate and write the artifacts folder (see the module docstring).

    A pooled-linear model (fixed classes) ignores `class_sets` and writes its own labels as the class set
    `labels_name` (default "labels").

    embeddings: optional {class set name: [L, D] array} used for those sets instead of encoding their
    prompts with the text tower (e.g. class embeddings learned with the image tower). Rows are
    L2-normalised here; a wrong shape or a non-finite / zero row is an ExportError before anything is
    exported.
    """
    out_dir = Path(out_dir)
    if target_layer is None:  # clip: layer4; a fixed-class model: the split its registry entry declares
        target_layer = lm.model.parts.name if lm.family == "pooled-linear" else "layer4"
    given = _check_embeddings(embeddings or {}, class_sets, model_dims(lm)["D"]) if lm.family == "clip" else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = model_dims(lm)
    remove_stale_temporaries(out_dir)
    for left in stale_temporary_folders(out_dir):  # never removed: only named
        log(f"note: {show(left)} was left by an interrupted export; remove it by hand when no export is running")
    tmp_dir = temp_dir(out_dir)
    timings = {}
    try:
        t0 = time.perf_counter()
        mods = _modules(lm, target_layer)
        graph_specs = specs(lm)
        feed = sample_inputs(lm, *TRACE_SIZE, seed=0)
        with torch.no_grad():
            feed["activations"] = mods["explain"].trunk(feed["image"]).detach()
        args = {name: tuple(feed[n] for n in ("image", "activations", "text", "target") if n in spec.input_names)
                for name, spec in graph_specs.items()}
        paths = {}
        for name in graph_specs:
            spec = graph_specs[name]
            log(f"[export] {lm.name}: writing {spec.filename} ...")
            t = time.perf_counter()
            paths[name] = tmp_dir / spec.filename
            _export_one(mods[name], spec, args[name], paths[name], opset)
            timings[f"export_{name}_s"] = time.perf_counter() - t
        structural = [f for name, p in paths.items() for f in _check_structure(p, graph_specs[name], dims)]
        if structural:
            raise ValidationError([{"batch": "-", "L": "-", "max_abs": float("nan"), "max_rel": float("nan"),
                                    "atol": 0, "rtol": 0, **f} for f in structural])
        log(f"[export] {lm.name}: validating against PyTorch at (batch, L) = {list(VALIDATION_SIZES)} ...")
        t = time.perf_counter()
        report = validate_graphs(lm, paths)
        timings["validate_s"] = time.perf_counter() - t

        manifest = {
            "format_version": MANIFEST_VERSION,
            "family": lm.family,
            "model": lm.name,
            "pretrained": lm.pretrained,
            "pretrained_id": lm.pretrained_id,
            "random_weights": lm.random_weights,
            "target_layer": target_layer,
            "input_size": lm.image_size,
            "preprocess": dict(lm.preprocess or {"resize": "crop", "resize_size": lm.image_size,
                                                  "interpolation": "bicubic"}),
            "mean": list(lm.mean),
            "std": list(lm.std),
            # clip: CLIP's logit scale (logits = scale * cosine); pooled-linear: raw logits, scale 1
            "logit_scale": float(lm.model.logit_scale.detach().exp()) if lm.family == "clip" else 1.0,
            "dims": {k: v for k, v in dims.items() if k != "3"},
            "opset": opset,
            "versions": versions(),
        }
        manifest["graphs"] = graph_entries(paths, graph_specs, manifest)
        manifest["class_sets"] = {}
        t = time.perf_counter()
        if lm.family == "pooled-linear":  # the fixed classes: labels only, in the classifier's output order
            name = labels_name or "labels"
            manifest["class_sets"][name] = write_labels(out_dir, name, list(lm.labels))
            manifest["default_class_set"] = name
        else:
            for cs in class_sets:
                emb = given[cs.name] if cs.name in given else text_embeddings(lm.model, lm.name, lm.pretrained_id, cs)
                manifest["class_sets"][cs.name] = write_class_set(out_dir, cs, emb)
            manifest["default_class_set"] = class_sets[0].name if class_sets else None
        timings["class_sets_s"] = time.perf_counter() - t
        manifest["validation"] = {"sizes": report["sizes"], "max": _summarise(report)}
        install(out_dir, paths, graph_specs, manifest)
        timings["total_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(out_dir, manifest, report, timings)


def _check_embeddings(embeddings: dict[str, np.ndarray], class_sets: list[ClassSet], d: int) -> dict[str, np.ndarray]:
    """Validate precomputed class embeddings against their class sets; return them L2-normalised, float32."""
    sets = {cs.name: cs for cs in class_sets}
    out = {}
    for name, emb in embeddings.items():
        if name not in sets:
            raise ExportError(f"embeddings given for class set '{name}', which is not exported "
                              f"(class sets: {', '.join(sets) or 'none'})")
        e = np.asarray(emb, dtype=np.float64)
        want = (len(sets[name].labels), d)
        if e.shape != want:
            raise ExportError(f"embeddings for class set '{name}' have shape {e.shape}, expected {want}")
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        if not np.all(np.isfinite(e)) or np.any(norms == 0):
            raise ExportError(f"embeddings for class set '{name}' have a non-finite or all-zero row")
        out[name] = (e / norms).astype(np.float32)
    return out


def ops_used(path: str | os.PathLike) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})


__all__ = ["export_model", "validate_graphs", "add_class_set", "ValidationError", "ExportError", "ops_used",
           "format_parity_table", "EXPLAIN", "CLASSIFY", "HEAD", "FEATURES", "HEAD_GRAD"]
