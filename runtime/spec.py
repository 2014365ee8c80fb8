"""Graph contracts: the seam between export/ and runtime/.

Each ONNX graph the toolkit writes is declared here exactly once: its input and output names, element
types, axes (symbolic names for dynamic axes, integers or model-dependent names for static ones) and the
tolerances its export is validated with. export/ reads these declarations to export and validate;
runtime/ reads them (through the manifest) to bind inputs and outputs. Nothing here imports torch.

Two model families share the five graph names (see FAMILIES):
    clip            open_clip's CLIP ResNets: the classes are data, a `text` input of class embeddings [L, D]
    pooled-linear   CNN classifiers whose head is global average pooling + a small MLP (Linear, elementwise
                    activations, LayerNorm), optionally after a position-wise 1x1 conv head (Conv 1x1, BatchNorm,
                    activation at every position): the classes are fixed, logits [batch, K], no `text` input

Axis names:
    batch  dynamic, images per call
    L      dynamic, classes in the class set (clip)
    K      static per model, the classifier's fixed classes (pooled-linear)
    H, W   static per model, the input resolution
    C      static per model, channels of the target layer (2048 for RN50)
    h, w   static per model, spatial size of the target layer (7x7 at 224 px)
    D      static per model, the embedding width (1024 for RN50; clip only)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DYNAMIC_AXES = ("batch", "L")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str              # numpy dtype name: "float32" or "int64"
    axes: tuple[str, ...]   # axis names; those in DYNAMIC_AXES are dynamic, the rest are fixed per model

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given axis sizes."""
        return tuple(int(dims[a]) for a in self.axes)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes)}


@dataclass(frozen=True)
class Tolerance:
    atol: float  # in units of the reference's max |value|: an element fails when
    rtol: float  # |out - ref| > atol * max|ref| + rtol * |ref|


@dataclass(frozen=True)
class GraphSpec:
    name: str                                   # graph name; the file is f"{name}.onnx"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerances: dict[str, Tolerance] = field(default_factory=dict)  # per output, fp32 ORT-CPU vs eager torch
    doc: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`{tensor: {axis index: axis name}}` for the dynamic axes, in torch.onnx's format."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            dyn = {i: a for i, a in enumerate(t.axes) if a in DYNAMIC_AXES}
            if dyn:
                out[t.name] = dyn
        return out

    def check_feed(self, feed: dict[str, np.ndarray], dims: dict[str, int] | None = None) -> None:
        """Raise ValueError when a feed's names, dtypes or fixed axes do not match the declaration."""
        names = set(feed)
        expected = set(self.input_names)
        if names != expected:
            raise ValueError(f"{self.filename}: inputs {sorted(names)} do not match the declared {sorted(expected)}")
        for t in self.inputs:
            arr = feed[t.name]
            if str(arr.dtype) != t.dtype:
                raise ValueError(f"{self.filename}: input '{t.name}' has dtype {arr.dtype}, expected {t.dtype}")
            if arr.ndim != len(t.axes):
                raise ValueError(f"{self.filename}: input '{t.name}' has {arr.ndim} dims, expected {len(t.axes)} {t.axes}")
            if dims:
                for size, axis in zip(arr.shape, t.axes):
                    if axis not in DYNAMIC_AXES and axis in dims and size != dims[axis]:
                        raise ValueError(
                            f"{self.filename}: input '{t.name}' axis {axis} is {size}, expected {dims[axis]}"
                        )

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "tolerances": {k: {"atol": v.atol, "rtol": v.rtol} for k, v in self.tolerances.items()},
        }


_IMAGE = TensorSpec("image", "float32", ("batch", "3", "H", "W"))   # normalised with the model's mean/std
_TEXT = TensorSpec("text", "float32", ("L", "D"))                    # L2-normalised class embeddings
_LOGITS = TensorSpec("logits", "float32", ("batch", "L"))            # logit_scale * cos(image, text)

EXPLAIN = GraphSpec(
    name="explain",
    inputs=(_IMAGE, _TEXT, TensorSpec("target", "int64", ("batch",))),
    outputs=(
        _LOGITS,
        TensorSpec("activations", "float32", ("batch", "C", "h", "w")),
        TensorSpec("gradients", "float32", ("batch", "C", "h", "w")),  # d logits[b, t_b] / d activations
    ),
    tolerances={
        "logits": Tolerance(atol=1e-3, rtol=1e-3),
        "activations": Tolerance(atol=1e-3, rtol=1e-3),
        "gradients": Tolerance(atol=2e-3, rtol=1e-2),
    },
    doc="Forward to logits plus the target layer's activations and the target logit's gradient (explicit "
        "backward). t_b = target[b], or the top-1 class where target[b] < 0.",
)

CLASSIFY = GraphSpec(
    name="classify",
    inputs=(_IMAGE, _TEXT),
    outputs=(_LOGITS,),
    tolerances={"logits": Tolerance(atol=1e-3, rtol=1e-3)},
    doc="Zero-shot classifier: logits of a batch of images against the class embeddings.",
)

HEAD = GraphSpec(
    name="head",
    inputs=(TensorSpec("activations", "float32", ("batch", "C", "h", "w")), _TEXT),
    outputs=(_LOGITS,),
    tolerances={"logits": Tolerance(atol=1e-3, rtol=1e-3)},
    doc="The part of the network after the target layer (attention pool, projection, cosine logits).",
)

FEATURES = GraphSpec(
    name="features",
    inputs=(_IMAGE, _TEXT),
    outputs=(_LOGITS, TensorSpec("activations", "float32", ("batch", "C", "h", "w"))),
    tolerances={
        "logits": Tolerance(atol=1e-3, rtol=1e-3),
        "activations": Tolerance(atol=1e-3, rtol=1e-3),
    },
    doc="Forward only: logits plus the target layer's activations, no backward subgraph (for the "
        "gradient-free methods: Score-CAM, Ablation-CAM, EigenCAM).",
)

HEAD_GRAD = GraphSpec(
    name="head_grad",
    inputs=(TensorSpec("activations", "float32", ("batch", "C", "h", "w")), _TEXT,
            TensorSpec("target", "int64", ("batch",))),
    outputs=(
        _LOGITS,
        TensorSpec("gradients", "float32", ("batch", "C", "h", "w")),  # d logits[b, t_b] / d activations
    ),
    tolerances={
        "logits": Tolerance(atol=1e-3, rtol=1e-3),
        "gradients": Tolerance(atol=2e-3, rtol=1e-2),
    },
    doc="The head on given activations plus the target logit's gradient at them (explicit backward): the "
        "gradient anywhere in activation space, e.g. along the path alpha * A of decomcam-ig. t_b = target[b], "
        "or the top-1 class at those activations where target[b] < 0.",
)

# the clip family's graphs; head_grad is optional in a manifest (exports before it lack it; only decomcam-ig runs it)
GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (EXPLAIN, CLASSIFY, HEAD, FEATURES, HEAD_GRAD)}


def _fixed_classes(g: GraphSpec) -> GraphSpec:
    """The same graph for a fixed-class model: no `text` input, logits over the K fixed classes."""
    def fix(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple("K" if a == "L" else a for a in t.axes))

    return GraphSpec(name=g.name, inputs=tuple(fix(t) for t in g.inputs if t.name != "text"),
                     outputs=tuple(fix(t) for t in g.outputs), tolerances=dict(g.tolerances),
                     doc=g.doc.replace("class embeddings", "the fixed classes"))


@dataclass(frozen=True)
class Family:
    name: str
    text_input: bool        # True: the class set is data (a `text` input); False: classes fixed in the graph
    graphs: dict            # graph name -> GraphSpec
    doc: str = ""


FAMILIES: dict[str, Family] = {
    "clip": Family("clip", True, GRAPHS,
                   "open_clip ModifiedResNet + attention pool; cosine logits against class embeddings"),
    "pooled-linear": Family("pooled-linear", False, {n: _fixed_classes(g) for n, g in GRAPHS.items()},
                            "CNN trunk + [a position-wise 1x1 conv head] + global average pooling + a small "
                            "head (Linear, ReLU/Hardswish, LayerNorm); fixed classes"),
}
DEFAULT_FAMILY = "clip"  # a manifest without a `family` field was written before families existed


def family(name: str | None) -> Family:
    """The declaration of a model family; an unknown name lists the valid ones."""
    key = name or DEFAULT_FAMILY
    if key not in FAMILIES:
        raise ValueError(f"unknown model family '{key}'; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[key]


MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
