"""Latency of the C++ consumer (`cpp/build/decomcam-cpp`) against the Python runtime, and their agreement.

Same machine, same artifacts, same generated images (PNG files, `common.photo_like`), top-1 class, p
components, ORT's default thread count on both sides. The C++ program runs once over all files (its
first `--warmup` images are untimed: they include session warm-up); the Python runtime explains the same
files one call each (`Explainer.explain(path)`, warm-up calls untimed). Per image, both report the
same stages; "total" is load + preprocess + the pipeline (the C++ side also writes its outputs, listed
separately as "write" and left out of the total; the Python call writes nothing).

    python -m benchmarks.cpp_latency --artifacts artifacts/RN50 [--n 8] [--warmup 1] [--top-p 10]
        [--method decomcam|decomcam-ig] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from . import common

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "cpp" / "build" / "decomcam-cpp"
STAGES = ["load", "preprocess", "explain", "head_grad", "decompose", "upsample", "blur", "blend", "classify",
          "integrate"]


def run(args) -> dict:
    from runtime.explainer import Explainer

    if not BINARY.is_file():
        raise SystemExit(f"{BINARY}: not built; run `bash cpp/setup.sh` first")
    info = common.machine_info()
    info["load_average"] = {"start": common.load_average()}
    n_all = args.warmup + args.n
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, rgb in enumerate(common.photo_like_batch(n_all, seed=args.seed)):
            paths.append(Path(tmp) / f"img{i:03d}.png")
            cv2.imwrite(str(paths[-1]), rgb[:, :, ::-1])
        out = Path(tmp) / "out"
        t = time.perf_counter()
        r = subprocess.run([str(BINARY), "--artifacts", args.artifacts, "--out", str(out), "--top-p", str(args.top_p),
                            "--method", args.method, *map(str, paths)], capture_output=True, text=True, check=False)
        cpp_process_s = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"decomcam-cpp failed (exit {r.returncode}): {r.stderr.strip()}")
        cpp_lines = [json.loads(ln) for ln in r.stdout.splitlines()]
        cpp_sal = [np.load(out / f"{p.stem}.saliency.npy") for p in paths]

        ex = Explainer.from_artifacts(args.artifacts)
        py_runs, py_total, py_sal, py_w, py_t = [], [], [], [], []
        for i, p in enumerate(paths):
            t = time.perf_counter()
            e = ex.explain(str(p), top_p=args.top_p, method=args.method)
            dt = time.perf_counter() - t
            py_sal.append(e.saliency)
            py_w.append(e.weights)
            py_t.append(e.target)
            if i >= args.warmup:
                py_runs.append(e.timings)
                py_total.append(dt)
    info["load_average"]["end"] = common.load_average()

    timed = cpp_lines[args.warmup:]
    cpp_runs = [{k: v / 1e3 for k, v in ln["timings_ms"].items()} for ln in timed]
    cpp_total = [sum(v for k, v in run.items() if k != "write") for run in cpp_runs]
    parity = [{"pearson": float(np.corrcoef(c.ravel(), p.ravel())[0, 1]), "saliency_max_abs": float(np.abs(c - p).max()),
               "weights_max_abs": float(np.abs(np.asarray(ln["weights"]) - w).max()),
               "same_target": ln["target"]["index"] == t}
              for c, p, ln, w, t in zip(cpp_sal, py_sal, cpp_lines, py_w, py_t)]
    return {
        "command": common.command_line("benchmarks.cpp_latency"),
        "machine": info,
        "artifacts": args.artifacts,
        "model": ex.artifacts.model,
        "n": args.n, "warmup": args.warmup, "top_p": args.top_p, "method": args.method,
        "cpp": {"stages_ms": common.median_stages_ms(cpp_runs), "total_ms": common.stats_ms(cpp_total),
                "process_s": cpp_process_s},
        "python": {"stages_ms": common.median_stages_ms(py_runs), "total_ms": common.stats_ms(py_total)},
        "parity": {"min_pearson": min(d["pearson"] for d in parity),
                   "max_saliency_abs": max(d["saliency_max_abs"] for d in parity),
                   "max_weights_abs": max(d["weights_max_abs"] for d in parity),
                   "same_target": all(d["same_target"] for d in parity), "per_image": parity},
    }


def table(rep: dict) -> str:
    c, p = rep["cpp"], rep["python"]
    rows = [[s, common.fmt(c["stages_ms"].get(s)), common.fmt(p["stages_ms"].get(s))] for s in STAGES]
    rows.append(["total p50", common.fmt(c["total_ms"]["p50"]), common.fmt(p["total_ms"]["p50"])])
    rows.append(["total p90", common.fmt(c["total_ms"]["p90"]), common.fmt(p["total_ms"]["p90"])])
    rows.append(["write (C++ only: 3 .npy + overlay PNG)", common.fmt(c["stages_ms"].get("write")), "-"])
    par = rep["parity"]
    return (f"{rep['model']}, {rep.get('method', 'decomcam')}, top-p {rep['top_p']}, {rep['n']} images "
            f"(+{rep['warmup']} warm-up), per image, ms "
            f"(median per stage)\n{common.describe_machine(rep['machine'])}\n"
            + common.format_table(["stage", "C++ (decomcam-cpp)", "Python runtime (cpu)"], rows)
            + f"\nagreement: saliency Pearson >= {par['min_pearson']:.9f}, max abs {par['max_saliency_abs']:.2e}; "
              f"weights max abs {par['max_weights_abs']:.2e}; same target: {par['same_target']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--n", type=int, default=8, help="timed images")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first")
    ap.add_argument("--top-p", type=int, default=10)
    ap.add_argument("--method", default="decomcam", choices=("decomcam", "decomcam-ig"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rep = run(args)
    print(table(rep))
    common.write_json(args.json, rep)


if __name__ == "__main__":
    main()
