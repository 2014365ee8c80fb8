"""`python -m benchmarks.quality`: the real-data commands on tiny generated folders, the offline synthetic run,
the evaluation's coordinate handling (stub explainer), the export's precomputed-embeddings option, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality.__main__ import main as quality_main
from benchmarks.quality.evaluate import (
    DEFAULT_METHODS,
    POINT_BASELINES,
    SALIENCY_BASELINES,
    ClassMismatchError,
    class_indices,
    parse_method_spec,
    pointing_game,
    resolve_methods,
    scaled_step,
)
from benchmarks.quality.synthetic_data import SyntheticSpec, generate, write_imagefolder_layout, write_voc_layout
from benchmarks.quality.voc import VOC_CLASSES, read_voc
from runtime.images import preprocess
from runtime.methods import list_methods

ROOT = Path(__file__).resolve().parents[2]
SPEC = SyntheticSpec(n_classes=3, image_size=96, seed=5)  # 96 px images, RN-tiny takes 128: maps are resized
NAMES = list(VOC_CLASSES[:3])  # synthetic labels written under VOC names, so the 'voc' class set has them
FAST = "gradcam,decomcam"


def finite_numbers(obj, path="$"):
    """Every number in a parsed JSON document is finite (None stands for 'no value')."""
    if isinstance(obj, float):
        assert math.isfinite(obj), path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            finite_numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def samples():
    return generate(SPEC, 2, "val")  # 6 images, 2 per class


@pytest.fixture(scope="module")
def voc_dir(samples, tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc_layout(samples, NAMES, root)  # JPEG, as VOC
    return root


@pytest.fixture(scope="module")
def folder_dir(samples, tiny_artifacts, tmp_path_factory):
    """An ImageFolder whose labels are set from the random model's own predictions, so that both paths run:
    the even images go to the folder of the predicted VOC class (correct: curves are computed), the odd
    ones to the next class (incorrect: dropped)."""
    from runtime.explainer import Explainer

    ex = Explainer.from_artifacts(tiny_artifacts.out_dir, resize="stretch")
    x = np.stack([preprocess(s.image, ex.size, ex.artifacts.mean, ex.artifacts.std, "stretch")[0] for s in samples])
    pred = np.asarray(ex.classify(x)).argmax(1)
    labels = [int(p) if i % 2 == 0 else (int(p) + 1) % len(VOC_CLASSES) for i, p in enumerate(pred)]
    relabelled = [replace(s, label=lab) for s, lab in zip(samples, labels)]
    root = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder_layout(relabelled, list(VOC_CLASSES), root)
    for name in VOC_CLASSES:  # read_imagefolder keeps empty class folders; drop them to keep the test small
        if not any((root / name).iterdir()):
            (root / name).rmdir()
    return root


def run_cli(args, capsys):
    code = quality_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# Real-data commands on generated folders (random RN-tiny export with the voc class set)
# --------------------------------------------------------------------------------------------------


def test_pointing_game_cli_default_methods(tiny_artifacts, voc_dir, tmp_path, capsys):
    out = tmp_path / "pg.json"
    code, stdout, err = run_cli(["pointing-game", "--voc", voc_dir, "--artifacts", tiny_artifacts.out_dir,
                                 "--json", out, "--tolerance", "15", "--limit", "3"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    finite_numbers(res)
    expected = [m for m in DEFAULT_METHODS if m in list_methods()]
    assert list(res["methods"]) == expected and set(res["baselines"]) == set(POINT_BASELINES)
    assert res["n_images"] == 3 and res["n_trials"] == 3 and res["tolerance"] == 15.0
    assert res["resize"] == "stretch" and res["classes"] == sorted(NAMES)
    for summary in [*res["methods"].values(), *res["baselines"].values()]:
        assert 0.0 <= summary["mean_accuracy"] <= 1.0 and summary["n"] == 3
        assert set(summary["per_class"]) == set(res["classes"])
    assert len(res["trials"]) == 3 and set(res["trials"][0]["hits"]) == {*expected, *POINT_BASELINES}
    assert "Table 1" in stdout and "Accuracy(%)" in stdout and "Decom-CAM" in stdout and "Centre point" in stdout


def test_deletion_insertion_cli(tiny_artifacts, folder_dir, tmp_path, capsys):
    out, png = tmp_path / "di.json", tmp_path / "fig" / "figure4.png"
    code, stdout, err = run_cli(["deletion-insertion", "--imagefolder", folder_dir, "--artifacts",
                                 tiny_artifacts.out_dir, "--json", out, "--plot", png, "--methods", FAST,
                                 "--step", "auto", "--substrate", "blur", "--limit-per-class", "2"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    finite_numbers(res)
    assert res["step"] == scaled_step(128) and res["n_steps"] == 11 and res["substrate"] == "blur"
    assert res["n_images"] == 6 and len(res["images"]) == 6 and res["n_correct"] == 3
    assert {row["class"] for row in res["images"]} == set(res["per_class_accuracy"])
    assert list(res["methods"]) == ["gradcam", "decomcam"] and list(res["baselines"]) == list(SALIENCY_BASELINES)
    for r in [*res["methods"].values(), *res["baselines"].values()]:
        assert r["binned"]["n_images"] == 3 and r["binned"]["n_dropped"] == 3
        assert set(r["binned"]["auc"]) == {"insertion", "deletion", "overall"}
        assert all(0.0 <= r["mean"][k] <= 1.0 for k in ("insertion", "deletion"))
        assert len(r["curves"]["insertion"]) == 12 and len(r["curves"]["deletion"]) == 12
    for row in res["images"]:
        assert set(row["auc"]) == ({"gradcam", "decomcam", *SALIENCY_BASELINES} if row["correct"] else set())
    assert png.is_file()
    assert "Table 2" in stdout and "Overall Score(%)" in stdout


def test_deletion_insertion_paper_step_zero_substrate(tiny_artifacts, folder_dir, tmp_path, capsys):
    out = tmp_path / "di.json"
    code, _, err = run_cli(["deletion-insertion", "--imagefolder", folder_dir, "--artifacts",
                            tiny_artifacts.out_dir, "--json", out, "--methods", "gradcam",
                            "--limit-per-class", "1", "--step", "4928"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["step"] == 4928 and res["n_steps"] == math.ceil(128 * 128 / 4928)
    assert res["n_images"] == len(res["per_class_accuracy"])  # one image per class folder


def test_class_missing_from_class_set_is_one_line_error(tiny_artifacts, samples, tmp_path, capsys):
    write_imagefolder_layout(samples, ["disc", "square", "triangle"], tmp_path / "f")
    code, _, err = run_cli(["deletion-insertion", "--imagefolder", tmp_path / "f", "--artifacts",
                            tiny_artifacts.out_dir, "--json", tmp_path / "x.json", "--methods", "gradcam"], capsys)
    assert code == 2
    assert "class set 'voc'" in err and "lacks 3 image folder class(es): disc, square, triangle" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.json").exists()


def test_unknown_method_and_bad_step(tiny_artifacts, voc_dir, folder_dir, tmp_path, capsys):
    code, _, err = run_cli(["pointing-game", "--voc", voc_dir, "--artifacts", tiny_artifacts.out_dir,
                            "--json", tmp_path / "x.json", "--methods", "gradcam,nosuchcam"], capsys)
    assert code == 2 and "unknown method 'nosuchcam'" in err and "decomcam" in err
    code, _, err = run_cli(["deletion-insertion", "--imagefolder", folder_dir, "--artifacts",
                            tiny_artifacts.out_dir, "--json", tmp_path / "x.json", "--step", "many"], capsys)
    assert code == 2 and "--step" in err


def test_missing_folders_are_errors(tiny_artifacts, tmp_path, capsys):
    code, _, err = run_cli(["pointing-game", "--voc", tmp_path / "nope", "--artifacts", tiny_artifacts.out_dir,
                            "--json", tmp_path / "x.json"], capsys)
    assert code == 2 and "VOC root folder not found" in err
    code, _, err = run_cli(["pointing-game", "--voc", tmp_path, "--artifacts", tmp_path / "noart",
                            "--json", tmp_path / "x.json"], capsys)
    assert code == 2


def test_real_data_commands_run_without_torch(tiny_artifacts, voc_dir, folder_dir, tmp_path):
    """The evaluations need only the deployable runtime (plus matplotlib for --plot): a subprocess where
    importing torch or open_clip fails."""
    art = str(tiny_artifacts.out_dir)
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'open_clip', 'torchvision'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from benchmarks.quality.__main__ import main\n"
        f"rc = main(['pointing-game', '--voc', {str(voc_dir)!r}, '--artifacts', {art!r}, '--limit', '2',\n"
        f"           '--methods', 'decomcam', '--json', {str(tmp_path / 'pg.json')!r}])\n"
        f"rc += main(['deletion-insertion', '--imagefolder', {str(folder_dir)!r}, '--artifacts', {art!r},\n"
        f"            '--limit-per-class', '1', '--methods', 'decomcam', '--json', {str(tmp_path / 'di.json')!r},\n"
        f"            '--plot', {str(tmp_path / 'f.png')!r}])\n"
        "assert not any(m.split('.')[0] in ('torch', 'open_clip') for m in sys.modules), 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pg.json").is_file() and (tmp_path / "di.json").is_file()


# --------------------------------------------------------------------------------------------------
# Library pieces
# --------------------------------------------------------------------------------------------------


def test_resolve_methods_defaults_aliases_and_errors():
    reg = ["decomcam", "gradcam", "gradcam++", "scorecam"]
    assert resolve_methods(None, reg) == ["gradcam", "gradcam++", "scorecam", "decomcam"]
    assert resolve_methods("GradCAMpp, decomcam,gradcam++", reg) == ["gradcam++", "decomcam"]
    with pytest.raises(ValueError, match="unknown method 'ablationcam'; registered methods: decomcam"):
        resolve_methods("ablationcam", reg)
    with pytest.raises(ValueError, match="no methods given"):
        resolve_methods(" , ", reg)


def test_method_options_parse_and_refuse():
    reg = ["decomcam", "decomcam-ig", "gradcam", "layercam"]
    assert resolve_methods("GradCAM:kernel=bicubic,gradcam,decomcam-ig:top_p=49", reg) == \
        ["gradcam:kernel=bicubic", "gradcam", "decomcam-ig:top_p=49"]
    assert parse_method_spec("grad-cam:kernel=bicubic") == ("gradcam", {"kernel": "bicubic"})
    # an option at its default names the bare method's run
    assert resolve_methods("gradcam,gradcam:kernel=bilinear", reg) == ["gradcam"]
    from benchmarks.quality.report import display_name

    assert display_name("gradcam:kernel=bicubic") == "GradCAM (bicubic)"
    assert display_name("decomcam-ig:top_p=400") == "Decom-CAM (IG) (p = 400)"
    # one name per run, whatever the order of its options
    assert resolve_methods("gradcam:kernel=bicubic,GradCAM:kernel=bicubic", reg) == ["gradcam:kernel=bicubic"]
    for bad, msg in (("gradcam:kernel=lanczos", "kernel must be one of bilinear, bicubic"),
                     ("gradcam:kernel=bicubic:kernel=bilinear", "kernel is given twice"),
                     ("decomcam:top_p=\u00b2", "top_p must be an integer >= 1"),
                     ("nosuch:top_p=3", "unknown method 'nosuch:top_p=3'"),
                     ("gradcam:top_p=3", "top_p applies to the Decom-CAM methods only"),
                     ("decomcam-ig:kernel=bicubic", "kernel applies to the CAM baselines"),
                     ("decomcam:top_p=0", "top_p must be an integer >= 1"),
                     ("decomcam-ig:ig_baseline=blur", "option 'ig_baseline=blur' is not key=value with a key"),
                     ("gradcam:bicubic", "option 'bicubic' is not key=value"),
                     ("nosuch:kernel=bicubic", "unknown method 'nosuch:kernel=bicubic'")):
        with pytest.raises(ValueError, match=msg):
            resolve_methods(bad, reg)


def test_bicubic_kernel_option_is_grad_cam_with_opencv_cubic(tiny_artifacts):
    """gradcam:kernel=bicubic = min-max(cv2 INTER_CUBIC(ReLU(sum_c mean(dy/dA_c) A_c))), computed here from the
    explain graph's outputs; the bare name keeps the bilinear kernel; decomcam-ig:top_p=k runs k components."""
    import cv2

    from benchmarks.quality.evaluate import explain_maps
    from runtime.explainer import Explainer
    from tests.conftest import make_images

    ex = Explainer.from_artifacts(tiny_artifacts.out_dir)
    imgs = make_images(3, seed=8)
    targets = [1, 4, 7]
    x = ex.preprocess(imgs)[0]
    out = ex.runner("explain").run(ex.feed(image=x, target=np.array(targets)))
    a, g = out["activations"].astype(np.float64), out["gradients"].astype(np.float64)
    cam = np.maximum((g.mean(axis=(2, 3))[:, :, None, None] * a).sum(1), 0).astype(np.float32)
    maps = {k: [m for m, _ in explain_maps(ex, imgs, targets, k)]
            for k in ("gradcam:kernel=bicubic", "gradcam", "decomcam-ig:top_p=2")}
    for i in range(3):
        for kernel, flag in (("gradcam:kernel=bicubic", cv2.INTER_CUBIC), ("gradcam", cv2.INTER_LINEAR)):
            up = cv2.resize(cam[i], (ex.size, ex.size), interpolation=flag).astype(np.float64)
            ref = (up - up.min()) / (up.max() - up.min())
            np.testing.assert_allclose(maps[kernel][i], ref, atol=1e-5)
        assert np.abs(maps["gradcam:kernel=bicubic"][i] - maps["gradcam"][i]).max() > 1e-3
    e = ex.explain_arrays(imgs, target=targets, method="decomcam-ig", config=ex.config.with_(top_p=2))
    for i in range(3):
        assert len(e[i].weights) == 2
        np.testing.assert_array_equal(maps["decomcam-ig:top_p=2"][i], e[i].saliency)


def test_class_indices_by_name():
    labels = ["Cat", "dog", "tvmonitor"]
    assert class_indices(labels, ["dog", "cat"], "s", "VOC") == {"dog": 1, "cat": 0}
    with pytest.raises(ClassMismatchError, match="class set 's' of the artifacts lacks 2 VOC class\\(es\\): bus, car"):
        class_indices(labels, ["bus", "dog", "car"], "s", "VOC")


def test_scaled_step_keeps_eleven_steps():
    assert scaled_step(224) == 4928
    for s in (96, 128, 288, 448):
        assert math.ceil(s * s / scaled_step(s)) == 11


@dataclass
class _StubExplanation:
    saliency: np.ndarray
    geometry: object


class _StubClasses:
    name = "stub"
    labels = NAMES


class _PeakExplainer:
    """Points at the box centre of the target class (or at the far corner), in model-input coordinates,
    so the test checks the evaluation's coordinate mapping and not a model."""

    def __init__(self, items, size=128, resize_mode="stretch", at_box=True):
        self.classes, self.size, self.resize_mode, self.at_box = _StubClasses(), size, resize_mode, at_box
        self.boxes = {}
        for it in items:
            for name, b in it.objects.items():
                self.boxes[(it.height, it.width, NAMES.index(name))] = b  # one image per (size, class) here
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def explain_arrays(self, rgbs, target, method):
        out = []
        for rgb, t in zip(rgbs, target):
            _, geom = preprocess(rgb, self.size, self.mean, self.std, self.resize_mode)
            sal = np.zeros((self.size, self.size), np.float32)
            if self.at_box:
                x0, y0, x1, y1 = self.boxes[(rgb.shape[0], rgb.shape[1], t)][0]
                cx, cy = (x0 + x1) / 2 * geom.scale_w, (y0 + y1) / 2 * geom.scale_h  # original -> model input
                sal[int(cy), int(cx)] = 1.0
                sal = np.maximum(sal, 0.5 * np.roll(sal, 1, 0))  # a small blob, still peaked at (cy, cx)
            else:
                sal[-1, -1] = 1.0
            out.append(_StubExplanation(sal, geom))
        return out


def test_pointing_game_maps_back_to_original_coordinates(samples, tmp_path):
    # One image per class so the stub can find the boxes by (size, class).
    root = tmp_path / "voc"
    write_voc_layout(samples[:3], NAMES, root, ext="png")
    items = read_voc(root)
    res = pointing_game(_PeakExplainer(items), items, ["peak"], tolerance=0, progress=False)
    assert res["methods"]["peak"]["mean_accuracy"] == 1.0 and res["n_trials"] == 3
    res = pointing_game(_PeakExplainer(items, at_box=False), items, ["corner"], tolerance=0, progress=False)
    assert res["methods"]["corner"]["mean_accuracy"] == 0.0
    # Same seed, same random-point draws.
    again = pointing_game(_PeakExplainer(items), items, ["peak"], tolerance=0, seed=0, progress=False)
    assert again["baselines"] == res["baselines"]


def test_export_rejects_bad_precomputed_embeddings(tiny, tmp_path):
    from export.classes import class_set_from_names
    from export.onnx_export import ExportError, export_model

    cs = class_set_from_names(["a", "b"], "two")
    with pytest.raises(ExportError, match=r"embeddings for class set 'two' have shape \(3, 64\), expected \(2, 64\)"):
        export_model(tiny, [cs], tmp_path / "art", embeddings={"two": np.ones((3, 64))})
    with pytest.raises(ExportError, match="non-finite or all-zero row"):
        export_model(tiny, [cs], tmp_path / "art", embeddings={"two": np.zeros((2, 64))})
    with pytest.raises(ExportError, match="class set 'other', which is not exported"):
        export_model(tiny, [cs], tmp_path / "art", embeddings={"other": np.ones((2, 64))})
    assert not (tmp_path / "art").exists()


# --------------------------------------------------------------------------------------------------
# The offline synthetic run
# --------------------------------------------------------------------------------------------------


def _run_synthetic(tmp_path, *extra):
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, "-m", "benchmarks.quality", "synthetic", "--out", str(out),
                        "--json", str(tmp_path / "syn.json"), *extra],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "syn.json").read_text())
    finite_numbers(res)
    return out, res, r.stdout


def _check_synthetic(out: Path, res: dict, stdout: str) -> None:
    from benchmarks.quality.train import cache_root

    assert set(res) >= {"run", "model", "methods", "pointing_game", "deletion_insertion", "plot", "seconds"}
    assert res["methods"] == [m for m in DEFAULT_METHODS if m in list_methods()]
    assert res["model"]["pretrained_id"].startswith("sha256:")
    assert Path(res["model"]["checkpoint"]).parent == cache_root()
    manifest = json.loads((out / "artifacts" / "manifest.json").read_text())
    assert manifest["model"] == "RN-quality" and manifest["pretrained_id"] == res["model"]["pretrained_id"]
    assert manifest["random_weights"] is False and manifest["default_class_set"] == "synthetic"
    # The exported class set holds the learned embeddings (unit rows), in the checkpoint's label order.
    import torch

    ckpt = torch.load(res["model"]["checkpoint"], map_location="cpu", weights_only=True)
    emb = np.load(out / "artifacts" / "classes" / "synthetic.npy")
    np.testing.assert_allclose(emb, ckpt["class_embeddings"].numpy(), atol=1e-6)
    assert (out / "artifacts" / "classes" / "synthetic.txt").read_text().split() == ckpt["class_names"]
    pg, di = res["pointing_game"], res["deletion_insertion"]
    assert set(pg["baselines"]) == set(POINT_BASELINES) and set(di["baselines"]) == set(SALIENCY_BASELINES)
    assert pg["n_trials"] >= pg["n_images"] > 0 and di["n_images"] > 0
    assert di["step"] == scaled_step(128) and di["substrate"] == "zero"
    assert (out / "voc" / "ImageSets" / "Main" / "val.txt").is_file()
    if res["plot"]:
        assert Path(res["plot"]).is_file()
    assert "Table 1" in stdout and "Table 2" in stdout


def test_synthetic_quick(tmp_path):
    out, res, stdout = _run_synthetic(tmp_path, "--quick")
    _check_synthetic(out, res, stdout)
    assert res["run"]["train"]["epochs"] == 1
    # A rerun of the same config loads the checkpoint instead of training.
    from benchmarks.quality.synthetic import QUICK
    from benchmarks.quality.train import train_or_load

    tm = train_or_load(QUICK.train)
    assert tm.cached and f"sha256:{tm.sha256}" == res["model"]["pretrained_id"]


@pytest.mark.slow
def test_synthetic_full(tmp_path):
    out, res, stdout = _run_synthetic(tmp_path)
    _check_synthetic(out, res, stdout)
    di = res["deletion_insertion"]
    # The trained model is far above chance (1/8) and its classes spread over several accuracy bins.
    assert di["accuracy"] > 0.5 and len(di["bins"]) >= 3
    assert res["plot"] and Path(res["plot"]).is_file()
