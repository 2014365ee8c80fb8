"""`python -m export.demo`: the README's main job.

Exports the default model (RN50 with the OpenAI weights, class set `voc`) to artifacts/, unless a valid
export is already there, and explains the sample image the repository ships, writing an overlay PNG,
the component grid, JSON and NPZ to outputs/.

Where the OpenAI weights cannot be obtained (offline), and only here, it falls back to seeded random
weights (`--pretrained none`): it says so on stderr, in the JSON (`weights_note`), and on the overlay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "scene.jpg"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="RN50")
    p.add_argument("--classes", default="voc")
    p.add_argument("--image", default=str(SAMPLE))
    p.add_argument("--artifacts-root", default=str(ROOT / "artifacts"))
    p.add_argument("--out", default=str(ROOT / "outputs"))
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
        art_dir = Path(args.artifacts_root) / f"{args.model}-openai"
    except PretrainedUnavailable as e:
        note = (f"OpenAI weights unavailable ({e}); this demo falls back to seeded RANDOM weights "
                f"(--pretrained none): the maps show the method, not what CLIP sees")
        print(f"WARNING: {note}", file=sys.stderr, flush=True)
        lm = None
        art_dir = Path(args.artifacts_root) / f"{args.model}-none"

    try:
        load_artifacts(art_dir)
        print(f"using the existing export in {art_dir}", file=sys.stderr)
    except ArtifactsError:
        if lm is None:
            lm = load_model(args.model, "none")
        res = export_model(lm, [get_class_set(args.classes)], art_dir)
        print(format_parity_table(res.report))
        print(f"exported {args.model} to {art_dir} in {res.seconds['total_s']:.1f} s")

    ex = Explainer.from_artifacts(art_dir)
    rgb = load_image(args.image)
    exp = ex.explain(rgb)
    exp.source = args.image
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_outputs(out, Path(args.image).stem, rgb, exp,
                          extra={"engine": "cpu", "artifacts": str(art_dir), "weights_note": note})
    top = ", ".join(f"{n} {p:.3f}" for n, p in exp.top5[:3])
    print(f"explained {args.image}: target '{exp.target_name}' (top: {top}); "
          f"{sum(exp.timings.values()) * 1e3:.0f} ms")
    for f in files:
        print(f"wrote {f}")
    if note:
        print("note: made with RANDOM weights (see the warning above and weights_note in the JSON)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
