"""`python -m export`: export a CLIP ResNet to the toolkit's ONNX graphs, or add a class set.

    python -m export --model RN50 --pretrained openai|none|PATH --classes voc|imagenet|FILE --out DIR
    python -m export classes --artifacts DIR (--names "cat,dog" | --file F) [--name SET] [--template T]
    python -m export list
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.spec import MANIFEST_NAME


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="RN50", help="architecture (see `python -m export list`), default RN50")
    g.add_argument("--pretrained", default="openai",
                   help="'openai' (download), a local checkpoint path, or 'none' (seeded random weights)")
    g.add_argument("--seed", type=int, default=0, help="seed for --pretrained none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export a CLIP ResNet to ONNX for Decom-CAM.")
    _model_args(p)
    p.add_argument("--classes", default="voc", help="class set: voc, imagenet, or a text file (one name per line)")
    p.add_argument("--template", default=None, help="prompt template: authors (default), photo, imagenet, or a string with {}")
    p.add_argument("--target-layer", default="layer4", help="target layer (layer4, the paper's choice)")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--out", required=True, help="artifacts folder to write")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="fp16: also write fp16 graphs (NAME.fp16.onnx, fp32 I/O; see export/precision.py)")
    p.add_argument("--json", default=None, help="also write the parity report as JSON to this file")
    return p


def build_classes_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export classes",
                                description="Add a class set to an existing export without touching the graphs.")
    p.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--names", help="comma-separated class names")
    src.add_argument("--file", help="text file, one class name per line (or a built-in set: voc, imagenet)")
    p.add_argument("--name", default=None, help="class set name (default: the file's stem, or 'custom')")
    p.add_argument("--template", default=None, help="prompt template: authors (default), photo, imagenet, or a string with {}")
    p.add_argument("--pretrained", default=None,
                   help="checkpoint path, when the export was made from a local checkpoint (its sha256 is checked)")
    p.add_argument("--default", action="store_true", help="make this the default class set")
    return p


def main_export(argv) -> int:
    from .classes import get_class_set
    from .models import load_model
    from .onnx_export import export_model, format_parity_table, ops_used

    args = build_parser().parse_args(argv)
    cs = get_class_set(args.classes, args.template)
    lm = load_model(args.model, args.pretrained, seed=args.seed)
    res = export_model(lm, [cs], args.out, target_layer=args.target_layer, opset=args.opset)
    print(format_parity_table(res.report))
    sizes = {k: f"{v['bytes'] / 1e6:.1f} MB" for k, v in res.manifest["graphs"].items()}
    print(f"\nexported {lm.name} ({lm.pretrained_id}) to {res.out_dir} in {res.seconds['total_s']:.1f} s; "
          f"graphs: {sizes}; class set '{cs.name}' ({len(cs.labels)} classes)")
    print(f"explain.onnx ops: {', '.join(ops_used(res.out_dir / 'explain.onnx'))}")
    if args.precision == "fp16":
        from .precision import add_fp16_graphs, validation_table

        print(validation_table(add_fp16_graphs(lm, res.out_dir)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"report": res.report, "seconds": res.seconds, "manifest": res.manifest}, f, indent=2)
    if lm.random_weights:
        print("note: random weights (--pretrained none): maps show the method, not a trained model", file=sys.stderr)
    return 0


def main_classes(argv) -> int:
    from pathlib import Path

    from .classes import class_set_from_names, get_class_set
    from .models import load_model
    from .onnx_export import add_class_set, read_manifest_raw

    args = build_classes_parser().parse_args(argv)
    manifest = read_manifest_raw(Path(args.artifacts))
    pid = manifest["pretrained_id"]
    if pid.startswith("none:seed="):
        pretrained, seed = "none", int(pid.split("=", 1)[1])
    elif pid.startswith("sha256:"):
        if not args.pretrained:
            raise SystemExit(f"error: {args.artifacts} was exported from a local checkpoint; pass it with --pretrained PATH")
        pretrained, seed = args.pretrained, 0
    else:
        pretrained, seed = manifest["pretrained"], 0
    if args.names is not None:
        cs = class_set_from_names(args.names.split(","), args.name or "custom", args.template)
    else:
        cs = get_class_set(args.file, args.template, name=args.name)
    lm = load_model(manifest["model"], pretrained, seed=seed)
    m = add_class_set(args.artifacts, lm, cs, make_default=args.default)
    print(f"added class set '{cs.name}' ({len(cs.labels)} classes) to {Path(args.artifacts) / MANIFEST_NAME}; "
          f"sets: {', '.join(m['class_sets'])}; default: {m['default_class_set']}")
    return 0


def main(argv=None) -> int:
    from .classes import ClassSetError
    from .models import ModelError, list_models
    from .onnx_export import ExportError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["list"]:
            print("\n".join(list_models()))
            return 0
        if argv[:1] == ["classes"]:
            return main_classes(argv[1:])
        return main_export(argv)
    except (ModelError, ClassSetError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
