"""Reverse-mode differentiation of ONNX graphs, written as ONNX nodes (ONNX Runtime has no `Gradient` op).

    gradient_graph(model, wrt, output, seed)        -> the model plus an output grad_<wrt> = (d output / d wrt)^T seed
    target_gradient_graph(model, wrt, logits)       -> the same seeded with the one-hot of a `target` input (int64
                                                       [batch]; target < 0: the row's argmax), as the toolkit's graphs
    to_float64(model)                               -> the same graph computing in float64 (for finite differences)

One vector-Jacobian rule per op type (RULES: op type -> rule), JAX/tinygrad style. A rule gets the node and the
cotangents of its outputs and emits the nodes that compute the cotangents of its inputs. `gradient_graph` walks the
nodes between `wrt` and `output` in reverse topological order, adds the cotangents of a tensor that fans out, and
undoes broadcasting with ReduceSum to each input's shape. Only tensors that depend on `wrt` through float values get
a cotangent: Shape, comparisons, ArgMax, integer casts and the like cut the path (their derivative is zero). An op on
the path without a rule is a GradientError naming the node and its type.

Shapes stay dynamic in the batch axis: broadcasts and zero tensors are built with Shape / Expand / ConstantOfShape;
static dims from ONNX shape inference are used where an op's geometry needs them (Conv and pooling windows, Slice,
Concat) and must be fixed there. Graphs below opset 16 are converted to opset 17 first (onnx.version_converter):
MaxPool's backward needs ScatterElements with reduction="add".

Conventions at kinks (measure zero; these match torch's backward): Relu, LeakyRelu, PRelu pass where x > 0; Clip
(ReLU6) and HardSigmoid strictly inside their range; HardSwish as torch's hardswish_backward (0 below -3, x / 3 + 1/2
on [-3, 3], 1 above); MaxPool routes each window's cotangent to its first maximal element in row-major order (ORT's
Indices output), overlapping windows add up; ReduceMax / ReduceMin / GlobalMaxPool / Max / Min share a tie evenly.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 16      # ScatterElements(reduction="add"); older graphs are converted to CONVERT_OPSET
CONVERT_OPSET = 17
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)

# ops whose outputs do not carry a derivative (shapes, comparisons, indices, piecewise constants): they cut the path
NON_DIFFERENTIABLE = frozenset((
    "Shape", "Size", "Constant", "ConstantOfShape", "EyeLike", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign", "Floor", "Ceil",
    "Round", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Range", "OneHot",
))


# inputs that only give a shape, type, index or condition: no derivative flows through them
NON_DIFFERENTIABLE_INPUTS = {"CastLike": (1,), "Where": (0,), "Reshape": (1,), "Expand": (1,), "Squeeze": (1,),
                             "Unsqueeze": (1,), "Split": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 3),
                             "Gather": (1,), "Tile": (1,), "Dropout": (1, 2)}


class GradientError(ValueError):
    """The graph cannot be differentiated: an op without a rule on the path, or a geometry that needs static dims."""


def node_label(node: onnx.NodeProto) -> str:
    return f"'{node.name or node.output[0]}' ({node.op_type})"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# -- the emitter: what a rule writes with ---------------------------------------------------------------------------

class Emitter:
    """Collects the backward nodes and constants; answers shape and constant questions about the forward graph."""

    def __init__(self, graph: onnx.GraphProto, types: dict, opset: int, dtype: int, active: set):
        self.graph = graph
        self.types = types          # tensor name -> onnx.TypeProto (shape inference)
        self.opset = opset
        self.dtype = dtype          # the float element type of the cotangents
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.active = active        # tensors that depend on wrt
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.taken = _all_names(graph)
        self._consts: dict = {}
        self._shapes: dict = {}
        self._n = 0
        self.const_values = _constant_values(graph)

    # names and nodes
    def fresh(self, hint: str = "t") -> str:
        while True:
            self._n += 1
            name = f"grad/{hint}_{self._n}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: list, outputs: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, dtype=None) -> str:
        """A constant initializer: python floats and float arrays in the graph's float type, ints as int64."""
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif arr.dtype.kind == "f":
            arr = arr.astype(self.np_dtype)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def needs(self, name: str) -> bool:
        return bool(name) and name in self.active

    # shapes
    def dims(self, name: str) -> list | None:
        """Static shape: a list of int (fixed), str (symbolic) or None (unknown) per axis; None if the rank is unknown."""
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]

    def rank(self, name: str, node: onnx.NodeProto | None = None) -> int:
        d = self.dims(name)
        if d is None:
            where = f" (node {node_label(node)})" if node is not None else ""
            raise GradientError(f"the rank of tensor '{name}'{where} is unknown after shape inference")
        return len(d)

    def static(self, name: str, axes, node: onnx.NodeProto) -> list[int]:
        """Fixed sizes of `name` along `axes`; a GradientError when one is not known."""
        d = self.dims(name)
        out = []
        for a in axes:
            v = None if d is None or a >= len(d) else d[a]
            if not isinstance(v, int) or v <= 0:
                raise GradientError(f"node {node_label(node)}: its backward needs the size of axis {a} of '{name}' "
                                    f"to be fixed (shape {d}); export the model with a fixed input size")
            out.append(v)
        return out

    def shape_of(self, name: str) -> str:
        if name not in self._shapes:
            self._shapes[name] = self.op("Shape", [name])
        return self._shapes[name]

    def zeros_like(self, name: str) -> str:
        return self.op("ConstantOfShape", [self.shape_of(name)],
                       value=numpy_helper.from_array(np.zeros(1, self.np_dtype), "zero"))

    def constant(self, name: str):
        """The value of an initializer or Constant output, else None."""
        return self.const_values.get(name)

    # opset-aware ops
    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1) -> str:
        axes = [int(a) for a in axes]
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64))], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes) -> str:
        return self.op("Unsqueeze", [x, self.const(np.array(list(axes), np.int64))])

    def squeeze(self, x: str, axes) -> str:
        return self.op("Squeeze", [x, self.const(np.array(list(axes), np.int64))])

    def reshape_like(self, g: str, x: str) -> str:
        return self.op("Reshape", [g, self.shape_of(x)])

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def count(self, x: str, axes, node) -> str:
        """The number of elements of `x` over `axes`, as a float scalar (static where the dims are fixed)."""
        d = self.dims(x)
        if d is not None and all(isinstance(d[a], int) and d[a] > 0 for a in axes):
            return self.const(float(np.prod([d[a] for a in axes])))
        picked = self.op("Gather", [self.shape_of(x), self.const(np.array(list(axes), np.int64))])
        return self.op("Cast", [self.op("ReduceProd", [picked], keepdims=0)], to=self.dtype)

    def unbroadcast(self, g: str, g_dims: list | None, x: str, x_dims: list | None = None) -> str:
        """Sum the cotangent `g` (of the broadcast shape g_dims) down to the shape of `x`."""
        x_dims = self.dims(x) if x_dims is None else x_dims
        if g_dims is None or x_dims is None:
            raise GradientError(f"the rank of '{x}' or of its broadcast is unknown; cannot undo the broadcast")
        lead = len(g_dims) - len(x_dims)
        if lead > 0:
            g = self.reduce("ReduceSum", g, range(lead), keepdims=0)
            g_dims = g_dims[lead:]
        axes, dynamic = [], False
        for i, (xd, gd) in enumerate(zip(x_dims, g_dims)):
            if xd == 1:
                if gd != 1:
                    axes.append(i)
            elif isinstance(xd, int) and xd > 1:
                continue
            elif xd is None or xd != gd:   # unknown, or a symbolic dim that may be 1 where g's is not
                dynamic = True
        if dynamic:
            ones = self.op("Equal", [self.shape_of(x), self.const(np.array(1, np.int64))])
            dyn_axes = self.op("Reshape", [self.op("NonZero", [ones]), self.const(np.array([-1], np.int64))])
            return self.op("ReduceSum", [g, dyn_axes], keepdims=1, noop_with_empty_axes=1)
        return self.reduce("ReduceSum", g, axes, keepdims=1) if axes else g

    def unb(self, g: str, y: str, x: str) -> str:
        """unbroadcast of the cotangent of output `y` to input `x`."""
        return self.unbroadcast(g, self.dims(y), x)


def _all_names(graph: onnx.GraphProto) -> set:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
    return names


def _constant_values(graph: onnx.GraphProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            a = n.attribute[0]
            if a.name == "value":
                values[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                values[n.output[0]] = np.array(helper.get_attribute_value(a))
            elif a.name in ("value_floats", "value_ints"):
                values[n.output[0]] = np.array(list(helper.get_attribute_value(a)))
        elif n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
    return values


# -- geometry of windows (Conv, pooling) ----------------------------------------------------------------------------

def _window_geometry(e: Emitter, node, x: str, y: str, kernel: list[int]):
    """(X, Y, strides, dilations, pads_begin, pads_end) of a Conv / pooling node along its spatial axes."""
    a = _attrs(node)
    n = len(kernel)
    r = e.rank(x, node)
    xs = e.static(x, range(r - n, r), node)
    ys = e.static(y, range(r - n, r), node)
    s = list(a.get("strides") or [1] * n)
    d = list(a.get("dilations") or [1] * n)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = list(a.get("pads") or [0] * 2 * n)
        pb, pe = p[:n], p[n:]
    elif auto == "VALID":
        pb, pe = [0] * n, [0] * n
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for i in range(n):
            out = -(-xs[i] // s[i])
            total = max((out - 1) * s[i] + (kernel[i] - 1) * d[i] + 1 - xs[i], 0)
            small, big = total // 2, total - total // 2
            pb.append(small if auto == "SAME_UPPER" else big)
            pe.append(big if auto == "SAME_UPPER" else small)
    else:
        raise GradientError(f"node {node_label(node)}: unknown auto_pad {auto!r}")
    return xs, ys, s, d, pb, pe


def _transpose_pads(xs, ys, kernel, s, d, pb):
    """ConvTranspose pads and output_padding that scatter every window of a forward Conv / pool back onto an input
    of size xs: output = s (Y - 1) + k_eff - pads_begin - pads_end + output_padding = X."""
    pe_t, out_pad = [], []
    for i in range(len(kernel)):
        total = s[i] * (ys[i] - 1) + (kernel[i] - 1) * d[i] + 1 - pb[i]
        pe_t.append(max(total - xs[i], 0))
        out_pad.append(max(xs[i] - total, 0))
    return list(pb) + pe_t, out_pad


# -- rules ----------------------------------------------------------------------------------------------------------
# rule(e, node, gy) -> list of input cotangents (None where the input gets none); gy[i] is the cotangent of
# node.output[i] or None.

RULES: dict = {}


def rule(*op_types):
    def register(fn):
        for t in op_types:
            RULES[t] = fn
        return fn
    return register


def _only_first(node, gy):
    if any(g is not None for g in gy[1:]):
        raise GradientError(f"node {node_label(node)}: only its first output is differentiable here, but another "
                            f"output is on the path")
    return gy[0]


@rule("Identity", "Dropout")
def _identity(e, node, gy):
    g = _only_first(node, gy)
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = e.constant(node.input[2])
        if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
            raise GradientError(f"node {node_label(node)}: Dropout in training mode is not differentiable here")
    return [g]


@rule("Cast", "CastLike")
def _cast(e, node, gy):
    x = node.input[0]
    t = e.types.get(x)
    to = t.tensor_type.elem_type if t is not None else e.dtype
    return [e.op("Cast", [gy[0]], to=to)]


@rule("Neg")
def _neg(e, node, gy):
    return [e.op("Neg", [gy[0]])]


@rule("Relu")
def _relu(e, node, gy):
    x = node.input[0]
    zero = e.const(0.0)
    return [e.op("Where", [e.op("Greater", [x, zero]), gy[0], zero])]


@rule("LeakyRelu")
def _leaky_relu(e, node, gy):
    x, g = node.input[0], gy[0]
    alpha = float(_attrs(node).get("alpha", 0.01))
    return [e.op("Where", [e.op("Greater", [x, e.const(0.0)]), g, e.mul(g, e.const(alpha))])]


@rule("PRelu")
def _prelu(e, node, gy):
    x, slope = node.input[0], node.input[1]
    g, y = gy[0], node.output[0]
    pos = e.op("Greater", [x, e.const(0.0)])
    gx = e.op("Where", [pos, g, e.mul(g, slope)]) if e.needs(x) else None
    gs = e.unb(e.op("Where", [pos, e.const(0.0), e.mul(g, x)]), y, slope) if e.needs(slope) else None
    return [gx, gs]


@rule("Clip")
def _clip(e, node, gy):
    x, g = node.input[0], gy[0]
    a = _attrs(node)
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if lo is None and "min" in a:   # opset < 11: bounds as attributes
        lo = e.const(float(a["min"]))
    if hi is None and "max" in a:
        hi = e.const(float(a["max"]))
    conds = []
    if lo is not None:
        conds.append(e.op("Greater", [x, lo]))
    if hi is not None:
        conds.append(e.op("Less", [x, hi]))
    if not conds:
        return [g]
    cond = conds[0] if len(conds) == 1 else e.op("And", conds)
    return [e.op("Where", [cond, g, e.const(0.0)])]


@rule("Sigmoid")
def _sigmoid(e, node, gy):
    y = node.output[0]
    return [e.mul(gy[0], e.mul(y, e.op("Sub", [e.const(1.0), y])))]


@rule("HardSigmoid")
def _hard_sigmoid(e, node, gy):
    x = node.input[0]
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    z = e.op("Add", [e.mul(x, e.const(alpha)), e.const(beta)])
    inside = e.op("And", [e.op("Greater", [z, e.const(0.0)]), e.op("Less", [z, e.const(1.0)])])
    return [e.op("Where", [inside, e.mul(gy[0], e.const(alpha)), e.const(0.0)])]


@rule("HardSwish")
def _hard_swish(e, node, gy):
    x = node.input[0]
    mid = e.op("Add", [e.op("Div", [x, e.const(3.0)]), e.const(0.5)])
    d = e.op("Where", [e.op("Less", [x, e.const(-3.0)]), e.const(0.0),
                       e.op("Where", [e.op("LessOrEqual", [x, e.const(3.0)]), mid, e.const(1.0)])])
    return [e.mul(gy[0], d)]


@rule("Tanh")
def _tanh(e, node, gy):
    y = node.output[0]
    return [e.mul(gy[0], e.op("Sub", [e.const(1.0), e.mul(y, y)]))]


@rule("Erf")
def _erf(e, node, gy):
    x = node.input[0]
    d = e.mul(e.const(2.0 / math.sqrt(math.pi)), e.op("Exp", [e.op("Neg", [e.mul(x, x)])]))
    return [e.mul(gy[0], d)]


@rule("Gelu")
def _gelu(e, node, gy):
    x = node.input[0]
    approx = _attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    if approx == "tanh":   # torch's gelu_backward(approximate="tanh")
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        x2 = e.mul(x, x)
        inner = e.mul(e.const(k), e.op("Add", [x, e.mul(e.const(c), e.mul(x2, x))]))
        t = e.op("Tanh", [inner])
        left = e.mul(e.const(0.5), e.op("Add", [e.const(1.0), t]))
        dinner = e.mul(e.const(k), e.op("Add", [e.const(1.0), e.mul(e.const(3.0 * c), x2)]))
        right = e.mul(e.mul(e.const(0.5), x), e.mul(e.op("Sub", [e.const(1.0), e.mul(t, t)]), dinner))
        d = e.op("Add", [left, right])
    else:                  # Phi(x) + x phi(x)
        cdf = e.mul(e.const(0.5), e.op("Add", [e.const(1.0), e.op("Erf", [e.mul(x, e.const(1.0 / math.sqrt(2.0)))])]))
        pdf = e.mul(e.const(1.0 / math.sqrt(2.0 * math.pi)),
                    e.op("Exp", [e.mul(e.const(-0.5), e.mul(x, x))]))
        d = e.op("Add", [cdf, e.mul(x, pdf)])
    return [e.mul(gy[0], d)]


@rule("Exp")
def _exp(e, node, gy):
    return [e.mul(gy[0], node.output[0])]


@rule("Log")
def _log(e, node, gy):
    return [e.op("Div", [gy[0], node.input[0]])]


@rule("Sqrt")
def _sqrt(e, node, gy):
    return [e.op("Div", [gy[0], e.mul(e.const(2.0), node.output[0])])]


@rule("Reciprocal")
def _reciprocal(e, node, gy):
    y = node.output[0]
    return [e.op("Neg", [e.mul(gy[0], e.mul(y, y))])]


@rule("Abs")
def _abs(e, node, gy):
    return [e.mul(gy[0], e.op("Sign", [node.input[0]]))]


@rule("Softplus")
def _softplus(e, node, gy):
    return [e.mul(gy[0], e.op("Sigmoid", [node.input[0]]))]


@rule("Mish")
def _mish(e, node, gy):
    x = node.input[0]
    t = e.op("Tanh", [e.op("Softplus", [x])])
    d = e.op("Add", [t, e.mul(e.mul(x, e.op("Sigmoid", [x])), e.op("Sub", [e.const(1.0), e.mul(t, t)]))])
    return [e.mul(gy[0], d)]


@rule("Add", "Sub", "Sum", "Mean")
def _add(e, node, gy):
    g, y = gy[0], node.output[0]
    if node.op_type == "Mean":
        g = e.op("Div", [g, e.const(float(len(node.input)))])
    out = []
    for i, x in enumerate(node.input):
        if not e.needs(x):
            out.append(None)
            continue
        gi = e.unb(g, y, x)
        out.append(e.op("Neg", [gi]) if node.op_type == "Sub" and i == 1 else gi)
    return out


@rule("Mul")
def _mul(e, node, gy):
    a, b = node.input
    g, y = gy[0], node.output[0]
    return [e.unb(e.mul(g, b), y, a) if e.needs(a) else None,
            e.unb(e.mul(g, a), y, b) if e.needs(b) else None]


@rule("Div")
def _div(e, node, gy):
    a, b = node.input
    g, y = gy[0], node.output[0]
    ga = e.unb(e.op("Div", [g, b]), y, a) if e.needs(a) else None
    gb = e.unb(e.op("Neg", [e.op("Div", [e.mul(g, y), b])]), y, b) if e.needs(b) else None
    return [ga, gb]


@rule("Pow")
def _pow(e, node, gy):
    x, p = node.input
    g, y = gy[0], node.output[0]
    gx = gp = None
    if e.needs(x):
        val = e.constant(p)
        if val is not None:   # a constant exponent: p x^(p - 1), computed in the graph's float type
            pf = np.asarray(val, np.float64)
            d = e.mul(e.const(pf), e.op("Pow", [x, e.const(pf - 1.0)]))
        else:
            pc = e.op("CastLike", [p, x])
            d = e.mul(pc, e.op("Pow", [x, e.op("Sub", [pc, e.const(1.0)])]))
        gx = e.unb(e.mul(g, d), y, x)
    if e.needs(p):
        gp = e.unb(e.mul(g, e.mul(y, e.op("Log", [x]))), y, p)
    return [gx, gp]


@rule("Max", "Min")
def _max_min(e, node, gy):
    if len(node.input) != 2:
        if len(node.input) == 1:
            return [gy[0]]
        raise GradientError(f"node {node_label(node)}: {node.op_type} of {len(node.input)} inputs has no rule "
                            f"(two are supported)")
    a, b = node.input
    g, y = gy[0], node.output[0]
    half = e.mul(g, e.const(0.5))
    win = e.op("Greater" if node.op_type == "Max" else "Less", [a, b])
    tie = e.op("Equal", [a, b])
    zero = e.const(0.0)
    ga = e.op("Where", [win, g, e.op("Where", [tie, half, zero])])
    gb = e.op("Where", [win, zero, e.op("Where", [tie, half, g])])
    return [e.unb(ga, y, a) if e.needs(a) else None, e.unb(gb, y, b) if e.needs(b) else None]


@rule("Where")
def _where(e, node, gy):
    c, a, b = node.input
    g, y = gy[0], node.output[0]
    zero = e.const(0.0)
    return [None,
            e.unb(e.op("Where", [c, g, zero]), y, a) if e.needs(a) else None,
            e.unb(e.op("Where", [c, zero, g]), y, b) if e.needs(b) else None]


@rule("Expand")
def _expand(e, node, gy):
    return [e.unb(gy[0], node.output[0], node.input[0]), None]


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(e, node, gy):
    return [e.reshape_like(gy[0], node.input[0])] + [None] * (len(node.input) - 1)


@rule("Transpose")
def _transpose(e, node, gy):
    perm = _attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(e.rank(node.input[0], node))))
    inv = list(np.argsort(perm))
    return [e.op("Transpose", [gy[0]], perm=[int(i) for i in inv])]


@rule("Concat")
def _concat(e, node, gy):
    ins = list(node.input)
    r = e.rank(node.output[0], node)
    axis = _attrs(node)["axis"] % r
    sizes = []
    static = True
    for x in ins:
        d = e.dims(x)
        v = None if d is None else d[axis]
        static = static and isinstance(v, int)
        sizes.append(v)
    if static:
        split = e.const(np.array(sizes, np.int64))
    else:
        parts = [e.op("Gather", [e.shape_of(x), e.const(np.array([axis], np.int64))]) for x in ins]
        split = e.op("Concat", parts, axis=0)
    pieces = e.op("Split", [gy[0], split], outputs=len(ins), axis=axis)
    pieces = pieces if isinstance(pieces, list) else [pieces]
    return [p if e.needs(x) else None for p, x in zip(pieces, ins)]


@rule("Split")
def _split(e, node, gy):
    r = e.rank(node.input[0], node)
    axis = _attrs(node).get("axis", 0) % r
    parts = [g if g is not None else e.zeros_like(y) for g, y in zip(gy, node.output)]
    return [e.op("Concat", parts, axis=axis) if len(parts) > 1 else parts[0]] + [None] * (len(node.input) - 1)


def _const_input(e, node, i, what):
    if len(node.input) <= i or not node.input[i]:
        return None
    v = e.constant(node.input[i])
    if v is None:
        raise GradientError(f"node {node_label(node)}: its {what} must be a constant for its backward")
    return np.asarray(v).reshape(-1)


@rule("Slice")
def _slice(e, node, gy):
    x, g = node.input[0], gy[0]
    r = e.rank(x, node)
    if e.opset < 10:
        a = _attrs(node)
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts = _const_input(e, node, 1, "starts")
        ends = _const_input(e, node, 2, "ends")
        axes = _const_input(e, node, 3, "axes")
        steps = _const_input(e, node, 4, "steps")
    axes = list(range(len(starts))) if axes is None else [int(a) % r for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    dims = e.static(x, axes, node)
    zero = e.const(0.0)
    for axis, start, end, step, n in zip(axes, starts, ends, steps, dims):
        picked = list(range(*slice(int(max(min(start, 2**62), -2**62)), int(max(min(end, 2**62), -2**62)),
                                   step).indices(n)))
        if step == 1:   # the slice's backward pads the cotangent back with zeros
            pads = np.zeros(2 * r, np.int64)
            if picked:
                pads[axis], pads[r + axis] = picked[0], n - picked[-1] - 1
            g = e.op("Pad", [g, e.const(pads), zero])
        else:           # gather the cotangent back through the inverse index map (one zero slice appended)
            inv = np.full(n, len(picked), np.int64)
            inv[picked] = np.arange(len(picked))
            pads = np.zeros(2 * r, np.int64)
            pads[r + axis] = 1
            g = e.op("Gather", [e.op("Pad", [g, e.const(pads), zero]), e.const(inv)], axis=axis)
    return [g] + [None] * (len(node.input) - 1)


@rule("Pad")
def _pad(e, node, gy):
    a = _attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise GradientError(f"node {node_label(node)}: Pad mode '{mode}' has no rule (only 'constant')")
    x = node.input[0]
    r = e.rank(x, node)
    pads = _const_input(e, node, 1, "pads")
    axes = _const_input(e, node, 3, "axes")
    if axes is not None:
        full = np.zeros(2 * r, np.int64)
        for i, ax in enumerate(int(v) % r for v in axes):
            full[ax], full[r + ax] = pads[i], pads[len(axes) + i]
        pads = full
    pads = np.asarray(pads, np.int64)
    g = gy[0]
    if (pads > 0).any():   # the padded border is cropped off the cotangent
        begin, end = np.maximum(pads[:r], 0), np.maximum(pads[r:], 0)
        ends = np.where(end > 0, -end, np.iinfo(np.int64).max)
        g = e.op("Slice", [g, e.const(begin), e.const(ends), e.const(np.arange(r, dtype=np.int64))])
    if (pads < 0).any():   # and a cropped border comes back as zeros
        g = e.op("Pad", [g, e.const(np.maximum(-pads, 0)), e.const(0.0)])
    return [g] + [None] * (len(node.input) - 1)


@rule("Gather")
def _gather(e, node, gy):
    x, idx = node.input
    r = e.rank(x, node)
    axis = _attrs(node).get("axis", 0) % r
    ind = e.constant(idx)
    if ind is None:
        raise GradientError(f"node {node_label(node)}: Gather with non-constant indices has no rule")
    ind = np.asarray(ind, np.int64)
    (n,) = e.static(x, [axis], node)
    flat = np.where(ind.reshape(-1) < 0, ind.reshape(-1) + n, ind.reshape(-1))
    g = gy[0]
    # merge the index axes of the cotangent into one: [pre..., m, post...]
    pre = e.op("Slice", [e.shape_of(x), e.const(np.array([0], np.int64)), e.const(np.array([axis], np.int64))])
    post = e.op("Slice", [e.shape_of(x), e.const(np.array([axis + 1], np.int64)), e.const(np.array([r], np.int64))])
    g = e.op("Reshape", [g, e.op("Concat", [pre, e.const(np.array([len(flat)], np.int64)), post], axis=0)])
    # one-hot [m, n] matrix: the transposed gather, which adds repeated indices
    onehot = np.zeros((len(flat), n), np.float64)
    onehot[np.arange(len(flat)), flat] = 1.0
    perm = [i for i in range(r) if i != axis] + [axis]
    moved = e.op("MatMul", [e.op("Transpose", [g], perm=perm), e.const(onehot)])
    return [e.op("Transpose", [moved], perm=[int(i) for i in np.argsort(perm)]), None]


@rule("BatchNormalization")
def _batch_norm(e, node, gy):
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise GradientError(f"node {node_label(node)}: BatchNormalization in training mode has no rule")
    g = _only_first(node, gy)
    x, scale, _, _, var = node.input[:5]
    for t in node.input[1:5]:
        if e.needs(t):
            raise GradientError(f"node {node_label(node)}: only the data input of BatchNormalization is differentiable")
    r = e.rank(x, node)
    k = e.op("Div", [scale, e.op("Sqrt", [e.op("Add", [var, e.const(float(a.get("epsilon", 1e-5)))])])])
    k = e.op("Reshape", [k, e.const(np.array([-1] + [1] * (r - 2), np.int64))])
    return [e.mul(g, k), None, None, None, None]


@rule("Conv")
def _conv(e, node, gy):
    x, w = node.input[0], node.input[1]
    g, y = gy[0], node.output[0]
    if e.needs(w) or (len(node.input) > 2 and e.needs(node.input[2])):
        raise GradientError(f"node {node_label(node)}: only the data input of Conv is differentiable here (its weight "
                            f"or bias depends on the tensor differentiated against)")
    wd = e.dims(w)
    kernel = list(_attrs(node).get("kernel_shape") or e.static(w, range(2, len(wd or [])), node))
    xs, ys, s, d, pb, _ = _window_geometry(e, node, x, y, kernel)
    pads, out_pad = _transpose_pads(xs, ys, kernel, s, d, pb)
    gx = e.op("ConvTranspose", [g, w], kernel_shape=kernel, strides=s, dilations=d, pads=pads,
              output_padding=out_pad, group=int(_attrs(node).get("group", 1)))
    return [gx, None, None]


def _scatter_windows(e, node, g, x, y, kernel, xs, ys, s, d, pb):
    """Sum each output cotangent back over its window: ConvTranspose with a ones kernel on [N C, 1, *Y]."""
    pads, out_pad = _transpose_pads(xs, ys, kernel, s, d, pb)
    flat = e.op("Reshape", [g, e.const(np.array([-1, 1] + list(ys), np.int64))])
    ones = e.const(np.ones([1, 1] + kernel))
    back = e.op("ConvTranspose", [flat, ones], kernel_shape=kernel, strides=s, dilations=d, pads=pads,
                output_padding=out_pad)
    return e.reshape_like(back, x)


@rule("AveragePool")
def _average_pool(e, node, gy):
    x, y, g = node.input[0], node.output[0], gy[0]
    kernel = list(_attrs(node)["kernel_shape"])
    xs, ys, s, d, pb, _ = _window_geometry(e, node, x, y, kernel)
    # y = (1 / D) sum over the window's valid inputs; D (count_include_pad, ceil_mode) is whatever the runtime's own
    # AveragePool uses: 1 / D = AveragePool(ones) / n_valid, with n_valid counted here
    valid = np.ones([1, 1])
    for i in range(len(kernel)):   # valid inputs per window, one spatial axis at a time (the count is separable)
        pos = np.arange(ys[i])[:, None] * s[i] - pb[i] + np.arange(kernel[i])[None, :] * d[i]
        valid = np.multiply.outer(valid, ((pos >= 0) & (pos < xs[i])).sum(1).astype(np.float64))
    inv_valid = np.where(valid > 0, 1.0 / np.maximum(valid, 1.0), 0.0)
    probe = e.op("AveragePool", [e.const(np.ones([1, 1] + list(xs)))], **_attrs(node))
    scale = e.mul(probe, e.const(inv_valid))
    return [_scatter_windows(e, node, e.mul(g, scale), x, y, kernel, xs, ys, s, d, pb)]


@rule("MaxPool")
def _max_pool(e, node, gy):
    x, g = node.input[0], _only_first(node, gy)
    attrs = {k: v for k, v in _attrs(node).items() if k != "storage_order"}
    _, idx = e.op("MaxPool", [x], outputs=2, **attrs)          # indices into x flattened, row-major
    flat = e.const(np.array([-1], np.int64))
    zeros = e.op("ConstantOfShape", [e.op("Reshape", [e.op("Size", [x]), flat])],
                 value=numpy_helper.from_array(np.zeros(1, e.np_dtype), "zero"))
    gx = e.op("ScatterElements", [zeros, e.op("Reshape", [idx, flat]), e.op("Reshape", [g, flat])],
              axis=0, reduction="add")
    return [e.reshape_like(gx, x)]


def _reduce_axes(e, node, x):
    """(normalised axes, keepdims) of a Reduce* node; None axes = the identity (noop_with_empty_axes)."""
    a = _attrs(node)
    r = e.rank(x, node)
    if "axes" in a:
        axes = list(a["axes"])
    else:
        v = _const_input(e, node, 1, "axes")
        axes = [] if v is None else [int(i) for i in v]
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return None, a.get("keepdims", 1)
        axes = list(range(r))
    return sorted(int(i) % r for i in axes), int(a.get("keepdims", 1))


@rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2")
def _reduce(e, node, gy):
    x, y, g = node.input[0], node.output[0], gy[0]
    axes, keep = _reduce_axes(e, node, x)
    rest = [None] * (len(node.input) - 1)
    if axes is None:
        return [g] + rest
    if not keep:
        g = e.unsqueeze(g, axes)
        yk = e.unsqueeze(y, axes)
    else:
        yk = y
    full = e.op("Expand", [g, e.shape_of(x)])
    op = node.op_type
    if op == "ReduceSum":
        return [full] + rest
    if op == "ReduceMean":
        return [e.op("Div", [full, e.count(x, axes, node)])] + rest
    if op == "ReduceSumSquare":
        return [e.mul(full, e.mul(e.const(2.0), x))] + rest
    if op == "ReduceL2":
        return [e.mul(full, e.op("Div", [x, yk]))] + rest
    mask = e.op("Cast", [e.op("Equal", [x, yk])], to=e.dtype)      # ties share the cotangent evenly
    share = e.op("Div", [mask, e.reduce("ReduceSum", mask, axes, keepdims=1)])
    return [e.mul(full, share)] + rest


@rule("GlobalAveragePool")
def _global_average_pool(e, node, gy):
    x = node.input[0]
    axes = list(range(2, e.rank(x, node)))
    return [e.op("Div", [e.op("Expand", [gy[0], e.shape_of(x)]), e.count(x, axes, node)])]


@rule("GlobalMaxPool")
def _global_max_pool(e, node, gy):
    x, y = node.input[0], node.output[0]
    axes = list(range(2, e.rank(x, node)))
    mask = e.op("Cast", [e.op("Equal", [x, y])], to=e.dtype)
    share = e.op("Div", [mask, e.reduce("ReduceSum", mask, axes, keepdims=1)])
    return [e.mul(e.op("Expand", [gy[0], e.shape_of(x)]), share)]


@rule("Gemm")
def _gemm(e, node, gy):
    a_, b_ = node.input[0], node.input[1]
    c_ = node.input[2] if len(node.input) > 2 and node.input[2] else None
    at = _attrs(node)
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    g, y = gy[0], node.output[0]
    ga = gb = gc = None
    if e.needs(a_):
        ga = (e.op("Gemm", [g, b_], alpha=alpha, transB=1 - tb) if not ta else
              e.op("Gemm", [b_, g], alpha=alpha, transA=tb, transB=1))
    if e.needs(b_):
        gb = (e.op("Gemm", [a_, g], alpha=alpha, transA=1 - ta) if not tb else
              e.op("Gemm", [g, a_], alpha=alpha, transA=1, transB=ta))
    if c_ is not None and e.needs(c_):
        gc = e.unb(g if beta == 1.0 else e.mul(g, e.const(beta)), y, c_)
    return [ga, gb, gc][:len(node.input)]


def _swap_last(e, t, r):
    perm = list(range(r))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return e.op("Transpose", [t], perm=perm)


@rule("MatMul")
def _matmul(e, node, gy):
    a, b = node.input
    g, y = gy[0], node.output[0]
    ad, bd, yd = e.dims(a), e.dims(b), e.dims(y)
    if ad is None or bd is None or yd is None:
        raise GradientError(f"node {node_label(node)}: MatMul's backward needs the ranks of its operands")
    if len(ad) == 1 and len(bd) == 1:
        return [e.mul(g, b) if e.needs(a) else None, e.mul(g, a) if e.needs(b) else None]
    a2, b2, g2, a2d, b2d, g2d = a, b, g, list(ad), list(bd), list(yd)
    if len(ad) == 1:
        a2, a2d = e.unsqueeze(a, [0]), [1] + a2d
        g2, g2d = e.unsqueeze(g2, [len(g2d) - 1]), g2d[:-1] + [1] + g2d[-1:]
    if len(bd) == 1:
        b2, b2d = e.unsqueeze(b, [1]), b2d + [1]
        g2, g2d = e.unsqueeze(g2, [len(g2d)]), g2d + [1]
    ga = gb = None
    if e.needs(a):
        ga = e.unbroadcast(e.op("MatMul", [g2, _swap_last(e, b2, len(b2d))]), g2d[:-1] + [a2d[-1]], a2, a2d)
        if len(ad) == 1:
            ga = e.reshape_like(ga, a)
    if e.needs(b):
        gb = e.unbroadcast(e.op("MatMul", [_swap_last(e, a2, len(a2d)), g2]), g2d[:-2] + [b2d[-2], g2d[-1]], b2, b2d)
        if len(bd) == 1:
            gb = e.reshape_like(gb, b)
    return [ga, gb]


@rule("Softmax", "LogSoftmax")
def _softmax(e, node, gy):
    x, y, g = node.input[0], node.output[0], gy[0]
    r = e.rank(x, node)
    if e.opset >= 13:
        axes = [_attrs(node).get("axis", -1) % r]
    else:
        axes = list(range(_attrs(node).get("axis", 1) % r, r))
    if node.op_type == "Softmax":
        s = e.reduce("ReduceSum", e.mul(g, y), axes, keepdims=1)
        return [e.mul(y, e.op("Sub", [g, s]))]
    s = e.reduce("ReduceSum", g, axes, keepdims=1)
    return [e.op("Sub", [g, e.mul(e.op("Exp", [y]), s)])]


@rule("LayerNormalization")
def _layer_norm(e, node, gy):
    g = _only_first(node, gy)
    x, scale = node.input[0], node.input[1]
    for t in node.input[1:]:
        if e.needs(t):
            raise GradientError(f"node {node_label(node)}: only the data input of LayerNormalization is "
                                f"differentiable here")
    a = _attrs(node)
    r = e.rank(x, node)
    axes = list(range(a.get("axis", -1) % r, r))
    mu = e.reduce("ReduceMean", x, axes, keepdims=1)
    xc = e.op("Sub", [x, mu])
    var = e.reduce("ReduceMean", e.mul(xc, xc), axes, keepdims=1)
    rstd = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.const(float(a.get("epsilon", 1e-5)))])])])
    xh = e.mul(xc, rstd)
    gh = e.mul(g, scale)
    m1 = e.reduce("ReduceMean", gh, axes, keepdims=1)
    m2 = e.reduce("ReduceMean", e.mul(gh, xh), axes, keepdims=1)
    gx = e.mul(rstd, e.op("Sub", [e.op("Sub", [gh, m1]), e.mul(xh, m2)]))
    return [gx] + [None] * (len(node.input) - 1)


@rule("InstanceNormalization")
def _instance_norm(e, node, gy):
    """y = scale_c (x - mean) / sqrt(var + eps) + B_c, mean and var over the spatial axes of each (n, c)."""
    x, scale = node.input[0], node.input[1]
    for t in node.input[1:]:
        if e.needs(t):
            raise GradientError(f"node {node_label(node)}: only the data input of InstanceNormalization is "
                                f"differentiable here")
    r = e.rank(x, node)
    axes = list(range(2, r))
    mu = e.reduce("ReduceMean", x, axes, keepdims=1)
    xc = e.op("Sub", [x, mu])
    var = e.reduce("ReduceMean", e.mul(xc, xc), axes, keepdims=1)
    eps = float(_attrs(node).get("epsilon", 1e-5))
    rstd = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.const(eps)])])])
    xh = e.mul(xc, rstd)
    gh = e.mul(gy[0], e.unsqueeze(scale, range(1, r - 1)))     # scale [C] -> [C, 1, ...]
    m1 = e.reduce("ReduceMean", gh, axes, keepdims=1)
    m2 = e.reduce("ReduceMean", e.mul(gh, xh), axes, keepdims=1)
    return [e.mul(rstd, e.op("Sub", [e.op("Sub", [gh, m1]), e.mul(xh, m2)])), None, None]


@rule("Tile")
def _tile(e, node, gy):
    """y = x repeated `repeats` times along each axis: the cotangent, viewed as [r_0, d_0, r_1, d_1, ...], summed
    over the repeats."""
    x = node.input[0]
    r = e.rank(x, node)
    reps = _const_input(e, node, 1, "repeats").astype(np.int64)
    dims = e.shape_of(x)
    parts = []
    for i in range(r):
        parts += [e.const(reps[i:i + 1]), e.op("Gather", [dims, e.const(np.array([i], np.int64))])]
    view = e.op("Reshape", [gy[0], e.op("Concat", parts, axis=0)])
    return [e.reduce("ReduceSum", view, range(0, 2 * r, 2), keepdims=0), None]


def _resize_matrices(e, node, xs: list[int], ys: list[int]) -> list[np.ndarray]:
    """Per spatial axis j, the matrix R_j [ys_j, xs_j] of the (separable, linear) Resize along it: the node's own
    attributes and scales run by onnx.reference on a one-hot basis (constant along the other axes, which every
    mode keeps constant)."""
    from onnx.reference import ReferenceEvaluator

    a = {k: v for k, v in _attrs(node).items()}
    if "axes" in a:
        raise GradientError(f"node {node_label(node)}: Resize with an `axes` attribute has no rule")
    scales = _const_input(e, node, 2, "scales") if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size == 0:
        scales = None
    if len(node.input) > 1 and node.input[1] and _const_input(e, node, 1, "roi").size:
        ctm = a.get("coordinate_transformation_mode", b"half_pixel")
        if (ctm.decode() if isinstance(ctm, bytes) else ctm) == "tf_crop_and_resize":
            raise GradientError(f"node {node_label(node)}: Resize in tf_crop_and_resize mode has no rule")
    if scales is not None and (scales[:2] != 1).any():
        raise GradientError(f"node {node_label(node)}: Resize of the batch or channel axis has no rule")
    mats = []
    for j, (n_in, n_out) in enumerate(zip(xs, ys)):
        basis = np.zeros([n_in, 1] + list(xs), np.float64)       # item k: one-hot at k along axis j
        np.moveaxis(basis, 2 + j, 2)[np.arange(n_in), 0, np.arange(n_in)] = 1.0
        inputs = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
        inits = ([numpy_helper.from_array(scales.astype(np.float32), "scales")] if scales is not None else
                 [numpy_helper.from_array(np.array([n_in, 1] + list(ys), np.int64), "sizes")])
        g = helper.make_graph([helper.make_node("Resize", inputs, ["y"], **a)], "resize",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, list(basis.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", max(e.opset, 13))])
        try:
            out = ReferenceEvaluator(m).run(None, {"x": basis})[0]
        except Exception as err:  # the reference raises several types for modes it lacks
            raise GradientError(f"node {node_label(node)}: Resize's matrix could not be computed "
                                f"({str(err).splitlines()[0][:120]})") from None
        pick = [slice(None), 0] + [0] * len(xs)
        pick[2 + j] = slice(None)
        mats.append(np.ascontiguousarray(out[tuple(pick)].T))   # [n_out, n_in]
    return mats


@rule("Resize")
def _resize(e, node, gy):
    """A Resize is linear and separable: y = x x_j R_j along each spatial axis j (R_j from the node itself, see
    _resize_matrices); the cotangent goes back through R_j^T, axis by axis, as MatMuls."""
    x, y = node.input[0], node.output[0]
    for i, t in enumerate(node.input[1:], 1):
        if e.needs(t):
            raise GradientError(f"node {node_label(node)}: input {i} of Resize depends on the differentiated "
                                f"tensor")
    r = e.rank(x, node)
    xs, ys = e.static(x, range(2, r), node), e.static(y, range(2, r), node)
    g = gy[0]
    for j, mat in enumerate(_resize_matrices(e, node, xs, ys)):
        axis = 2 + j
        perm = list(range(r))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        gt = e.op("Transpose", [g], perm=perm) if axis != r - 1 else g
        gt = e.op("MatMul", [gt, e.const(mat.astype(e.np_dtype))])        # [..., n_out] @ [n_out, n_in]
        g = e.op("Transpose", [gt], perm=perm) if axis != r - 1 else gt
    return [g] + [None] * (len(node.input) - 1)


NON_DIFFERENTIABLE_INPUTS["Resize"] = (1, 2, 3)   # roi, scales, sizes


# -- the reverse walk -----------------------------------------------------------------------------------------------

def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy at opset >= MIN_OPSET (converted to CONVERT_OPSET when lower)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if opset_of(m) < MIN_OPSET:
        from onnx import version_converter

        try:
            m = version_converter.convert_version(m, CONVERT_OPSET)
        except Exception as e:  # the converter raises several types
            raise GradientError(f"the graph is at opset {opset_of(model)} and could not be converted to opset "
                                f"{CONVERT_OPSET} ({str(e).splitlines()[0][:200]})") from None
    return m


def infer_types(model: onnx.ModelProto) -> dict:
    """Tensor name -> TypeProto, from ONNX shape inference (with data propagation) plus the graph's declarations."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is best effort; the rules say which dims they miss
        inferred = model
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        known = types.get(vi.name)
        if known is None or not known.tensor_type.HasField("shape") or vi.type.tensor_type.HasField("shape"):
            types[vi.name] = vi.type   # a declaration without a shape does not hide an inferred one
    for t in g.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types


def _is_float(types: dict, name: str) -> bool:
    t = types.get(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        return True   # unknown: assume it carries a derivative (a rule will say if not)
    return t.tensor_type.elem_type in FLOAT_TYPES


def dependents(graph: onnx.GraphProto, wrt: str, types: dict) -> set:
    """Tensors whose value depends on `wrt` through float values (the differentiable path)."""
    dep = {wrt}
    for n in graph.node:
        if n.op_type in NON_DIFFERENTIABLE and n.domain in ("", "ai.onnx"):
            continue
        if any(i in dep for i in n.input if i):
            dep.update(o for o in n.output if o and _is_float(types, o))
    return dep


def ancestors(graph: onnx.GraphProto, output: str) -> set:
    """Tensors `output` is computed from (itself included)."""
    producer = {o: n for n in graph.node for o in n.output}
    seen, stack = {output}, [output]
    while stack:
        n = producer.get(stack.pop())
        if n is None:
            continue
        for i in n.input:
            if i and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def gradient_graph(model: onnx.ModelProto, wrt: str, output: str, seed: str, grad_name: str | None = None
                   ) -> onnx.ModelProto:
    """The model plus an output `grad_name` (default grad_<wrt>) = (d output / d wrt)^T seed.

    `seed` is a tensor of the graph (an input, or computed from others) with the shape of `output`. The forward graph
    is unchanged (converted to opset >= MIN_OPSET where older); the backward nodes are appended after it."""
    m = prepare(model)
    g = m.graph
    names = _all_names(g)
    for t, what in ((wrt, "wrt"), (output, "output"), (seed, "seed")):
        if t not in names:
            raise GradientError(f"no tensor '{t}' in the graph (the {what})")
    types = infer_types(m)
    dtype = types[wrt].tensor_type.elem_type if wrt in types else TensorProto.FLOAT
    if dtype not in FLOAT_TYPES:
        raise GradientError(f"'{wrt}' is not a float tensor")
    dep = dependents(g, wrt, types)
    need = ancestors(g, output)
    path = dep & need
    e = Emitter(g, types, opset_of(m), dtype, path)
    cot: dict[str, str] = {output: seed}
    if output in path:
        # nodes between wrt and output: an output on the path and an input on it (the node producing wrt has none)
        on_path = [n for n in g.node if any(o in path for o in n.output) and any(i in path for i in n.input if i)]
        for node in reversed(on_path):
            gy = [cot.get(o) if o in path else None for o in node.output]
            if all(v is None for v in gy):
                continue
            fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if fn is None:
                raise GradientError(f"node {node_label(node)} is on the path from '{wrt}' to '{output}' and has no "
                                    f"gradient rule (ops with rules: {', '.join(sorted(RULES))})")
            gx = fn(e, node, gy)
            cut = NON_DIFFERENTIABLE_INPUTS.get(node.op_type, ())
            for i, x in enumerate(node.input):
                if not x or x not in path or i in cut:
                    continue
                gi = gx[i] if i < len(gx) else None
                if gi is None:
                    raise GradientError(f"node {node_label(node)}: input {i} ('{x}') depends on '{wrt}' but the "
                                        f"{node.op_type} rule does not differentiate it")
                cot[x] = gi if x not in cot else e.op("Add", [cot[x], gi])
    grad = cot.get(wrt)
    if grad is None:   # the output does not depend on wrt
        grad = e.zeros_like(wrt)
    out_name = grad_name or f"grad_{wrt}"
    if out_name in names:
        raise GradientError(f"the graph already has a tensor named '{out_name}'")
    e.nodes.append(helper.make_node("Identity", [grad], [out_name], name=out_name))
    g.node.extend(e.nodes)
    g.initializer.extend(e.inits)
    wt = types.get(wrt)
    vi = helper.make_tensor_value_info(out_name, dtype, None)
    if wt is not None and wt.tensor_type.HasField("shape"):
        vi.type.tensor_type.shape.CopyFrom(wt.tensor_type.shape)
    g.output.append(vi)
    return m


def add_target_seed(model: onnx.ModelProto, logits: str, target: str = "target") -> tuple[onnx.ModelProto, str]:
    """The model plus an int64 input `target` [batch] and the one-hot seed [batch, K] of
    t_b = target[b], or argmax(logits[b]) where target[b] < 0. Returns (model, the seed's name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = infer_types(m)
    ld = Emitter(g, types, opset_of(m), TensorProto.FLOAT, set())
    dims = ld.dims(logits)
    if dims is None or len(dims) != 2:
        raise GradientError(f"the logits '{logits}' must be [batch, K] (shape {dims})")
    dtype = types[logits].tensor_type.elem_type
    if target in _all_names(g):
        raise GradientError(f"the graph already has a tensor named '{target}'")
    batch = dims[0] if isinstance(dims[0], str) else "batch"
    g.input.append(helper.make_tensor_value_info(target, TensorProto.INT64, [batch]))
    e = Emitter(g, types, opset_of(m), dtype, set())
    top = e.op("ArgMax", [logits], axis=1, keepdims=0)
    t = e.op("Where", [e.op("Less", [target, e.const(np.array(0, np.int64))]), top, target])
    if isinstance(dims[1], int):
        classes = e.const(np.arange(dims[1], dtype=np.int64))
    else:
        k = e.op("Gather", [e.shape_of(logits), e.const(np.array(1, np.int64))])
        classes = e.op("Range", [e.const(np.array(0, np.int64)), k, e.const(np.array(1, np.int64))])
    seed = e.op("Cast", [e.op("Equal", [e.unsqueeze(t, [1]), classes])], to=dtype)
    g.node.extend(e.nodes)
    g.initializer.extend(e.inits)
    return m, seed


def target_gradient_graph(model: onnx.ModelProto, wrt: str, logits: str, target: str = "target",
                          grad_name: str = "gradients") -> onnx.ModelProto:
    """The model plus an input `target` (int64 [batch]) and an output `grad_name`: d logits[b, t_b] / d wrt, with
    t_b = target[b], or the row's top-1 class where target[b] < 0 (the toolkit's explain / head_grad contract)."""
    m, seed = add_target_seed(prepare(model), logits, target)
    return gradient_graph(m, wrt, logits, seed, grad_name)


# -- float64 copies (finite differences) ----------------------------------------------------------------------------

def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64: float32 initializers, constants, casts and declared types become
    float64 (for finite-difference checks; ONNX Runtime's CPU provider lacks float64 kernels for some ops, e.g.
    Conv, which onnx.reference runs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    F, D = TensorProto.FLOAT, TensorProto.DOUBLE

    def tensor(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type != F:
            return t
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)

    g = m.graph
    inits = [tensor(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(inits)
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == F:
            vi.type.tensor_type.elem_type = D
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(tensor(a.t))
            elif n.op_type == "Constant" and a.name == "value_float":
                t = numpy_helper.from_array(np.array(a.f, np.float64), "value")
                a.Clear()
                a.name, a.type = "value", onnx.AttributeProto.TENSOR
                a.t.CopyFrom(t)
            elif n.op_type == "Constant" and a.name == "value_floats":
                t = numpy_helper.from_array(np.array(list(a.floats), np.float64), "value")
                a.Clear()
                a.name, a.type = "value", onnx.AttributeProto.TENSOR
                a.t.CopyFrom(t)
            elif n.op_type == "Cast" and a.name == "to" and a.i == F:
                a.i = D
    return m


__all__ = ["gradient_graph", "target_gradient_graph", "add_target_seed", "to_float64", "GradientError", "RULES",
           "NON_DIFFERENTIABLE", "NON_DIFFERENTIABLE_INPUTS", "prepare", "infer_types", "dependents", "ancestors", "opset_of"]
