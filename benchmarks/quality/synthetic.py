"""The whole quality protocol offline: synthetic data -> trained CLIP ResNet -> ONNX -> both evaluations.

    1. ``synthetic_data.generate`` draws the validation images; they are written in both layouts
       (``write_voc_layout`` as PNG, ``write_imagefolder_layout``) under ``out/``.
    2. ``train.train_or_load`` trains a small open_clip ModifiedResNet with learned class embeddings
       (cached), and ``train.export_trained`` exports it with the toolkit's ``export_model``.
    3. ``evaluate.pointing_game`` on ``out/voc`` and ``evaluate.deletion_insertion`` on ``out/imagefolder``
       (the same functions as the real-data commands), sharing one ``SaliencyCache`` so an image is
       explained once per method and target; the Figure-4 plot goes to ``out/figure4.png``.

The deletion / insertion step is the paper's 4928 px at 224 rescaled to the model's input size (11 steps).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from .evaluate import SaliencyCache, deletion_insertion, pointing_game, scaled_step
from .synthetic_data import class_names, generate, write_imagefolder_layout, write_voc_layout
from .train import TrainConfig, config_hash, export_trained, log, train_or_load
from .voc import read_imagefolder, read_voc

__all__ = ["SyntheticRun", "FULL", "QUICK", "run_synthetic"]


@dataclass(frozen=True)
class SyntheticRun:
    """One offline benchmark run."""

    train: TrainConfig = field(default_factory=TrainConfig)  # model, data spec and training recipe
    n_val_per_class: int = 25  # validation images per class (ImageFolder layout: deletion / insertion)
    n_point_per_class: int = 25  # the first ones of those also go to the VOC layout (pointing game)
    tolerance: float = 0.0  # pointing-game tolerance in pixels (0 = the paper)
    substrate: str = "zero"  # deletion / insertion substrate (the authors' zero in normalised space)
    resize: str = "stretch"  # the Explainer's resize mode (images already have the model's size)
    seed: int = 0  # random-point and random-saliency baselines
    threads: int | None = 1  # ORT intra-op threads, spinning off: on a shared 2-core machine one thread
    #                          measured 2.5x faster than ORT's default (None = ORT's default)


FULL = SyntheticRun()
QUICK = SyntheticRun(train=replace(TrainConfig(), n_train_per_class=8, epochs=1), n_val_per_class=1,
                     n_point_per_class=1)


def run_synthetic(run: SyntheticRun, out_dir, methods: Sequence[str], use_cache: bool = True,
                  plot: bool = True) -> dict:
    """Run the whole protocol; returns a JSON-ready dict (see the module docstring). ``out_dir`` receives
    voc/, imagefolder/, artifacts/ and figure4.png."""
    from runtime.engines import EngineOptions
    from runtime.explainer import Explainer

    from .protocol import plot_binned

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if run.n_point_per_class > run.n_val_per_class:
        raise ValueError("n_point_per_class must not exceed n_val_per_class (the VOC images are a prefix)")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = run.train.spec
    names = class_names(spec)

    t = time.perf_counter()
    val = generate(spec, run.n_val_per_class, "val")  # class-interleaved, so a prefix is balanced
    for sub in ("voc", "imagefolder"):
        shutil.rmtree(out / sub, ignore_errors=True)
    write_imagefolder_layout(val, names, out / "imagefolder")
    write_voc_layout(val[: run.n_point_per_class * len(names)], names, out / "voc", split="val", ext="png")
    times["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    tm = train_or_load(run.train, use_cache=use_cache)
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    art = export_trained(tm, run.train, out / "artifacts", use_cache=use_cache)
    times["export_s"] = time.perf_counter() - t

    opts = EngineOptions(intra_op_threads=run.threads, allow_spinning=run.threads is None)
    ex = Explainer.from_artifacts(art, resize=run.resize, engine_options=opts)
    cache = SaliencyCache()
    t = time.perf_counter()
    pg = pointing_game(ex, read_voc(out / "voc", "val"), methods, tolerance=run.tolerance, seed=run.seed,
                       cache=cache)
    times["pointing_game_s"] = time.perf_counter() - t
    t = time.perf_counter()
    classes, items = read_imagefolder(out / "imagefolder")
    di = deletion_insertion(ex, classes, items, methods, step=scaled_step(ex.size), substrate=run.substrate,
                            seed=run.seed, cache=cache)
    times["deletion_insertion_s"] = time.perf_counter() - t

    plot_path = None
    curves = {n: r["binned"] for n, r in [*di["methods"].items(), *di["baselines"].items()] if r["binned"]}
    if plot and curves:
        from .report import display_name

        plot_path = out / "figure4.png"
        plot_binned({display_name(n): r for n, r in curves.items()}, plot_path)
    times["total_s"] = time.perf_counter() - t0
    log(f"[quality] synthetic run done in {times['total_s']:.1f} s ({cache.hits} explanations reused)")

    run_json = asdict(run)
    run_json["train"] = run.train.to_json()
    return {
        "run": run_json,
        "model": {"config_hash": config_hash(run.train), "checkpoint": str(tm.checkpoint),
                  "pretrained_id": f"sha256:{tm.sha256}", "cached": tm.cached, "history": tm.history,
                  "classes": tm.class_names, "artifacts": str(art)},
        "methods": list(methods),
        "pointing_game": pg,
        "deletion_insertion": di,
        "plot": str(plot_path) if plot_path else None,
        "seconds": times,
    }
