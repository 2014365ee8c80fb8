"""int8 graphs: static QDQ quantization of an export, validated against its fp32 graphs.

    python -m export quantize --artifacts DIR [--images DIR] [--n-calibration 32] [--graphs classify,features]
        [--calibration percentile|minmax|entropy] [--explain-trunk]

What is quantized: the convolutions (the trunk, where the time goes: the p + 1 classifier forwards of a
Decom-CAM explanation are ~90% of it), with per-channel int8 weights and uint8 activations (U8S8, ONNX
Runtime's fast path on x86; `reduce_range` keeps AVX2 machines without VNNI from saturating), in the QDQ
format (QuantizeLinear/DequantizeLinear pairs: standard ops, readable by every ONNX Runtime provider and by
TensorRT). The head (MatMul, the attention pool, the generated backward) stays fp32. explain.onnx is
quantized only with `--explain-trunk` (its trunk int8, its head backward fp32): the gradients then carry
the trunk's quantization error into the decomposition, which the validation measures.

Calibration: activation ranges from `--images`, a folder of the user's own photos (required: ranges taken
from other images are wrong for theirs), preprocessed with the export's own policy; the first `n` calibrate
and the next `n_check` validate (never the same images). `--generated-calibration` calibrates on generated
photo-like images instead: for tests only, said loudly, and recorded in the manifest. Validation against the
fp32 graph of the same export on the held-out images: per-image cosine of the logits, top-1 agreement, and
for explain.onnx the cosine of the gradients. Nothing is written (ValidationError) when a graph keeps
fp32's top-1 class on fewer than `min_top1` (default TOP1_TARGET, 99%) of the held-out images, or when its
worst logit cosine is below `min_cosine` (default INT8_MIN_COSINE), unless `force`: int8 is an explicit
opt-in (`--precision int8`), never a default, and never a silently wrong graph.

The int8 graphs are recorded like the fp16 ones (export/precision.py), under the manifest's
`precisions.int8`: `graphs` (per graph: file `<graph>.int8.onnx`, sha256, bytes, the fp32 graph's I/O
contract), `quantization` (the settings) and `validation` (per graph). The runtime uses them with
`--precision int8` and runs the graphs without an int8 version in fp32. Quantizing again adds to (or
replaces) the graphs already there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from runtime.artifacts import load_artifacts, sha256_path
from runtime.fsutil import temp_dir
from runtime.spec import MANIFEST_NAME

from .onnx_export import ExportError, ValidationError, _atomic_write_text, log

INT8_MIN_COSINE = 0.5         # default floor of the worst per-image logit cosine against fp32 (catastrophic only)
TOP1_TARGET = 0.99            # top-1 agreement with fp32 on held-out images below which nothing is written
CALIBRATIONS = ("percentile", "minmax", "entropy")


def generated_photos(n: int, seed: int = 0, size: tuple[int, int] = (240, 320)) -> list[np.ndarray]:
    """Photo-like uint8 RGB images: smooth colour fields, a few shapes, sensor noise (deterministic)."""
    from .photos import photo_like_rgb

    rng = np.random.default_rng(seed)
    h, w = size
    return [photo_like_rgb(rng, h, w, grid=(3, 7), shapes=(2, 6), level=(220.0, 15.0), radius_div=12, noise=6.0)
            for _ in range(n)]


def _image_tensors(art, folder: str | None, n: int, seed: int) -> tuple[np.ndarray, str]:
    """[n, 3, S, S] float32 preprocessed with the export's policy, and where they came from (folder None:
    generated images, for tests)."""
    if folder is None:
        rgbs = generated_photos(n, seed)
        source = f"generated photo-like images (seed {seed}; for tests, not calibrated for real photos)"
    else:
        from runtime.inputs import IMAGE_EXTENSIONS
        from runtime.images import ImageError, load_image

        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        rgbs = []
        for p in files:
            try:
                rgbs.append(load_image(p))
            except ImageError as e:
                log(f"[quantize] skipped {e}")
            if len(rgbs) == n:
                break
        if len(rgbs) < n:
            raise ExportError(f"{folder}: {len(rgbs)} readable images, {n} needed for calibration and validation")
        source = f"{len(rgbs)} images from {folder}"
    return np.stack([art.preprocess_image(im)[0] for im in rgbs]).astype(np.float32), source


def _feeds(art, x: np.ndarray, graph: str, batch: int = 1, targets: np.ndarray | None = None):
    """Graph feeds over x in batches; explain.onnx gets `targets` (default -1: each image's top-1)."""
    text = art.load_class_set().embeddings if art.text_input else None
    for i in range(0, len(x), batch):
        feed = {"image": x[i:i + batch]}
        if text is not None:
            feed["text"] = text
        if graph == "explain":
            t = np.full(len(feed["image"]), -1, np.int64) if targets is None else targets[i:i + batch]
            feed["target"] = np.ascontiguousarray(t, dtype=np.int64)
        yield feed


def _run(path: Path, feeds) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [dict(zip(names, sess.run(None, f))) for f in feeds]
    return {k: np.concatenate([o[k] for o in outs]) for k in names}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def quantize_export(artifacts: str | os.PathLike, graphs=("classify", "features"), images: str | None = None,
                    n_calibration: int = 32, n_check: int = 32, calibration: str = "percentile",
                    explain_trunk: bool = False, seed: int = 0, min_cosine: float | None = None,
                    generated_calibration: bool = False, min_top1: float = TOP1_TARGET,
                    force: bool = False) -> dict:
    """Write `<graph>.int8.onnx` for each graph and add them to the manifest; returns the report.

    images: the folder of the user's photos to calibrate and validate on (required unless
    generated_calibration, which uses generated images: for tests). force: write graphs below min_top1 or
    min_cosine too (the report and the manifest still say how far below)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    floor = INT8_MIN_COSINE if min_cosine is None else float(min_cosine)
    if images is None and not generated_calibration:
        raise ExportError("int8 needs the user's own photos to calibrate on: --images DIR (a folder of photos like "
                          "the ones to explain; --n-calibration + --n-check of them are read)")
    if images is not None and generated_calibration:
        raise ExportError("--images and --generated-calibration exclude each other")
    if generated_calibration:
        log("[quantize] WARNING: calibrating on generated images (--generated-calibration), which is for tests: "
            "the int8 graphs are not calibrated for real photos")
    if calibration not in CALIBRATIONS:
        raise ExportError(f"unknown calibration '{calibration}'; valid: {', '.join(CALIBRATIONS)}")
    if n_calibration < 1 or n_check < 1:
        raise ExportError("--n-calibration and --n-check must be >= 1")
    root = Path(artifacts)
    art = load_artifacts(root, graphs=())
    graphs = list(graphs) + (["explain"] if explain_trunk and "explain" not in graphs else [])
    for g in graphs:
        if g not in art.manifest["graphs"]:
            raise ExportError(f"{root / MANIFEST_NAME}: no '{g}' graph to quantize")
        art.check_graph(g)
    x, source = _image_tensors(art, images, n_calibration + n_check, seed)
    x_cal, x_check = x[:n_calibration], x[n_calibration:]
    method = {"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
              "entropy": CalibrationMethod.Entropy}[calibration]
    report, entries = {}, {}
    tmp = temp_dir(root)   # private, random name; removed below whatever happens
    try:
        for g in graphs:
            t0 = time.perf_counter()
            log(f"[quantize] {art.model}: {g}.onnx -> {g}.int8.onnx ({calibration}, {n_calibration} images) ...")
            src = art.graph_path(g)
            pre = tmp / f"{g}.pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = _feeds(art, x_cal, g)

                def get_next(self):
                    return next(self.it, None)

            out = tmp / f"{g}.int8.onnx"
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
                quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["Conv"], per_channel=True, reduce_range=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=method)
            ref = _run(src, _feeds(art, x_check, g, batch=8))
            # gradients of the same class on both sides (fp32's top-1), so a flipped top-1 is not counted twice
            tgt = ref["logits"].argmax(1)
            got = _run(out, _feeds(art, x_check, g, batch=8, targets=tgt))
            cos = _cosines(got["logits"], ref["logits"])
            row = {"graph": g, "n_check": len(x_check), "logits_cosine_min": float(cos.min()),
                   "logits_cosine_median": float(np.median(cos)),
                   "top1_agreement": float((got["logits"].argmax(1) == ref["logits"].argmax(1)).mean()),
                   "logits_max_abs_over_scale": float(np.abs(got["logits"] - ref["logits"]).max()
                                                      / max(np.abs(ref["logits"]).max(), 1e-30)),
                   "seconds": time.perf_counter() - t0}
            if "gradients" in ref:
                gc = _cosines(got["gradients"], ref["gradients"])
                row["gradients_cosine_min"] = float(gc.min())
                row["gradients_cosine_median"] = float(np.median(gc))
            report[g] = row
            problems = []
            if row["top1_agreement"] < min_top1:
                problems.append(f"keeps fp32's top-1 class on {100 * row['top1_agreement']:.1f}% of "
                                f"{row['n_check']} held-out images (required {100 * min_top1:.0f}%)")
            if row["logits_cosine_min"] < floor:
                problems.append(f"worst logit cosine {row['logits_cosine_min']:.4f} against fp32 (required {floor})")
            if problems and force:
                log(f"[quantize] WARNING: {g}.int8.onnx {'; '.join(problems)}; written anyway (--force)")
            elif problems:
                raise ValidationError([{"graph": g, "output": "logits", "batch": len(x_check), "L": "-",
                                        "max_abs": row["logits_max_abs_over_scale"], "max_rel": float("nan"),
                                        "atol": 0, "rtol": 0,
                                        "reason": f"int8 {'; '.join(problems)}; nothing written (--force writes "
                                                  f"it anyway)"}])
            base = art.manifest["graphs"][g]
            entries[g] = {"file": f"{g}.int8.onnx", "inputs": base["inputs"], "outputs": base["outputs"]}
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        int8 = manifest.setdefault("precisions", {}).setdefault("int8", {"graphs": {}, "validation": {}})
        int8["quantization"] = {"format": "QDQ", "ops": ["Conv"], "weights": "int8 per-channel",
                                "activations": "uint8 per-tensor", "reduce_range": True,
                                "calibration": calibration, "calibration_images": source,
                                "n_calibration": n_calibration, "min_logit_cosine": floor,
                                "min_top1_agreement": min_top1, "forced": bool(force),
                                "generated_calibration": bool(generated_calibration)}
        for g, entry in entries.items():
            dst = root / entry["file"]
            os.replace(tmp / entry["file"], dst)   # out of the private temporary folder
            entry["sha256"] = sha256_path(dst)
            entry["bytes"] = dst.stat().st_size
            int8["graphs"][g] = entry
            int8["validation"][g] = {k: v for k, v in report[g].items() if k not in ("graph", "seconds")}
        _atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    head = f"{'graph':<9} {'n':>4} {'top-1 agree':>11} {'logit cos min':>13} {'grad cos min':>12} {'s':>6}"
    lines = [head, "-" * len(head)]
    for r in report.values():
        gc = f"{r['gradients_cosine_min']:.4f}" if "gradients_cosine_min" in r else "-"
        lines.append(f"{r['graph']:<9} {r['n_check']:>4} {r['top1_agreement']:>11.3f} {r['logits_cosine_min']:>13.4f} "
                     f"{gc:>12} {r['seconds']:>6.1f}")
    return "\n".join(lines)
