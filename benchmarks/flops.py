"""FLOPs of the exported graphs and of one explanation, and the machine's peak, to know the limit.

`graph_flops(path, batch, L)` fixes the graph's dynamic axes, runs ONNX shape inference and counts, per
node, 2 x multiply-adds for the products (Conv, ConvTranspose, MatMul, Gemm) and one FLOP per output
element for everything else (elementwise ops, pooling, softmax: small next to the products, counted so
nothing is hidden). `explanation_flops(artifacts, method, p)` adds up one explanation: explain.onnx at
batch 1 and the classifier forwards the method runs (Decom-CAM: p + 1).

`peak_gflops()` is the machine's fp32 peak: cores x FMA units x SIMD lanes x 2 x clock, from lscpu and
/proc/cpuinfo (AVX-512: 16 lanes, AVX2/FMA: 8, SSE: 4; two FMA units on the server CPUs these benchmarks
run on; the clock is the maximum lscpu reports, else the current one). Achieved / peak says how close a
run is to the hardware; the int8 peak (VNNI: 4 x the fp32 multiply-adds per lane) is reported beside it.

    python -m benchmarks.flops --artifacts artifacts/RN50 [--top-p 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

_PRODUCTS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger", "QLinearConv",
             "QLinearMatMul"}


def _fixed_model(path: str | os.PathLike, sizes: dict[str, int]):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                name = dim.dim_param
                value = sizes.get(name, sizes.get("batch") if "batch" in name else None)
                if value is not None:
                    dim.ClearField("dim_param")
                    dim.dim_value = int(value)
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.dim_value > 0 for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in model.graph.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def graph_flops(path: str | os.PathLike, batch: int = 1, classes: int | None = None) -> dict:
    """{"total": FLOPs, "products": FLOPs of the products, "unknown_nodes": nodes without shapes}."""
    sizes = {"batch": batch}
    if classes is not None:
        sizes["L"] = classes
    model = _fixed_model(path, sizes)
    shapes = _shapes(model)
    products = other = 0
    unknown = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            unknown += 1
            continue
        n_out = int(np.prod(out))
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3 if node.op_type == "QLinearConv" else 1])
            if w is None:
                unknown += 1
                continue
            products += 2 * n_out * int(np.prod(w[1:]))            # Cin/group * kh * kw per output
        elif node.op_type == "ConvTranspose":
            x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if x is None or w is None:
                unknown += 1
                continue
            products += 2 * int(np.prod(x)) * int(np.prod(w[1:]))  # Cout/group * kh * kw per input element
        elif node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if a is None:
                unknown += 1
                continue
            k = a[-1]
            if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            products += 2 * n_out * int(k)
        else:
            other += n_out
    return {"total": products + other, "products": products, "unknown_nodes": unknown}


def explanation_flops(artifacts, method_forwards: int, classes: int | None = None) -> dict:
    """One explanation at batch 1: explain.onnx + `method_forwards` classify.onnx images (Decom-CAM: p + 1)."""
    L = classes if classes is not None else (None if not artifacts.text_input else
                                             len(artifacts.load_class_set().labels))
    ex = graph_flops(artifacts.graph_path("explain"), 1, L)
    cl = graph_flops(artifacts.graph_path("classify"), 1, L)
    return {"explain": ex["total"], "classify_per_image": cl["total"], "forwards": method_forwards,
            "total": ex["total"] + method_forwards * cl["total"],
            "unknown_nodes": ex["unknown_nodes"] + cl["unknown_nodes"]}


def _lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def cpu_flags() -> set[str]:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def peak_gflops(threads: int | None = None) -> dict:
    """fp32 (and int8 with VNNI) peak of `threads` cores (default: all), with how it was derived."""
    info = _lscpu()
    flags = cpu_flags()
    cores = threads or os.cpu_count() or 1
    mhz = None
    for key in ("CPU max MHz", "CPU MHz"):
        if info.get(key):
            try:
                mhz = float(info[key])
                break
            except ValueError:
                pass
    if mhz is None:
        try:
            m = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
            mhz = float(m.group(1)) if m else None
        except OSError:
            mhz = None
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "fma" in flags or "avx" in flags) else 4
    fma_units = 2
    flops_per_cycle = lanes * fma_units * 2
    fp32 = cores * flops_per_cycle * (mhz or math.nan) / 1e3
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return {"gflops_fp32": fp32, "gops_int8": fp32 * 4 if vnni else fp32 * 2, "cores": cores, "mhz": mhz,
            "simd_lanes_fp32": lanes, "fma_units": fma_units, "vnni": vnni, "amx": "amx_int8" in flags,
            "isa": sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))}


def main(argv=None) -> int:
    from runtime.artifacts import load_artifacts

    from . import common

    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--top-p", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    art = load_artifacts(args.artifacts, verify=False)
    c, n = art.dims["C"], art.dims["h"] * art.dims["w"]
    fl = explanation_flops(art, min(args.top_p, c, n) + 1)
    peak = peak_gflops()
    rows = [["explain.onnx (batch 1)", f"{fl['explain'] / 1e9:.2f}"],
            [f"classify.onnx x {fl['forwards']}", f"{fl['forwards'] * fl['classify_per_image'] / 1e9:.2f}"],
            ["one Decom-CAM explanation", f"{fl['total'] / 1e9:.2f}"]]
    print(f"{art.model}: GFLOP per explanation (p = {args.top_p})")
    print(common.format_table(["graph", "GFLOP"], rows))
    print(f"peak: {peak['gflops_fp32']:.0f} GFLOP/s fp32 ({peak['cores']} cores x {peak['fma_units']} FMA x "
          f"{peak['simd_lanes_fp32']} lanes x 2 x {peak['mhz']} MHz); ISA {' '.join(peak['isa'])}")
    common.write_json(args.json, {"artifacts": str(args.artifacts), "model": art.model, "flops": fl, "peak": peak})
    return 0


if __name__ == "__main__":
    sys.exit(main())
