"""Any PyTorch CNN classifier in: the pooled-linear family's five graphs from a torch.nn.Module and the name of its
target layer.

    export_module(module, out, target_layer="layer4", input_size=224, labels=None, preprocess=None)
    python -m export module 'pkg.mod:factory' [--checkpoint PATH] --target-layer NAME --size 224 [--labels FILE]
                     [preprocessing as `python -m export onnx`] --out DIR

What `export_module` does, in order:
    module     eval mode (a module in train mode is switched to it, and the log says so); CPU float32 parameters
    target     the submodule named `target_layer` as named_modules() names it ("layer4", "features.7"); one forward
               at batch 2 checks that it runs once, that its output is a 4-D tensor [N, C, h, w] nothing modifies in
               place later (a residual `out += identity`), and that the module returns logits [N, K]
    onnx       torch.onnx.export of a wrapper that returns (logits, the target layer's output) through a forward hook:
               inputs `image` [batch, 3, S, S], outputs `logits` and the target layer's output, named after the layer;
               opset OPSET, dynamic batch; exporter "dynamo" (torch's default, as the registry export) or "torchscript"
    import     export/onnx_import.py with that output as the target layer: the head's backward generated from the
               graph, its checks (logits against the graph in ONNX Runtime, head(A) = logits, gradients against
               central differences); a tensor inside a residual block is refused there, naming the skip connection
    torch      explain.onnx against torch autograd on the module itself before anything is written (TORCH_* below):
               logits, the target layer's output (a forward hook) and d logit_t / d output, recorded in the manifest
               (validation.torch_autograd) and the log
    write      onnx_import's: graphs renamed into place, then labels and manifest.json; nothing on failure

`load_factory("pkg.mod:attr")` imports a callable and calls it with no arguments (an nn.Module instance is taken as
it is); `--checkpoint` is read by export/models.py's reader (weights_only=True, TorchScript archives refused, a state
dict that does not fit names its keys).
"""

from __future__ import annotations

import difflib
import importlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.artifacts import sha256_path
from runtime.fsutil import temp_dir
from runtime.spec import FAMILIES

from .onnx_import import RESERVED, VALIDATION_BATCHES, ImportError_, ImportResult, Preprocess, import_onnx
from .onnx_import import check_labels, read_label_file, sample_images
from .writing import ExportError, ValidationError, compare, log

OPSET = 20                      # the registry export's (export/onnx_export.py)
EXPORTERS = ("dynamo", "torchscript")
TRACE_BATCH = 2                 # the dry run's and the trace's batch (dynamo specialises batch 1)
# The explain graph against torch autograd on the module: |ours - ref| <= atol * max|ref| + rtol * |ref| per element,
# the registry export's tolerances for explain.onnx (runtime/spec.py: a different engine, float32 both). The gradients
# are compared with autograd at the graph's own activations (a forward hook returns them), so that float32 rounding of
# the trunk cannot move a kink of the head; the whole module's gradient at its own activations must keep a cosine of
# TORCH_WHOLE_MIN_COSINE with them.
TORCH_TOL = {name: (t.atol, t.rtol) for name, t in FAMILIES["pooled-linear"].graphs["explain"].tolerances.items()}
TORCH_WHOLE_MIN_COSINE = 0.999


class ModuleExportError(ImportError_):
    """A module, factory or target layer that cannot be exported (one line)."""


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# -- the module -----------------------------------------------------------------------------------------------------

def load_factory(factory: str) -> nn.Module:
    """The module `package.module:attr` returns when called with no arguments (an nn.Module instance as it is)."""
    mod_name, sep, attr = str(factory).partition(":")
    if not sep or not mod_name or not attr:
        raise ModuleExportError(f"factory {factory!r}: expected 'package.module:callable'")
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ModuleExportError(f"factory {factory!r}: cannot import '{mod_name}' ({_first_line(e)})") from None
    except Exception as e:  # the user's module failed while importing: any type
        raise ModuleExportError(f"factory {factory!r}: importing '{mod_name}' failed ({_first_line(e)})") from None
    where = mod_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=5, cutoff=0.5)
            raise ModuleExportError(f"factory {factory!r}: '{where}' has no attribute '{part}'"
                                    + (f" (close names: {', '.join(close)})" if close else ""))
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModuleExportError(f"factory {factory!r}: '{where}' is a {type(obj).__name__}, not a callable")
    try:
        module = obj()
    except Exception as e:  # the user's factory: any type
        raise ModuleExportError(f"factory {factory!r} failed when called with no arguments ({_first_line(e)})") from None
    if not isinstance(module, nn.Module):
        raise ModuleExportError(f"factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def module_from_factory(factory: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """`load_factory(factory)` with the state dict of `checkpoint` loaded strictly (export/models.py's reader: no
    code from the file runs; keys that do not fit are named)."""
    from .models import load_checkpoint

    module = load_factory(factory)
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    return module


def find_layer(module: nn.Module, name: str) -> nn.Module:
    """The submodule `name` (as named_modules() names it); an unknown name lists close ones."""
    names = [n for n, _ in module.named_modules() if n]
    found = dict(module.named_modules()).get(name) if name else None
    if found is None:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        top = [n for n, _ in module.named_children()]
        hint = (f"close names: {', '.join(close)}" if close
                else f"its top-level modules: {', '.join(top[:12])}{' ...' if len(top) > 12 else ''}")
        raise ModuleExportError(f"--target-layer {name!r}: no submodule of that name in {type(module).__name__} "
                                f"({hint})")
    return found


def _enclosing(name: str) -> str:
    """What to choose instead of a layer inside a residual block: the blocks that contain it."""
    parts = name.split(".")
    outer = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return ("choose a module whose output every path from the image to the logits passes through"
            + (f", e.g. the block or stage around it: {', '.join(repr(o) for o in outer)}" if outer else
               " (a whole block or stage)"))


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


@torch.no_grad()
def probe(module: nn.Module, layer: nn.Module, name: str, size: int) -> tuple[list, int]:
    """One forward at batch TRACE_BATCH: ([C, h, w] of the target layer's output, K); each problem is one line."""
    x = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = layer.register_forward_hook(lambda _m, _i, out: calls.append(
        (out, out._version if isinstance(out, torch.Tensor) else None)))
    try:
        logits = module(x)
    except Exception as e:  # the user's forward: any type
        raise ModuleExportError(f"the module's forward fails on an input [{TRACE_BATCH}, 3, {size}, {size}] "
                                f"({_first_line(e)})") from None
    finally:
        handle.remove()
    if not calls:
        raise ModuleExportError(f"--target-layer {name!r}: the module does not run in the forward")
    if len(calls) > 1:
        raise ModuleExportError(f"--target-layer {name!r}: runs {len(calls)} times in one forward (a shared module); "
                                f"name a module that runs once")
    out, version = calls[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != TRACE_BATCH:
        raise ModuleExportError(f"--target-layer {name!r}: its output {_shape(out)} is not a feature map "
                                f"[N, C, h, w]; name a convolutional layer or block")
    if out.dtype != torch.float32:
        raise ModuleExportError(f"--target-layer {name!r}: its output is {out.dtype}, not float32")
    if out._version != version:
        raise ModuleExportError(f"--target-layer {name!r}: its output is modified in place later in the forward "
                                f"(e.g. a residual `out += identity` or an inplace activation), so it is not a "
                                f"tensor of its own; {_enclosing(name)}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != TRACE_BATCH:
        raise ModuleExportError(f"the module returns {_shape(logits)}, not logits [N, K] (wrap it so that forward "
                                f"returns the classifier's logits)")
    return list(out.shape[1:]), int(logits.shape[1])


def _prepare(module: nn.Module) -> list[str]:
    """Eval mode, CPU float32; what was changed, for the log."""
    if not isinstance(module, nn.Module):
        raise ModuleExportError(f"expected a torch.nn.Module, got a {type(module).__name__}")
    notes = []
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.device.type != "cpu" for t in tensors):
        raise ModuleExportError("the module's parameters are not on the CPU; call module.cpu() first")
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        raise ModuleExportError("the module's parameters are not float32; call module.float() first")
    if any(m.training for m in module.modules()):
        module.eval()
        notes.append("the module was in train mode: put in eval mode (BatchNorm uses its running statistics, "
                     "Dropout is off)")
    return notes


# -- to ONNX --------------------------------------------------------------------------------------------------------

class _WithTarget(nn.Module):
    """image -> (the module's logits, the target layer's output), the latter through a forward hook."""

    def __init__(self, module: nn.Module, layer: nn.Module):
        super().__init__()
        self.module = module
        self.layer = layer

    def forward(self, image):
        got = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: got.append(out))
        try:
            logits = self.module(image)
        finally:
            handle.remove()
        return logits, got[0]


def to_onnx(module: nn.Module, layer: nn.Module, tensor: str, size: int, path: Path, exporter: str = "dynamo",
            opset: int = OPSET) -> None:
    """torch.onnx.export of the module with the target layer's output as a second output named `tensor`."""
    x = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    names = dict(input_names=["image"], output_names=["logits", tensor], opset_version=opset, external_data=False,
                 verbose=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(_WithTarget(module, layer).eval(), (x,), str(path), dynamo=True,
                                  dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, **names)
            elif exporter == "torchscript":
                torch.onnx.export(_WithTarget(module, layer).eval(), (x,), str(path), dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, tensor: {0: "batch"}},
                                  **names)
            else:
                raise ModuleExportError(f"exporter {exporter!r}: valid exporters are {', '.join(EXPORTERS)}")
    except ModuleExportError:
        raise
    except Exception as e:  # the exporters raise many types
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ModuleExportError(f"torch.onnx.export ({exporter}) failed: {_first_line(e)} (try --exporter "
                                f"{other})") from None


# -- the torch check ------------------------------------------------------------------------------------------------

def hooked_autograd(module: nn.Module, layer: nn.Module, image: np.ndarray, target: np.ndarray,
                    activations: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, the layer's output, d logits[b, target[b]] / d output) by torch autograd on the module, the output
    captured by a forward hook; with `activations`, the hook returns those instead (the rest of the forward runs on
    them) and the gradient is taken there."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).requires_grad_(True)   # params may be frozen
    given = None if activations is None else torch.from_numpy(np.array(activations, np.float32)).requires_grad_(True)
    calls = []

    def hook(_m, _i, out):
        calls.append(out if given is None else given)
        return given

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = module(x)
            a = calls[0]
            t = torch.from_numpy(np.asarray(target, np.int64))
            (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    finally:
        handle.remove()
    return logits.detach().numpy(), a.detach().numpy(), grad.detach().numpy()


def torch_check(module: nn.Module, layer: nn.Module, layer_name: str, size: int, k: int):
    """The `check` import_onnx runs before writing: explain.onnx against torch autograd on `module` at batch sizes
    VALIDATION_BATCHES (generated photos, preprocessed as the runtime does; the first row's target the graph's top-1,
    the others drawn from the K classes). Raises ValidationError listing every failure; returns
    ("torch_autograd", summary)."""
    import onnxruntime as ort

    def check(paths: dict, policy: dict, pre: Preprocess):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(paths["explain"]), so, providers=["CPUExecutionProvider"])
        rows, failures = [], []
        for i, b in enumerate(VALIDATION_BATCHES):
            x = sample_images(policy, size, pre.mean, pre.std, b, seed=4321 + i)
            target = np.random.default_rng(100 + i).integers(0, k, b).astype(np.int64)
            target[0] = -1
            logits, acts, grads = sess.run(["logits", "activations", "gradients"], {"image": x, "target": target})
            t = np.where(target < 0, logits.argmax(1), target)   # the class the graph explained
            ref_logits, ref_acts, ref_grads = hooked_autograd(module, layer, x, t)
            _, _, own_grads = hooked_autograd(module, layer, x, t, activations=acts)
            cases = (("logits", logits, ref_logits, "torch: the module's logits"),
                     ("activations", acts, ref_acts, f"torch: forward hook on '{layer_name}'"),
                     ("gradients", grads, own_grads, "torch autograd at the graph's activations"))
            for out, ours, ref, what in cases:
                atol, rtol = TORCH_TOL[out]
                r = {"graph": "explain", "output": out, "batch": b, "L": k, "atol": atol, "rtol": rtol,
                     **compare(ours, ref, atol, rtol), "reference": what}
                if out == "gradients":
                    whole = compare(ours, ref_grads, float("inf"), 0.0)["cosine"]
                    r.update(whole_model_cosine=whole, whole_model_min_cosine=TORCH_WHOLE_MIN_COSINE)
                    if not whole >= TORCH_WHOLE_MIN_COSINE:
                        r["ok"] = False
                        r["reason"] = (f"cosine {whole:.6f} with torch autograd at the module's own activations "
                                       f"< {TORCH_WHOLE_MIN_COSINE}")
                rows.append(r)
                if not r["ok"]:
                    failures.append(r)
        if failures:
            raise ValidationError(failures)
        log(format_torch_rows(rows))
        worst = {}
        for r in rows:
            w = worst.setdefault(r["output"], {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0})
            w["max_abs"] = max(w["max_abs"], r["max_abs"])
            w["max_rel"] = max(w["max_rel"], r["max_rel"])
            w["min_cosine"] = min(w["min_cosine"], r["cosine"])
        whole = min(r["whole_model_cosine"] for r in rows if "whole_model_cosine" in r)
        return "torch_autograd", {
            "reference": f"torch {torch.__version__} autograd on the module, forward hook on '{layer_name}'",
            "graph": "explain",
            "sizes": [[b, int(rows[0]["L"])] for b in VALIDATION_BATCHES],
            "gradients_at": "the graph's activations (returned by the hook)",
            "tolerance": {k: {"atol": a, "rtol": r} for k, (a, r) in TORCH_TOL.items()},
            "max": worst,
            "whole_model_gradient_min_cosine": whole,
            "whole_model_gradient_cosine_floor": TORCH_WHOLE_MIN_COSINE,
        }

    return check


def format_torch_rows(rows: list[dict]) -> str:
    lines = ["explain.onnx against torch autograd on the module (|ours - torch| <= atol max|torch| + rtol |torch|):",
             f"{'output':<12} {'batch':>5} {'max_abs':>10} {'max_rel':>10} {'cosine':>12}  tolerance    reference"]
    for r in rows:
        lines.append(f"{r['output']:<12} {r['batch']:>5} {r['max_abs']:>10.2e} {r['max_rel']:>10.2e} "
                     f"{r['cosine']:>12.9f}  {r['atol']:g}/{r['rtol']:g}  {r['reference']}"
                     + (f"; whole-module gradient cosine {r['whole_model_cosine']:.9f} (floor "
                        f"{r['whole_model_min_cosine']})" if "whole_model_cosine" in r else ""))
    return "\n".join(lines)


# -- the export -----------------------------------------------------------------------------------------------------

def export_module(module: nn.Module, out: str | os.PathLike, target_layer: str = "layer4", input_size: int = 224,
                  labels=None, preprocess: Preprocess | None = None, *, name: str | None = None,
                  exporter: str = "dynamo", checkpoint: str | os.PathLike | None = None,
                  factory: str | None = None) -> ImportResult:
    """Write the pooled-linear artifacts of a PyTorch classifier into `out` (module docstring).

    module        the classifier: image [N, 3, S, S] -> logits [N, K]; put in eval mode (in place)
    target_layer  the submodule whose output is explained, by its name in module.named_modules()
    input_size    S, the side the runtime resizes photos to
    labels        a file (one class name per line) or a sequence of K names, in output order; default class_0 ...
    preprocess    onnx_import.Preprocess (resize policy, interpolation, mean/std; default ImageNet's, 224 from 256);
                  its `size`, when set, must be input_size
    name          the model's name in the manifest (default: the module's class name)
    exporter      "dynamo" (torch.onnx's default) or "torchscript" (the older tracer: faster, for what dynamo cannot
                  trace)
    checkpoint, factory   where the weights and the module came from (the manifest's provenance; `checkpoint` is
                  not loaded here: module_from_factory does that)
    """
    if exporter not in EXPORTERS:
        raise ModuleExportError(f"exporter {exporter!r}: valid exporters are {', '.join(EXPORTERS)}")
    if not isinstance(input_size, int) or isinstance(input_size, bool) or not 8 <= input_size <= 4096:
        raise ModuleExportError(f"--size {input_size!r}: an integer in 8..4096")
    pre = Preprocess() if preprocess is None else preprocess
    if pre.size is not None and pre.size != input_size:
        raise ModuleExportError(f"preprocess.size {pre.size} differs from input_size {input_size}")
    pre = Preprocess(**{**pre.__dict__, "size": input_size})
    pre.resolved(input_size)   # bad preprocessing options are named before the export
    notes = _prepare(module)
    layer = find_layer(module, target_layer)
    (c, h, w), k = probe(module, layer, target_layer, input_size)
    try:   # the label count is K: named before the export
        if isinstance(labels, (str, os.PathLike)):
            read_label_file(labels, k)
        elif labels is not None:
            check_labels(labels, k)
    except ImportError_ as e:
        raise ModuleExportError(str(e)) from None
    model_name = name or type(module).__name__
    log(f"[module] {model_name}: target layer '{target_layer}' ({type(layer).__name__}) -> [N, {c}, {h}, {w}], "
        f"logits [N, {k}], input {input_size}x{input_size}")
    for note in notes:
        log(f"[module] {note}")
    tensor = target_layer if target_layer not in RESERVED else f"{target_layer}__output"
    out = Path(out)
    created = not out.exists() and not out.is_symlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    result = None
    try:
        path = tmp / "module.onnx"
        log(f"[module] torch.onnx.export ({exporter}, opset {OPSET}, dynamic batch) ...")
        to_onnx(module, layer, tensor, input_size, path, exporter)
        provenance = {
            "pretrained": str(checkpoint) if checkpoint is not None else "module",
            "random_weights": False,
            "source": {"file": "", "module": factory or f"{type(module).__module__}.{type(module).__qualname__}",
                       "checkpoint": str(checkpoint) if checkpoint is not None else None,
                       "target_module": target_layer, "exporter": f"torch.onnx.export ({exporter})",
                       "onnx_sha256": sha256_path(path), "eval_mode_set": bool(notes)},
            "versions": {"torch": torch.__version__},
        }
        if checkpoint is not None:
            provenance["pretrained_id"] = f"sha256:{sha256_path(checkpoint)}"
        shown = f"the graph of {model_name} ({exporter})"
        try:
            result = import_onnx(path, out, tensor, pre, labels=labels, name=model_name, output="logits",
                                 check=torch_check(module, layer, target_layer, input_size, k), provenance=provenance,
                                 target_advice=_enclosing(target_layer), shown_as=shown)
        except ImportError_ as e:   # name the graph, not its temporary file
            if str(path) not in str(e):
                raise
            raise ModuleExportError(str(e).replace(str(path), shown)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and result is None:   # the folder this call made, still empty: nothing is left behind
            try:
                out.rmdir()
            except OSError:
                pass
    return result


__all__ = ["export_module", "load_factory", "module_from_factory", "find_layer", "probe", "to_onnx",
           "hooked_autograd", "torch_check", "ModuleExportError", "OPSET", "EXPORTERS"]
