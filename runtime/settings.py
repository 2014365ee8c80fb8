"""The explanation settings: one dataclass that the CLI builds from its arguments and the Python API, the Ray
job and the server use as they are.

    s = Settings(method="decomcam-ig", top_p=5, engine="cpu", threads=2)
    ex = Explainer.from_artifacts("artifacts/RN50", s)

Every field is checked when a Settings is made (one line naming the field and its valid values: a
`SettingsError`, a ValueError). The ranges live here once; the CLI's argument types are built from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

# integer fields: (lowest, highest) accepted
INT_RANGES = {
    "top_p": (1, 4096),
    "ig_steps": (1, 1024),
    "batch_size": (1, 4096),
    "threads": (1, 1024),
    "device_id": (0, 1023),
    "max_pixels": (1, 1 << 40),
    "max_bytes": (1, 1 << 40),
}
BLUR_SIGMA_MAX = 1000.0
MAX_ASPECT_MAX = 1e6
ENGINES = ("cpu", "cuda", "trt")
PRECISIONS = ("fp32", "fp16", "fp16-masks", "int8")
RESIZES = ("crop", "stretch")
_INDEX = re.compile(r"-?[0-9]+")   # ASCII digits only ('²'.isdigit() is True, int('²') fails)


class SettingsError(ValueError):
    """A setting outside its valid values (one line naming the field)."""


def parse_target(text: str | None):
    """A --target argument: an index when it is ASCII digits (with an optional minus), else a class name."""
    if text is None:
        return None
    return int(text) if _INDEX.fullmatch(text) else text


@dataclass(frozen=True)
class Settings:
    # what is explained
    method: str = "decomcam"         # see runtime.methods.list_methods()
    top_p: int = 10                  # Decom-CAM components p
    target: int | str | None = None  # class index or name; None = each image's top-1 class
    class_set: str | None = None     # CLIP exports: the class set (None = the manifest's default)
    resize: str | None = None        # "crop" | "stretch"; None = the export's own policy (manifest)
    ig_steps: int = 16               # decomcam-ig: midpoints of the path alpha * A
    blur_sigma: float | None = None  # Decom-CAM's reference blur, model-input pixels (None = 10 * S / 224)
    # how it runs
    engine: str = "cpu"              # cpu | cuda | trt
    precision: str = "fp32"          # fp32 | fp16 | fp16-masks | int8 (the export's graphs of that precision)
    batch_size: int = 32             # images per graph call
    threads: int | None = None       # ORT intra-op threads and the image pool (None: ORT's choice / up to 8)
    device_id: int = 0               # GPU ordinal (cuda, trt)
    fp16: bool = False               # TensorRT's fp16 (trt only)
    cuda_graph: bool = False         # CUDA graphs (cuda only; runtime/runner.py)
    device_images: bool | None = None  # preprocess where the graphs run (None: on a GPU back end)
    # limits on each input (checked before decoding, from the file and its header)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_aspect: float = DEFAULT_MAX_ASPECT   # long side / short side

    def __post_init__(self):
        for name, (lo, hi) in INT_RANGES.items():
            v = getattr(self, name)
            if v is None and name == "threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SettingsError(f"{name} must be an integer in [{lo:,}, {hi:,}], got {v!r}")
        if self.blur_sigma is not None and not (_number(self.blur_sigma)
                                                and 0 < self.blur_sigma <= BLUR_SIGMA_MAX):
            raise SettingsError(f"blur_sigma must be a finite number in (0, {BLUR_SIGMA_MAX:g}], got {self.blur_sigma!r}")
        if not (_number(self.max_aspect) and 1 <= self.max_aspect <= MAX_ASPECT_MAX):
            raise SettingsError(f"max_aspect must be a number in [1, {MAX_ASPECT_MAX:g}], got {self.max_aspect!r}")
        for name, valid in (("engine", ENGINES), ("precision", PRECISIONS)):
            if getattr(self, name) not in valid:
                raise SettingsError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.resize is not None and self.resize not in RESIZES:
            raise SettingsError(f"unknown resize {self.resize!r}; valid: {', '.join(RESIZES)} (or None: the export's)")
        if isinstance(self.target, bool) or not (self.target is None or isinstance(self.target, (int, str))):
            raise SettingsError(f"target must be a class index, a class name or None, got {self.target!r}")
        for name in ("fp16", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.device_images is None or isinstance(self.device_images, bool)):
            raise SettingsError(f"device_images must be True, False or None, got {self.device_images!r}")
        from .methods import list_methods

        if self.method not in list_methods():
            raise SettingsError(f"unknown method '{self.method}'; valid methods: {', '.join(list_methods())}")

    def with_(self, **kw) -> "Settings":
        return replace(self, **kw)

    def config(self):
        """The method's numeric settings (runtime.config.DecomCamConfig)."""
        from .config import DecomCamConfig

        return DecomCamConfig(top_p=self.top_p, blur_sigma=self.blur_sigma, ig_steps=self.ig_steps)

    def engine_options(self, allow_spinning: bool = True):
        """ONNX Runtime options (runtime.engines.EngineOptions) for these settings."""
        from .engines import EngineOptions

        return EngineOptions(device_id=self.device_id, fp16=self.fp16, intra_op_threads=self.threads,
                             allow_spinning=allow_spinning, cuda_graph=self.cuda_graph)



def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
