"""Gradient-rule cases for ops of CNN trunks (tests/export/test_onnx_grad.py runs them with its other CASES):
the same (nodes, x shape, initializers, torch function[, options]) form."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from onnx import helper


def _rnd(*shape, seed=1, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def _n(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


CNN_CASES = {
    "instance-norm": ([_n("InstanceNormalization", ["x", "s", "b"], epsilon=2 ** -10)], (2, 3, 4, 5),
                      {"s": _rnd(3, seed=60), "b": _rnd(3, seed=61)},
                      lambda x, c: F.instance_norm(x, weight=c["s"], bias=c["b"], eps=2 ** -10)),
    "instance-norm-1d": ([_n("InstanceNormalization", ["x", "s", "b"])], (2, 3, 7),
                         {"s": _rnd(3, seed=62), "b": _rnd(3, seed=63)},
                         lambda x, c: F.instance_norm(x, weight=c["s"], bias=c["b"], eps=1e-5)),
    "tile": ([_n("Tile", ["x", "rep"])], (2, 3, 4), {"rep": np.array([1, 2, 3], np.int64)},
             lambda x, c: x.repeat(1, 2, 3)),
    "tile-batch": ([_n("Tile", ["x", "rep"])], (2, 3, 1, 2), {"rep": np.array([2, 1, 3, 1], np.int64)},
                   lambda x, c: x.repeat(2, 1, 3, 1)),
}


def _interp(mode, **kw):
    import torch.nn.functional as F  # noqa: N812

    return lambda x, c: F.interpolate(x, mode=mode, **kw)


CNN_CASES.update({
    # torch.onnx's F.interpolate(scale_factor=2) (nearest: asymmetric, floor) and bilinear (pytorch_half_pixel)
    "resize-nearest-x2": ([_n("Resize", ["x", "", "sc"], mode="nearest", coordinate_transformation_mode="asymmetric",
                              nearest_mode="floor")], (2, 3, 3, 4), {"sc": np.array([1, 1, 2, 2], np.float32)},
                          _interp("nearest", scale_factor=2)),
    "resize-bilinear-half-pixel": ([_n("Resize", ["x", "", "sc"], mode="linear",
                                       coordinate_transformation_mode="pytorch_half_pixel")], (2, 3, 3, 4),
                                   {"sc": np.array([1, 1, 2, 1.5], np.float32)},
                                   _interp("bilinear", scale_factor=(2, 1.5), align_corners=False)),
    # F.interpolate(size=...): the sizes computed from the input's shape (batch and channels kept)
    "resize-bilinear-align-corners-sizes": ([_n("Shape", ["x"], ["s"], end=2), _n("Concat", ["s", "hw"], ["sz"], axis=0),
                                             _n("Resize", ["x", "", "", "sz"], mode="linear",
                                                coordinate_transformation_mode="align_corners")], (2, 3, 4, 3),
                                            {"hw": np.array([7, 5], np.int64)},
                                            _interp("bilinear", size=(7, 5), align_corners=True)),
    "resize-down-nearest": ([_n("Resize", ["x", "", "sc"], mode="nearest")], (2, 3, 6, 4),
                            {"sc": np.array([1, 1, 0.5, 0.5], np.float32)}, None),
})
