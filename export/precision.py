"""fp16 graphs: the exported fp32 graphs converted to float16 inside, float32 at their inputs and outputs.

    python -m export ... --precision fp16            export, then add the fp16 graphs (validated on ORT-CPU
                                                     where it can run them)
    python -m export.precision --artifacts DIR [--validate-on cpu|cuda] [--json FILE]
                                                     add (or re-validate) them on an existing export

Files and manifest: each graph NAME.onnx gets NAME.fp16.onnx beside it, and the manifest gets

    "precisions": {"fp16": {"graphs": {NAME: {"file", "sha256", "bytes", inputs, outputs, tolerances}},
                            "converter": ..., "validation": {"status": "passed" | "failed" | "not run",
                                                             "provider": ..., "reason"?, "rows"?}}}

The fp32 `graphs` entry is untouched, and the I/O contract is the same (runtime/spec.py), so the runtime
picks the fp16 files with `--precision fp16` (Explainer(precision="fp16")) and binds them as it binds
the fp32 ones. The conversion is onnxruntime.transformers.float16 with keep_io_types (ORT ships it in both
onnxruntime and onnxruntime-gpu).

Validation: the fp16 graphs against the fp32 eager model (export.onnx_export's references: torch autograd
on the unmodified open_clip module) at the export's (batch, L) sizes, with the fp16 tolerances below per
output. ORT's CPU provider runs these graphs (1.30 on an AVX-512 Xeon, 1.32 on an AVX2 EPYC); a provider
that cannot create or run the session makes the validation "not run" with ORT's reason, and it is done on
the GPU with `--validate-on cuda` (the device kit does that as well). A validation that ran and failed
writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


from runtime.artifacts import sha256_path
from runtime.fsutil import atomic_write, temp_dir
from runtime.spec import MANIFEST_NAME, Tolerance, family

PRECISIONS = ("fp32", "fp16")
# per output, in the units of export.onnx_export.compare: |out - ref| <= atol * max|ref| + rtol * |ref|,
# and a cosine to the reference of at least FP16_MIN_COSINE. float16 keeps 11 significant bits (relative
# rounding 4.9e-4 per operation); through RN50's 16 bottlenecks the worst element of layer4's activations
# is off by 4-6% of their scale, on ORT's CPU and CUDA providers alike (random-weight RN50: 0.37 and 0.49
# at scale 8.6), while the whole tensor keeps a cosine of 0.9992; the explicit backward's gradients reach
# 10% at their worst element with a cosine of 0.997. An element-wise bound alone would refuse correct
# fp16 graphs or pass broken ones; the cosine catches a wrong graph, the bound a local blow-up.
FP16_TOLERANCES = {
    "logits": Tolerance(atol=2e-2, rtol=2e-2),
    "activations": Tolerance(atol=8e-2, rtol=2e-2),
    "gradients": Tolerance(atol=1.5e-1, rtol=1e-1),
}
FP16_MIN_COSINE = {"logits": 0.9995, "activations": 0.998, "gradients": 0.995}
# explain.gradients of a model with a kinked position-wise head (the -lastblock exports) is compared at the
# fp16 graph's own activations (onnx_export.references_for); against the whole model's gradient at the
# reference activations only this floor holds, as fp16 activations put more pre-activations across a kink
FP16_WHOLE_MODEL_MIN_COSINE = 0.99
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def fp16_filename(name: str) -> str:
    return f"{name}.fp16.onnx"


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the float16 version of graph `src` to `dst`, its inputs and outputs kept float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def validate_fp16(lm, paths: dict[str, Path], provider: str = "CPUExecutionProvider", seed: int = 1234) -> dict:
    """The fp16 graphs against the fp32 eager model; {"status", "provider", "rows" | "reason"}."""
    import onnxruntime as ort

    from .onnx_export import VALIDATION_SIZES, compare, references_for, specs, validation_cases, whole_model_floor

    try:
        opts = [(provider, {"use_tf32": 0})] if provider == "CUDAExecutionProvider" else [provider]
        sessions = {n: ort.InferenceSession(str(p), providers=opts) for n, p in paths.items()}
        for n, s in sessions.items():
            if provider not in s.get_providers():
                raise RuntimeError(f"{provider} did not load (the session got {', '.join(s.get_providers())})")
    except Exception as e:  # noqa: BLE001 (ORT raises its own types; the reason is the result)
        return {"status": "not run", "provider": provider, "reason": str(e).splitlines()[0][:300]}
    rows = []
    graph_specs = specs(lm)   # the family's contracts (a fixed-class model has no text input)
    for b, l, refs, feeds in validation_cases(lm, VALIDATION_SIZES, seed):
        for name, sess in sessions.items():
            spec = graph_specs[name]
            try:
                outs = dict(zip(spec.output_names, sess.run(spec.output_names, feeds[name])))
            except Exception as e:  # noqa: BLE001
                return {"status": "not run", "provider": provider,
                        "reason": f"{name}: ORT run failed: {str(e).splitlines()[0][:300]}"}
            ref, whole = references_for(lm, name, outs, feeds[name], refs)
            for out_name in spec.tolerances:
                tol = FP16_TOLERANCES[out_name]
                r = compare(outs[out_name], ref[out_name], tol.atol, tol.rtol)
                r["ok"] = bool(r["ok"] and r["cosine"] >= FP16_MIN_COSINE[out_name])
                if out_name in whole:
                    r = {**r, **whole_model_floor(outs[out_name], whole[out_name], FP16_WHOLE_MODEL_MIN_COSINE)}
                    r["ok"] = bool(r["ok"] and r["whole_model_ok"])
                rows.append({"graph": name, "output": out_name, "batch": b, "L": l, "atol": tol.atol,
                             "rtol": tol.rtol, "min_cosine": FP16_MIN_COSINE[out_name], **r})
    return {"status": "passed" if all(r["ok"] for r in rows) else "failed", "provider": provider, "rows": rows}


def add_fp16_graphs(lm, out_dir: str | os.PathLike, validate_on: str = "cpu") -> dict:
    """Convert every fp32 graph of an export, validate, and record them in the manifest (see the module
    docstring). Returns the manifest's "fp16" entry; raises ExportError when a validation that ran failed
    (then nothing is written)."""
    from .onnx_export import ExportError

    out_dir = Path(out_dir)
    mpath = out_dir / MANIFEST_NAME
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    graph_specs = family(manifest.get("family")).graphs
    tmp_dir = temp_dir(out_dir)   # private, random name; removed below whatever happens
    tmp = {name: tmp_dir / fp16_filename(name) for name in manifest["graphs"]}
    try:
        for name, p in tmp.items():
            convert_fp16(out_dir / manifest["graphs"][name]["file"], p)
        validation = validate_fp16(lm, tmp, PROVIDERS[validate_on])
        if validation["status"] == "failed":
            bad = [r for r in validation["rows"] if not r["ok"]]
            raise ExportError(f"{out_dir}: fp16 graphs fail their tolerances on {validation['provider']}: "
                             + "; ".join(f"{r['graph']}.{r['output']} (batch {r['batch']}, L {r['L']}) max_abs "
                                         f"{r['max_abs']:.3g} cosine {r['cosine']:.5f}" for r in bad[:4]))
        graphs = {}
        for name, p in tmp.items():
            final = out_dir / fp16_filename(name)
            os.replace(p, final)   # out of the private temporary folder
            io = graph_specs[name].to_json()
            io["tolerances"] = {k: {"atol": FP16_TOLERANCES[k].atol, "rtol": FP16_TOLERANCES[k].rtol,
                                    "min_cosine": FP16_MIN_COSINE[k]} for k in io["tolerances"]}
            graphs[name] = {"file": final.name, "sha256": sha256_path(final), "bytes": final.stat().st_size, **io}
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    entry = {"graphs": graphs, "converter": CONVERTER, "validation": validation}
    manifest.setdefault("precisions", {})["fp16"] = entry
    atomic_write(mpath, json.dumps(manifest, indent=2))
    return entry


def validation_table(entry: dict) -> str:
    v = entry["validation"]
    if v["status"] == "not run":
        return f"fp16 graphs written; validation not run on {v['provider']}: {v['reason']}"
    lines = [f"fp16 validation on {v['provider']}: {v['status']}",
             f"{'graph':<9} {'output':<12} {'batch':>5} {'L':>3} {'max_abs':>10} {'cosine':>12}  ok"]
    for r in v["rows"]:
        lines.append(f"{r['graph']:<9} {r['output']:<12} {r['batch']:>5} {r['L']:>3} {r['max_abs']:>10.3g} "
                     f"{r['cosine']:>12.8f}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", required=True, help="an export (python -m export)")
    p.add_argument("--validate-on", default="cpu", choices=tuple(PROVIDERS), help="ORT provider of the validation")
    p.add_argument("--pretrained", default=None, help="checkpoint path, for an export made from a checkpoint")
    p.add_argument("--json", default=None, help="also write the fp16 entry here")
    args = p.parse_args(argv)
    from .models import load_exported_model

    manifest = json.loads((Path(args.artifacts) / MANIFEST_NAME).read_text(encoding="utf-8"))
    lm = load_exported_model(manifest, args.pretrained)
    from .onnx_export import ExportError

    try:
        entry = add_fp16_graphs(lm, args.artifacts, args.validate_on)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(validation_table(entry))
    if args.json:
        atomic_write(args.json, json.dumps(entry, indent=2))
    return 0 if entry["validation"]["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
