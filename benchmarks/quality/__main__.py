"""`python -m benchmarks.quality`: the paper's quality evaluations (section 4) over an exported model.

    python -m benchmarks.quality pointing-game --voc DIR --artifacts DIR --json FILE
        [--engine cpu] [--methods decomcam,gradcam,...] [--limit N] [--tolerance PX] [--resize stretch]
    python -m benchmarks.quality deletion-insertion --imagefolder DIR --artifacts DIR --json FILE
        [--step 4928|auto] [--substrate zero|blur] [--methods ...] [--limit-per-class N] [--plot FILE.png]
    python -m benchmarks.quality synthetic [--quick] [--json FILE] [--out DIR] [--methods ...] [--no-cache]
    python -m benchmarks.quality real --data DIR --artifacts DIR --json FILE [--methods ...] [--engine cpu]
        [--limit N] [--steps 14] [--substrates deletion=zero,insertion=blur] [--plot FILE.png]
        [--score-subset N] [--bootstrap 1000] [--tolerances 0,15] [--targets auto|index|name]
        [--start ROW] [--road-fractions 0.1,...,0.9|none] [--road-subset N] [--pairs A:B,...|all|none]
    python -m benchmarks.quality real --from-json A.json,B.json --json FILE     (chunks or method sets, merged)
    python -m benchmarks.quality pairs --from-json RUN.json[+MORE.json][,OTHER.json] --pairs A:B[,...]
    python -m benchmarks.quality sanity --data DIR --model NAME --pretrained package --cache DIR --json FILE
        [--levels head,1,2,3] [--methods ...] [--score-subset N]

Prints the tables in the paper's formats (Table 1, Table 2) with baselines, and writes everything to the
JSON file. Exit status: 0 on success, 2 for a usage or data error (one line on stderr: a missing folder, a
class the artifacts' class set lacks, an unknown method, mismatched artifacts); `real` exits 1 when some
images could not be used (one line each on stderr; the others are evaluated and the JSON is written).
`real` and `sanity` append each photo's record to FILE.checkpoint.jsonl beside --json as they go: the same
command resumes a killed run (other arguments are refused in one line, exit 2); Ctrl-C exits 130 with the
records kept; the checkpoint is removed once the JSON is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _method_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=None,
                   help="comma-separated saliency methods (default: " + (default or
                        "the paper's, those registered: gradcam, gradcam++, wgradcam, scorecam, scorecam++, "
                        "ablationcam, decomcam") + ")")
    g.add_argument("--seed", type=int, default=0, help="seed of the random baselines (default 0)")


def _explainer_args(p: argparse.ArgumentParser) -> None:
    from runtime.cli_args import add_engine_args

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

    re_ = sub.add_parser("real", help="both evaluations on labelled photos with boxes (ImageNet-val layout), "
                                      "with bootstrap intervals")
    re_.add_argument("--data", default=None,
                     help="folder with manifest.csv (file, class_index, synset, class_name, width, height, "
                          "orig_width, orig_height, n_boxes, boxes_xyxy) and the images (required unless "
                          "--from-json)")
    re_.add_argument("--json", required=True,
                     help="write the results here; while the run goes, each photo's record is appended to "
                          "FILE.checkpoint.jsonl beside it, and the same command resumes a killed run from there")
    re_.add_argument("--limit", type=int, default=None, help="only the first N rows of manifest.csv (from --start)")
    re_.add_argument("--start", type=int, default=0,
                     help="first row of manifest.csv to score (0-based, default 0): with --limit, one chunk of "
                          "a data set; chunks merge with --from-json")
    re_.add_argument("--from-json", default=None,
                     help="no model: merge earlier runs' JSON (comma-separated: chunks of the photos, or runs "
                          "of other methods, of one model on one data folder) and report them as one run; a "
                          "FILE.checkpoint.jsonl stands for the photos a running or killed run has scored so far")
    re_.add_argument("--road-fractions", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                     help="ROAD's removed fractions (default 0.1,...,0.9); 'none' skips ROAD")
    re_.add_argument("--road-subset", type=int, default=None,
                     help="ROAD on the manifest's first N rows only (its imputation solves a sparse system per "
                          "fraction and map: the slowest part of a run); default all")
    re_.add_argument("--road-noise", type=float, default=0.01,
                     help="ROAD's imputation noise, sd in normalised input space (default 0.01)")
    re_.add_argument("--pairs", default=None,
                     help="paired differences in the report: A:B,... (A~B where a name has a colon), 'all' "
                          "(every two methods), or 'none'; default: the first method against each other "
                          "method and each map baseline")
    re_.add_argument("--steps", type=int, default=14, help="deletion / insertion steps (default 14)")
    re_.add_argument("--substrates", default="deletion=zero,insertion=blur",
                     help="what deleted pixels become and what insertion starts from: zero (0 in normalised "
                          "space = the mean colour) or blur (the blurred photo); default deletion=zero,insertion=blur")
    re_.add_argument("--tolerances", default="0,15", help="pointing-game tolerances in photo pixels (default 0,15)")
    re_.add_argument("--plot", default=None, help="write the Figure-4 style plot (PNG) here")
    re_.add_argument("--score-subset", type=int, default=None,
                     help="run Score-CAM, Score-CAM++ and Ablation-CAM (one forward per channel) on the first N "
                          "images only; every method is then also scored on that subset")
    re_.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over images (default 1000)")
    re_.add_argument("--targets", default="auto", choices=("auto", "index", "name"),
                     help="label -> class: index (class_index into the class set), name (class_name looked up "
                          "in the class set), auto (default: index for a 1000-class set, name otherwise)")
    re_.add_argument("--bin-width", type=float, default=0.1, help="accuracy bin width (default 0.1 = 10%%)")
    re_.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _explainer_args(re_)
    _method_args(re_, default="every registered method")
    for action in re_._actions:  # --from-json needs neither a model nor photos
        if action.dest == "artifacts":
            action.required = False

    sy = sub.add_parser("synthetic", help="the whole protocol offline: generate, train, export, evaluate")
    sy.add_argument("--quick", action="store_true", help="a few images and one training epoch (a smoke test)")
    sy.add_argument("--out", default="outputs/quality-synthetic",
                    help="folder for the datasets, artifacts and figure4.png (default outputs/quality-synthetic)")
    sy.add_argument("--json", default=None, help="write the results here (default OUT/results.json)")
    sy.add_argument("--no-cache", action="store_true", help="retrain and re-export even when cached")
    _method_args(sy)

    from . import pairs, sanity
    pairs.add_parser(sub)
    sanity.add_parser(sub)
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
                                    batch_size=args.batch_size, engine_options=opts, resize=args.resize)


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


def _plot_curves(di: dict, path) -> bool:
    """The Figure-4 plot of a deletion/insertion result's binned curves (methods and baselines); False, with a
    line on stderr, when no image was predicted correctly."""
    from .protocol import plot_binned
    from .report import display_name

    curves = {display_name(n): r["binned"] for n, r in [*di["methods"].items(), *di["baselines"].items()]
              if r["binned"]}
    if not curves:
        print("no correctly predicted images: no plot written", file=sys.stderr)
        return False
    plot_binned(curves, path)
    return True


def main_deletion(args) -> int:
    from .evaluate import deletion_insertion, resolve_methods, scaled_step
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
    if args.plot and _plot_curves(res, args.plot):
        res["plot"] = str(args.plot)
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


def _parse_substrates(spec: str) -> dict:
    """'deletion=zero,insertion=blur' (or 'zero,blur': deletion, insertion) -> {"deletion": .., "insertion": ..}."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 2 and not any("=" in p for p in parts):
        return {"deletion": parts[0], "insertion": parts[1]}
    out = {}
    for p in parts:
        key, _, val = p.partition("=")
        if key.strip() not in ("deletion", "insertion") or not val.strip():
            raise ValueError(f"--substrates: expected deletion=zero|blur,insertion=zero|blur, got {spec!r}")
        out[key.strip()] = val.strip()
    if set(out) != {"deletion", "insertion"}:
        raise ValueError(f"--substrates must set both deletion and insertion, got {spec!r}")
    return out


def _parse_tolerances(spec: str) -> tuple[float, ...]:
    try:
        tols = tuple(float(t) for t in spec.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--tolerances must be comma-separated numbers of pixels, got {spec!r}") from None
    if not tols or any(not math.isfinite(t) or t < 0 for t in tols):
        raise ValueError(f"--tolerances must be one or more numbers >= 0, got {spec!r}")
    return tols


def _parse_fractions(spec: str) -> tuple[float, ...]:
    if spec.strip().lower() in ("none", ""):
        return ()
    try:
        fr = tuple(float(q) for q in spec.split(",") if q.strip())
    except ValueError:
        raise ValueError(f"--road-fractions must be comma-separated numbers in (0, 1) or 'none', got {spec!r}") from None
    if not fr or any(not 0.0 < q < 1.0 for q in fr):
        raise ValueError(f"--road-fractions must be comma-separated numbers in (0, 1) or 'none', got {spec!r}")
    return fr


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def real_config(args):
    from .real import RealConfig

    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    return RealConfig(tolerances=_parse_tolerances(args.tolerances), steps=args.steps,
                      substrates=_parse_substrates(args.substrates), score_subset=args.score_subset,
                      n_bootstrap=args.bootstrap, seed=args.seed, bin_width=args.bin_width, targets=args.targets,
                      road_fractions=_parse_fractions(args.road_fractions), road_noise=args.road_noise,
                      road_subset=args.road_subset)


def print_real_report(res: dict) -> None:
    """The tables of a real-data run (or of merged runs) on stdout."""
    from . import report as rp

    proto = res["protocol"]
    note = (res.get("targets") or {}).get("note")
    print(f"model {res['artifacts']['model']}, {res['n_images']} images ({res['n_bad']} unusable), top-1 "
          f"{100 * res['accuracy']['top1']:.1f}% ({res['accuracy']['n_correct']} correct)"
          + (f"; targets: {note}" if note else ""))
    print()
    print(rp.real_pointing_table(res, proto))
    print()
    print(rp.real_center_miss_table(res, proto))
    print()
    print(rp.real_deletion_table(res["deletion_insertion"], proto))
    print()
    print(rp.real_mean_table(res["deletion_insertion"], proto))
    if res.get("road"):
        print()
        print(rp.real_road_table(res["road"], proto))
    if res.get("on_subset") is not None:
        sub = res["on_subset"]
        first = res["subset"].get("n_first_rows")
        extra = (f" on the manifest's first {first} rows" if first else " on the photos every method ran on") + \
            f" ({sub['n_images']} images, all methods)"
        print(f"\n{', '.join(res['subset']['methods'])} ran on a subset: {res['subset']['reason']}\n")
        print(rp.real_pointing_table(sub, proto, extra))
        print()
        print(rp.real_deletion_table(sub["deletion_insertion"], proto, extra))
        if sub.get("road"):
            print()
            print(rp.real_road_table(sub["road"], proto, extra))
    if res.get("pairs"):
        print()
        print(rp.real_pairs_table(res["pairs"]))
    print()
    print(rp.real_seconds_table(res["seconds"]))


def _report_pairs(res: dict, spec: str | None, n_bootstrap: int, seed: int) -> list[dict]:
    from . import pairs as pr

    methods = res["methods"]
    if spec is not None and spec.strip().lower() == "none":
        return []
    if spec is None:
        pairs = [(methods[0], b) for b in [*methods[1:], "center_point", *pr.MAP_BASELINES]] if methods else []
    elif spec.strip().lower() == "all":
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    else:
        pairs = pr.parse_pairs(spec)
    return pr.paired_metrics(res, pairs, resamples=n_bootstrap, seed=seed)


def main_real(args, argv) -> int:
    from benchmarks.common import command_line, load_average, machine_info
    from runtime.methods import list_methods

    from .boxes_data import read_boxes_manifest
    from .checkpoint import Checkpoint, checkpoint_path
    from .real import evaluate_real

    cfg = real_config(args)
    if args.from_json:
        return main_real_merge(args, argv, cfg)
    if args.data is None or args.artifacts is None:
        raise ValueError("real: --data and --artifacts are required (or --from-json to merge earlier runs)")
    methods = resolve_methods_all(args.methods, list_methods())
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.start < 0:
        raise ValueError(f"--start must be >= 0, got {args.start}")
    items = read_boxes_manifest(args.data, limit=args.limit, start=args.start)
    if args.resize != "stretch":
        raise ValueError("real: the protocol stretches every photo to the model input (--resize stretch), "
                         "as the boxes are scaled with it")
    load_start = load_average()
    ex = _explainer(args)
    from .evaluate import parse_method_spec

    for m in methods:        # every graph each method runs, before any photo (an older export lacks head_grad)
        ex.check_graphs(parse_method_spec(m)[0])
    art = ex.artifacts
    artifacts = {"path": str(args.artifacts), "model": art.manifest.get("model"),
                 "pretrained": art.manifest.get("pretrained"),
                 "pretrained_id": art.manifest.get("pretrained_id"), "random_weights": art.random_weights,
                 "class_set": getattr(ex.classes, "name", None), "n_classes": len(ex.classes.labels),
                 "input_size": ex.size, "mean": list(art.mean), "std": list(art.std)}
    key = {"data": str(Path(args.data).resolve()), "manifest_sha256": _sha256(Path(args.data) / "manifest.csv"),
           "rows": [int(args.start), None if args.limit is None else int(args.start + args.limit)],
           "artifacts": {"path": str(Path(args.artifacts).resolve()), "model": artifacts["model"],
                         "pretrained_id": artifacts["pretrained_id"],
                         "graphs": {k: v.get("sha256") for k, v in sorted(art.manifest["graphs"].items())}},
           "engine": args.engine, "fp16": bool(args.fp16), "class_set": artifacts["class_set"],
           "methods": list(methods), "protocol": cfg.key()}
    ckpt = Checkpoint(checkpoint_path(args.json), "real", key)
    ckpt.open()  # another run's checkpoint is refused before any work
    try:
        res = evaluate_real(ex, items, methods, cfg, progress=not args.no_progress, checkpoint=ckpt)
    except KeyboardInterrupt:
        print(f"interrupted: the photos scored so far are in {ckpt.path}; the same command resumes", file=sys.stderr)
        return 130
    finally:
        ckpt.close()
    machine = machine_info(args.threads)
    machine["load_average"] = {"start": load_start, "end": load_average()}
    out = {
        "benchmark": "quality-real",
        "command": command_line("benchmarks.quality", argv),
        "machine": machine,
        "data": str(args.data),
        "rows": key["rows"],
        "artifacts": artifacts,
        "engine": args.engine,
        "run_key": key,
        **res,
    }
    out["pairs"] = _report_pairs(out, args.pairs, cfg.n_bootstrap, cfg.seed)
    print_real_report(out)
    if args.plot and _plot_curves(res["deletion_insertion"], args.plot):
        out["plot"] = str(args.plot)
    write_json(args.json, out)
    ckpt.remove()
    return 1 if res["n_bad"] else 0


def main_real_merge(args, argv, cfg) -> int:
    """`real --from-json A.json,B.json`: one report over runs of one model on one data folder."""
    from benchmarks.common import command_line

    from .pairs import load_json, merge_real_runs
    from .real import aggregate, config_from_key

    names = [f.strip() for f in args.from_json.split(",") if f.strip()]
    if not names:
        raise ValueError("--from-json names no file")
    runs = [load_json(n) for n in names]
    merged = merge_real_runs(runs, names)
    key = (merged.get("run_key") or {}).get("protocol")
    if key is None:
        raise ValueError(f"{names[0]}: a run without its settings (written before checkpoints); rerun it")
    missing = [n for n, r in zip(names, runs) if any("curves" not in rec for rec in r["images"])]
    if missing:
        raise ValueError(f"{', '.join(missing)}: per-photo records without curves (an older run); rerun it")
    cfg = config_from_key(key, cfg)
    methods = merged["methods"]
    res = aggregate(merged["images"], merged["bad"], methods, cfg, merged["artifacts"]["input_size"],
                    merged.get("targets"), merged["n_rows"])
    out = {k: merged[k] for k in ("benchmark", "machine", "data", "artifacts", "engine") if k in merged}
    partial = [n for n, r in zip(names, runs) if r.get("partial")]
    if partial:
        out["partial"] = partial  # running or killed runs: the photos scored so far
        print(f"note: {', '.join(partial)}: a checkpoint, the photos scored so far", file=sys.stderr)
    out.update({"command": command_line("benchmarks.quality", argv), "merged_from": merged["merged_from"],
                "rows": merged.get("rows"), **res})
    out["pairs"] = _report_pairs(out, args.pairs, cfg.n_bootstrap, cfg.seed)
    print_real_report(out)
    if args.plot and _plot_curves(res["deletion_insertion"], args.plot):
        out["plot"] = str(args.plot)
    write_json(args.json, out)
    return 0


def _main_sanity(args, argv) -> int:
    from . import sanity

    return sanity.main(args, argv)


def _main_pairs(args) -> int:
    from . import pairs

    return pairs.main(args)


def resolve_methods_all(spec, registered) -> list[str]:
    """--methods for `real`: the given ones, or every registered method when none is given."""
    from .evaluate import resolve_methods

    return list(registered) if spec is None else resolve_methods(spec, registered)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"pointing-game": main_pointing, "deletion-insertion": main_deletion, "synthetic": main_synthetic,
                "real": lambda a: main_real(a, argv), "pairs": _main_pairs,
                "sanity": lambda a: _main_sanity(a, argv)}
    from runtime.artifacts import ArtifactsError
    from runtime.engines import EngineError

    try:
        return handlers[args.command](args)
    except (ValueError, ArtifactsError, EngineError) as e:  # data / usage errors: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
