"""Any ONNX classifier in: the five graphs of the pooled-linear family from the user's graph alone (no torch).

    python -m export onnx MODEL.onnx --out DIR [--target-layer auto|NAME] [--list-targets] [preprocessing] [--labels F]

What `import_onnx` does, in order:
    graph      the image input (any name, float32 [N, 3, H, W], fixed or dynamic batch) and the logits (the graph's
               output; a final Softmax / LogSoftmax is dropped and the logits before it are explained)
    batch      made dynamic: the input's batch axis becomes `batch`, and a Reshape whose constant shape repeats the
               fixed batch copies it instead (0); a graph that still bakes the batch is refused at validation
    shapes     ONNX shape inference at the chosen input size (or, where it leaves tensors unknown, one ORT run)
    target     a 4-D tensor [N, C, h, w] that every path from the image to the logits passes through (a dominator
               of the logits); `auto` takes the last one with h w > 1. A tensor a skip connection goes around
               (inside a residual block) is refused, naming the skip
    graphs     features = the graph with the target as a second output; classify; head = target -> logits;
               explain and head_grad = features and head plus export/onnx_grad.py's backward of the target logit
    checks     the logits against the user's unmodified graph in ONNX Runtime, head(activations) against the logits,
               explain against features and head_grad, and the gradients against central differences of head.onnx
               in float64 along random directions and along the gradient (VALIDATION below); any failure is an
               ExportError and nothing is written
    write      the graphs in a temporary folder, renamed into place, then labels and manifest.json (export/writing.py)
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.artifacts import sha256_path
from runtime.fsutil import remove_stale_temporaries, temp_dir
from runtime.manifest import SET_NAME, ManifestError, validate_manifest
from runtime.spec import FAMILIES, MANIFEST_VERSION

from .onnx_grad import NON_DIFFERENTIABLE_INPUTS, GradientError, dependents, infer_types, opset_of, prepare
from .onnx_grad import target_gradient_graph, to_float64
from .writing import ExportError, ValidationError, check_structure, compare, graph_entries, install, log, summarise
from .writing import write_labels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILY = "pooled-linear"
RESERVED = ("image", "target", "logits", "activations", "gradients")

# Validation. Graph outputs against the user's graph and each other: |ours - ref| <= ATOL * max|ref| + RTOL * |ref|
# (the same ops on the same inputs; ORT may fuse them differently, so float32 rounding differs).
ATOL, RTOL = 1e-4, 1e-4
VALIDATION_BATCHES = (1, 3)
# Gradients: for each direction v (unit norm per image), |central difference of logits[b, t_b] along v - <g_b, v>|
# in units of |g_b| / sqrt(n) (the RMS derivative over random unit directions; n = C h w). Float64 differences
# (step 1e-9 |A_b|: small enough not to cross the ReLU and MaxPool kinks of a deep head, e.g. Inception v3) measure
# the float32 gradient's own error. Where the logit's rounding would show at that step (activations that vanish next
# to a bias: the logit is mostly the bias), the point is scaled up until it does not (its RMS up to RESCALE_MAX_RMS),
# and past that the step is raised (see check_gradients): a raised step of 1% |A| crossed the kinks of Inception
# v4's head (random weights, 96 px, |A| ~ 1e-6) and failed its correct gradient with an error of 58. Float32
# differences (heads too large for the float64 evaluator) are limited by rounding (step 1e-2 |A_b|). A kink of the
# head between the two points (a ReLU that switches) spoils one step only: a point that fails is differenced again
# at the next smaller step (never under the rounding floor) and keeps its smallest error, while a wrong gradient
# fails at every step.
GRAD_DIRECTIONS = 4           # random directions, plus the gradient's own
GRAD_TOL = {"float64": 1e-3, "float32": 5e-2}
GRAD_STEPS = {"float64": (1e-9, 1e-10, 1e-11), "float32": (1e-2,)}
FLOAT64_MAX_MACS = 3e8        # per image: larger heads are checked in float32 by ONNX Runtime
TIE_BREAK = 1e-3              # the checked points move by this fraction of their RMS value (check_gradients)
RESCALE_MAX_RMS = 1.0         # points whose logit's rounding would raise the step are scaled up to at most this RMS


class ImportError_(ExportError):
    """A model that cannot be imported (one line: the node, tensor or option at fault)."""


@dataclass
class Preprocess:
    """How the runtime turns a photo into the model's input (recorded in the manifest)."""

    size: int | None = None              # input side in pixels; None: the graph's fixed size, else 224
    resize: str = "crop"                 # crop: shortest side to resize_size, centre crop; stretch: to size x size
    crop_pct: float | None = None        # crop: resize_size = floor(size / crop_pct) (default 0.875: 224 from 256)
    resize_size: int | None = None       # crop: the shortest side before the crop (instead of crop_pct)
    interpolation: str = "bilinear"      # Pillow's filter: bilinear or bicubic
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def resolved(self, size: int) -> dict:
        if self.resize not in ("crop", "stretch"):
            raise ImportError_(f"--resize {self.resize!r}: valid values are crop, stretch")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ImportError_(f"--interpolation {self.interpolation!r}: valid values are bilinear, bicubic")
        if self.crop_pct is not None and self.resize_size is not None:
            raise ImportError_("--crop-pct and --resize-size both set the shortest side before the crop; give one")
        if self.resize == "stretch":
            rs = size
        elif self.resize_size is not None:
            rs = int(self.resize_size)
        else:
            pct = 0.875 if self.crop_pct is None else float(self.crop_pct)
            if not 0.0 < pct <= 1.0:
                raise ImportError_(f"--crop-pct {pct}: must be in (0, 1]")
            rs = int(math.floor(size / pct + 1e-9))
        if rs < size:
            raise ImportError_(f"--resize-size {rs} is smaller than the input size {size}")
        for what, v in (("mean", self.mean), ("std", self.std)):
            if len(v) != 3 or not all(math.isfinite(float(x)) for x in v):
                raise ImportError_(f"--{what}: expected three numbers, got {v}")
        if not all(0.0 <= float(x) <= 1.0 for x in self.mean):
            raise ImportError_(f"--mean {list(self.mean)}: each value must be in [0, 1] (pixels scaled to [0, 1])")
        if not all(0.0 < float(x) <= 1000.0 for x in self.std):
            raise ImportError_(f"--std {list(self.std)}: each value must be in (0, 1000]")
        return {"resize": self.resize, "resize_size": rs, "interpolation": self.interpolation}


@dataclass
class Candidate:
    name: str
    dims: list            # [batch, C, h, w]
    producer: str         # the op type that produces it


@dataclass
class Source:
    """The user's graph prepared for cutting: dynamic batch, shapes, image and logits found."""

    model: onnx.ModelProto        # dynamic batch, opset >= onnx_grad.MIN_OPSET, shapes in value_info
    original: onnx.ModelProto     # as loaded
    path: Path
    image: str                    # the input's name
    logits: str                   # the explained tensor
    output: str                   # the graph output it comes from
    softmax: str | None           # "Softmax" / "LogSoftmax" when the graph ended in one (dropped)
    size: int
    batch: int | str              # the original batch axis: a size or a symbolic name
    rewritten: list = field(default_factory=list)   # Reshape nodes whose baked batch now copies the input's
    notes: list = field(default_factory=list)       # what the log says about the graph
    types: dict = field(default_factory=dict)       # tensor name -> onnx.TypeProto of `model`
    channels_last: bool = False                     # the user's input is [N, H, W, 3]: `image` is a new NCHW input
    original_image: str | None = None               # the user's input name (in `original`), when it differs


@dataclass
class ImportResult:
    out_dir: Path
    manifest: dict
    report: dict
    seconds: dict = field(default_factory=dict)


# -- reading the user's graph ---------------------------------------------------------------------------------------

def _dims(vi_type) -> list | None:
    if vi_type is None or not vi_type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi_type.tensor_type.shape.dim]


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf, checker and external-data errors come in several types
        raise ImportError_(f"{path}: not a valid ONNX model ({str(e).strip().splitlines()[0][:200]})") from None
    return model


def _image_input(model: onnx.ModelProto, path: Path) -> tuple[str, bool]:
    """(the image input's name, whether it is channels-last [N, H, W, 3])."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ImportError_(f"{path}: expected one image input, the graph has {len(inputs)} "
                           f"({', '.join(i.name for i in inputs) or 'none'})")
    vi = inputs[0]
    if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportError_(f"{path}: input '{vi.name}' must be float32 (it is "
                           f"{TensorProto.DataType.Name(vi.type.tensor_type.elem_type)})")
    d = _dims(vi.type)
    if d is not None and len(d) == 4 and d[3] == 3 and d[1] != 3:
        return vi.name, True      # channels last (Keras, TensorFlow, tf2onnx)
    if d is None or len(d) != 4 or d[1] not in (3, None) and not isinstance(d[1], str):
        raise ImportError_(f"{path}: input '{vi.name}' must be an image batch [N, 3, H, W] or [N, H, W, 3] "
                           f"(shape {d})")
    return vi.name, False


def _logits(model: onnx.ModelProto, path: Path, output: str | None) -> tuple[str, str, str | None]:
    """(the explained tensor, the graph output, the dropped Softmax/LogSoftmax op or None)."""
    outs = [o.name for o in model.graph.output]
    if output is None:
        if len(outs) != 1:
            raise ImportError_(f"{path}: the graph has {len(outs)} outputs ({', '.join(outs)}); name the logits "
                               f"with --output")
        output = outs[0]
    elif output not in outs:
        raise ImportError_(f"{path}: no graph output '{output}' (outputs: {', '.join(outs)})")
    producer = {o: n for n in model.graph.node for o in n.output}
    t, dropped = output, None
    while t in producer and producer[t].op_type == "Identity":
        t = producer[t].input[0]
    if t in producer and producer[t].op_type in ("Softmax", "LogSoftmax"):
        dropped = producer[t].op_type
        t = producer[t].input[0]
    return t, output, dropped


def _set_dims(vi: onnx.ValueInfoProto, dims: list) -> None:
    shape = vi.type.tensor_type.shape
    shape.Clear()
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        elif d is not None:
            dim.dim_value = int(d)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # best effort: unknown shapes are filled in by running the graph
        return model


def _constant(model: onnx.ModelProto, name: str):
    for t in model.graph.initializer:
        if t.name == name:
            return t
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute and n.attribute[0].name == "value":
            return n.attribute[0].t
    return None


def _rewrite_baked_batch(model: onnx.ModelProto, batch0) -> list[str]:
    """Reshape nodes whose constant target shape starts with the fixed batch (their data's first axis being the
    batch) leave it free instead (-1, or 0: copied). Returns their names; the model is changed in place."""
    done = []
    for _ in range(len(model.graph.node)):
        inferred = _infer(model)
        types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
        for n in model.graph.node:
            if n.op_type != "Reshape":
                continue
            data = _dims(types.get(n.input[0]))
            t = _constant(model, n.input[1])
            if data is None or not data or data[0] != "batch" or t is None:
                continue
            shape = onnx.numpy_helper.to_array(t).astype(np.int64)
            if shape.ndim != 1 or not shape.size or shape[0] <= 0:
                continue
            if isinstance(batch0, int) and shape[0] != batch0:
                raise ImportError_(f"Reshape node '{n.name or n.output[0]}' bakes the batch into its target shape "
                                   f"{shape.tolist()}; export the model with a dynamic batch")
            fixed = shape.copy()
            allowzero = any(a.name == "allowzero" and a.i for a in n.attribute)
            if not (shape == -1).any():
                fixed[0] = -1            # the batch is what is left
            elif not allowzero:
                fixed[0] = 0             # copied from the data's first axis
            else:
                raise ImportError_(f"Reshape node '{n.name or n.output[0]}' bakes the batch into its target shape "
                                   f"{shape.tolist()}; export the model with a dynamic batch")
            name = f"{n.input[1]}__dynamic_batch"
            model.graph.initializer.append(onnx.numpy_helper.from_array(fixed, name))
            n.input[1] = name
            done.append(n.name or n.output[0])
            break
        else:
            return done
    return done


def _fill_unknown_shapes(model: onnx.ModelProto, image: str, size: int, names: list[str]) -> None:
    """Shapes of `names` that inference left unknown, from two ORT runs (batch 2 and 3: the axis that follows the
    batch is `batch`), added to the model's value_info."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known_out = {o.name for o in m.graph.output}
    for n in names:
        if n not in known_out:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(m.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(outs, sess.run(outs, {image: np.zeros((b, 3, size, size), np.float32)}))) for b in (2, 3)]
    filled = set()
    for n in names:
        a, b = runs[0][n], runs[1][n]
        if a.ndim != b.ndim or any(x != y and (x, y) != (2, 3) for x, y in zip(a.shape, b.shape)):
            continue
        filled.add(n)
    keep = [vi for vi in model.graph.value_info if vi.name not in filled]   # the partial shapes they replace
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    for n in names:
        if n not in filled:
            continue
        a, b = runs[0][n], runs[1][n]
        dims = ["batch" if (x, y) == (2, 3) else x for x, y in zip(a.shape, b.shape)]
        vi = helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), dims)
        model.graph.value_info.append(vi)


def read_source(path: str | os.PathLike, size: int | None = None, output: str | None = None) -> Source:
    """Load the user's graph and prepare it for cutting (module docstring: graph, batch, shapes)."""
    path = Path(path)
    original = _load(path)
    try:
        model = prepare(original)
    except GradientError as e:
        raise ImportError_(f"{path}: {e}") from None
    image, channels_last = _image_input(model, path)
    logits, out, dropped = _logits(model, path, output)
    vi = next(i for i in model.graph.input if i.name == image)
    d = _dims(vi.type)
    batch0 = d[0] if d[0] is not None else "N"
    fixed = [x for x in (d[1:3] if channels_last else d[2:]) if isinstance(x, int)]
    if len(fixed) == 2 and fixed[0] != fixed[1]:
        raise ImportError_(f"{path}: input '{image}' is fixed at {fixed[0]}x{fixed[1]}; the runtime feeds square "
                           f"images")
    if fixed and size is not None and size != fixed[0]:
        raise ImportError_(f"{path}: input '{image}' is fixed at {fixed[0]}x{fixed[0]}; --size {size} differs")
    size = int(size or (fixed[0] if fixed else 224))
    notes = []
    original_image = image
    if channels_last:   # the runtime feeds [N, 3, H, W]: a new input, transposed to the user's layout
        taken = _all_names(model.graph) | {o.name for o in model.graph.output}
        nchw, i = f"{image}__nchw", 0
        while nchw in taken:
            i += 1
            nchw = f"{image}__nchw{i}"
        model.graph.node.insert(0, helper.make_node("Transpose", [nchw], [image], perm=[0, 2, 3, 1],
                                                    name=f"{image}__to_channels_last"))
        vi.name = image = nchw
        notes.append(f"input '{original_image}' is channels-last [N, H, W, 3]: the graphs take [N, 3, H, W] and "
                     f"transpose it")
    # dynamic batch: the input's first axis, no stale intermediate shapes
    _set_dims(vi, ["batch", 3, size, size])
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    rewritten = _rewrite_baked_batch(model, batch0)
    if isinstance(batch0, int):
        notes.append(f"the graph's batch axis was fixed at {batch0}; made dynamic"
                     + (f" (Reshape nodes now copy the batch: {', '.join(rewritten)})" if rewritten else ""))
    inferred = _infer(model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for o in model.graph.output:
        io = next((x for x in inferred.graph.output if x.name == o.name), None)
        if io is not None:
            o.CopyFrom(io)
    types = infer_types(model)
    on_path = sorted(_reachable(model.graph, image) & _ancestors(model.graph, logits))
    # unknown: no rank, or an axis after the first without a size (a Pad or Reshape whose amounts are computed)
    unknown = [n for n in on_path if _dims(types.get(n)) is None
               or any(not isinstance(x, int) for x in _dims(types.get(n))[1:])]
    if unknown:
        _fill_unknown_shapes(model, image, size, unknown)
        notes.append(f"shape inference left {len(unknown)} tensors unknown or partly unknown; their shapes come from "
                     f"running the graph")
        types = infer_types(model)
    src = Source(model, original, path, image, logits, out, dropped, size, batch0, rewritten, notes, types,
                 channels_last, original_image)
    ld = _dims(types.get(logits))
    if ld is None or len(ld) != 2 or not isinstance(ld[1], int):
        raise ImportError_(f"{path}: the logits '{logits}' must be [batch, K] with a fixed K (shape {ld})")
    if isinstance(ld[0], int):
        raise ImportError_(f"{path}: the logits' batch axis stays {ld[0]} whatever the input's batch: "
                           f"{_batch_baker(model, types, image)}; export the model with a dynamic batch")
    if dropped:
        notes.append(f"the graph ends in {dropped}: explaining the logits before it ('{logits}')")
    return src


def _batch_baker(model, types, image) -> str:
    reach = _reachable(model.graph, image)
    for n in model.graph.node:
        ins = [_dims(types.get(i)) for i in n.input if i in reach]
        outs = [_dims(types.get(o)) for o in n.output]
        if any(d and d[0] == "batch" for d in ins) and any(d and isinstance(d[0], int) for d in outs):
            return f"node '{n.name or n.output[0]}' ({n.op_type}) fixes it"
    return "a node fixes it"


# -- the target layer: dominators of the logits ---------------------------------------------------------------------

def _reachable(graph: onnx.GraphProto, source: str, avoid: str | None = None) -> set:
    seen = {source}
    for n in graph.node:
        if any(i in seen and i != avoid for i in n.input if i):
            seen.update(o for o in n.output if o)
    seen.discard(avoid)
    return seen


def _ancestors(graph: onnx.GraphProto, sink: str) -> set:
    producer = {o: n for n in graph.node for o in n.output}
    seen, stack = {sink}, [sink]
    while stack:
        n = producer.get(stack.pop())
        for i in (n.input if n is not None else ()):
            if i and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def dominators(graph: onnx.GraphProto, source: str, sink: str, types: dict | None = None) -> list[str]:
    """The tensors every path from `source` to `sink` passes through, from source to sink (both included), by the
    immediate dominators of the tensor DAG in topological order (each tensor's is the lowest common dominator of
    the tensors its node reads). With `types`, only paths of values count: a shape read from the image
    (`x.view(x.size(0), -1)` at the head, with x the input) carries no value of it and goes around nothing."""
    if types is None:
        reach = _reachable(graph, source)
    else:
        reach = dependents(graph, source, types)
    idom, depth = {source: None}, {source: 0}

    def lca(a, b):
        while a != b:
            if depth[a] < depth[b]:
                a, b = b, a
            a = idom[a]
        return a

    for n in graph.node:
        cut = NON_DIFFERENTIABLE_INPUTS.get(n.op_type, ()) if types is not None else ()
        preds = [i for k, i in enumerate(n.input) if i in reach and i in idom and k not in cut]
        if not preds:
            continue
        d = preds[0]
        for p in preds[1:]:
            d = lca(d, p)
        for o in n.output:
            if o and o not in idom:
                idom[o], depth[o] = d, depth[d] + 1
    if sink not in idom:
        return []
    chain, t = [], sink
    while t is not None:
        chain.append(t)
        t = idom[t]
    return chain[::-1]


# ops whose (first) input and output are [N, C, spatial...] by the operator's definition
_NCHW_OPS = frozenset(("Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool",
                       "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "LRN",
                       "DepthToSpace", "SpaceToDepth", "MaxRoiPool", "MaxUnpool"))
# ops whose output keeps the axis order of their 4-D inputs (elementwise, with broadcasting)
_LAYOUT_KEEPING_OPS = frozenset((
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf",
    "Gelu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Dropout",
    "Cast", "CastLike", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"))


def layouts(graph: onnx.GraphProto, types: dict, image: str | None = None) -> dict:
    """Tensor -> its axis order relative to [N, C, h, w], for the 4-D tensors where the graph says it: the operands
    and results of convolutions, normalisations and pooling are [N, C, h, w] (identity), a Transpose permutes its
    input's order, elementwise ops keep it. A channels-last copy made for a head (Keras / tf2onnx: Transpose to
    [N, h, w, C] before ReduceMean) is (0, 2, 3, 1). Tensors the graph says nothing about are absent."""
    ident = (0, 1, 2, 3)
    out: dict = {image: ident} if image else {}
    for n in graph.node:
        if n.op_type in _NCHW_OPS:
            if n.input and len(_dims(types.get(n.input[0])) or []) == 4:
                out.setdefault(n.input[0], ident)
            for o in n.output[:1]:
                if len(_dims(types.get(o)) or []) == 4:
                    out[o] = ident
        elif n.op_type == "Transpose" and n.input[0] in out:
            perm = list(_attrs_of(n).get("perm") or [3, 2, 1, 0])
            if len(perm) == 4:
                out[n.output[0]] = tuple(out[n.input[0]][p] for p in perm)
        elif n.op_type in _LAYOUT_KEEPING_OPS:
            od = _dims(types.get(n.output[0]))
            for i in n.input:
                if i in out and od is not None and _dims(types.get(i)) == od:
                    out[n.output[0]] = out[i]
                    break
    return out


def _attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def candidates(src: Source) -> list[Candidate]:
    """4-D tensors [batch, C, h, w] every path from the image to the logits passes through, first to last (tensors
    the graph shows in another axis order, e.g. a channels-last copy for the head, are not feature maps [N, C, h,
    w] and are left out)."""
    types = src.types
    producer = {o: n for n in src.model.graph.node for o in n.output}
    order = layouts(src.model.graph, types, src.image)
    out = []
    for t in dominators(src.model.graph, src.image, src.logits, types)[1:-1]:
        d = _dims(types.get(t))
        if d is not None and len(d) == 4 and all(isinstance(x, int) and x > 0 for x in d[1:]) \
                and order.get(t, (0, 1, 2, 3)) == (0, 1, 2, 3):
            out.append(Candidate(t, d, producer[t].op_type if t in producer else "?"))
    return out


def _why_not(src: Source, name: str, advice: str | None = None) -> str:
    """Why `name` cannot be the target layer (one line); `advice` replaces the closing suggestion of a tensor inside a
    residual block (what to choose instead, in the caller's terms)."""
    g = src.model.graph
    if name not in {o for n in g.node for o in n.output}:
        return f"--target-layer '{name}': no tensor of that name in the graph (see --list-targets)"
    reach = _reachable(g, src.image)
    if name not in reach or name not in _ancestors(g, src.logits):
        return f"--target-layer '{name}': the tensor does not lie between the image and the logits"
    d = _dims(src.types.get(name))
    if d is None or len(d) != 4 or not all(isinstance(x, int) and x > 0 for x in d[1:]):
        return f"--target-layer '{name}': not a 4-D tensor [batch, C, h, w] of fixed C, h, w (shape {d})"
    order = layouts(g, src.types, src.image).get(name, (0, 1, 2, 3))
    if order != (0, 1, 2, 3):
        return (f"--target-layer '{name}': its axes are in the order {''.join('NChw'[a] for a in order)}, not "
                f"[batch, C, h, w] (a transposed copy of a feature map; see --list-targets)")
    around = _reachable(g, src.image, avoid=name)
    below = _reachable(g, name)
    for n in g.node:   # the first node where a path around the tensor meets one through it: the skip's join
        inside = [i for i in n.input if i in below and i not in around]
        skip = [i for i in n.input if i in around and i not in below]
        if inside and skip:
            return (f"--target-layer '{name}': the tensor is inside a residual block: the skip connection '{skip[0]}' "
                    f"goes around it into node '{n.name or n.output[0]}' ({n.op_type}); "
                    + (advice or "choose a tensor every path from the image to the logits passes through "
                                 "(--list-targets)"))
    return f"--target-layer '{name}': a path from the image to the logits goes around the tensor"


def auto_target(cands: list[Candidate]) -> Candidate | None:
    """The last candidate with h w > 1 before space is pooled away (the first candidate with h w = 1: after it a
    4-D tensor is no longer a feature map, e.g. ConvNeXt's channels-last LayerNorm [N, 1, 1, C])."""
    best = None
    for c in cands:
        if c.dims[2] * c.dims[3] == 1:
            break
        best = c
    return best


def choose_target(src: Source, target_layer: str = "auto", advice: str | None = None) -> Candidate:
    cands = candidates(src)
    if target_layer in (None, "", "auto"):
        best = auto_target(cands)
        if best is None:
            raise ImportError_(f"{src.path}: no target-layer candidate: no 4-D tensor [batch, C, h, w] with h w > 1 "
                               f"that every path from the image to the logits passes through")
        return best
    hit = next((c for c in cands if c.name == target_layer), None)
    if hit is None:
        raise ImportError_(_why_not(src, target_layer, advice))
    return hit


def format_candidates(src: Source, cands: list[Candidate]) -> str:
    if not cands:
        return f"{src.path}: no target-layer candidate (no 4-D tensor every path from the image to the logits passes through)"
    best = auto_target(cands)
    auto = best.name if best is not None else None
    pooled = False
    width = max(len(c.name) for c in cands)
    lines = [f"target-layer candidates of {src.path} (4-D tensors every path from the image to the logits passes "
             f"through, first to last; input {src.size}x{src.size}):"]
    for c in cands:
        shape = "[" + ", ".join(str(x) for x in c.dims) + "]"
        pooled = pooled or c.dims[2] * c.dims[3] == 1
        mark = "  <- auto" if c.name == auto else ("  (after the pooling)" if pooled else "")
        lines.append(f"  {c.name:<{width}}  {shape:<24} {c.producer}{mark}")
    if auto is None:
        lines.append("  (none has h w > 1 before the pooling: --target-layer auto finds no candidate)")
    return "\n".join(lines)


# -- cutting and renaming -------------------------------------------------------------------------------------------

def _rename(graph: onnx.GraphProto, mapping: dict) -> None:
    def r(name):
        return mapping.get(name, name)

    for n in graph.node:
        n.input[:] = [r(i) for i in n.input]
        n.output[:] = [r(o) for o in n.output]
        for a in n.attribute:   # outer-scope names read inside If / Loop / Scan bodies
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename(sub, {k: v for k, v in mapping.items()})
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            vi.name = r(vi.name)
    for t in graph.initializer:
        t.name = r(t.name)


def _all_names(graph: onnx.GraphProto) -> set:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], types: dict) -> onnx.ModelProto:
    """The subgraph computing `outputs` from `inputs` (and constants), as a model."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    need, stack, keep = set(outputs), list(outputs), set()
    while stack:
        t = stack.pop()
        if t in inputs or t in inits:
            continue
        n = producer.get(t)
        if n is None:
            raise ImportError_(f"cannot cut the graph: tensor '{t}' is needed but not computed from "
                               f"{', '.join(inputs)}")
        if id(n) in keep:
            continue
        keep.add(id(n))
        for i in n.input:
            if i and i not in need:
                need.add(i)
                stack.append(i)
        for a in n.attribute:   # subgraph bodies may read outer tensors
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for sn in sub.node:
                    for i in sn.input:
                        if i and i not in need and (i in producer or i in inits):
                            need.add(i)
                            stack.append(i)
    nodes = [n for n in g.node if id(n) in keep]

    def vi(name):
        v = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        if name in types:
            v.type.CopyFrom(types[name])
        return v

    graph = helper.make_graph(nodes, g.name or "graph", [vi(i) for i in inputs], [vi(o) for o in outputs],
                              [inits[t] for t in sorted(need) if t in inits],
                              value_info=[v for v in g.value_info if v.name in need and v.name not in inputs
                                          and v.name not in outputs])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="decomcam onnx import")
    m.ir_version = model.ir_version
    m.functions.extend(model.functions)
    return m


def _declare(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """Set the declared shapes of the graph's inputs and outputs (the contract's axes; batch symbolic)."""
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in shapes:
            dtype, dims = shapes[vi.name]
            vi.type.tensor_type.elem_type = dtype
            _set_dims(vi, dims)
    return model


def contract_shapes(graph_specs: dict, dims: dict) -> dict:
    """{tensor: (element type, dims)} of every input and output the graphs declare: dynamic axes by name (batch, L),
    the others at their size in `dims`."""
    from runtime.spec import DYNAMIC_AXES

    types = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    return {t.name: (types[t.dtype], [a if a in DYNAMIC_AXES else int(dims[a]) for a in t.axes])
            for g in graph_specs.values() for t in g.inputs + g.outputs}


def derive_graphs(forward: onnx.ModelProto, graph_specs: dict, shapes: dict) -> dict[str, onnx.ModelProto]:
    """The family's five graphs from one forward graph whose tensors carry the contract's names: the image input
    `image` (and, where the family has one, the class input `text`), the outputs `logits` and `activations` (the
    target layer, read by the head):

        features   the forward, cut to the features contract's inputs and outputs
        classify   cut to image [, text] -> logits
        head       cut to activations [, text] -> logits
        explain    features + export/onnx_grad.py's backward of logits[b, t_b] to the activations, t_b = target[b]
                   or the top-1 class where target[b] < 0 (a `target` input)
        head_grad  head + the same backward

    Each graph's inputs and outputs get the contract's order and the declared `shapes` (contract_shapes).
    A head that reads the image's shape (`x.view(image.size(0), -1)`) takes it from the activations' batch. A
    GradientError names an op on the head's path without a rule."""
    types = infer_types(forward)
    height, width = shapes["image"][1][2:]
    sources = {"features": forward, "classify": forward,
               "head": _image_shape_from_activations(forward, int(height), int(width))}
    cut = {name: _extract(src, graph_specs[name].input_names, graph_specs[name].output_names, types)
           for name, src in sources.items()}
    graphs = {
        **cut,
        "explain": target_gradient_graph(cut["features"], "activations", "logits", "target", "gradients"),
        "head_grad": target_gradient_graph(cut["head"], "activations", "logits", "target", "gradients"),
    }
    for name, m in graphs.items():   # the contract's order of inputs and outputs
        _declare(m, shapes)
        ins = {i.name: i for i in m.graph.input}
        outs = {o.name: o for o in m.graph.output}
        order_in = [ins[t.name] for t in graph_specs[name].inputs]
        order_out = [outs[t.name] for t in graph_specs[name].outputs]
        del m.graph.input[:]
        m.graph.input.extend(order_in)
        del m.graph.output[:]
        m.graph.output.extend(order_out)
    return {name: graphs[name] for name in graph_specs}


def _image_shape_from_activations(model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
    """A copy in which every Shape node that reads the image computes [batch, 3, height, width] from the activations'
    batch instead, for the head (whose only input is the activations): a model may read its input's batch at the
    head (`x.view(inputs.size(0), -1)`). The nodes stay where the Shape node was: in the head they read an input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    for n in m.graph.node:
        if n.op_type != "Shape" or n.input[0] != "image":
            nodes.append(n)
            continue
        a = _attrs_of(n)
        base = f"{n.output[0]}__from_activations"
        rest = numpy_helper.from_array(np.array([3, height, width], np.int64), f"{base}/rest")
        m.graph.initializer.append(rest)
        full = f"{base}/full" if ("start" in a or "end" in a) else n.output[0]
        nodes += [helper.make_node("Shape", ["activations"], [f"{base}/batch"], end=1, name=f"{base}/batch"),
                  helper.make_node("Concat", [f"{base}/batch", rest.name], [full], axis=0, name=f"{base}/concat")]
        if full != n.output[0]:
            start, end = int(a.get("start", 0)), int(a.get("end", 4))
            nodes.append(helper.make_node("Slice", [full, _int_init(m, f"{base}/start", start),
                                                   _int_init(m, f"{base}/end", end)], [n.output[0]],
                                          name=f"{base}/slice"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _int_init(m: onnx.ModelProto, name: str, value: int) -> str:
    m.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    return name


def build_graphs(src: Source, target: Candidate) -> tuple[dict[str, onnx.ModelProto], dict]:
    """{graph name: model} of the family's five graphs, and the dims (C, h, w, K, H, W)."""
    model = onnx.ModelProto()
    model.CopyFrom(src.model)
    g = model.graph
    mapping = {src.image: "image", src.logits: "logits", target.name: "activations"}
    taken = _all_names(g) | {o.name for o in g.output}
    for name in RESERVED:   # another tensor already has a contract name: it gets a fresh one
        if name in taken and name not in mapping:
            fresh, i = f"{name}__orig", 0
            while fresh in taken:
                i += 1
                fresh = f"{name}__orig{i}"
            mapping[name] = fresh
    _rename(g, mapping)
    k = _dims(infer_types(model)["logits"])[1]
    c, h, w = target.dims[1:]
    dims = {"C": c, "h": h, "w": w, "K": int(k), "H": src.size, "W": src.size}
    spec = FAMILIES[FAMILY].graphs
    return derive_graphs(model, spec, contract_shapes(spec, {**dims, "3": 3})), dims


# -- validation -----------------------------------------------------------------------------------------------------

def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _session(model_or_path):
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, _session_options(), providers=["CPUExecutionProvider"])


def sample_images(pre: dict, size: int, mean, std, n: int, seed: int = 1234) -> np.ndarray:
    """Generated photo-like images as the runtime preprocesses them: [n, 3, size, size] float32."""
    from runtime.images import preprocess

    from .photos import photo_like_rgb

    rng = np.random.default_rng(seed)
    shapes = ((size + 40, size + 90), (size * 2, size + 7), (size + 31, size + 31), (size + 60, size * 2))
    imgs = [photo_like_rgb(rng, *shapes[i % len(shapes)]) for i in range(n)]
    return np.stack([preprocess(im, size, mean, std, pre["resize"], resize_size=pre["resize_size"],
                                interpolation=pre["interpolation"])[0] for im in imgs])


def _original_logits(src: Source, x: np.ndarray) -> np.ndarray:
    """The user's unmodified graph (plus the logits as an output where a Softmax followed them), at its own batch."""
    m = onnx.ModelProto()
    m.CopyFrom(src.original)
    if src.logits not in {o.name for o in m.graph.output}:
        m.graph.output.append(helper.make_empty_tensor_value_info(src.logits))
    sess = _session(m)
    b0 = src.batch
    name = src.original_image or src.image
    if src.channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if not isinstance(b0, int):
        return sess.run([src.logits], {name: x})[0]
    rows = [sess.run([src.logits], {name: np.repeat(x[i:i + 1], b0, 0)})[0][:1] for i in range(len(x))]
    return np.concatenate(rows, 0)


def _row(graph, output, batch, k, r, tol=(ATOL, RTOL), **extra) -> dict:
    return {"graph": graph, "output": output, "batch": batch, "L": k, "atol": tol[0], "rtol": tol[1], **r, **extra}


def _head_macs(head: onnx.ModelProto) -> float:
    """Multiply-adds of the head's Conv, Gemm and MatMul nodes per image (from inferred shapes)."""
    types = infer_types(head)
    total = 0.0
    for n in head.graph.node:
        out = _dims(types.get(n.output[0]))
        if out is None or not all(isinstance(d, int) for d in out[1:]):
            continue
        if n.op_type == "Conv":
            w = _dims(types.get(n.input[1])) or []
            total += float(np.prod(out[1:])) * float(np.prod([d for d in w[1:] if isinstance(d, int)] or [1]))
        elif n.op_type in ("Gemm", "MatMul"):
            a = _dims(types.get(n.input[0])) or [1]
            kdim = a[-1] if isinstance(a[-1], int) else 1
            total += float(np.prod(out[1:])) * kdim
    return total


def _float64_evaluator(head: onnx.ModelProto):
    """A float64 forward of the head: onnx.reference (ONNX Runtime lacks float64 Conv, pooling, ...), with Erf and
    Gelu in float64 (the reference computes them in float32). None where it cannot run."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[x.dtype])(x),)

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x, approximate="none"):
            approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
            if approximate == "tanh":
                return (0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),)
            return (0.5 * x * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / math.sqrt(2))),)

    try:
        ev = ReferenceEvaluator(to_float64(head), new_ops=[Erf, Gelu])
    except Exception:  # an op the reference does not implement
        return None
    return lambda a: ev.run(["logits"], {"activations": a})[0]


def check_gradients(head: onnx.ModelProto, head_grad_sess, points: np.ndarray, target: np.ndarray,
                    seed: int = 7) -> dict:
    """Directional-derivative check of head_grad.onnx's gradients at `points` (see GRAD_* above), each moved by
    TIE_BREAK of its RMS value in a random direction: activations after a ReLU hold exact zeros, and a MaxPool
    window of zeros in the head is a kink at the point itself (its one-sided derivatives differ; the backward
    takes the first maximum, as torch), where no central difference measures a gradient. A point whose logit is
    mostly a constant (activations that vanish next to a bias) is scaled up where the logit's rounding would raise
    the step above GRAD_STEPS[0] |A| (see RESCALE_MAX_RMS)."""
    rng = np.random.default_rng(seed)
    b0, n0 = len(points), points[0].size
    scale = np.linalg.norm(points.reshape(b0, -1).astype(np.float64), axis=1) / math.sqrt(n0)
    points = (points + TIE_BREAK * scale.reshape(b0, 1, 1, 1) * rng.normal(size=points.shape)).astype(np.float32)
    f64 = _float64_evaluator(head) if _head_macs(head) <= FLOAT64_MAX_MACS else None
    if f64 is not None:
        mode, f, ftype = "float64", f64, np.float64
    else:
        mode, ftype = "float32", np.float32
        head_sess = _session(head)

        def f(a):
            return head_sess.run(["logits"], {"activations": a.astype(np.float32)})[0].astype(np.float64)
    eps = float(np.finfo(ftype).eps)
    b, n = len(points), points[0].size

    def at(points):
        """(point, target, gradient, its RMS, the rounding floor of the step, |point|) at float32 `points`."""
        logits, grads = head_grad_sess.run(["logits", "gradients"], {"activations": points, "target": target})
        t = np.where(target < 0, logits.argmax(1), target)
        p, g = points.astype(ftype), grads.astype(np.float64)
        rms = np.linalg.norm(g.reshape(b, -1), axis=1) / math.sqrt(n)
        # each step: GRAD_STEPS |A_b|, or more where the logit's rounding (eps |y|, over 2 step) would exceed 1% of
        # the tolerance on the derivative (|g| / sqrt(n)): activations that vanish next to a bias (random weights)
        y0 = f(p)[np.arange(b), t]
        floor = 100 * eps * np.abs(y0) / (GRAD_TOL[mode] * np.maximum(rms, 1e-300))
        return p, t, g, rms, floor, np.linalg.norm(p.reshape(b, -1).astype(np.float64), axis=1)

    p, t, g, rms, floor, size = at(points)
    # a raised step crosses the kinks of a deep head (ReLU, MaxPool) and measures a mix of its pieces: where the
    # floor is above GRAD_STEPS[0] |A|, the point itself is scaled up instead (by twice the ratio: a head whose
    # logit is a constant plus a positively homogeneous function, as ReLU CNNs without biases, then needs no raised
    # step), its RMS value up to RESCALE_MAX_RMS; head_grad's gradient is checked as a function at valid inputs
    rms_a = size / math.sqrt(n)
    lift = np.where(size > 0, 2 * floor / (GRAD_STEPS[mode][0] * np.maximum(size, 1e-300)), 1.0)
    lift = np.minimum(lift, RESCALE_MAX_RMS / np.maximum(rms_a, 1e-300))
    lift = np.where(np.isfinite(lift) & (lift > 1.0), lift, 1.0)
    if (lift > 1.0).any():
        points = (points.astype(np.float64) * lift.reshape(b, 1, 1, 1)).astype(np.float32)
        p, t, g, rms, floor, size = at(points)
    dirs = [rng.normal(size=points.shape) for _ in range(GRAD_DIRECTIONS)] + [g]
    worst, per = 0.0, []
    for k, v in enumerate(dirs):
        v = v / np.maximum(np.linalg.norm(v.reshape(b, -1), axis=1), 1e-300).reshape(b, 1, 1, 1)
        dd = (g * v).reshape(b, -1).sum(1)
        err, last = np.full(b, np.inf), None
        for rel in GRAD_STEPS[mode]:   # the next step only where a kink may have spoiled this one
            step = np.maximum(rel * size, floor).reshape(b, 1, 1, 1)
            if not (err > GRAD_TOL[mode]).any() or (last is not None and np.array_equal(step, last)):
                break
            last = step
            up, down = f(p + step * v), f(p - step * v)
            fd = (up[np.arange(b), t] - down[np.arange(b), t]) / (2 * step.reshape(b))
            err = np.minimum(err, np.abs(fd - dd) / np.maximum(rms, 1e-30))
        per.append(float(err.max()))
        worst = max(worst, float(err.max()))
    return {"method": f"central differences of head.onnx in {mode}" +
                      (" (onnx.reference)" if mode == "float64" else " (ONNX Runtime)"),
            "precision": mode, "points": b, "directions": len(dirs), "step_relative": list(GRAD_STEPS[mode]),
            "steps_raised_for_rounding": int((floor > GRAD_STEPS[mode][0] * size).sum()),
            "points_rescaled": int((lift > 1.0).sum()), "rescale_max": float(lift.max()),
            "tie_breaking": TIE_BREAK,
            "units": "|g| / sqrt(C h w) (the RMS derivative over random unit directions)",
            "max_error": worst, "per_direction": per, "tolerance": GRAD_TOL[mode], "ok": worst <= GRAD_TOL[mode]}


def validate(src: Source, paths: dict[str, Path], dims: dict, pre: dict, mean, std) -> dict:
    """Run the written graphs (module docstring, checks); raise ValidationError listing every failure."""
    sess = {n: _session(p) for n, p in paths.items()}
    k = dims["K"]
    rows, failures = [], []

    def check(graph, output, b, out, ref, tol=(ATOL, RTOL), **extra):
        r = _row(graph, output, b, k, compare(out, ref, *tol), tol, **extra)
        rows.append(r)
        if not r["ok"]:
            failures.append(r)

    grad_checks = []
    for i, b in enumerate(VALIDATION_BATCHES):
        x = sample_images(pre, src.size, mean, std, b, seed=1234 + i)
        target = np.random.default_rng(i).integers(0, k, b).astype(np.int64)
        target[0] = -1
        try:
            ref = _original_logits(src, x)
            cl = sess["classify"].run(["logits"], {"image": x})[0]
            fl, fa = sess["features"].run(["logits", "activations"], {"image": x})
            el, ea, eg = sess["explain"].run(["logits", "activations", "gradients"], {"image": x, "target": target})
            hl = sess["head"].run(["logits"], {"activations": fa})[0]
            path = fa * ((np.arange(b, dtype=np.float32) + 0.5) / b).reshape(b, 1, 1, 1)
            gl, gg = sess["head_grad"].run(["logits", "gradients"], {"activations": ea, "target": target})
        except Exception as e:  # ORT's own error types: a shape the graph cannot take (a baked batch)
            failures.append(_row("*", "*", b, k, {"max_abs": float("inf"), "max_rel": float("inf")},
                                 reason=f"ORT run failed at batch {b}: {str(e).splitlines()[0][:200]}"))
            continue
        reference = "the user's graph in ONNX Runtime"
        for graph, out in (("classify", cl), ("features", fl), ("explain", el)):
            check(graph, "logits", b, out, ref, reference=reference)
        check("features", "activations", b, fa, ea, reference="explain.activations")
        check("head", "logits", b, hl, fl, reference="features.logits")
        check("head_grad", "logits", b, gl, el, reference="explain.logits")
        check("head_grad", "gradients", b, gg, eg, reference="explain.gradients")
        gc = check_gradients(onnx.load(str(paths["head"])), sess["head_grad"], np.concatenate([fa, path]),
                             np.concatenate([target, target]), seed=i)
        grad_checks.append(gc)
        if not gc["ok"]:
            failures.append(_row("head_grad", "gradients", b, k, {"max_abs": gc["max_error"], "max_rel": float("nan")},
                                 (gc["tolerance"], 0.0),
                                 reason=f"{gc['method']}: error {gc['max_error']:.3g} > {gc['tolerance']:g} "
                                        f"(in {gc['units']})"))
    if failures:
        raise ValidationError(failures)
    worst = max(grad_checks, key=lambda c: c["max_error"])
    return {"sizes": [[b, k] for b in VALIDATION_BATCHES], "rows": rows,
            "gradient_check": {key: worst[key] for key in ("method", "precision", "units", "step_relative",
                                                           "tolerance", "max_error")}
            | {"points": sum(c["points"] for c in grad_checks), "directions": worst["directions"]}}


def format_report(report: dict) -> str:
    head = f"{'graph':<9} {'output':<12} {'batch':>5} {'max_abs':>10} {'max_rel':>10} {'cosine':>12}  reference"
    lines = [head, "-" * (len(head) + 20)]
    for r in report["rows"]:
        lines.append(f"{r['graph']:<9} {r['output']:<12} {r['batch']:>5} {r['max_abs']:>10.2e} {r['max_rel']:>10.2e} "
                     f"{r['cosine']:>12.9f}  {r.get('reference', '')}")
    gc = report["gradient_check"]
    lines.append(f"gradients: {gc['method']}, {gc['points']} points x {gc['directions']} directions: max error "
                 f"{gc['max_error']:.2e} (tolerance {gc['tolerance']:g}, in units of {gc['units']})")
    return "\n".join(lines)


# -- the import -----------------------------------------------------------------------------------------------------

def read_label_file(path: str | os.PathLike, count: int) -> tuple[str, ...]:
    """Class names, one per line in output order; the count must be the classifier's K."""
    try:
        labels = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ImportError_(f"{path}: cannot read labels ({e})") from None
    return check_labels(labels, count, path)


def check_labels(labels, count: int, path="labels") -> tuple[str, ...]:
    """Class names in output order (`path`: where they come from, for the error line)."""
    labels = list(labels)
    if not all(isinstance(lab, str) and lab.strip() == lab and lab for lab in labels):
        raise ImportError_(f"{path}: every label must be a non-empty string without surrounding spaces")
    if len(labels) != count:
        raise ImportError_(f"{path}: {len(labels)} labels for a classifier with {count} outputs")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:   # ImageNet-1k's standard names repeat two ("crane", "maillot"), as the registry's labels do
        log(f"[import] {path}: {len(dup)} labels appear more than once ({', '.join(dup[:5])}): a target given by such "
            f"a name takes its first index; give the index for the others")
    if any(not lab.isprintable() for lab in labels):
        raise ImportError_(f"{path}: a label contains a control character")
    return tuple(labels)


def _versions() -> dict:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def import_onnx(model_path: str | os.PathLike, out_dir: str | os.PathLike, target_layer: str = "auto",
                pre: Preprocess | None = None, labels=None, name: str | None = None,
                output: str | None = None, *, check=None, provenance: dict | None = None,
                target_advice: str | None = None, shown_as: str | None = None) -> ImportResult:
    """Write the pooled-linear artifacts of a user's ONNX classifier into `out_dir` (module docstring).

    labels          a file (one name per line) or a sequence of names, in output order; default class_0 ...
    check           a further validation of the graphs before anything is installed (export/module_import.py:
                    torch autograd on the module the graph came from): check(paths, policy, pre) -> (key, summary)
                    with paths {graph name: its temporary file}; the summary goes to the manifest's validation[key];
                    it raises ValidationError to refuse
    provenance      manifest fields that replace the file's: pretrained, pretrained_id, random_weights; `source` and
                    `versions` are merged into the graph's
    target_advice   what a refusal of a tensor inside a residual block suggests instead
    shown_as        how the log names the graph (default: its path)
    """
    t0 = time.perf_counter()
    pre = pre or Preprocess()
    model_path, out_dir = Path(model_path), Path(out_dir)
    src = read_source(model_path, pre.size, output)
    policy = pre.resolved(src.size)
    log(f"[import] {shown_as or model_path}: input '{src.image}' {src.size}x{src.size}, logits '{src.logits}'")
    for note in src.notes:
        log(f"[import] {note}")
    target = choose_target(src, target_layer, target_advice)
    how = "auto: the last" if target_layer in (None, "", "auto") else "given:"
    log(f"[import] target layer ({how} 4-D tensor every path passes through): '{target.name}' "
        f"[{', '.join(str(d) for d in target.dims)}] ({target.producer})")
    log(f"[import] preprocessing: {policy['resize']} {src.size}"
        + (f" from a shortest side of {policy['resize_size']}" if policy["resize"] == "crop" else "")
        + f", {policy['interpolation']}, mean {list(pre.mean)}, std {list(pre.std)}"
        + (" (ImageNet defaults)" if (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD) else ""))
    k = _dims(src.types[src.logits])[1]
    if labels is None:
        label_names = tuple(f"class_{i}" for i in range(k))
    elif isinstance(labels, (str, os.PathLike)):
        label_names = read_label_file(labels, k)
    else:
        label_names = check_labels(labels, k)
    try:
        graphs, dims = build_graphs(src, target)
    except GradientError as e:
        raise ImportError_(f"{model_path}: the head after '{target.name}' cannot be differentiated: {e}") from None
    set_name = Path(labels).stem if isinstance(labels, (str, os.PathLike)) else "labels"
    if not SET_NAME.match(set_name):
        set_name = "labels"
    model_name = name or model_path.stem
    spec = FAMILIES[FAMILY].graphs
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = temp_dir(out_dir)
    seconds = {}
    try:
        paths = {}
        for gname, m in graphs.items():
            paths[gname] = tmp / spec[gname].filename
            onnx.save(m, str(paths[gname]))
        structural = [f for gname, p in paths.items() for f in check_structure(p, spec[gname], {**dims, "3": 3})]
        if structural:
            raise ValidationError([{"batch": "-", "L": "-", "max_abs": float("nan"), "max_rel": float("nan"),
                                    "atol": 0, "rtol": 0, **f} for f in structural])
        t = time.perf_counter()
        report = validate(src, paths, dims, policy, pre.mean, pre.std)
        seconds["validate_s"] = time.perf_counter() - t
        log(format_report(report))
        extra = {}
        if check is not None:
            t = time.perf_counter()
            key, summary = check(paths, policy, pre)
            extra[key] = summary
            seconds[f"{key}_s"] = time.perf_counter() - t
        manifest = {
            "format_version": MANIFEST_VERSION,
            "family": FAMILY,
            "model": model_name,
            "pretrained": str(model_path),
            "pretrained_id": f"sha256:{sha256_path(model_path)}",
            "random_weights": False,
            "target_layer": target.name,
            "input_size": src.size,
            "preprocess": policy,
            "mean": [float(v) for v in pre.mean],
            "std": [float(v) for v in pre.std],
            "logit_scale": 1.0,
            "dims": dims,
            "opset": opset_of(graphs["classify"]),
            "versions": _versions(),
            "source": {"file": model_path.name, "input": src.original_image or src.image,
                       "layout": "NHWC" if src.channels_last else "NCHW", "output": src.output, "logits": src.logits,
                       "softmax_removed": src.softmax, "batch": src.batch, "reshapes_rewritten": src.rewritten,
                       "target_layer": {"name": target.name, "shape": target.dims, "producer": target.producer,
                                        "chosen": "auto" if target_layer in (None, "", "auto") else "given"}},
        }
        for key, value in (provenance or {}).items():
            manifest[key] = ({**manifest[key], **value} if isinstance(value, dict) and isinstance(manifest.get(key), dict)
                             else value)
        manifest["graphs"] = graph_entries(paths, spec, manifest)
        manifest["class_sets"] = {set_name: write_labels(out_dir, set_name, list(label_names))}
        manifest["default_class_set"] = set_name
        manifest["validation"] = {"sizes": report["sizes"], "max": summarise(report),
                                  "reference": "the user's ONNX graph in ONNX Runtime (CPU)",
                                  "tolerance": {"atol": ATOL, "rtol": RTOL}, "gradients": report["gradient_check"],
                                  **extra}
        try:
            validate_manifest(manifest)
        except ManifestError as e:
            raise ImportError_(f"the manifest would not be valid: {e}") from None
        install(out_dir, paths, spec, manifest)
        seconds["total_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(out_dir, manifest, report, seconds)


__all__ = ["import_onnx", "read_source", "candidates", "choose_target", "format_candidates", "dominators",
           "build_graphs", "derive_graphs", "contract_shapes", "Preprocess", "ImportError_", "check_gradients",
           "check_labels", "sample_images"]
