"""Plain-text tables in the paper's formats (Table 1: pointing game, Table 2: binned deletion/insertion).

Every function takes the dicts returned by ``benchmarks.quality.evaluate`` and returns a string; nothing
here computes a metric.
"""

from __future__ import annotations

__all__ = ["display_name", "pointing_table", "pointing_per_class_table", "deletion_table",
           "mean_auc_table", "bins_table", "accuracy_table", "real_pointing_table", "real_deletion_table",
           "real_mean_table", "real_seconds_table", "real_center_miss_table", "real_road_table",
           "real_pairs_table", "metric_label"]

_DISPLAY = {
    "gradcam": "GradCAM", "gradcam++": "GradCAM++", "wgradcam": "WGradCAM", "scorecam": "ScoreCAM",
    "scorecam++": "ScoreCAM++", "ablationcam": "AblationCAM", "decomcam": "Decom-CAM",
    "decomcam-authors": "Decom-CAM (authors' code)",
    "decomcam-ig": "Decom-CAM (IG)",
    "xgradcam": "XGradCAM", "layercam": "LayerCAM",
    "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM",
    "center_point": "Centre point (baseline)", "random_point": "Random point (baseline)",
    "random_saliency": "Random saliency (baseline)", "center_saliency": "Centre Gaussian (baseline)",
}


def display_name(name: str) -> str:
    """The table label: "gradcam:kernel=bicubic" -> "GradCAM (bicubic)", "decomcam-ig:top_p=5" ->
    "Decom-CAM (IG) (p = 5)" (benchmarks/quality/evaluate.py METHOD_OPTIONS)."""
    base, *opts = name.split(":")
    label = _DISPLAY.get(base, base)
    for o in opts:
        key, _, val = o.partition("=")
        label += f" ({val})" if key == "kernel" else f" (p = {val})" if key == "top_p" else f" ({o})"
    return label


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


# --------------------------------------------------------------------------------------------------
# Real-data run (benchmarks.quality.real): the same tables with n and bootstrap intervals
# --------------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def _ci(lo_hi) -> str:
    if lo_hi is None or lo_hi[0] is None or lo_hi[0] != lo_hi[0]:
        return "-"
    return f"[{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"


def _mci(entry) -> tuple[str, str]:
    """(mean in %, CI) of a {"mean", "ci"} entry, or dashes."""
    if not entry:
        return "-", "-"
    return _pct(entry["mean"]), _ci(entry["ci"])


def real_pointing_table(res: dict, protocol: dict, title_extra: str = "") -> str:
    """Table 1: pointing accuracy and the energy-based pointing game per method (rows) and tolerance, with
    95% CIs and n; the point baselines have no map (no energy)."""
    tols = [f"{t:g}" for t in protocol["pointing_game"]["tolerances_px"]]
    level = protocol["bootstrap"]["level"]
    head = ["Method", "n"]
    for t in tols:
        head += [f"Acc@{t}px(%)↑", f"{100 * level:g}% CI", f"Energy@{t}px(%)↑", f"{100 * level:g}% CI"]
    pg, en = res["pointing_game"], res.get("energy") or {"methods": {}, "baselines": {}}
    rows = []
    for n, s in [*pg["methods"].items(), *pg["baselines"].items()]:
        e = en["methods"].get(n) or en["baselines"].get(n) or {}
        row = [display_name(n), str(s[tols[0]]["n"])]
        for t in tols:
            row += [_pct(s[t]["accuracy"]), _ci(s[t]["ci"]), *_mci(e.get(t))]
        rows.append(row)
    title = (f"Table 1 - pointing game and energy-based pointing{title_extra} (explained class = label; stretch "
             f"resize to {protocol['input_size']} px, boxes scaled; energy = share of the map's positive mass in "
             f"the boxes; bootstrap over images, {protocol['bootstrap']['n_resamples']} resamples)")
    return _table(head, rows, title)


def real_center_miss_table(res: dict, protocol: dict) -> str:
    """Table 1b: the same on the centre-miss photos (per tolerance: the photos whose boxes do not hold the
    centre; the centre point scores 0 there by construction)."""
    tols = [f"{t:g}" for t in protocol["pointing_game"]["tolerances_px"]]
    level = protocol["bootstrap"]["level"]
    cm = res["center_miss"]
    head = ["Method"]
    for t in tols:
        head += [f"Acc@{t}px(%)↑", f"{100 * level:g}% CI", f"Energy@{t}px(%)↑", f"{100 * level:g}% CI", "n"]
    names = list(dict.fromkeys(n for t in tols for n in [*cm[t]["methods"], *cm[t]["baselines"]]))
    rows = []
    for n in names:
        row = [display_name(n)]
        for t in tols:
            e = cm[t]["methods"].get(n) or cm[t]["baselines"].get(n)
            if e is None:
                row += ["-"] * 5
                continue
            row += [*_mci(e["pointing"]), *_mci(e["energy"]), str(e["pointing"]["n"])]
        rows.append(row)
    sizes = ", ".join(f"{cm[t]['n_images']} at {t} px" for t in tols)
    title = (f"Table 1b - the centre-miss photos (boxes grown by the tolerance do not hold the photo's centre: "
             f"{sizes}; the centre point scores 0 there by construction)")
    return _table(head, rows, title)


def real_road_table(part: dict, protocol: dict, title_extra: str = "") -> str:
    """Table 3: ROAD (noisy linear imputation): MoRF, LeRF and (LeRF - MoRF) / 2, means over the fractions
    and the correctly predicted photos, 95% CIs."""
    level = protocol["bootstrap"]["level"]
    road = protocol.get("road") or {}
    head = ["Method", "n correct", "MoRF(%)↓", f"{100 * level:g}% CI", "LeRF(%)↑", f"{100 * level:g}% CI",
            "(LeRF-MoRF)/2(%)↑", f"{100 * level:g}% CI"]
    rows = []
    for n, r in [*part["methods"].items(), *part["baselines"].items()]:
        if r is None:
            rows.append([display_name(n), "0", *["-"] * 6])
            continue
        rows.append([display_name(n), str(r["n_correct"]), *_mci(r["morf"]), *_mci(r["lerf"]), *_mci(r["combined"])])
    fr = road.get("fractions") or []
    frs = f"{100 * fr[0]:g}%, ..., {100 * fr[-1]:g}% ({len(fr)} fractions)" if fr else "-"
    title = (f"Table 3 - ROAD{title_extra} (correct images only; remove {frs} of the pixels, noisy linear "
             f"imputation; softmax probability of the label, mean over the fractions)")
    return _table(head, rows, title)


METRIC_LABELS = {"pointing": "pointing", "energy": "energy", "pointing_cm": "pointing, centre-miss",
                 "energy_cm": "energy, centre-miss", "insertion": "insertion", "deletion": "deletion",
                 "ins_del": "ins - del", "morf": "ROAD MoRF", "lerf": "ROAD LeRF", "road": "ROAD (LeRF-MoRF)/2"}


def metric_label(key: str) -> str:
    """"pointing@15" -> "pointing @15 px"; "ins_del" -> "ins - del"."""
    base, _, tol = key.partition("@")
    return METRIC_LABELS.get(base, base) + (f" @{tol} px" if tol else "")


def real_pairs_table(rows: list[dict]) -> str:
    """Paired differences A - B, one line per pair and metric: the mean difference in points with its 95%
    bootstrap interval and the photos both ran on (lower is better for deletion and MoRF)."""
    lines = ["Paired differences A - B (points; bootstrap over the photos both methods ran on, 95%; lower is "
             "better for deletion and MoRF)",
             "| A - B | metric | difference [95% CI] | n photos |", "|:--|:--|--:|--:|"]
    for r in rows:
        for key, m in r["metrics"].items():
            if m is None:
                continue
            units = f" on {m['n_units']} photos" if m.get("n_units", m["n"]) != m["n"] else ""
            lines.append(f"| {r['a']} - {r['b']} | {metric_label(key)} | {m['estimate']:+.2f} "
                         f"[{m['lo']:.2f}, {m['hi']:.2f}] | {m['n']}{units} |")
    return "\n".join(lines)


def real_deletion_table(part: dict, protocol: dict, title_extra: str = "") -> str:
    """Table 2: binned insertion, deletion and overall (area under metric-versus-accuracy), 95% CIs, n."""
    di = protocol["deletion_insertion"]
    level = protocol["bootstrap"]["level"]
    head = ["Method", "n", "n correct", "Insertion(%)↑", f"{100 * level:g}% CI", "Deletion(%)↓",
            f"{100 * level:g}% CI", "Overall(%)↑", f"{100 * level:g}% CI"]
    rows = []
    for n, r in [*part["methods"].items(), *part["baselines"].items()]:
        if r["binned"] is None:
            rows.append([display_name(n), str(r["n_images"]), "0", *["-"] * 6])
            continue
        a, ci = r["binned"]["auc"], r["ci"]
        rows.append([display_name(n), str(r["n_images"]), str(r["n_correct"]),
                     _pct(a["insertion"]), _ci(ci["insertion"]), _pct(a["deletion"]), _ci(ci["deletion"]),
                     _pct(a["overall"]), _ci(ci["overall"])])
    title = (f"Table 2 - binned deletion/insertion{title_extra} (correct images only; {di['n_steps']} steps of "
             f"{di['step_px']} px at {protocol['input_size']} px; deletion to '{di['substrates']['deletion']}', "
             f"insertion from '{di['substrates']['insertion']}'; softmax probability of the label)")
    return _table(head, rows, title)


def real_mean_table(part: dict, protocol: dict) -> str:
    """Unbinned RISE AUCs: means over the correctly predicted images, 95% CIs."""
    level = protocol["bootstrap"]["level"]
    head = ["Method", "n correct", "Insertion AUC(%)↑", f"{100 * level:g}% CI", "Deletion AUC(%)↓",
            f"{100 * level:g}% CI", "Ins - Del(%)↑", f"{100 * level:g}% CI"]
    rows = []
    for n, r in [*part["methods"].items(), *part["baselines"].items()]:
        if r["mean"] is None:
            rows.append([display_name(n), "0", *["-"] * 6])
            continue
        m, ci = r["mean"], r["ci"]
        rows.append([display_name(n), str(r["n_correct"]), _pct(m["insertion"]), _ci(ci["insertion_mean"]),
                     _pct(m["deletion"]), _ci(ci["deletion_mean"]), _pct(m["overall"]), _ci(ci["overall_mean"])])
    return _table(head, rows, "Mean AUC over the correctly predicted images (unbinned)")


def real_seconds_table(seconds: dict) -> str:
    """Seconds per method: its explanations, everything for its map (pointing, curves, ROAD), per image."""
    rows = []
    for n, s in seconds.items():
        if n == "classify":
            continue
        per = s["total"] / s["images"] if s["images"] else float("nan")
        rows.append([display_name(n), str(s["images"]), f"{s['explain']:.1f}", f"{s['total']:.1f}", f"{per:.2f}"])
    return _table(["Method", "images", "explain s", "total s", "s / image"], rows,
                  "Time per method (explanation; total with pointing, curves and ROAD)")
