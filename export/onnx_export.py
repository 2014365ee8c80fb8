"""Export the five graphs, validate them against PyTorch, and write the manifest.

`export_model(...)` writes into an artifacts folder:
    explain.onnx, classify.onnx, head.onnx,  the graphs declared in runtime/spec.py
    features.onnx, head_grad.onnx
    classes/<set>.txt, classes/<set>.npy     class sets: label names and L2-normalised embeddings [L, D] (clip), or
                                             the fixed labels (pooled-linear)
    manifest.json                            model, weights, preprocessing, dims, versions, graphs (sha256 +
                                             I/O spec), class sets and the validation report

One path for every family (export/families.py declares what differs): the model's forward (the trunk to the target
layer, then the head) is exported once with torch.onnx, image [, text] -> logits, activations; the five graphs are
derived from that graph by export/onnx_import.derive_graphs: classify, head and features by cutting it, explain and
head_grad by adding export/onnx_grad.py's generated backward of the target logit (target < 0: the top-1 class).

Validation always runs before anything is called a success: ONNX Runtime (CPU) and PyTorch see the same
inputs at several (batch, L) sizes, including batch 1 and an odd batch. explain.onnx is compared with torch
autograd on the unmodified module (open_clip's, or the classifier's own), classify.onnx with its logits,
head.onnx with the unmodified head, features.onnx with the logits and a forward hook at the target layer,
head_grad.onnx with torch autograd through the unmodified head at scaled activations alpha * A (path_scales). Each
output passes when |ort - ref| <= atol * max|ref| + rtol * |ref| for every element (atol is in units of the
output's scale, so one table serves every model size). Running the written
files at sizes other than the traced ones also proves the dynamic axes are really dynamic. Every failure is
collected into one `ValidationError`; the graphs are written under temporary names and renamed only after
they pass.
"""

from __future__ import annotations

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

from runtime.fsutil import atomic_write, remove_stale_temporaries, stale_temporary_folders, temp_dir
from runtime.names import show
from runtime.manifest import ManifestError, validate_manifest
from runtime.spec import CLASSIFY, EXPLAIN, FEATURES, HEAD, HEAD_GRAD, MANIFEST_NAME, MANIFEST_VERSION, GraphSpec, family

from .classes import ClassSet, text_embeddings, write_class_set
from .families import export_family, forward_module, sample_inputs
from .models import LoadedModel
from .onnx_grad import GradientError
from .onnx_import import contract_shapes, derive_graphs
from .writing import ExportError, ValidationError, compare, graph_entries, install, log
from .writing import check_structure as _check_structure
from .writing import summarise as _summarise

OPSET = 20
# (batch, L) sizes the written graphs are run at. The export traces (2, 5); the others prove the axes are dynamic.
VALIDATION_SIZES = ((1, 3), (3, 7))
TRACE_SIZE = (2, 5)


def specs(lm: LoadedModel) -> dict[str, GraphSpec]:
    """The graph contracts of the model's family (runtime/spec.py)."""
    return family(lm.family).graphs


def model_dims(lm: LoadedModel) -> dict[str, int]:
    """The contract's fixed axis sizes (export/families.py)."""
    return export_family(lm.family).dims(lm)


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
    return export_family(lm.family).eager_head(lm, act, text)


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
    text = feed.get("text")
    logits, act, grad = export_family(lm.family).autograd(lm, feed["image"], text, feed["target"])
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
    if not family(lm.family).text_input:  # L is the fixed K: validate at batch sizes only
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
    """A head with position-wise ops before the pooling (the -lastblock exports): there the gradient is
    piecewise in A at h w C' pre-activations, and activations that differ by float32 rounding (ORT's trunk vs
    torch's) can put one of them on the other side of a ReLU6 kink."""
    return export_family(lm.family).local_kinks(lm)


def _gradients_at(lm: LoadedModel, act: np.ndarray, target: np.ndarray) -> np.ndarray:
    """explain.gradients' reference for such a model: torch autograd through the unmodified head modules at
    the graph's own activations (the activations themselves are checked against the reference separately),
    so the generated backward is compared where the kinks fall the same way."""
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


def add_class_set(artifacts: str | os.PathLike, lm: LoadedModel, cs: ClassSet, make_default: bool = False) -> dict:
    """Add (or replace) a class set in an existing export without touching the graphs."""
    out_dir = Path(artifacts)
    manifest = read_manifest_raw(out_dir)
    if not family(manifest.get("family")).text_input:
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
    fam = export_family(lm.family)
    if target_layer is None:  # clip: layer4; a fixed-class model: the split its registry entry declares
        target_layer = fam.default_target_layer(lm)
    classes = fam.plan_classes(lm, class_sets, embeddings, labels_name)   # checked before anything is exported
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = model_dims(lm)
    remove_stale_temporaries(out_dir)
    for left in stale_temporary_folders(out_dir):  # never removed: only named
        log(f"note: {show(left)} was left by an interrupted export; remove it by hand when no export is running")
    tmp_dir = temp_dir(out_dir)
    timings = {}
    try:
        t0 = time.perf_counter()
        graph_specs = specs(lm)
        fspec = graph_specs["features"]
        log(f"[export] {lm.name}: exporting the forward (image -> logits, {target_layer} activations) ...")
        forward_path = tmp_dir / "forward.onnx"
        feed = sample_inputs(lm, *TRACE_SIZE, seed=0)
        _export_one(forward_module(lm, target_layer), fspec, tuple(feed[n] for n in fspec.input_names),
                    forward_path, opset)
        timings["export_forward_s"] = time.perf_counter() - t0
        log(f"[export] {lm.name}: deriving {', '.join(s.filename for s in graph_specs.values())} "
            f"(cuts and the generated backward of the head) ...")
        t = time.perf_counter()
        forward = onnx.load(str(forward_path))
        forward_path.unlink()
        try:
            graphs = derive_graphs(forward, graph_specs, contract_shapes(graph_specs, dims))
        except GradientError as e:
            raise ExportError(f"{lm.name}: the head after {target_layer} cannot be differentiated: {e}") from None
        paths = {}
        for name, m in graphs.items():
            paths[name] = tmp_dir / graph_specs[name].filename
            onnx.save(m, str(paths[name]))
        timings["derive_s"] = time.perf_counter() - t
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
            "logit_scale": fam.logit_scale(lm),
            "dims": {k: v for k, v in dims.items() if k != "3"},
            "opset": opset,
            "versions": versions(),
        }
        manifest["graphs"] = graph_entries(paths, graph_specs, manifest)
        t = time.perf_counter()
        manifest["class_sets"], manifest["default_class_set"] = fam.write_classes(lm, out_dir, classes)
        timings["class_sets_s"] = time.perf_counter() - t
        manifest["validation"] = {"sizes": report["sizes"], "max": _summarise(report)}
        install(out_dir, paths, graph_specs, manifest)
        timings["total_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(out_dir, manifest, report, timings)


def ops_used(path: str | os.PathLike) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})


__all__ = ["export_model", "validate_graphs", "add_class_set", "ValidationError", "ExportError", "ops_used",
           "format_parity_table", "write_class_set", "sample_inputs", "model_dims", "EXPLAIN", "CLASSIFY", "HEAD",
           "FEATURES", "HEAD_GRAD"]
