"""The manifest's schema: one declarative table of fields, checked once when an artifacts folder is opened.

Each field is a `Field` (type, whether it is required, range, choices, pattern, nested fields); a new
manifest field is one line in the tables below. Unknown fields are allowed (newer exporters may add
some). `validate_manifest` raises one `ManifestError` naming `manifest.json` and the first bad field, e.g.

    artifacts/RN50/manifest.json: field 'graphs.explain.sha256': expected 64 lowercase hex digits, got 'abc'

Graph entries are checked for shape here; whether their inputs and outputs are this runtime's contract is
checked per graph by `Artifacts.check_graph`. Optional fields and their defaults:
    family        one of runtime/spec.py FAMILIES: "clip" (text embeddings as class weights) or "pooled-linear"
                  (fixed classes); default spec.DEFAULT_FAMILY ("clip", written before families existed)
    preprocess    {resize: crop|stretch, resize_size: 1..8192, interpolation: bicubic|bilinear};
                  crop at input_size, bicubic
    class_sets.*  `embeddings` (required for "clip"), `sha256` (required with embeddings), `labels_sha256`
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .spec import DEFAULT_FAMILY, FAMILIES as _FAMILIES, MANIFEST_VERSION

FAMILIES = tuple(_FAMILIES)   # the families runtime/spec.py declares
SET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")  # class-set and graph names: plain identifiers
SET_NAME_RULE = "letters, digits, '_' and '-', at most 64, not starting with '-'"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that does not follow the schema (one line naming the file and the field)."""


@dataclass(frozen=True)
class Field:
    kind: str                        # int | number | str | bool | path | list | object | map | any
    required: bool = True
    lo: float | None = None          # inclusive bounds (int, number)
    hi: float | None = None
    gt: float | None = None          # exclusive lower bound (number)
    choices: tuple = ()              # allowed values
    pattern: re.Pattern | None = None
    pattern_doc: str = ""
    length: int | None = None        # exact list length
    items: "Field | None" = None     # list items
    fields: dict = field(default_factory=dict)  # object members
    values: "Field | None" = None    # map values (keys are SET_NAME identifiers)
    nullable: bool = False


def opt(kind: str, **kw) -> Field:
    return Field(kind, required=False, **kw)


HEX64 = dict(pattern=_HEX64, pattern_doc="64 lowercase hex digits")
TENSOR = Field("object", fields={
    "name": Field("str"),
    "dtype": Field("str", choices=("float32", "float16", "int64")),
    "axes": Field("list", items=Field("str")),
})
GRAPH = Field("object", fields={
    "file": Field("path"),
    "sha256": Field("str", **HEX64),
    "bytes": opt("int", lo=0),
    "inputs": Field("list", items=TENSOR),
    "outputs": Field("list", items=TENSOR),
    "tolerances": opt("any"),
})
PRECISION = Field("object", fields={   # precisions.fp16 (export/precision.py), precisions.int8 (export/quantize.py)
    "graphs": Field("map", values=GRAPH),
    "converter": opt("any"),
    "quantization": opt("any"),
    "validation": opt("any"),
})
CLASS_SET = Field("object", fields={
    "labels": Field("path"),
    "embeddings": opt("path"),
    "count": Field("int", lo=1, hi=10_000_000),
    "templates": opt("list", items=Field("str")),
    "sha256": opt("str", **HEX64),
    "labels_sha256": opt("str", **HEX64),
})
PREPROCESS = Field("object", fields={
    "resize": opt("str", choices=("crop", "stretch")),
    "resize_size": opt("int", lo=1, hi=8192),
    "interpolation": opt("str", choices=("bicubic", "bilinear")),
})
DIMS = Field("object", fields={
    "C": Field("int", lo=1, hi=1 << 20),
    "h": Field("int", lo=1, hi=8192),
    "w": Field("int", lo=1, hi=8192),
    "D": opt("int", lo=1, hi=1 << 20),
    "K": opt("int", lo=1, hi=10_000_000),   # fixed-class families: the classifier's outputs
    "H": opt("int", lo=1, hi=8192),
    "W": opt("int", lo=1, hi=8192),
})
MANIFEST = Field("object", fields={
    "format_version": Field("int", choices=(MANIFEST_VERSION,)),
    "model": Field("str"),
    "family": opt("str", choices=FAMILIES),
    "pretrained": opt("str"),
    "pretrained_id": opt("str"),
    "random_weights": opt("bool"),
    "target_layer": opt("str"),
    "input_size": Field("int", lo=1, hi=4096),
    "preprocess": opt("object", fields=PREPROCESS.fields),
    "mean": Field("list", length=3, items=Field("number", lo=0.0, hi=1.0)),
    "std": Field("list", length=3, items=Field("number", gt=0.0, hi=1000.0)),
    "logit_scale": Field("number", gt=0.0, hi=1e6),
    "dims": DIMS,
    "opset": opt("int", lo=1, hi=1000),
    "versions": opt("any"),
    "graphs": Field("map", values=GRAPH),
    "precisions": opt("map", values=PRECISION),
    "class_sets": opt("map", values=CLASS_SET),
    "default_class_set": opt("str", nullable=True),
    "validation": opt("any"),
})

_TYPE_NAMES = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
               "path": "a relative path", "list": "a list", "object": "an object", "map": "an object"}


def _check(value, f: Field, where: str) -> None:
    def bad(problem: str):
        raise ManifestError(f"field '{where}': {problem}")

    if value is None:
        if f.nullable:
            return
        bad(f"expected {_TYPE_NAMES.get(f.kind, 'a value')}, got null")
    k = f.kind
    if k == "any":
        return
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "path": isinstance(value, str), "bool": isinstance(value, bool),
          "list": isinstance(value, list), "object": isinstance(value, dict), "map": isinstance(value, dict)}[k]
    if not ok:
        bad(f"expected {_TYPE_NAMES[k]}, got {type(value).__name__} {str(value)[:40]!r}")
    if k in ("int", "number"):
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"expected a finite number, got {value}")
        if (f.lo is not None and value < f.lo) or (f.hi is not None and value > f.hi) or \
                (f.gt is not None and value <= f.gt):   # exact for integers of any size
            low = f"> {f.gt:g}" if f.gt is not None else f">= {f.lo:g}" if f.lo is not None else ""
            high = f"<= {f.hi:g}" if f.hi is not None else ""
            shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
            bad(f"{shown} is out of range (valid: {' and '.join(x for x in (low, high) if x)})")
    if f.choices and value not in f.choices:
        bad(f"{value!r} is not one of {', '.join(map(repr, f.choices))}")
    if f.pattern is not None and not f.pattern.match(value):
        bad(f"expected {f.pattern_doc}, got {value[:70]!r}")
    if k == "path":
        p = PurePosixPath(value)
        if not value or p.is_absolute() or ".." in p.parts or "\\" in value or "\0" in value:
            bad(f"expected a relative path inside the artifacts folder, got {value[:70]!r}")
    if k == "list":
        if f.length is not None and len(value) != f.length:
            bad(f"expected {f.length} values, got {len(value)}")
        for i, v in enumerate(value):
            _check(v, f.items, f"{where}[{i}]")
    if k == "object":
        for name, sub in f.fields.items():
            if name not in value:
                if sub.required:
                    bad_where = f"{where}.{name}" if where else name
                    raise ManifestError(f"field '{bad_where}': missing")
                continue
            _check(value[name], sub, f"{where}.{name}" if where else name)
    if k == "map":
        for name, v in value.items():
            if not SET_NAME.match(name):
                bad(f"name {name[:70]!r} is not a plain identifier ({SET_NAME_RULE})")
            _check(v, f.values, f"{where}.{name}")


def validate_manifest(manifest, path="manifest.json") -> dict:
    """Check `manifest` (parsed JSON) against MANIFEST and the rules between fields; return it.

    Raises ManifestError "{path}: field '...': problem"."""
    try:
        if not isinstance(manifest, dict):
            raise ManifestError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
        _check(manifest, MANIFEST, "")
        text_input = _FAMILIES[manifest.get("family", DEFAULT_FAMILY)].text_input
        sets = manifest.get("class_sets") or {}
        default = manifest.get("default_class_set")
        if default is not None and default not in sets:
            raise ManifestError(f"field 'default_class_set': {default!r} is not one of the class sets "
                                f"({', '.join(sets) or 'none'})")
        rs = (manifest.get("preprocess") or {}).get("resize_size")
        if rs is not None and rs < manifest["input_size"]:
            raise ManifestError(f"field 'preprocess.resize_size': {rs} is smaller than input_size "
                                f"{manifest['input_size']}")
        dims = manifest["dims"]
        for axis in ("H", "W"):
            if axis in dims and dims[axis] != manifest["input_size"]:
                raise ManifestError(f"field 'dims.{axis}': {dims[axis]} differs from input_size {manifest['input_size']}")
        if text_input and "D" not in manifest["dims"]:
            raise ManifestError(f"field 'dims.D': missing (needed by the {manifest.get('family', DEFAULT_FAMILY)} "
                                f"family's text input)")
        for name, entry in sets.items():
            if text_input and "embeddings" not in entry:
                raise ManifestError(f"field 'class_sets.{name}.embeddings': missing (needed by the "
                                    f"{manifest.get('family', DEFAULT_FAMILY)} family's text input)")
            if "embeddings" in entry and "sha256" not in entry:
                raise ManifestError(f"field 'class_sets.{name}.sha256': missing (the embeddings' checksum)")
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    except (RecursionError, OverflowError, TypeError, ValueError) as e:  # nesting or numbers no field allows
        raise ManifestError(f"{path}: malformed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return manifest
