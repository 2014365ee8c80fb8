"""CuPy numerics against numpy/OpenCV on the GPU machine, with no onnxruntime-gpu needed.

    python -m benchmarks.gpu.numerics --artifacts DIR [--xp cupy|fake] [--json FILE]

Three checks, each against an independent host computation:
    operators    MatrixBackend(cupy) resize (bilinear, bicubic) and blur vs NumpyBackend (OpenCV): max abs diff
    eigh         the batched symmetric eigendecomposition at n = 16, 49, 81, 144, 196 (B = 8), float64:
                 CuPy's device path (cupy.linalg.eigh -> cuSOLVER syevjBatched) and the runtime's path
                 (host LAPACK with the copies): eigenvalue error vs numpy, reconstruction |V L V^T - G| and
                 orthogonality |V^T V - I|, and the median time of each (after a warm-up)
    explainer    Explainer(backend="cupy") vs the numpy back end on the same graphs and targets (any
                 onnxruntime: with a CPU one the runner round-trips through the host): saliency max abs diff
                 and Pearson, same targets, and the host<->device copies of one call
--xp fake runs the same code on the numpy stand-in of tests/fake_cupy.py (a dry run of the kit on a
machine without a GPU: it proves the script, not the GPU; the report says so).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .. import common

EIGH_SIZES = (16, 49, 81, 144, 196)


def _module(xp: str):
    if xp == "fake":
        from tests.fake_cupy import FakeCupy

        return FakeCupy()
    import cupy

    return cupy


def _sync(mod) -> None:
    mod.cuda.get_current_stream().synchronize()


def _median_ms(fn, reps: int = 10) -> float:
    fn()  # warm-up: kernel compilation, cuSOLVER handles
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def check_operators(mod) -> list[dict]:
    from runtime.backend import MatrixBackend, NumpyBackend

    rng = np.random.default_rng(0)
    dev, host = MatrixBackend(mod, name="cupy"), NumpyBackend()
    rows = []
    maps = rng.random((20, 7, 7)).astype(np.float32)
    for interp in ("bilinear", "bicubic"):
        got = dev.to_host(dev.resize(dev.asarray(maps), 224, interp))
        rows.append({"op": f"resize 7x7->224 {interp}", "max_abs": float(np.abs(got - host.resize(maps, 224, interp)).max())})
    imgs = rng.random((4, 3, 224, 224)).astype(np.float32)
    got = dev.to_host(dev.blur(dev.asarray(imgs), 10.0, 30))
    rows.append({"op": "blur 224 sigma 10 r 30", "max_abs": float(np.abs(got - host.blur(imgs, 10.0, 30)).max())})
    return rows


def check_eigh(mod, batch: int = 8) -> list[dict]:
    from runtime.backend import MatrixBackend

    rows = []
    for n in EIGH_SIZES:
        rng = np.random.default_rng(n)
        a = rng.standard_normal((batch, n, 3 * n))
        gram = a @ a.transpose(0, 2, 1)                                   # [B, n, n] symmetric PSD
        ref = np.linalg.eigvalsh(gram)
        scale = np.abs(gram).max()
        for path in ("device", "host"):
            be = MatrixBackend(mod, name="cupy")
            be._device_eigh = path == "device"
            g = be.asarray(gram)

            def run():
                w, v = be.eigh(g)
                _sync(mod)
                return w, v

            try:
                w, v = run()
                ms = _median_ms(run)
            except Exception as e:  # noqa: BLE001 (a failing device path is a result)
                rows.append({"n": n, "path": path, "error": f"{type(e).__name__}: {e}"})
                continue
            w, v = be.to_host(w), be.to_host(v)
            recon = v @ (w[:, :, None] * v.transpose(0, 2, 1))
            eye = np.eye(n)[None]
            rows.append({"n": n, "batch": batch, "path": path, "median_ms": ms,
                         "eigenvalue_rel_err": float(np.abs(w - ref).max() / np.abs(ref).max()),
                         "reconstruction_rel_err": float(np.abs(recon - gram).max() / scale),
                         "orthogonality_err": float(np.abs(v.transpose(0, 2, 1) @ v - eye).max())})
    return rows


def check_explainer(mod, artifacts: str, n_images: int = 4) -> dict:
    from runtime.backend import MatrixBackend, TransferLog
    from runtime.explainer import Explainer

    from .. import parity

    rgbs = common.photo_like_batch(n_images, seed=0)
    ref = Explainer.from_artifacts(artifacts).explain(rgbs)
    be = MatrixBackend(mod, name="cupy")
    ex = Explainer.from_artifacts(artifacts, backend=be)
    got = ex.explain(rgbs, target=[e.target for e in ref])
    # decomcam-ig: the path alpha_k A stacked on the device and head_grad.onnx (skipped on an export without it)
    ig = None
    if "head_grad" in ex.artifacts.manifest["graphs"]:
        ig_ref = Explainer.from_artifacts(artifacts).explain(rgbs, method="decomcam-ig")
        ig_got = ex.explain(rgbs, method="decomcam-ig", target=[e.target for e in ig_ref])
        ig = {"saliency_max_abs": float(max(np.abs(a.saliency - b.saliency).max() for a, b in zip(ig_got, ig_ref))),
              "saliency_pearson_min": float(min(parity.pearson(a.saliency, b.saliency)
                                                for a, b in zip(ig_got, ig_ref)))}
    return {
        "decomcam_ig": ig,
        "engine": ex.engine, "session_providers": ex.runner("explain").session.get_providers(),
        "runner": "bound" if ex.runner("explain").bound else "host round trip",
        "targets_equal": all(a.target == b.target for a, b in zip(got, ref)),
        "saliency_max_abs": float(max(np.abs(a.saliency - b.saliency).max() for a, b in zip(got, ref))),
        "saliency_pearson_min": float(min(parity.pearson(a.saliency, b.saliency) for a, b in zip(got, ref))),
        "transfers": {"totals": TransferLog.totals(got[0].transfers), "copies": got[0].transfers},
    }


def tables(rep: dict) -> str:
    out = [f"array module: {rep['xp']}"]
    out.append(common.format_table(["operator", "max abs vs OpenCV"],
                                   [[r["op"], f"{r['max_abs']:.2e}"] for r in rep["operators"]], "lr"))
    rows = [[r["n"], r["path"], r.get("error", "")[:60] or common.fmt(r["median_ms"], 3),
             f"{r.get('eigenvalue_rel_err', float('nan')):.1e}", f"{r.get('reconstruction_rel_err', float('nan')):.1e}",
             f"{r.get('orthogonality_err', float('nan')):.1e}"] for r in rep["eigh"]]
    out.append(f"eigh, batch {rep['eigh'][0].get('batch', '?')} float64 (device = cupy.linalg.eigh; host = the "
               f"runtime's path, copies included)\n"
               + common.format_table(["n", "path", "median ms", "eigval rel err", "recon rel err", "orth err"],
                                     rows, "rlrrrr"))
    e = rep.get("explainer")
    if e:
        t = e["transfers"]["totals"]
        out.append(f"explainer ({e['runner']}, {', '.join(e['session_providers'])}): same targets "
                   f"{e['targets_equal']}, saliency max abs {e['saliency_max_abs']:.2e}, Pearson min "
                   f"{e['saliency_pearson_min']:.7f}; copies per call: H2D {t['h2d']['count']} "
                   f"({t['h2d']['bytes'] / 1024:.1f} KB), D2H {t['d2h']['count']} ({t['d2h']['bytes'] / 1024:.1f} KB)")
        if e.get("decomcam_ig"):
            out.append(f"decomcam-ig: saliency max abs {e['decomcam_ig']['saliency_max_abs']:.2e}, Pearson min "
                       f"{e['decomcam_ig']['saliency_pearson_min']:.7f}")
    return "\n\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.numerics", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default=None, help="an export, for the explainer check (skipped without)")
    p.add_argument("--xp", default="cupy", choices=("cupy", "fake"), help="cupy, or the numpy stand-in (dry run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    mod = _module(args.xp)
    rep = {"benchmark": "gpu-numerics",
           "xp": "cupy" if args.xp == "cupy" else "fake: tests/fake_cupy.py, the numpy stand-in (no GPU was used)",
           "operators": check_operators(mod), "eigh": check_eigh(mod)}
    if args.artifacts:
        rep["explainer"] = check_explainer(mod, args.artifacts)
    rep["machine"] = common.machine_info()
    rep["command"] = common.command_line("benchmarks.gpu.numerics", argv)
    rep["table"] = tables(rep)
    common.write_json(args.json, rep)
    print(rep["table"])
    bad = [r for r in rep["operators"] if r["max_abs"] > 1e-4]
    bad += [r for r in rep["eigh"] if r["path"] == "host" and ("error" in r or r["reconstruction_rel_err"] > 1e-9)]
    if rep.get("explainer") and not (rep["explainer"]["targets_equal"] and rep["explainer"]["saliency_pearson_min"] >= 0.9999):
        bad.append(rep["explainer"])
    ig = (rep.get("explainer") or {}).get("decomcam_ig")
    if ig and not ig["saliency_pearson_min"] >= 0.9999:
        bad.append(ig)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
