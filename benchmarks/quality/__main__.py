"""`python -m benchmarks.quality`: the paper's quality evaluations (section 4) over an exported model.

    python -m benchmarks.quality pointing-game --voc DIR --artifacts DIR --json FILE
        [--engine cpu] [--methods decomcam,gradcam,...] [--limit N] [--tolerance PX] [--resize stretch]
    python -m benchmarks.quality deletion-insertion --imagefolder DIR --artifacts DIR --json FILE
        [--step 4928|auto] [--substrate zero|blur] [--methods ...] [--limit-per-class N] [--plot FILE.png]
    python -m benchmarks.quality synthetic [--quick] [--json FILE] [--out DIR] [--methods ...] [--no-cache]

Prints the tables in the paper's formats (Table 1, Table 2) with baselines, and writes everything to the
JSON file. Exit status: 0 on success, 2 for a usage or data error (one line on stderr: a missing folder, a
class the artifacts' class set lacks, an unknown method, mismatched artifacts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=None,
                   help="comma-separated saliency methods (default: the paper's, those registered: "
                        "gradcam, gradcam++, wgradcam, scorecam, scorecam++, ablationcam, decomcam)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random baselines (default 0)")


def _explainer_args(p: argparse.ArgumentParser) -> None:
    from runtime.explain import add_engine_args

    add_engine_args(p)  # --artifacts, --engine, --fp16, --device-id, --threads, --batch-size
    g = p.add_argument_group("input")
    g.add_argument("--classes", default=None, help="class set in the artifacts (default: the manifest's default)")
    g.add_argument("--resize", default="stretch", choices=("stretch", "crop"),
                   help="stretch (default): whole image to S x S, as the paper (all images resized to 224 x 224); "
                        "crop: CLIP's shortest-side resize + centre crop")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pg = sub.add_parser("pointing-game", help="pointing game on a PASCAL VOC layout (Table 1)")
    pg.add_argument("--voc", required=True, help="VOC folder with JPEGImages/, Annotations/, ImageSets/Main/")
    pg.add_argument("--split", default="val", help="ImageSets/Main/<split>.txt (default val)")
    pg.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    pg.add_argument("--tolerance", type=float, default=0.0,
                    help="grow each box by this many pixels (0 = the paper's strict test, default; 15 is usual)")
    pg.add_argument("--json", required=True, help="write the results here")
    _explainer_args(pg)
    _method_args(pg)

    di = sub.add_parser("deletion-insertion", help="deletion / insertion and the binned protocol (Table 2, Figure 4)")
    di.add_argument("--imagefolder", required=True, help="one sub-folder of images per class (Mini-ImageNet layout)")
    di.add_argument("--limit-per-class", type=int, default=None, help="first N images of each class (paper: 100)")
    di.add_argument("--step", default="4928",
                    help="pixels per step (default 4928, the authors' 11 steps at 224 px); 'auto' rescales it to "
                         "the model's input size")
    di.add_argument("--substrate", default="zero", choices=("zero", "blur"),
                    help="what removed pixels become: zero in normalised space (the authors', default) or a blurred copy")
    di.add_argument("--bin-width", type=float, default=0.1, help="accuracy bin width (default 0.1 = 10%%)")
    di.add_argument("--json", required=True, help="write the results here")
    di.add_argument("--plot", default=None, help="write the Figure-4 style plot (PNG) here")
    _explainer_args(di)
    _method_args(di)

    sy = sub.add_parser("synthetic", help="the whole protocol offline: generate, train, export, evaluate")
    sy.add_argument("--quick", action="store_true", help="a few images and one training epoch (a smoke test)")
    sy.add_argument("--out", default="outputs/quality-synthetic",
                    help="folder for the datasets, artifacts and figure4.png (default outputs/quality-synthetic)")
    sy.add_argument("--json", default=None, help="write the results here (default OUT/results.json)")
    sy.add_argument("--no-cache", action="store_true", help="retrain and re-export even when cached")
    _method_args(sy)
    return p


def _clean(obj):
    """NaN -> None (rows of incorrectly predicted images have no AUC), numpy scalars -> Python."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _clean(obj)
    from runtime.fsutil import atomic_write

    atomic_write(path, json.dumps(data, indent=1, allow_nan=False))


def _explainer(args):
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer

    opts = EngineOptions(device_id=args.device_id, fp16=args.fp16, intra_op_threads=args.threads)
    return Explainer.from_artifacts(args.artifacts, engine=args.engine, class_set=args.classes,
                                    batch_size=args.batch_size, engine_options=opts, resize_mode=args.resize)


def _print_pointing(res: dict) -> None:
    from .report import pointing_per_class_table, pointing_table

    print(pointing_table(res))
    print()
    print(pointing_per_class_table(res))


def _print_deletion(res: dict) -> None:
    from .report import accuracy_table, bins_table, deletion_table, mean_auc_table

    print(accuracy_table(res))
    print()
    print(deletion_table(res))
    print()
    print(mean_auc_table(res))
    for metric in ("insertion", "deletion", "overall"):
        print()
        print(bins_table(res, metric))


def main_pointing(args) -> int:
    from .evaluate import pointing_game, resolve_methods
    from .voc import read_voc

    methods = resolve_methods(args.methods)
    items = read_voc(args.voc, args.split, limit=args.limit)
    ex = _explainer(args)
    res = pointing_game(ex, items, methods, tolerance=args.tolerance, seed=args.seed)
    res["artifacts"] = str(args.artifacts)
    res["engine"] = args.engine
    _print_pointing(res)
    write_json(args.json, res)
    return 0


def main_deletion(args) -> int:
    from .evaluate import deletion_insertion, resolve_methods, scaled_step
    from .protocol import plot_binned
    from .report import display_name
    from .voc import read_imagefolder

    methods = resolve_methods(args.methods)
    classes, items = read_imagefolder(args.imagefolder, limit_per_class=args.limit_per_class)
    ex = _explainer(args)
    if args.step == "auto":
        step = scaled_step(ex.size)
    else:
        try:
            step = int(args.step)
        except ValueError:
            raise ValueError(f"--step must be a positive integer or 'auto', got {args.step!r}") from None
    res = deletion_insertion(ex, classes, items, methods, step=step, substrate=args.substrate,
                             width=args.bin_width, seed=args.seed)
    res["artifacts"] = str(args.artifacts)
    res["engine"] = args.engine
    _print_deletion(res)
    if args.plot:
        curves = {display_name(n): r["binned"] for n, r in [*res["methods"].items(), *res["baselines"].items()]
                  if r["binned"]}
        if curves:
            plot_binned(curves, args.plot)
            res["plot"] = str(args.plot)
        else:
            print("no correctly predicted images: no plot written", file=sys.stderr)
    write_json(args.json, res)
    return 0


def main_synthetic(args) -> int:
    from .evaluate import resolve_methods
    from .synthetic import FULL, QUICK, run_synthetic

    methods = resolve_methods(args.methods)
    res = run_synthetic(QUICK if args.quick else FULL, args.out, methods, use_cache=not args.no_cache)
    print(f"model: {res['model']['pretrained_id'][:19]}... ({'cached' if res['model']['cached'] else 'trained'}), "
          f"artifacts {res['model']['artifacts']}")
    print()
    _print_pointing(res["pointing_game"])
    print()
    _print_deletion(res["deletion_insertion"])
    if res["plot"]:
        print(f"\nFigure 4: {res['plot']}")
    print("\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    write_json(args.json or Path(args.out) / "results.json", res)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"pointing-game": main_pointing, "deletion-insertion": main_deletion, "synthetic": main_synthetic}
    from runtime.artifacts import ArtifactsError
    from runtime.engines import EngineError

    try:
        return handlers[args.command](args)
    except (ValueError, ArtifactsError, EngineError) as e:  # data / usage errors: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
