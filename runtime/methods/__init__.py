"""Saliency methods over the exported graphs: Decom-CAM and the CAM baselines.

Each method is one small module registering a `Method` subclass under its CLI name. `get_method(name)`
returns an instance; an unknown name lists the registered ones. The CAM baselines share one pipeline
(base_cam.BaseCam) and override one hook each.
"""

from __future__ import annotations

from .base import METHODS, Method, MethodContext, MethodOutput, get_method, list_methods, register  # noqa: F401
from . import decomcam  # noqa: F401,E402  (registers "decomcam" and "decomcam-authors")
from . import (  # noqa: F401,E402  (each registers one CAM baseline)
    gradcam,
    gradcampp,
    xgradcam,
    layercam,
    wgradcam,
    scorecam,
    scorecampp,
    ablationcam,
    eigencam,
    eigengradcam,
)
