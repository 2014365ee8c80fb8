"""export/onnx_grad.py: every vector-Jacobian rule on a tiny graph, the reverse walk, the cut, the errors.

Each case is one op (or a short chain) built with onnx.helper, with a symbolic batch. Its gradient graph is checked
    float64   against central differences of the forward in random directions (onnx.reference evaluates both:
              ONNX Runtime's CPU provider has no float64 Conv, AveragePool, Erf, ...), relative error <= 1e-7
    torch     against torch autograd of the same function in float64 (where torch has it), <= 1e-9
    float32   in ONNX Runtime at another batch size against the float64 gradient, <= 1e-4 of its scale
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from export.onnx_grad import GradientError, gradient_graph, prepare, target_gradient_graph, to_float64
from tests.export.grad_cases_cnn import CNN_CASES

FD_TOL = 1e-7       # float64 central differences: |fd - <g, v>| <= FD_TOL * |g| |v|
TORCH_TOL = 1e-9    # float64: max |ours - torch| <= TORCH_TOL * max |torch|
ORT_TOL = 1e-4      # float32 ORT vs the float64 gradient, in units of its max |value|


# -- evaluation -----------------------------------------------------------------------------------------------------

class _ConvTransposeTorch(OpRun):
    """ONNX ConvTranspose (explicit pads, output_padding, groups, dilations) on torch: onnx.reference's own
    implementation fails with groups. The full transposed convolution, output_padding zeros at the end, cropped by
    the pads: the operator's definition."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, output_padding=None,
             output_shape=None, pads=None, strides=None):
        n = W.ndim - 2
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        full = conv(torch.from_numpy(np.array(X)), torch.from_numpy(np.array(W)),
                    stride=tuple(strides or [1] * n), dilation=tuple(dilations or [1] * n), groups=int(group or 1))
        full = full.numpy()
        op = list(output_padding or [0] * n)
        p = list(pads or [0] * 2 * n)
        frame = np.zeros(full.shape[:2] + tuple(full.shape[2 + i] + op[i] for i in range(n)), full.dtype)
        frame[(slice(None), slice(None)) + tuple(slice(0, s) for s in full.shape[2:])] = full
        crop = frame[(slice(None), slice(None)) + tuple(slice(p[i], frame.shape[2 + i] - p[n + i]) for i in range(n))]
        if B is not None:
            crop = crop + B.reshape([1, -1] + [1] * n)
        return (np.ascontiguousarray(crop),)


_ConvTransposeTorch.__name__ = "ConvTranspose"


class _MaxPoolNumpy(OpRun):
    """ONNX MaxPool with its Indices output (first maximum of each window, row-major, over the whole tensor):
    onnx.reference's indices differ from ONNX Runtime's and torch's for some geometries."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        n = len(kernel_shape)
        sp = x.shape[2:]
        s = list(strides or [1] * n)
        d = list(dilations or [1] * n)
        k = list(kernel_shape)
        auto = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
        p = list(pads or [0] * 2 * n)
        out = []
        for i in range(n):
            ke = (k[i] - 1) * d[i] + 1
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                o = -(-sp[i] // s[i])
                tot = max((o - 1) * s[i] + ke - sp[i], 0)
                p[i], p[n + i] = (tot // 2, tot - tot // 2) if auto == "SAME_UPPER" else (tot - tot // 2, tot // 2)
            elif auto == "VALID":
                p[i] = p[n + i] = 0
            span = sp[i] + p[i] + p[n + i] - ke
            o = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
            if ceil_mode and (o - 1) * s[i] >= sp[i] + p[i]:
                o -= 1
            out.append(o)
        grids = []
        for i in range(n):   # [Y_0..Y_n-1, k_0..k_n-1] coordinates along axis i
            pos = np.arange(out[i])[:, None] * s[i] - p[i] + np.arange(k[i])[None, :] * d[i]
            shape = [1] * (2 * n)
            shape[i], shape[n + i] = out[i], k[i]
            grids.append(pos.reshape(shape))
        grids = np.broadcast_arrays(*grids)
        valid = np.all([(g >= 0) & (g < sp[i]) for i, g in enumerate(grids)], axis=0)
        flat = np.zeros(valid.shape, np.int64)
        for i, g in enumerate(grids):
            flat = flat * sp[i] + np.clip(g, 0, sp[i] - 1)
        planes = x.reshape(x.shape[0] * x.shape[1], -1)
        vals = np.where(valid[None], planes[:, flat], -np.inf).reshape(planes.shape[0], *out, -1)
        arg = vals.argmax(-1)
        y = np.take_along_axis(vals, arg[..., None], -1)[..., 0]
        idx = np.take_along_axis(np.broadcast_to(flat.reshape(1, *out, -1), vals.shape), arg[..., None], -1)[..., 0]
        idx = idx + (np.arange(planes.shape[0]) * planes.shape[1]).reshape([-1] + [1] * n)
        return y.reshape(x.shape[:2] + tuple(out)).astype(x.dtype), idx.reshape(x.shape[:2] + tuple(out))


_MaxPoolNumpy.__name__ = "MaxPool"


class _ErfFloat64(OpRun):
    """Erf in the input's precision (onnx.reference's runs in float32)."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


_ErfFloat64.__name__ = "Erf"


class _GeluFloat64(OpRun):
    """Gelu in the input's precision."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
        with torch.no_grad():
            return (F.gelu(torch.from_numpy(np.array(x)), approximate=approximate or "none").numpy(),)


_GeluFloat64.__name__ = "Gelu"


class _HardSwishFloat64(OpRun):
    """HardSwish in the input's precision (onnx.reference runs the op's function body, whose HardSigmoid alpha 1/6
    is a float32 attribute)."""

    op_domain = ""

    def _run(self, x):
        return (x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,)


_HardSwishFloat64.__name__ = "HardSwish"


def run_reference(model: onnx.ModelProto, feed: dict, outputs=None) -> list:
    ops = [_ConvTransposeTorch, _MaxPoolNumpy, _ErfFloat64, _GeluFloat64, _HardSwishFloat64]
    return ReferenceEvaluator(model, new_ops=ops).run(outputs, feed)


def run_ort(model: onnx.ModelProto, feed: dict, outputs=None) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def make_model(nodes, x_shape, inits=None, opset=20, x="x", y="y", dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph x -> y from nodes; x's first axis is symbolic ("N"); initializers given as float64 numpy arrays are
    stored as float32."""
    tensors = []
    for name, v in (inits or {}).items():
        arr = np.asarray(v)
        tensors.append(numpy_helper.from_array(arr.astype(np.float32) if arr.dtype == np.float64 else arr, name))
    g = helper.make_graph(nodes, "case", [helper.make_tensor_value_info(x, dtype, ["N"] + list(x_shape[1:]))],
                          [helper.make_empty_tensor_value_info(y)], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 10)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    out = next(v for v in inferred.graph.value_info if v.name == y) if y not in {o.name for o in m.graph.output if
                                                                               o.type.HasField("tensor_type")} else None
    if out is not None:
        del m.graph.output[:]
        m.graph.output.append(out)
    return m


def with_seed(model: onnx.ModelProto, y="y", seed="seed") -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = next(o for o in m.graph.output if o.name == y)
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(out)
    vi.name = seed
    m.graph.input.append(vi)
    return m


def directional_check(f64: onnx.ModelProto, grad64: onnx.ModelProto, x: np.ndarray, seed: np.ndarray, wrt="x",
                      y="y", n_dirs=3, rng=None, eps=1e-6):
    """max over random directions v of |central difference of <seed, y> along v - <grad, v>| / (|grad| |v|)."""
    rng = rng or np.random.default_rng(0)
    (g,) = run_reference(grad64, {wrt: x, "seed": seed}, [f"grad_{wrt}"])
    worst = 0.0
    for _ in range(n_dirs):
        v = rng.normal(size=x.shape)
        v /= np.linalg.norm(v)
        up = run_reference(f64, {wrt: x + eps * v}, [y])[0]
        down = run_reference(f64, {wrt: x - eps * v}, [y])[0]
        fd = float(((up - down) * seed).sum()) / (2 * eps)
        worst = max(worst, abs(fd - float((g * v).sum())) / max(np.linalg.norm(g), 1e-300))
    return g, worst


def check_case(model: onnx.ModelProto, x_shape, torch_fn=None, inits=None, positive=False, scale=1.0, seed_rng=0):
    rng = np.random.default_rng(seed_rng)
    x = rng.normal(size=x_shape) * scale
    if positive:
        x = np.abs(x) + 0.5
    model = prepare(model)   # an old opset is converted before the float64 copy (the converter adds float32 constants)
    f64 = to_float64(model)
    grad64 = gradient_graph(with_seed(f64), "x", "y", "seed")
    y0 = run_reference(f64, {"x": x}, ["y"])[0]
    seed = rng.normal(size=y0.shape)
    g, err = directional_check(f64, grad64, x, seed, rng=rng)
    assert g.shape == x.shape
    assert np.linalg.norm(g) > 0, "a zero gradient checks nothing"
    assert err <= FD_TOL, f"float64 gradient vs central differences: {err:.3g}"
    if torch_fn is not None:
        consts = {k: torch.from_numpy(np.asarray(v).astype(np.float32).astype(np.float64))
                  for k, v in (inits or {}).items() if np.asarray(v).dtype.kind == "f"}
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = torch_fn(xt, consts)
        # the same function (onnx.reference computes a few ops, e.g. HardSwish, in float32)
        np.testing.assert_allclose(yt.detach().numpy(), y0, rtol=0, atol=1e-6 * max(1.0, np.abs(y0).max()))
        (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(seed))
        assert np.abs(g - gt.numpy()).max() <= TORCH_TOL * np.abs(gt.numpy()).max(), "float64 gradient vs torch"
    # float32 in ONNX Runtime, at another batch size (the batch axis is dynamic)
    x3 = np.concatenate([x, x[:1] * 0.5], 0)
    seed3 = rng.normal(size=run_reference(f64, {"x": x3}, ["y"])[0].shape)
    (g32,) = run_ort(gradient_graph(with_seed(model), "x", "y", "seed"),
                     {"x": x3.astype(np.float32), "seed": seed3.astype(np.float32)}, ["grad_x"])
    (g64,) = run_reference(grad64, {"x": x3, "seed": seed3}, ["grad_x"])
    scale = np.abs(g64).max()
    assert np.abs(g32 - g64).max() <= ORT_TOL * scale, f"ORT float32 vs float64: {np.abs(g32 - g64).max() / scale:.3g}"
    return err


def rnd(*shape, seed=1, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def N(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def _pad2d(x, pads):  # ONNX pads [t, l, b, r] -> torch's (l, r, t, b)
    return F.pad(x, (pads[1], pads[3], pads[0], pads[2]))


# -- cases: (nodes, x shape, initializers, torch function or None, options) ------------------------------------------

W6 = rnd(6, 4, 3, 3, seed=2, scale=0.3)
W5g = rnd(6, 2, 5, 5, seed=3, scale=0.3)
Wdw = rnd(4, 1, 3, 3, seed=4, scale=0.5)
B6 = rnd(6, seed=5)

CASES = {
    # Conv: kernel, stride, padding (explicit, asymmetric, auto_pad), dilation, groups
    "conv-k3-s1-p1": ([N("Conv", ["x", "W", "B"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], (2, 4, 7, 7),
                      {"W": W6, "B": B6}, lambda x, c: F.conv2d(x, c["W"], c["B"], padding=1)),
    "conv-k3-s2-p1": ([N("Conv", ["x", "W"], strides=[2, 2], pads=[1, 1, 1, 1])], (2, 4, 8, 9), {"W": W6},
                      lambda x, c: F.conv2d(x, c["W"], stride=2, padding=1)),
    "conv-k5-s2-groups2-dil2": ([N("Conv", ["x", "W"], strides=[2, 3], dilations=[2, 1], group=2, pads=[2, 1, 3, 0])],
                                (2, 4, 13, 11), {"W": W5g},
                                lambda x, c: F.conv2d(_pad2d(x, [2, 1, 3, 0]), c["W"], stride=(2, 3), dilation=(2, 1),
                                                      groups=2)),
    "conv-depthwise-same-upper": ([N("Conv", ["x", "W"], strides=[2, 2], group=4, auto_pad="SAME_UPPER")],
                                  (2, 4, 8, 7), {"W": Wdw},
                                  lambda x, c: F.conv2d(_pad2d(x, [0, 1, 1, 1]), c["W"], stride=2, groups=4)),
    "conv-same-lower": ([N("Conv", ["x", "W"], strides=[2, 2], auto_pad="SAME_LOWER")], (2, 4, 8, 8), {"W": W6},
                        lambda x, c: F.conv2d(_pad2d(x, [1, 1, 0, 0]), c["W"], stride=2)),
    "conv-valid-dil2": ([N("Conv", ["x", "W"], dilations=[2, 2], auto_pad="VALID")], (2, 4, 9, 8), {"W": W6},
                        lambda x, c: F.conv2d(x, c["W"], dilation=2)),
    "conv-1x1-s2": ([N("Conv", ["x", "W"], strides=[2, 2])], (2, 4, 7, 7), {"W": rnd(6, 4, 1, 1, seed=6)},
                    lambda x, c: F.conv2d(x, c["W"], stride=2)),
    "conv1d": ([N("Conv", ["x", "W"], strides=[2], pads=[1, 2])], (2, 4, 11), {"W": rnd(3, 4, 3, seed=7)},
               lambda x, c: F.conv1d(F.pad(x, (1, 2)), c["W"], stride=2)),
    "batchnorm": ([N("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=2 ** -10)], (2, 4, 3, 3),
                  {"s": rnd(4, seed=8), "b": rnd(4, seed=9), "m": rnd(4, seed=10), "v": np.abs(rnd(4, seed=11)) + .5},
                  lambda x, c: F.batch_norm(x, c["m"], c["v"], c["s"], c["b"], False, 0.0, 2 ** -10)),
    # elementwise
    "relu": ([N("Relu", ["x"])], (2, 3, 4, 4), None, lambda x, c: torch.relu(x)),
    "leaky-relu": ([N("LeakyRelu", ["x"], alpha=0.125)], (2, 3, 4, 4), None, lambda x, c: F.leaky_relu(x, 0.125)),
    "prelu": ([N("PRelu", ["x", "s"])], (2, 3, 4, 4), {"s": rnd(3, 1, 1, seed=12)},
              lambda x, c: F.prelu(x, c["s"].reshape(-1))),
    "clip-relu6": ([N("Clip", ["x", "lo", "hi"])], (2, 3, 4, 4),
                   {"lo": np.array(0.0, np.float32), "hi": np.array(0.5, np.float32)},
                   lambda x, c: F.hardtanh(x, 0.0, 0.5)),
    "clip-min-only": ([N("Clip", ["x", "lo"])], (2, 3, 4, 4), {"lo": np.array(-0.25, np.float32)},
                      lambda x, c: torch.clamp(x, min=-0.25)),
    "sigmoid": ([N("Sigmoid", ["x"])], (2, 3, 4, 4), None, lambda x, c: torch.sigmoid(x)),
    "hard-sigmoid": ([N("HardSigmoid", ["x"], alpha=0.25, beta=0.5)], (2, 3, 4, 4), None,
                     lambda x, c: torch.clamp(x * 0.25 + 0.5, 0, 1), {"scale": 3.0}),
    "hard-swish": ([N("HardSwish", ["x"])], (2, 3, 4, 4), None, lambda x, c: F.hardswish(x), {"scale": 3.0}),
    "tanh": ([N("Tanh", ["x"])], (2, 3, 4, 4), None, lambda x, c: torch.tanh(x)),
    "erf": ([N("Erf", ["x"])], (2, 3, 4, 4), None, lambda x, c: torch.erf(x)),
    "gelu": ([N("Gelu", ["x"])], (2, 3, 4, 4), None, lambda x, c: F.gelu(x)),
    "gelu-tanh": ([N("Gelu", ["x"], approximate="tanh")], (2, 3, 4, 4), None,
                  lambda x, c: F.gelu(x, approximate="tanh")),
    "softplus": ([N("Softplus", ["x"])], (2, 3, 4, 4), None, lambda x, c: F.softplus(x)),
    "mish": ([N("Mish", ["x"])], (2, 3, 4, 4), None, lambda x, c: F.mish(x)),
    "exp": ([N("Exp", ["x"])], (2, 3, 4), None, lambda x, c: torch.exp(x)),
    "neg-abs": ([N("Neg", ["x"], ["n"]), N("Abs", ["n"])], (2, 3, 4), None, lambda x, c: torch.abs(-x)),
    # binary, with broadcasting to undo
    "mul-const-broadcast": ([N("Mul", ["k", "x"])], (2, 3, 4, 4), {"k": rnd(3, 1, 1, seed=13)},
                            lambda x, c: c["k"] * x),
    "silu-x-times-sigmoid-x": ([N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"])], (2, 3, 4, 4), None,
                               lambda x, c: F.silu(x)),
    "add-broadcast-both": ([N("ReduceMean", ["x", "ax"], ["m"], keepdims=1), N("Add", ["m", "x"])], (2, 3, 4, 4),
                           {"ax": np.array([2, 3], np.int64)}, lambda x, c: x.mean((2, 3), keepdim=True) + x),
    "sub-both-ways": ([N("Sub", ["x", "k"], ["a"]), N("Sub", ["k", "a"])], (2, 3, 4), {"k": rnd(4, seed=14)},
                      lambda x, c: c["k"] - (x - c["k"])),
    "div-by-const": ([N("Div", ["x", "k"])], (2, 3, 4), {"k": np.abs(rnd(3, 1, seed=15)) + 0.5},
                     lambda x, c: x / c["k"]),
    "div-general": ([N("Mul", ["x", "x"], ["sq"]), N("Add", ["sq", "one"], ["d"]), N("Div", ["x", "d"])], (2, 3, 4),
                    {"one": np.array(1.0, np.float32)}, lambda x, c: x / (x * x + 1)),
    "pow-const": ([N("Pow", ["x", "p"])], (2, 3, 4), {"p": np.array(3.0, np.float32)}, lambda x, c: x ** 3),
    "pow-sqrt-log-recip": ([N("Pow", ["x", "p"], ["a"]), N("Sqrt", ["a"], ["b"]), N("Log", ["b"], ["l"]),
                            N("Reciprocal", ["l"])], (2, 3, 4), {"p": np.array(3.0, np.float32)},
                           lambda x, c: 1 / torch.log(torch.sqrt(x ** 3)), {"positive": True}),
    "max-min-where": ([N("Max", ["x", "k"], ["a"]), N("Min", ["a", "k2"], ["b"]), N("Greater", ["x", "z"], ["c"]),
                       N("Where", ["c", "b", "x"])], (2, 3, 4),
                      {"k": np.array(-0.25, np.float32), "k2": rnd(4, seed=16, scale=0.5),
                       "z": np.array(0.25, np.float32)},
                      lambda x, c: torch.where(x > 0.25, torch.minimum(torch.maximum(x, c["k"]), c["k2"]), x)),
    "expand": ([N("ReduceSum", ["x", "ax"], ["s"], keepdims=1), N("Expand", ["s", "shp"])], (2, 3, 1),
               {"ax": np.array([1], np.int64), "shp": np.array([1, 5, 4], np.int64)},
               lambda x, c: x.sum(1, keepdim=True).expand(-1, 5, 4)),
    # pooling
    "global-average-pool": ([N("GlobalAveragePool", ["x"])], (2, 3, 5, 4), None,
                            lambda x, c: x.mean((2, 3), keepdim=True)),
    "global-max-pool": ([N("GlobalMaxPool", ["x"])], (2, 3, 5, 4), None, lambda x, c: x.amax((2, 3), keepdim=True)),
    "avgpool-k3-s2-p1": ([N("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                         (2, 3, 8, 7), None, lambda x, c: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
    "avgpool-count-include-pad": ([N("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                     count_include_pad=1)], (2, 3, 8, 7), None,
                                  lambda x, c: F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)),
    "avgpool-ceil": ([N("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)], (2, 3, 8, 8), None,
                     lambda x, c: F.avg_pool2d(x, 3, 2, 0, ceil_mode=True)),
    "avgpool-ceil-pad-include": ([N("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                    ceil_mode=1, count_include_pad=1)], (2, 3, 8, 8), None,
                                 lambda x, c: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)),
    "avgpool-same-upper": ([N("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")],
                           (2, 3, 7, 6), None, None),
    "avgpool-dilated": ([N("AveragePool", ["x"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 0, 1, 1])],
                        (2, 3, 7, 6), None, None),
    "maxpool-k3-s2-p1": ([N("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], (2, 3, 8, 7),
                         None, lambda x, c: F.max_pool2d(x, 3, 2, 1)),
    "maxpool-ceil-dilated": ([N("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 1],
                                ceil_mode=1)], (2, 3, 9, 7), None,
                             lambda x, c: F.max_pool2d(x, 2, 2, 0, dilation=(2, 1), ceil_mode=True)),
    "maxpool-same-upper": ([N("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
                           (2, 3, 7, 8), None, None),
    "maxpool-indices-output": ([N("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[1, 1])], (2, 3, 4, 4),
                               None, lambda x, c: F.max_pool2d(x, 2, 1)),
    # reductions
    "reduce-mean-attr-opset17": ([N("ReduceMean", ["x"], axes=[1, 3], keepdims=0)], (2, 3, 4, 5), None,
                                 lambda x, c: x.mean((1, 3)), {"opset": 17}),
    "reduce-mean-input": ([N("ReduceMean", ["x", "ax"], keepdims=1)], (2, 3, 4, 5), {"ax": np.array([-1], np.int64)},
                          lambda x, c: x.mean(-1, keepdim=True)),
    "reduce-sum-all": ([N("ReduceSum", ["x"], keepdims=0)], (2, 3, 4), None, lambda x, c: x.sum()),
    "reduce-max": ([N("ReduceMax", ["x", "ax"], keepdims=0)], (2, 3, 4, 5), {"ax": np.array([2, 3], np.int64)},
                   lambda x, c: x.amax((2, 3))),
    "reduce-min-opset17": ([N("ReduceMin", ["x"], axes=[1], keepdims=1)], (2, 3, 4), None,
                           lambda x, c: x.amin(1, keepdim=True), {"opset": 17}),
    "reduce-l2-sumsquare": ([N("ReduceL2", ["x", "ax"], ["a"], keepdims=1), N("ReduceSumSquare", ["x", "ax"], ["b"]),
                             N("Add", ["a", "b"])], (2, 3, 4), {"ax": np.array([2], np.int64)},
                            lambda x, c: x.norm(dim=2, keepdim=True) + (x * x).sum(2, keepdim=True)),
    # shapes and data movement
    "flatten-gemm": ([N("Flatten", ["x"], ["f"]), N("Gemm", ["f", "W", "b"], transB=1, alpha=0.5, beta=2.0)],
                     (2, 3, 2, 2), {"W": rnd(5, 12, seed=17), "b": rnd(5, seed=18)},
                     lambda x, c: 0.5 * x.flatten(1) @ c["W"].T + 2 * c["b"]),
    "gemm-transA": ([N("Transpose", ["x"], ["t"], perm=[1, 0]), N("Gemm", ["t", "W"], transA=1)], (3, 4),
                    {"W": rnd(4, 2, seed=19)}, lambda x, c: x @ c["W"]),
    "gemm-B-on-path": ([N("Gemm", ["W", "x"], ["g"], transB=1), N("Gemm", ["g", "x", "b"])], (3, 4),
                       {"W": rnd(2, 4, seed=20), "b": rnd(4, seed=21)},
                       lambda x, c: (c["W"] @ x.T) @ x + c["b"]),
    "reshape-dynamic-shape-path": ([N("Shape", ["x"], ["s"]), N("Slice", ["s", "z", "o"], ["b"]),
                                    N("Concat", ["b", "m1"], ["shp"], axis=0), N("Reshape", ["x", "shp"], ["r"]),
                                    N("Relu", ["r"])], (2, 3, 2, 2),
                                   {"z": np.array([0], np.int64), "o": np.array([1], np.int64),
                                    "m1": np.array([-1], np.int64)},
                                   lambda x, c: torch.relu(x.reshape(x.shape[0], -1))),
    "squeeze-unsqueeze-transpose": ([N("Unsqueeze", ["x", "a0"], ["u"]), N("Transpose", ["u"], ["t"],
                                     perm=[1, 3, 0, 2]), N("Squeeze", ["t", "a2"])], (2, 3, 4),
                                    {"a0": np.array([1], np.int64), "a2": np.array([0], np.int64)},
                                    lambda x, c: x.unsqueeze(1).permute(1, 3, 0, 2).squeeze(0)),
    "concat-with-itself": ([N("Relu", ["x"], ["r"]), N("Concat", ["x", "r", "x"], axis=2)], (2, 3, 4), None,
                           lambda x, c: torch.cat([x, torch.relu(x), x], 2)),
    "split-and-recombine": ([N("Split", ["x", "sp"], ["a", "b", "c"], axis=1), N("Mul", ["a", "c"], ["m"]),
                             N("Add", ["m", "b"])], (2, 6, 3),
                            {"sp": np.array([2, 2, 2], np.int64)},
                            lambda x, c: x[:, 0:2] * x[:, 4:6] + x[:, 2:4]),
    "split-unused-output": ([N("Split", ["x"], ["a", "b"], axis=2, num_outputs=2), N("Relu", ["b"])], (2, 3, 6),
                            None, lambda x, c: torch.relu(x[:, :, 3:])),
    "slice-steps": ([N("Slice", ["x", "st", "en", "ax", "sp"])], (2, 5, 9),
                    {"st": np.array([1, -2], np.int64), "en": np.array([5, 0], np.int64),
                     "ax": np.array([1, 2], np.int64), "sp": np.array([1, -3], np.int64)},
                    lambda x, c: x[:, 1:5][:, :, [7, 4, 1]]),
    "slice-contiguous": ([N("Slice", ["x", "st", "en", "ax"])], (2, 5, 9),
                         {"st": np.array([2], np.int64), "en": np.array([100], np.int64),
                          "ax": np.array([-1], np.int64)}, lambda x, c: x[:, :, 2:]),
    "pad-constant": ([N("Pad", ["x", "p"])], (2, 3, 4, 5), {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)},
                     lambda x, c: F.pad(x, (2, 1, 1, 2))),   # onnx.reference cannot run negative (cropping) pads
    "gather-const-indices": ([N("Gather", ["x", "i"], axis=1)], (2, 5, 3), {"i": np.array([[4, 0], [4, 2]], np.int64)},
                             lambda x, c: x[:, torch.tensor([[4, 0], [4, 2]])]),
    "matmul-batched-broadcast": ([N("MatMul", ["x", "W"])], (2, 3, 4), {"W": rnd(1, 4, 5, seed=23)},
                                 lambda x, c: x @ c["W"]),
    "matmul-both-on-path": ([N("Transpose", ["x"], ["t"], perm=[0, 2, 1]), N("MatMul", ["x", "t"])], (2, 3, 4), None,
                            lambda x, c: x @ x.transpose(1, 2)),
    "matmul-vector": ([N("MatMul", ["x", "v"], ["a"]), N("MatMul", ["v2", "x"], ["b"]), N("ReduceSum", ["a"], ["s"],
                       keepdims=0), N("Mul", ["b", "s"])], (2, 3, 4),
                      {"v": rnd(4, seed=24), "v2": rnd(3, seed=25)},
                      lambda x, c: (c["v2"] @ x) * (x @ c["v"]).sum()),
    "softmax": ([N("Softmax", ["x"], axis=1)], (2, 5, 3), None, lambda x, c: torch.softmax(x, 1)),
    "log-softmax": ([N("LogSoftmax", ["x"])], (2, 5), None, lambda x, c: torch.log_softmax(x, -1)),
    "layernorm-last": ([N("LayerNormalization", ["x", "s", "b"], epsilon=2 ** -10)], (2, 3, 6),
                       {"s": rnd(6, seed=26), "b": rnd(6, seed=27)},
                       lambda x, c: F.layer_norm(x, (6,), c["s"], c["b"], 2 ** -10)),
    "layernorm-chw": ([N("LayerNormalization", ["x", "s"], axis=1)], (2, 3, 2, 2), {"s": rnd(3, 2, 2, seed=28)},
                      lambda x, c: F.layer_norm(x, (3, 2, 2), c["s"])),
    "sum-mean-castlike": ([N("Relu", ["x"], ["r"]), N("Sum", ["x", "r", "k"], ["s"]), N("Mean", ["s", "x"], ["m"]),
                           N("CastLike", ["m", "x"])], (2, 3), {"k": rnd(3, seed=30)},
                          lambda x, c: ((x + torch.relu(x) + c["k"]) + x) / 2),
    "dropout-identity-cast": ([N("Dropout", ["x"], ["d"]), N("Identity", ["d"], ["i"]),
                               N("Cast", ["i"], ["c"], to=TensorProto.DOUBLE), N("Cast", ["c"], ["e"],
                                                                                    to=TensorProto.FLOAT),
                               N("Tanh", ["e"])], (2, 3), None, lambda x, c: torch.tanh(x)),
    "residual-fan-out": ([N("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), N("Relu", ["c"], ["r"]),
                          N("Add", ["r", "x"], ["a"]), N("Mul", ["a", "x"])], (2, 4, 5, 5),
                         {"W": rnd(4, 4, 3, 3, seed=29, scale=0.3)},
                         lambda x, c: (torch.relu(F.conv2d(x, c["W"], padding=1)) + x) * x),
    "opset11-clip-attrs": ([N("Clip", ["x"], min=-0.5, max=0.5)], (2, 3), None,
                           lambda x, c: F.hardtanh(x, -0.5, 0.5), {"opset": 6}),
}

CASES.update(CNN_CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_rule_against_finite_differences_torch_and_ort(name):
    case = CASES[name]
    nodes, shape, inits, fn = case[:4]
    opts = case[4] if len(case) > 4 else {}
    model = make_model(nodes, shape, inits, opset=opts.get("opset", 20))
    check_case(model, shape, fn, inits, positive=opts.get("positive", False), scale=opts.get("scale", 1.0))


def test_rules_cover_the_listed_ops():
    from export.onnx_grad import RULES

    needed = {"Conv", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
              "HardSwish", "Tanh", "Erf", "Gelu", "Mul", "Add", "Sub", "Div", "Neg", "Pow", "GlobalAveragePool",
              "AveragePool", "MaxPool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "Flatten", "Reshape",
              "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gemm", "MatMul", "Dropout",
              "Identity", "Cast", "LayerNormalization", "Softmax"}
    assert needed <= set(RULES)
    tested = {n.op_type for case in CASES.values() for n in case[0]}
    assert set(RULES) - tested == set(), f"rules without a test case: {sorted(set(RULES) - tested)}"


# -- the walk: the cut, paths that need no rule, the target seed, errors --------------------------------------------

def _tiny_cnn():
    """x -> conv -> relu (t) -> conv -> relu -> GAP -> flatten -> gemm -> logits, with a Resize-free constant side
    branch (TopK of a constant, an op without a rule, off the differentiable path)."""
    inits = {"W1": rnd(4, 3, 3, 3, seed=40, scale=0.4), "W2": rnd(5, 4, 3, 3, seed=41, scale=0.3),
             "Wf": rnd(6, 5, seed=42), "bf": rnd(6, seed=43), "c": rnd(1, 6, seed=44), "k": np.array([1], np.int64)}
    nodes = [N("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]), N("Relu", ["c1"], ["t"]),
             N("Conv", ["t", "W2"], ["c2"], strides=[2, 2]), N("Relu", ["c2"], ["r2"]),
             N("GlobalAveragePool", ["r2"], ["p"]), N("Flatten", ["p"], ["f"]), N("Gemm", ["f", "Wf", "bf"], ["g"],
                                                                                 transB=1),
             N("TopK", ["c", "k"], ["tv", "ti"], axis=1), N("ReduceSum", ["tv"], ["ts"], keepdims=0),
             N("Add", ["g", "ts"], ["y"])]
    return make_model(nodes, (2, 3, 9, 9), inits), inits


def _torch_cnn(x, c, hook=None):
    t = torch.relu(F.conv2d(x, c["W1"], padding=1))
    if hook is not None:
        t = hook(t)
    r2 = torch.relu(F.conv2d(t, c["W2"], stride=2))
    return r2.mean((2, 3)) @ c["Wf"].T + c["bf"] + c["c"].topk(1, 1).values.sum()


def test_gradient_with_respect_to_an_intermediate_tensor_matches_torch():
    model, inits = _tiny_cnn()
    c = {k: torch.from_numpy(np.asarray(v).astype(np.float32).astype(np.float64)) for k, v in inits.items()
         if np.asarray(v).dtype.kind == "f"}
    x = np.random.default_rng(5).normal(size=(3, 3, 9, 9))
    seed = np.random.default_rng(6).normal(size=(3, 6))
    grad = gradient_graph(with_seed(to_float64(model)), "t", "y", "seed")
    (ours,) = run_reference(grad, {"x": x, "seed": seed}, ["grad_t"])
    held = {}

    def keep(t):
        t.retain_grad()
        held["t"] = t
        return t

    y = _torch_cnn(torch.from_numpy(x).requires_grad_(True), c, keep)
    y.backward(torch.from_numpy(seed))
    ref = held["t"].grad.numpy()
    assert np.abs(ours - ref).max() <= TORCH_TOL * np.abs(ref).max()
    (ours32,) = run_ort(gradient_graph(with_seed(model), "t", "y", "seed"),
                        {"x": x.astype(np.float32), "seed": seed.astype(np.float32)}, ["grad_t"])
    assert np.abs(ours32 - ref).max() <= ORT_TOL * np.abs(ref).max()


def test_only_the_path_between_wrt_and_output_is_differentiated():
    model, _ = _tiny_cnn()
    grad = gradient_graph(with_seed(model), "t", "y", "seed")
    added = [n for n in grad.graph.node[len(model.graph.node):]]
    assert "ConvTranspose" in {n.op_type for n in added}
    # one ConvTranspose (the second conv's input): nothing before t is differentiated, nor the TopK branch
    assert sum(n.op_type == "ConvTranspose" for n in added) == 1
    # and nothing for the node that produces t (its Relu): every added node feeds the gradient
    used = {i for n in grad.graph.node for i in n.input} | {o.name for o in grad.graph.output}
    assert [n.name for n in added if not any(o in used for o in n.output)] == []
    wrt_producer = next(n for n in model.graph.node if "t" in n.output)
    assert not any(wrt_producer.input[0] in n.input for n in added)
    out = next(o for o in grad.graph.output if o.name == "grad_t")
    assert out.type.tensor_type.shape.dim[0].dim_param == "N"     # the batch stays symbolic


def test_an_op_without_a_rule_on_the_path_is_named():
    m = make_model([N("Relu", ["x"], ["r"]), N("Einsum", ["r", "r"], ["y"], equation="bi,bi->b")], (2, 3))
    with pytest.raises(GradientError, match=r"node 'y' \(Einsum\) is on the path from 'x' to 'y' and has no "
                                            r"gradient rule"):
        gradient_graph(with_seed(m), "x", "y", "seed")
    m = make_model([N("Relu", ["x"], ["r"]), N("Resize", ["r", "", "s"], ["y"], mode="nearest", axes=[2, 3])],
                   (2, 3, 2, 2), {"s": np.array([2, 2], np.float32)})    # the Resize rule takes no `axes`
    with pytest.raises(GradientError, match=r"\(Resize\): Resize with an `axes` attribute has no rule"):
        gradient_graph(with_seed(m), "x", "y", "seed")


def test_unreachable_output_gives_a_zero_gradient_and_unknown_names_are_refused():
    m = make_model([N("Shape", ["x"], ["s"]), N("Cast", ["s"], ["y"], to=TensorProto.FLOAT)], (2, 3))
    (g,) = run_ort(gradient_graph(with_seed(m), "x", "y", "seed"),
                   {"x": np.ones((2, 3), np.float32), "seed": np.ones(2, np.float32)}, ["grad_x"])
    assert g.shape == (2, 3) and not g.any()
    with pytest.raises(GradientError, match="no tensor 'nope'"):
        gradient_graph(with_seed(m), "nope", "y", "seed")


def test_geometry_that_needs_static_dims_says_so():
    g = helper.make_graph([N("AveragePool", ["x"], kernel_shape=[2, 2])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"]),
                           helper.make_tensor_value_info("seed", TensorProto.FLOAT, ["N", 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    with pytest.raises(GradientError, match=r"node 'y' \(AveragePool\): its backward needs the size of axis 2 of 'x' "
                                            r"to be fixed"):
        gradient_graph(m, "x", "y", "seed")


def test_target_seed_is_the_one_hot_of_target_or_the_top1_class():
    model, inits = _tiny_cnn()
    c = {k: torch.from_numpy(np.asarray(v).astype(np.float32).astype(np.float64)) for k, v in inits.items()
         if np.asarray(v).dtype.kind == "f"}
    x = np.random.default_rng(7).normal(size=(3, 3, 9, 9))
    target = np.array([-1, 4, 0], np.int64)
    grad = target_gradient_graph(model, "x", "y")
    assert [i.name for i in grad.graph.input] == ["x", "target"]
    y, g = run_ort(grad, {"x": x.astype(np.float32), "target": target}, ["y", "gradients"])
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = _torch_cnn(xt, c)
    t = torch.where(torch.from_numpy(target) < 0, yt.argmax(1), torch.from_numpy(target))
    (ref,) = torch.autograd.grad(yt.gather(1, t[:, None]).sum(), xt)
    assert np.abs(g - ref.numpy()).max() <= ORT_TOL * np.abs(ref.numpy()).max()


def _attention_pool_graph():
    """x [N, C, h, w] and a second input text [L, D] (L dynamic) -> y [N, L]: tokens (mean token + positions),
    query-0 attention (MatMul, Softmax), projection, L2 normalisation (ReduceL2, Div) and cosine logits against
    text: the CLIP head's op mix, with an input the gradient does not flow into."""
    C, D, n = 4, 3, 4
    inits = {"pos": rnd(n + 1, C, seed=60, scale=0.3), "wq": rnd(C, C, seed=61, scale=0.5),
             "wo": rnd(C, D, seed=62, scale=0.5), "shp": np.array([0, C, -1], np.int64),
             "ax1": np.array([1], np.int64), "ax_last": np.array([-1], np.int64), "i0": np.array(0, np.int64),
             "scale": np.array(0.5, np.float32), "s100": np.array(10.0, np.float32)}
    nodes = [N("Reshape", ["x", "shp"], ["flat"]), N("Transpose", ["flat"], ["tok"], perm=[0, 2, 1]),
             N("ReduceMean", ["tok", "ax1"], ["mean"], keepdims=1), N("Concat", ["mean", "tok"], ["cat"], axis=1),
             N("Add", ["cat", "pos"], ["t"]), N("Gather", ["t", "i0"], ["t0"], axis=1),
             N("MatMul", ["t0", "wq"], ["q"]), N("Unsqueeze", ["q", "ax1"], ["q1"]),
             N("Transpose", ["t"], ["tt"], perm=[0, 2, 1]), N("MatMul", ["q1", "tt"], ["sc"]),
             N("Mul", ["sc", "scale"], ["scs"]), N("Softmax", ["scs"], ["a"], axis=-1), N("MatMul", ["a", "t"], ["ctx"]),
             N("Squeeze", ["ctx", "ax1"], ["o"]), N("MatMul", ["o", "wo"], ["z"]),
             N("ReduceL2", ["z", "ax_last"], ["nz"], keepdims=1), N("Div", ["z", "nz"], ["e"]),
             N("Transpose", ["text"], ["tT"], perm=[1, 0]), N("MatMul", ["e", "tT"], ["cos"]),
             N("Mul", ["cos", "s100"], ["y"])]
    tensors = [numpy_helper.from_array(np.asarray(v).astype(np.float32) if np.asarray(v).dtype == np.float64
                                       else np.asarray(v), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 2, 2]),
                                          helper.make_tensor_value_info("text", TensorProto.FLOAT, ["L", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    return m, inits


def _attention_pool_torch(x, text, c):
    tok = x.flatten(2).transpose(1, 2)
    t = torch.cat([tok.mean(1, keepdim=True), tok], 1) + c["pos"]
    q = t[:, 0] @ c["wq"]
    a = torch.softmax((q[:, None] @ t.transpose(1, 2)) * 0.5, -1)
    z = (a @ t).squeeze(1) @ c["wo"]
    return 10.0 * (z / z.norm(dim=-1, keepdim=True)) @ text.T


def test_a_second_input_without_gradient_and_a_dynamic_class_axis():
    """The CLIP head's shape of problem: a `text` input [L, D] with its own dynamic axis L that the gradient does not
    flow into, logits [N, L] with L symbolic (the target seed's one-hot is built with Range). Float64 against central
    differences and torch autograd, float32 in ONNX Runtime at two values of L and two batch sizes."""
    model, inits = _attention_pool_graph()
    c = {k: torch.from_numpy(np.asarray(v).astype(np.float32).astype(np.float64)) for k, v in inits.items()
         if np.asarray(v).dtype.kind == "f" and np.asarray(v).ndim}
    rng = np.random.default_rng(8)
    f64 = to_float64(model)
    grad64 = gradient_graph(with_seed(f64), "x", "y", "seed")
    assert "grad_text" not in {o.name for o in grad64.graph.output}
    for n, L in ((2, 3), (3, 7)):
        x = rng.normal(size=(n, 4, 2, 2))
        text = rng.normal(size=(L, 3))
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        seed = rng.normal(size=(n, L))
        (g,) = run_reference(grad64, {"x": x, "text": text, "seed": seed}, ["grad_x"])
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = _attention_pool_torch(xt, torch.from_numpy(text), c)
        np.testing.assert_allclose(run_reference(f64, {"x": x, "text": text}, ["y"])[0], yt.detach().numpy(),
                                   rtol=1e-12, atol=1e-12)
        (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(seed), retain_graph=True)
        assert np.abs(g - gt.numpy()).max() <= TORCH_TOL * np.abs(gt.numpy()).max()
        worst = 0.0
        for _ in range(3):
            v = rng.normal(size=x.shape)
            v /= np.linalg.norm(v)
            up, down = (run_reference(f64, {"x": x + s * 1e-6 * v, "text": text}, ["y"])[0] for s in (1, -1))
            fd = float(((up - down) * seed).sum()) / 2e-6
            worst = max(worst, abs(fd - float((g * v).sum())) / np.linalg.norm(g))
        assert worst <= FD_TOL
        # the toolkit's seed: one-hot of target (or the top-1 class) over the dynamic L, in float32 ORT
        target = np.array([-1] + [L - 1] * (n - 1), np.int64)
        y, g32 = run_ort(target_gradient_graph(model, "x", "y"), {"x": x.astype(np.float32),
                                                                  "text": text.astype(np.float32), "target": target},
                         ["y", "gradients"])
        t = torch.where(torch.from_numpy(target) < 0, yt.argmax(1), torch.from_numpy(target))
        (ref,) = torch.autograd.grad(yt.gather(1, t[:, None]).sum(), xt)
        assert y.shape == (n, L)
        assert np.abs(g32 - ref.numpy()).max() <= ORT_TOL * np.abs(ref.numpy()).max()


def test_onnx_grad_imports_no_torch():
    code = "import sys, export.onnx_grad; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
