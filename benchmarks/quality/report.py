"""Plain-text tables in the paper's formats (Table 1: pointing game, Table 2: binned deletion/insertion).

Every function takes the dicts returned by ``benchmarks.quality.evaluate`` and returns a string; nothing
here computes a metric.
"""

from __future__ import annotations

__all__ = ["display_name", "pointing_table", "pointing_per_class_table", "deletion_table",
           "mean_auc_table", "bins_table", "accuracy_table"]

_DISPLAY = {
    "gradcam": "GradCAM", "gradcam++": "GradCAM++", "wgradcam": "WGradCAM", "scorecam": "ScoreCAM",
    "scorecam++": "ScoreCAM++", "ablationcam": "AblationCAM", "decomcam": "Decom-CAM",
    "decomcam-authors": "Decom-CAM (authors' code)", "decomcam-gain-share": "Decom-CAM (gain-share)",
    "xgradcam": "XGradCAM", "layercam": "LayerCAM",
    "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM",
    "center_point": "Centre point (baseline)", "random_point": "Random point (baseline)",
    "random_saliency": "Random saliency (baseline)", "center_saliency": "Centre Gaussian (baseline)",
}


def display_name(name: str) -> str:
    return _DISPLAY.get(name, name)


def _rows(result: dict) -> list[tuple[str, dict]]:
    return [*result["methods"].items(), *result["baselines"].items()]


def _table(header: list[str], rows: list[list[str]], title: str) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule])


def pointing_table(result: dict) -> str:
    """Table 1: mean pointing-game accuracy over classes, methods then baselines."""
    rows = [[display_name(n), f"{100 * s['mean_accuracy']:.2f}"] for n, s in _rows(result)]
    title = (f"Table 1 - pointing game ({result['n_trials']} trials on {result['n_images']} images, "
             f"tolerance {result['tolerance']:g} px, resize {result['resize']})")
    return _table(["Method", "Accuracy(%)↑"], rows, title)


def pointing_per_class_table(result: dict) -> str:
    """Per-class pointing accuracy (%), one column per class."""
    classes = result["classes"]
    rows = [[display_name(n), *(f"{100 * s['per_class'].get(c, float('nan')):.1f}" for c in classes)]
            for n, s in _rows(result)]
    return _table(["Method", *classes], rows, "Pointing game per class (%)")


def deletion_table(result: dict) -> str:
    """Table 2: area under the metric-versus-accuracy curves of the binned protocol, in %."""
    rows = []
    for n, r in _rows(result):
        if r["binned"] is None:
            rows.append([display_name(n), "-", "-", "-"])
            continue
        a = r["binned"]["auc"]
        rows.append([display_name(n), f"{100 * a['insertion']:.2f}", f"{100 * a['deletion']:.2f}",
                     f"{100 * a['overall']:.2f}"])
    kept = next((r["binned"] for _, r in _rows(result) if r["binned"]), None)
    n_bins = len(kept["bins"]) if kept else 0
    title = (f"Table 2 - binned deletion/insertion protocol ({result['n_correct']} correctly predicted of "
             f"{result['n_images']} images in {n_bins} accuracy bins; step {result['step']} px = "
             f"{result['n_steps']} steps at {result['input_size']} px, {result['substrate']} substrate)")
    return _table(["Method", "Insertion(%)↑", "Deletion(%)↓", "Overall Score(%)↑"], rows, title)


def mean_auc_table(result: dict) -> str:
    """Plain RISE AUCs: mean over the correctly predicted images (no binning), in %."""
    rows = []
    for n, r in _rows(result):
        if r["mean"] is None:
            rows.append([display_name(n), "-", "-", "-"])
            continue
        m = r["mean"]
        rows.append([display_name(n), f"{100 * m['insertion']:.2f}", f"{100 * m['deletion']:.2f}",
                     f"{100 * m['overall']:.2f}"])
    return _table(["Method", "Insertion AUC(%)↑", "Deletion AUC(%)↓", "Ins - Del(%)↑"], rows,
                  f"Mean AUC over the {result['n_correct']} correctly predicted images (unbinned)")


def bins_table(result: dict, metric: str = "overall") -> str:
    """One metric per accuracy bin (the points of Figure 4), in %."""
    any_res = next((r["binned"] for _, r in _rows(result) if r["binned"]), None)
    if any_res is None:
        return "(no correctly predicted images)"
    heads = [f"{100 * b['lo']:.0f}-{100 * b['hi']:.0f}% (n={b['n']})" for b in any_res["bins"]]
    rows = [[display_name(n), *(f"{100 * b[metric]:.2f}" for b in r["binned"]["bins"])]
            for n, r in _rows(result) if r["binned"]]
    return _table(["Method", *heads], rows, f"{metric.capitalize()} per accuracy bin (%)")


def accuracy_table(result: dict) -> str:
    """The model's per-class accuracy and the bin each class falls in."""
    bin_of = {c: int(b) for b, cs in result["bins"].items() for c in cs}
    rows = [[c, f"{100 * a:.1f}", f"{100 * result['bin_width'] * bin_of[c]:.0f}-"
             f"{100 * result['bin_width'] * (bin_of[c] + 1):.0f}%"] for c, a in result["per_class_accuracy"].items()]
    title = f"Model accuracy per class (overall {100 * result['accuracy']:.1f}% on {result['n_images']} images)"
    return _table(["Class", "Accuracy(%)", "Bin"], rows, title)
