"""Numerical parity of the runtime's engines with the eager PyTorch reference, on generated images.

    python -m benchmarks.parity --artifacts DIR --engines cpu[,cuda,trt] [--precision fp32,fp16]
        [--n-images N] [--top-p 10] [--method decomcam] --json FILE

The reference is fp32 eager PyTorch on the CPU, on the export's own torch model:
export.graphs.autograd_reference for the graph outputs (logits, layer4 activations, d logit_target / dA by
autograd) and export.reference.decomcam_reference for the method. Both sides get the same preprocessed
images (runtime.images) and the same target (the reference's top-1 class, passed to both explicitly, so a
near tie between two classes cannot make them explain different classes).

Metrics, each worst case over the images:
    logits, activations, gradients   max abs diff; max rel diff = max |a - r| / max(|r|, 1e-3 max|r|) (the
                                     floor keeps near-zero reference entries from dividing by ~0); cosine
    components H_i                   |cos| of each component map with the reference's map of the same index
                                     (both are sign-fixed, runtime/config.py); two all-zero (null) maps
                                     count as 1
    saliency                         max abs diff, Pearson correlation, IoU of the top 10% pixels
fp16: cpu and cuda run the export's fp16 graphs (python -m export --precision fp16), trt its fp32 graphs
with trt_fp16_enable; fp16-masks (cpu, cuda): the fp16 classify graph for the masked forwards, the fp32
explain graph for the activations and gradients; other pairs are skipped with the reason. A GPU engine runs only
when runtime.engines.probe_engine proves its provider loads (the sessions are checked again when created),
so a CUDA run is never reported as trt. The CUDA provider runs with TF32 off (use_tf32 = 0): parity
measures the graphs' fp32 arithmetic, not TF32's 10-bit mantissa.

Two more comparisons tell where a difference comes from:
    "eager fp32 on its A, dy/dA"     the eager method fed the engine's own activations and gradients: what is
                                     left is the method's implementation (decomposition, masks, blur, blend,
                                     integration) plus the classifier's rounding
    --oracle-fp64                    the same model and method in float64 eager: each fp32 side (the engine
                                     and the eager reference itself) against it, i.e. the fp32 noise floor
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from . import common

ENGINES = ("cpu", "cuda", "trt")
PRECISIONS = ("fp32", "fp16", "fp16-masks")
REL_FLOOR = 1e-3
TOP_FRACTION = 0.10


# ----------------------------------------------------------------------------------------------------
# Metrics

def tensor_diff(a: np.ndarray, r: np.ndarray) -> dict:
    """Per item along axis 0 -> worst case: max abs, max rel (floored), min cosine."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    r = np.asarray(r, np.float64).reshape(len(r), -1)
    d = np.abs(a - r)
    scale = np.abs(r).max()
    rel = d / np.maximum(np.abs(r), REL_FLOOR * scale) if scale > 0 else d
    cos = [cosine(x, y) for x, y in zip(a, r)]
    return {"max_abs": float(d.max()), "max_rel": float(rel.max()), "ref_max_abs": float(scale),
            "cosine_min": float(min(cos))}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of the mean-centred maps (1 for two constant maps)."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return cosine(a - a.mean(), b - b.mean())


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the `fraction` highest-valued pixels of two maps (the same pixel count on each side)."""
    a, b = np.ravel(a), np.ravel(b)
    k = max(1, int(math.ceil(fraction * a.size)))
    sa = set(np.argpartition(-a, k - 1)[:k].tolist())
    sb = set(np.argpartition(-b, k - 1)[:k].tolist())
    return len(sa & sb) / len(sa | sb)


def method_parity(got: dict, ref) -> dict:
    """A method result vs a ReferenceResult (same images, same targets). `got` holds saliency [B, S, S],
    components [B, p, S, S], weights [B, p] and target [B] (see `from_explanations`)."""
    sal = np.asarray(got["saliency"])
    comp_cos = np.array([[abs(cosine(c, rc)) for c, rc in zip(cs, rcs)]
                         for cs, rcs in zip(got["components"], ref.components)])     # [B, p]
    return {
        "targets_equal": bool(np.array_equal(np.asarray(got["target"]), np.asarray(ref.target))),
        "components_abs_cos_min": float(comp_cos.min()),
        "components_abs_cos_mean": float(comp_cos.mean()),
        "components_abs_cos_min_per_index": [float(v) for v in comp_cos.min(0)],
        "weights_max_abs": float(np.abs(np.asarray(got["weights"]) - ref.weights).max()),
        "saliency_max_abs": float(np.abs(sal - ref.saliency).max()),
        "saliency_pearson_min": float(min(pearson(a, r) for a, r in zip(sal, ref.saliency))),
        "saliency_pearson_per_image": [pearson(a, r) for a, r in zip(sal, ref.saliency)],
        "saliency_top10_iou_min": float(min(top_iou(a, r) for a, r in zip(sal, ref.saliency))),
    }


def from_explanations(exps: list) -> dict:
    return {"saliency": np.stack([e.saliency for e in exps]), "components": np.stack([e.components for e in exps]),
            "weights": np.stack([e.weights for e in exps]), "target": np.array([e.target for e in exps])}


def from_reference(ref) -> dict:
    return {"saliency": ref.saliency, "components": ref.components, "weights": ref.weights, "target": ref.target}


# ----------------------------------------------------------------------------------------------------
# Run

def photos(folder: str, n: int) -> tuple[list[np.ndarray], str]:
    """The first n decodable images of a folder (recursive, path order), and how the report names them."""
    from runtime.inputs import expand_inputs
    from runtime.images import ImageError, load_image

    paths, problems = expand_inputs([folder])
    if problems:
        raise SystemExit(f"error: --images {folder}: {problems[0][1]}")
    rgbs = []
    for p in sorted(paths):
        if len(rgbs) == n:
            break
        try:
            rgbs.append(load_image(str(p)))
        except ImageError as e:
            log(f"skipped {p}: {e}")
    if not rgbs:
        raise SystemExit(f"error: --images {folder}: no decodable image")
    return rgbs, f"the first {len(rgbs)} photos of {folder} (path order)"


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def skip_reason(engine: str, precision: str, has_fp16: bool = False, device_id: int = 0) -> str | None:
    from runtime.engines import probe_engine

    if engine not in ENGINES:
        return f"unknown engine '{engine}'; valid engines: {', '.join(ENGINES)}"
    if precision not in PRECISIONS:
        return f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}"
    if precision == "fp16-masks" and engine == "trt":
        return "fp16-masks runs the export's fp16 graphs: cpu and cuda only (trt has --fp16 on the fp32 graphs)"
    if precision in ("fp16", "fp16-masks") and engine in ("cpu", "cuda") and not has_fp16:
        return (f"the {engine} engine runs fp16 only on fp16 graphs, and this export has none "
                f"(export --precision fp16)")
    return probe_engine(engine, device_id) if engine != "cpu" else None


def run_parity(args) -> dict:
    import copy

    import torch

    from export.graphs import autograd_reference
    from export.reference import decomcam_reference
    from runtime.artifacts import load_artifacts
    from runtime.config import DecomCamConfig
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer

    torch.set_num_threads(args.threads)
    artifacts = load_artifacts(args.artifacts)
    lm = common.load_torch_model(artifacts.manifest, args.pretrained)
    model = lm.model.eval()
    try:
        common.check_same_model(artifacts, lm, seed=args.seed)
    except common.ModelMismatch as e:
        raise SystemExit(f"error: {e}") from None
    cs = artifacts.load_class_set(args.classes)
    text = None if cs.embeddings is None else torch.from_numpy(cs.embeddings)  # None: fixed classes
    if args.images:
        rgbs, image_desc = photos(args.images, args.n_images)
    else:
        rgbs = common.photo_like_batch(args.n_images, seed=args.seed)
        image_desc = f"benchmarks.common.photo_like 320x240, seed {args.seed}"
    x = np.stack([artifacts.preprocess_image(im)[0] for im in rgbs])
    xt = torch.from_numpy(x)
    cfg = DecomCamConfig(top_p=args.top_p)

    def reference(m, image, txt, grads):
        return decomcam_reference(m, image, txt, artifacts.mean, artifacts.std, target=target, config=cfg,
                                  batch_size=args.classify_batch, grads=grads, method=args.method)

    log("reference: autograd + eager Decom-CAM (fp32) ...")
    want = torch.full((len(rgbs),), -1, dtype=torch.long)
    logits_r, act_r, grad_r = autograd_reference(model, xt, text, want)
    target = logits_r.argmax(1)
    ref = reference(model, xt, text, (logits_r, act_r, grad_r))
    ref_graph = {"logits": logits_r.numpy(), "activations": act_r.numpy(), "gradients": grad_r.numpy()}

    oracle = None
    if args.oracle_fp64:  # the same model and method in float64: how far is each fp32 implementation from it?
        log("oracle: the same in float64 ...")
        m64 = copy.deepcopy(model).double()
        t64 = None if text is None else text.double()
        g64 = autograd_reference(m64, xt.double(), t64, target)
        oracle = {"graph": {"logits": g64[0].numpy(), "activations": g64[1].numpy(), "gradients": g64[2].numpy()},
                  "method": reference(m64, xt.double(), t64, g64)}
        del m64

    results, skipped = [], []
    for engine in parse_list(args.engines):
        for precision in parse_list(args.precision):
            reason = skip_reason(engine, precision, bool(artifacts.manifest.get("precisions", {}).get("fp16")),
                                 args.device_id)
            if reason:
                skipped.append({"engine": engine, "precision": precision, "reason": reason})
                log(f"skipped {engine} {precision}: {reason}")
                continue
            log(f"{engine} {precision} ...")
            opts = EngineOptions(device_id=args.device_id, fp16=precision == "fp16" and engine == "trt",
                                 intra_op_threads=args.threads, allow_spinning=False, tf32=False)
            kw = {"precision": precision} if precision != "fp32" and engine in ("cpu", "cuda") else {}
            try:   # a provider without kernels for these graphs (fp16 on some CPUs) is a skip, not a crash
                ex = Explainer.from_artifacts(args.artifacts, engine=engine, engine_options=opts,
                                              class_set=args.classes, batch_size=args.classify_batch, **kw)
                be = ex.backend
                out = ex.runner("explain").run({**ex.feed(image=be.asarray(x)),
                                                "target": be.asarray(target.numpy().astype(np.int64))})
                out = {k: be.to_host(v) for k, v in out.items()}
                # the classify graph too: under fp16-masks it is the only fp16 graph
                classify_logits = be.to_host(ex.classify(be.asarray(x)))
                exps = from_explanations(ex.explain_arrays(rgbs, target=[int(t) for t in target],
                                                           top_p=args.top_p, method=args.method))
            except Exception as e:  # noqa: BLE001 (ORT raises its own types; the reason is the result)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                skipped.append({"engine": engine, "precision": precision, "reason": reason})
                log(f"skipped {engine} {precision}: {reason}")
                continue
            row = {"engine": engine, "precision": precision,
                   "provider": ex.runner("classify").session.get_providers()[0],
                   "providers": ex.runner("classify").session.get_providers(),
                   "tf32": False,
                   "graphs": {**{k: tensor_diff(out[k], ref_graph[k]) for k in ref_graph},
                              "classify logits": tensor_diff(classify_logits, ref_graph["logits"])},
                   "graph_precisions": dict(ex.graph_precisions),
                   "method": method_parity(exps, ref)}
            # the eager method fed this engine's activations and gradients: isolates the method's implementation
            # (decomposition, masks, blur, integration) from the graphs' floating-point differences
            same = reference(model, xt, text, (torch.from_numpy(out["logits"]), torch.from_numpy(out["activations"]),
                                               torch.from_numpy(out["gradients"])))
            row["method_given_engine_graph_outputs"] = method_parity(exps, same)
            if oracle:
                row["graphs_vs_fp64"] = {k: tensor_diff(out[k], oracle["graph"][k]) for k in ref_graph}
                row["method_vs_fp64"] = method_parity(exps, oracle["method"])
            results.append(row)
    report = {"results": results, "skipped": skipped}
    if oracle:
        report["reference_vs_fp64"] = {
            "graphs": {k: tensor_diff(ref_graph[k], oracle["graph"][k]) for k in ref_graph},
            "method": method_parity(from_reference(ref), oracle["method"]),
        }
    report["settings"] = {
        "artifacts": str(args.artifacts), "model": artifacts.model,
        "pretrained_id": artifacts.manifest.get("pretrained_id"), "input_size": artifacts.input_size,
        "class_set": cs.name, "n_images": len(rgbs), "top_p": args.top_p, "method": args.method,
        "threads": args.threads, "targets": [int(t) for t in target], "oracle_fp64": bool(args.oracle_fp64),
        "reference": "fp32 eager PyTorch on the CPU (autograd_reference, decomcam_reference)",
        "images": image_desc, "n_images_explained": len(rgbs),
        "max_rel": f"max |a - r| / max(|r|, {REL_FLOOR:g} * max|r|)",
        "iou": f"top {TOP_FRACTION:.0%} pixels",
    }
    return report


def parity_tables(report: dict) -> str:
    g_rows, m_rows = [], []

    def grow(name, prec, against, graphs):
        for k, d in graphs.items():
            g_rows.append([name, prec, against, k, f"{d['max_abs']:.2e}", f"{d['max_rel']:.2e}",
                           f"{d['ref_max_abs']:.3g}", f"{1.0 - d['cosine_min']:.1e}"])

    def mrow(name, prec, against, m):
        m_rows.append([name, prec, against, "yes" if m["targets_equal"] else "NO",
                       f"{m['components_abs_cos_min']:.6f}", f"{m['weights_max_abs']:.2e}",
                       f"{m['saliency_max_abs']:.2e}", f"{m['saliency_pearson_min']:.7f}",
                       f"{float(np.median(m['saliency_pearson_per_image'])):.7f}",
                       f"{m['saliency_top10_iou_min']:.4f}"])

    for r in report["results"]:
        grow(r["engine"], r["precision"], "torch fp32", r["graphs"])
        if "graphs_vs_fp64" in r:
            grow(r["engine"], r["precision"], "torch fp64", r["graphs_vs_fp64"])
        mrow(r["engine"], r["precision"], "eager fp32", r["method"])
        mrow(r["engine"], r["precision"], "eager fp32 on its A, dy/dA", r["method_given_engine_graph_outputs"])
        if "method_vs_fp64" in r:
            mrow(r["engine"], r["precision"], "eager fp64", r["method_vs_fp64"])
    if "reference_vs_fp64" in report:
        grow("torch (reference)", "fp32", "torch fp64", report["reference_vs_fp64"]["graphs"])
        mrow("torch (reference)", "fp32", "eager fp64", report["reference_vs_fp64"]["method"])
    s = report["settings"]
    out = [
        f"graph outputs vs torch autograd ({s['model']}, {s['n_images']} images, worst image)\n"
        + common.format_table(["engine", "prec", "against", "output", "max abs", "max rel", "ref max |r|",
                               "1 - cosine (worst)"], g_rows, "llllrrrr"),
        f"{s['method']} p={s['top_p']} vs export.reference.decomcam_reference (worst image)\n"
        + common.format_table(["engine", "prec", "against", "same target", "comp |cos| min", "weights max abs",
                               "saliency max abs", "Pearson min", "Pearson median", "top-10% IoU min"], m_rows,
                               "llllrrrrrr"),
    ]
    for sk in report["skipped"]:
        out.append(f"skipped {sk['engine']} {sk['precision']}: {sk['reason']}")
    return "\n\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    p.add_argument("--engines", default="cpu", help=f"comma list of {', '.join(ENGINES)} (default cpu)")
    p.add_argument("--precision", default="fp32", help="comma list of fp32, fp16, fp16-masks (default fp32)")
    p.add_argument("--n-images", type=int, default=4, help="images, explained as one batch (default 4)")
    p.add_argument("--images", default=None,
                   help="a folder of photos (recursive; the first N in path order): real images instead of generated")
    p.add_argument("--top-p", type=int, default=10, help="Decom-CAM components p (default 10)")
    p.add_argument("--method", default="decomcam", choices=("decomcam", "decomcam-authors"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ORT threads (default all cores)")
    p.add_argument("--classify-batch", type=int, default=32, help="images per classifier call (default 32)")
    p.add_argument("--classes", default=None, help="class set (default: the export's default)")
    p.add_argument("--pretrained", default=None, help="checkpoint path, for an export made from a checkpoint")
    p.add_argument("--device-id", type=int, default=0, help="GPU ordinal")
    p.add_argument("--oracle-fp64", action="store_true",
                   help="also run the eager reference in float64 and compare every fp32 side with it")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_images < 1:
        raise SystemExit("--n-images must be >= 1")
    load_start = common.load_average()
    report = {"benchmark": "parity", **run_parity(args)}
    report["machine"] = common.machine_info(args.threads)
    report["machine"]["load_average"] = {"start": load_start, "end": common.load_average()}
    report["command"] = common.command_line("benchmarks.parity", argv)
    report["table"] = parity_tables(report)
    common.write_json(args.json, report)
    print(f"parity: {common.describe_machine(report['machine'])}")
    print(f"command: {report['command']}\n")
    print(report["table"])
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
