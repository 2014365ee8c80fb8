"""`python -m benchmarks.quality sanity` on a tiny pooled model: the randomised exports re-initialise exactly the
cascade's units (checked through the exported graphs), the correlations equal an independent computation,
and exports are reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality.__main__ import main as quality_main
from tests.benchmarks.test_quality_real import write_dataset
from tests.conftest import make_images


def test_randomize_units_cascades():
    """Level head re-initialises the classifier only; level 1 the classifier (with head's very weights: the
    cascade grows, it does not redraw) and the last block, whose BatchNorm statistics are measured again."""
    from export.models import load_model

    from benchmarks.quality.sanity import _module_to_randomize, level_units, model_units, randomize_units

    def state(level):
        lm = load_model("resnet-tiny", "none")
        if level is not None:
            randomize_units(lm, level_units(model_units(_module_to_randomize(lm)), level), seed=0)
        return {k: v.clone() for k, v in lm.model.model.state_dict().items()}

    trained, head, one = state(None), state("head"), state("1")
    fc = [k for k in trained if k.startswith("fc.")]
    last = [k for k in trained if k.startswith("layer4.") and "num_batches" not in k]
    rest = [k for k in trained if not k.startswith(("fc.", "layer4."))]
    assert fc and last and rest
    for k in fc:
        assert not np.allclose(trained[k].numpy(), head[k].numpy())
        np.testing.assert_array_equal(head[k].numpy(), one[k].numpy())
    for k in last:
        np.testing.assert_array_equal(trained[k].numpy(), head[k].numpy())
    changed = [k for k in last if not np.allclose(trained[k].numpy(), one[k].numpy())]
    assert any(k.endswith("running_var") for k in changed) and any(k.endswith("conv1.weight") for k in changed)
    for k in rest:
        np.testing.assert_array_equal(trained[k].numpy(), one[k].numpy())
    assert all(np.isfinite(v.numpy()).all() for v in one.values() if v.is_floating_point())


def test_sanity_command_and_its_export(resnet_tiny_artifacts, tmp_path, capsys):
    from scipy.stats import spearmanr

    from benchmarks.quality.boxes_data import read_boxes_manifest
    from benchmarks.quality.real import load_photo
    from runtime.explainer import Explainer
    from runtime.images import preprocess

    data = write_dataset(tmp_path / "data", make_images(3, seed=4), [0, 3, 7], [[[5.0, 5.0, 60.0, 70.0]]] * 3)
    argv = ["sanity", "--data", str(data), "--model", "resnet-tiny", "--pretrained", "none", "--artifacts",
            str(resnet_tiny_artifacts), "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "s.json"),
            "--levels", "head", "--methods", "gradcam,decomcam-ig", "--bootstrap", "50", "--no-progress"]
    assert quality_main(argv) == 0
    out, err = capsys.readouterr()
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["benchmark"] == "quality-sanity" and res["levels"] == ["head"] and res["n_images"] == 3
    assert res["level_units"] == {"head": ["fc"]} and res["exports"]["none"] == str(resnet_tiny_artifacts)
    assert "Sanity check" in out and "head = fc" in out and not (tmp_path / "s.checkpoint.jsonl").exists()

    ex = {k: Explainer.from_artifacts(v, resize="stretch") for k, v in res["exports"].items()}
    assert ex["head"].artifacts.manifest["random_weights"] is True
    assert "randomized(fc;seed=0)" in ex["head"].artifacts.manifest["pretrained_id"]
    items = read_boxes_manifest(data)
    x = np.stack([preprocess(load_photo(it), ex["none"].size, ex["none"].artifacts.mean, ex["none"].artifacts.std,
                             "stretch")[0] for it in items])
    acts = np.asarray(ex["none"].features(x))
    np.testing.assert_array_equal(acts, np.asarray(ex["head"].features(x)))   # the trunk is the trained one
    assert not np.allclose(np.asarray(ex["none"].head(acts)), np.asarray(ex["head"].head(acts)))

    # the correlations against scipy on maps made here
    for m in ("gradcam", "decomcam-ig"):
        for it, rec in zip(items, res["images"]):
            rgb = load_photo(it)
            a = ex["none"].explain_arrays([rgb], target=[it.class_index], method=m)[0].saliency
            b = ex["head"].explain_arrays([rgb], target=[it.class_index], method=m)[0].saliency
            want = spearmanr(np.ravel(a), np.ravel(b)).statistic
            got = rec["spearman"][m]["head"]
            assert (got is None and not np.isfinite(want)) or got == pytest.approx(want, abs=1e-9)
        vals = [r["spearman"][m]["head"] for r in res["images"] if r["spearman"][m]["head"] is not None]
        s = res["summary"][m]["head"]
        assert s["n"] == len(vals) and s["n_constant"] == 3 - len(vals)
        if vals:
            assert s["mean"] == pytest.approx(np.mean(vals)) and s["ci"][0] <= s["mean"] <= s["ci"][1]

    # a second run reuses the export
    assert err.count("[sanity] exporting") == 1
    assert quality_main(argv) == 0
    assert capsys.readouterr().err.count("[sanity] reusing") == 1
