"""The upsampling kernel on the synthetic benchmark: CAM maps upsampled bicubically instead of bilinearly.

    python -m benchmarks.quality.kernel_check {gain-share|baselines} [--out DIR] [--json FILE] [--quick]

A measurement for the integration study (benchmarks/README.md, "Third round"). The runtime upsamples every
CAM map bilinearly by default (OpenCV, half-pixel centres), as pytorch-grad-cam does; one method instance can
take the bicubic kernel (`BaseCam.kernel`, the quality benchmark's `--methods gradcam:kernel=bicubic`). Here
`bicubic(...)` switches the default, for one process and every CAM at once, to OpenCV's bicubic kernel:
- "gain-share": the final upsampling of Decom-CAM's gain-share integration (runtime.decomcam.integrate_share),
  run with Grad-CAM and LayerCAM left bilinear;
- "baselines": the upsampling of every gradient CAM (runtime.methods.base_cam.upsample, bilinear mode):
  Grad-CAM, LayerCAM and Ablation-CAM.
The trained model, data and protocol are the synthetic benchmark's (benchmarks/quality/synthetic.py: the cached
model when there is one); the output is its JSON and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

CHOICES = {"gain-share": ("decomcam-gain-share", "gradcam", "layercam"),
           "baselines": ("gradcam", "layercam", "ablationcam")}


@contextlib.contextmanager
def bicubic(which: str):
    """Within the block, the CAM upsampling named by `which` ("gain-share" or "baselines") is bicubic."""
    import runtime.decomcam as dc
    import runtime.methods.base_cam as bc

    if which == "gain-share":
        orig = dc.integrate_share

        def integrate_share(be, y_masked, y_blur, dec, h, w, size):
            own = vars(be).get("resize")                     # an instance attribute, if the backend has one
            real = be.resize
            be.resize = lambda maps, s, interpolation="bilinear": real(maps, s, "bicubic")
            try:
                return orig(be, y_masked, y_blur, dec, h, w, size)
            finally:
                if own is None:
                    del be.resize                            # back to the class's method
                else:
                    be.resize = own

        dc.integrate_share = integrate_share
        try:
            yield
        finally:
            dc.integrate_share = orig
    elif which == "baselines":
        orig_up = bc.upsample

        def upsample(be, maps, size, mode="bilinear"):
            if mode == "bilinear":
                return be.resize(maps.astype(be.xp.float32), size, "bicubic")
            return orig_up(be, maps, size, mode)

        bc.upsample = upsample
        try:
            yield
        finally:
            bc.upsample = orig_up
    else:
        raise ValueError(f"unknown choice '{which}'; valid: {', '.join(CHOICES)}")


def main(argv=None) -> int:
    from .synthetic import FULL, QUICK, run_synthetic

    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.kernel_check", description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=tuple(CHOICES))
    p.add_argument("--out", default="outputs/kernel-check", help="work folder (default outputs/kernel-check)")
    p.add_argument("--json", default=None, help="write the synthetic benchmark's JSON here")
    p.add_argument("--quick", action="store_true", help="the tiny synthetic run (measures nothing)")
    args = p.parse_args(argv)
    with bicubic(args.which):
        res = run_synthetic(QUICK if args.quick else FULL, Path(args.out) / args.which, CHOICES[args.which],
                            plot=False)
    print(f"| method ({args.which} bicubic) | pointing tol 0 (%) | insertion / deletion / ins - del (%) "
          "| Table-2 overall |")
    print("|:--|--:|--:|--:|")
    for m, v in res["pointing_game"]["methods"].items():
        di = res["deletion_insertion"]["methods"][m]
        mean = di["mean"]
        print(f"| {m} | {100 * v['mean_accuracy']:.1f} | {100 * mean['insertion']:.1f} / {100 * mean['deletion']:.1f}"
              f" / {100 * mean['overall']:.1f} | {100 * di['binned']['auc']['overall']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
