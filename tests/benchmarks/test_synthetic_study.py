"""benchmarks/quality/synthetic_study.py on the tiny random CLIP export: the study's variants, registered as
runtime methods, reproduce the runtime's Decom-CAM and gain-share, their forwards are the model on the masks
built independently here, and the registration is undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.quality import integration_study as st
from benchmarks.quality import synthetic_study as ss
from export.reference import gaussian_blur
from runtime.explainer import Explainer
from runtime.methods.base import METHODS
from tests.conftest import make_images


@pytest.fixture(scope="module")
def explainer(tiny_artifacts):
    return Explainer.from_artifacts(tiny_artifacts.out_dir)


def test_study_variants_are_the_runtime_methods(explainer):
    imgs = make_images(3, seed=5)
    with ss.registered(["paper", "gcam-relu-gain", "top1"]) as names:
        assert names == ["study-paper", "study-gcam-relu-gain", "study-top1"]
        got = {n: explainer.explain_arrays(imgs, method=n, top_p=4) for n in names}
    ref = explainer.explain_arrays(imgs, method="decomcam", top_p=4)
    share = explainer.explain_arrays(imgs, method="decomcam-gain-share", top_p=4)
    for i in range(3):
        assert np.ptp(ref[i].saliency) > 0
        assert np.abs(got["study-paper"][i].saliency - ref[i].saliency).max() <= 1e-5
        assert np.abs(got["study-gcam-relu-gain"][i].saliency - share[i].saliency).max() <= 1e-4
        assert np.abs(got["study-top1"][i].saliency - ref[i].components[0]).max() <= 1e-5
    assert not [n for n in METHODS if n.startswith(ss.PREFIX)]


def test_forwards_are_the_model_on_each_images_masks(explainer):
    """Three images in one batch: each image's kept, removed and equal-mass masks, its blurred image, the
    kept masks of the rectified decomposition and of each number of parts, built here with torch's blur, give
    the logits the pieces hold for that image."""
    imgs = make_images(3, seed=8)
    cfg = explainer.config.with_(top_p=4)
    x, _ = explainer.preprocess(imgs)
    size = x.shape[-1]
    targets = [1, 0, 2]
    with ss.registered(["paper"]) as reg:
        explainer.explain_arrays(imgs, method="study-paper", target=targets, top_p=4)
        by_target = {key[1]: d for key, d in reg.cache.items()}
        pieces = [by_target[t] for t in targets]
    mean = torch.tensor(explainer.artifacts.mean).view(3, 1, 1)
    std = torch.tensor(explainer.artifacts.std).view(3, 1, 1)
    for k, d in enumerate(pieces):
        pix = torch.from_numpy(x[k]).double() * std + mean
        blur = gaussian_blur(pix[None], cfg.sigma(size), cfg.radius(size))[0]
        hm = torch.from_numpy(d["H"]).double()[:, None]
        qm = torch.from_numpy(st.equal_mass(d["H"], d["null"])).double()[:, None]
        batch = torch.cat([torch.maximum(pix * hm, blur * (1 - hm)), torch.maximum(pix * (1 - hm), blur * hm),
                           torch.maximum(pix * qm, blur * (1 - qm)), blur[None]])
        hr = torch.from_numpy(d["rect"]["H"]).double()[:, None]
        batch = torch.cat([batch, torch.maximum(pix * hr, blur * (1 - hr))])
        for kp in st.PARTS_K:
            hp = torch.from_numpy(d["parts"][kp]["H"]).double()[:, None]
            batch = torch.cat([batch, torch.maximum(pix * hp, blur * (1 - hp))])
        z = np.asarray(explainer.classify(((batch - mean) / std).float().numpy()))[:, targets[k]]
        p = d["H"].shape[0]
        np.testing.assert_allclose(d["y_keep"], z[:p], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(d["y_remove"], z[p:2 * p], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(d["y_eq"], z[2 * p:3 * p], rtol=1e-3, atol=1e-3)
        assert d["y_blur"] == pytest.approx(float(z[3 * p]), rel=1e-3, abs=1e-3)
        np.testing.assert_allclose(d["rect"]["y_keep"], z[3 * p + 1:4 * p + 1], rtol=1e-3, atol=1e-3)
        assert np.abs(d["rect"]["y_keep"] - d["y_keep"]).max() > 1e-3
        row = 4 * p + 1
        for kp in st.PARTS_K:
            np.testing.assert_allclose(d["parts"][kp]["y_keep"], z[row:row + kp], rtol=1e-3, atol=1e-3)
            row += kp
        xk = torch.from_numpy(x[k]).double()
        for kc in st.CIC_SETS:                         # Score-CAM's masking: the normalised image times the mask
            hc = torch.from_numpy(d["H"] if kc == "svd" else d["rect"]["H"] if kc == "rect"
                                  else d["parts"][kc]["H"]).double()[:, None]
            zc = np.asarray(explainer.classify((xk[None] * hc).float().numpy()))
            np.testing.assert_allclose(d["cic"][kc]["y"], zc[:, targets[k]], rtol=1e-3, atol=1e-3)
            pc = np.exp(zc - zc.max(1, keepdims=True))
            np.testing.assert_allclose(d["cic"][kc]["prob"], (pc / pc.sum(1, keepdims=True))[:, targets[k]],
                                       rtol=1e-3, atol=1e-5)
        assert row == len(z)
        assert np.abs(d["y_eq"] - d["y_keep"]).max() > 1e-3


def test_pieces_are_recomputed_for_another_configuration(explainer):
    imgs = make_images(1, seed=9)
    with ss.registered(["top1"]) as reg:
        a = explainer.explain_arrays(imgs, method="study-top1", top_p=4)[0]
        b = explainer.explain_arrays(imgs, method="study-top1", top_p=2)[0]
        c = explainer.explain_arrays(imgs, method="study-top1", top_p=2)[0]
        assert len(reg.cache) == 2
        assert sorted(d["H"].shape[0] for d in reg.cache.values()) == [2, 4]
    assert not reg.cache
    ref = explainer.explain_arrays(imgs, method="decomcam", top_p=2)[0]
    assert np.abs(b.saliency - ref.components[0]).max() <= 1e-5
    assert np.array_equal(b.saliency, c.saliency) and a.saliency.shape == b.saliency.shape


def test_registration_errors_and_cli(capsys):
    with pytest.raises(ValueError, match="already registered"):
        with ss.registered(["top1", "top1"]):
            pass
    assert "study-top1" not in METHODS
    with pytest.raises(ValueError, match="contrast-share"):
        ss.parse_variants("top1,contrast-share")
    assert "contrast-share" not in ss.parse_variants("all") and "eqmass-softmax" in ss.parse_variants("all")
    assert ss.main(["--variants", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert ss.main(["--variants", "ig-rank-p", "--ig-steps", "0"]) == 2          # before any training
    assert "--ig-steps must be at least 1" in capsys.readouterr().err


def test_component_diagnostics_against_the_runtimes_components(explainer, tmp_path):
    """Per-component hits and the largest paper gain's hit, recomputed from `decomcam`'s own components and
    gains on a few generated images with made-up boxes."""
    import cv2

    from benchmarks.quality.protocol import pointing_hit
    from benchmarks.quality.voc import VocItem

    items = []
    rng = np.random.default_rng(2)
    for i, rgb in enumerate(make_images(3, seed=4)):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rgb[:, :, ::-1])
        h, w = rgb.shape[:2]
        objs = {}
        for c in ("cat", "dog"):
            x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
            objs[c] = np.array([[x0, y0, x0 + w // 2, y0 + h // 2]], np.float64)
        items.append(VocItem(path, w, h, objs, str(i)))
    diag = ss.component_diagnostics(explainer, items)
    labels = list(explainer.classes.labels)
    hits, pick, pick_m = [], [], []
    for it in items:
        rgb = cv2.imread(str(it.image_path))[:, :, ::-1].copy()
        for c in sorted(it.objects):
            e = explainer.explain_arrays([rgb], target=[labels.index(c)], method="decomcam")[0]
            h = np.array([np.ptp(m) > 0 and pointing_hit(e.geometry.to_original(m), it.objects[c], 0.0)
                          for m in e.components])
            hits.append(h)
            pick.append(bool(h[int(np.argmax(e.scores))]))
            mass = np.array([m.mean() for m in e.components])
            pick_m.append(bool(h[int(np.argmax(e.scores / np.maximum(mass, 1e-6)))]))
    assert diag["n_trials"] == 6
    np.testing.assert_allclose(diag["per_component"], np.mean(hits, 0))
    assert diag["any_component"] == pytest.approx(np.mean(np.any(hits, 1)))
    assert diag["largest_gain"]["C"] == pytest.approx(np.mean(pick))
    assert diag["largest_gain"]["C/m"] == pytest.approx(np.mean(pick_m))
    assert diag["largest_gain_n"] == {"C": 6, "C/m": 6, "E": 6}
    assert not [n for n in METHODS if n.startswith(ss.PREFIX)]


def test_paired_differences_from_a_runs_records(tmp_path, capsys):
    """`--pairs` on a run's JSON: the mean of the per-trial hit differences and of the per-image
    ins - del differences (correct images only), inside a bootstrap interval that widens with the spread."""
    import json

    rng = np.random.default_rng(0)
    hits_a, hits_b = rng.random(40) < 0.8, rng.random(40) < 0.6
    auc = rng.random((30, 4))
    correct = np.arange(30) % 3 != 0
    res = {"pointing_game": {"trials": [{"hits": {"study-x": bool(a), "layercam": bool(b)}}
                                        for a, b in zip(hits_a, hits_b)]},
           "deletion_insertion": {"images": [
               {"correct": bool(c), "auc": ({"study-x": {"insertion": v[0], "deletion": v[1]},
                                             "layercam": {"insertion": v[2], "deletion": v[3]}} if c else {})}
               for v, c in zip(auc, correct)]}}
    (row,) = ss.paired(res, [("x", "layercam")], resamples=2000)
    assert row["n_trials"] == 40 and row["n_correct"] == int(correct.sum())
    assert row["pointing"][0] == pytest.approx(100 * (hits_a.mean() - hits_b.mean()))
    d = 100 * ((auc[:, 0] - auc[:, 1]) - (auc[:, 2] - auc[:, 3]))[correct]
    assert row["overall"][0] == pytest.approx(d.mean())
    for mean, lo, hi in (row["pointing"], row["overall"]):
        assert lo < mean < hi
    assert ss.paired(res, [("layercam", "x"), ("x", "layercam")], resamples=2000)[1] == row   # order-free
    (two,) = ss.paired([res, res], [("x", "layercam")], resamples=2000)                 # runs pooled
    assert two["n_trials"] == 80 and two["n_correct"] == 2 * int(correct.sum())
    assert two["pointing"][0] == pytest.approx(row["pointing"][0]) and two["overall"][0] == pytest.approx(d.mean())
    assert two["overall"][2] - two["overall"][1] < row["overall"][2] - row["overall"][1]
    half = (row["overall"][2] - row["overall"][1]) / 2
    assert half == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(len(d)), rel=0.25)
    with pytest.raises(ValueError, match="'nope' is not a method"):
        ss.paired(res, [("nope", "layercam")])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(res))
    assert ss.main(["--from-json", str(path), "--pairs", "x:layercam"]) == 0
    assert "| x - layercam |" in capsys.readouterr().out
    assert ss.main(["--from-json", str(path)]) == 2
    assert "needs --pairs" in capsys.readouterr().err
    assert ss.main(["--from-json", str(path), "--pairs", "x"]) == 2


def test_paired_differences_from_a_real_data_run():
    """A real-data run's JSON (`benchmarks.quality real`): pointing at tolerance 0 over the photos both methods
    ran on (a slow method may cover a subset only), ins - del over the correctly classified ones."""
    rng = np.random.default_rng(1)
    n = 30
    hit = rng.random((n, 2, 2)) < 0.7                    # photo, method (ig, scorecam), tolerance (0, 15)
    auc = rng.random((n, 2, 2))
    correct = np.arange(n) % 4 != 0
    subset = np.arange(n) < 20                            # scorecam on the first 20 photos only
    images = []
    for i in range(n):
        methods = ["decomcam-ig", "scorecam"] if subset[i] else ["decomcam-ig"]
        images.append({
            "correct": bool(correct[i]),
            "pointing": {m: {"0": bool(hit[i, j, 0]), "15": bool(hit[i, j, 1])} for j, m in enumerate(methods)},
            "auc": ({m: {"insertion": auc[i, j, 0], "deletion": auc[i, j, 1]} for j, m in enumerate(methods)}
                    if correct[i] else {})})
    res = {"benchmark": "quality-real", "images": images}
    (row,) = ss.paired(res, [("decomcam-ig", "scorecam")], resamples=500)
    both = subset
    assert row["n_trials"] == int(both.sum()) and row["n_correct"] == int((both & correct).sum())
    assert row["pointing"][0] == pytest.approx(100 * (hit[both, 0, 0].astype(float) - hit[both, 1, 0]).mean())
    d = ((auc[:, 0, 0] - auc[:, 0, 1]) - (auc[:, 1, 0] - auc[:, 1, 1]))[both & correct]
    assert row["overall"][0] == pytest.approx(100 * d.mean())


def test_pooled_runs_resample_images_not_records():
    """Several models scored on the same photos pool into one paired difference whose bootstrap resamples
    photos, each with all its records: a run pooled with a copy of itself has the same interval as the run
    alone, and with correlated models the half-width follows the normal approximation over the photos'
    mean differences, not over the records (which would be narrower by about sqrt(models))."""
    rng = np.random.default_rng(2)
    n, models = 120, 3
    photo_effect = rng.normal(0.0, 0.3, n)                 # shared by every model: the photo's difficulty

    def run(k):
        images = []
        for i in range(n):
            d = photo_effect[i] + rng.normal(0.0, 0.05)
            hit_a, hit_b = bool(photo_effect[i] > -0.1), bool((photo_effect[i] + rng.normal(0, 0.2)) > 0.0)
            images.append({"file": f"images/{i:04d}.JPEG", "correct": True,
                           "pointing": {"a": {"0": hit_a}, "b": {"0": hit_b}},
                           "auc": {"a": {"insertion": 0.5 + d, "deletion": 0.0},
                                   "b": {"insertion": 0.5, "deletion": 0.0}}})
        return {"benchmark": "quality-real", "data": "/photos", "images": images}

    one = run(0)
    (alone,) = ss.paired(one, [("a", "b")], resamples=1000)
    (twice,) = ss.paired([one, one], [("a", "b")], resamples=1000)
    assert (twice["n_trials"], twice["n_units"], twice["n_correct_units"]) == (2 * n, n, n)
    assert twice["pointing"] == pytest.approx(alone["pointing"]) and twice["overall"] == pytest.approx(alone["overall"])
    runs = [one] + [run(k) for k in range(1, models)]
    (pooled,) = ss.paired(runs, [("a", "b")], resamples=2000)
    per = np.array([[r["auc"]["a"]["insertion"] - r["auc"]["b"]["insertion"] for r in x["images"]] for x in runs])
    photo_mean = 100 * per.mean(0)
    assert pooled["overall"][0] == pytest.approx(photo_mean.mean())
    half = (pooled["overall"][2] - pooled["overall"][1]) / 2
    assert half == pytest.approx(1.96 * photo_mean.std(ddof=1) / np.sqrt(n), rel=0.2)
    naive = 1.96 * (100 * per).ravel().std(ddof=1) / np.sqrt(per.size)
    assert half > 1.4 * naive
    table = ss.pairs_table([pooled])
    assert f"({models * n} on {n} images)" in table
    # records without an image name, or of runs that do not name their data, stay units of their own
    anon = {"benchmark": "quality-real", "data": "/photos", "images": [dict(r, file=None) for r in one["images"]]}
    assert ss.paired([anon, anon], [("a", "b")], resamples=10)[0]["n_units"] == 2 * n
    nodata = {k: v for k, v in one.items() if k != "data"}
    assert ss.paired([nodata, nodata], [("a", "b")], resamples=10)[0]["n_units"] == 2 * n
    # the same file names in another data folder are other photos; a trailing slash is the same folder
    assert ss.paired([one, dict(one, data="/other")], [("a", "b")], resamples=10)[0]["n_units"] == 2 * n
    assert ss.paired([one, dict(one, data="/photos/")], [("a", "b")], resamples=10)[0]["n_units"] == n
    # synthetic runs: the same image ids are the same images only under the same data settings
    spec = {"n_classes": 2, "image_size": 64, "seed": 0}
    syn = {"run": {"train": {"spec": spec, "seed": 0}, "n_val_per_class": 3, "n_point_per_class": 3, "seed": 0},
           "pointing_game": {"trials": [{"image": f"{i:06d}", "hits": {"a": True, "b": bool(i % 2)}}
                                        for i in range(6)]},
           "deletion_insertion": {"images": [{"path": "/x/imagefolder/disc/000000.png", "correct": True,
                                              "auc": {m: {"insertion": 0.5, "deletion": 0.1} for m in "ab"}}]}}
    retrained = {**syn, "run": {**syn["run"], "train": {"spec": spec, "seed": 1}}}
    regenerated = {**syn, "run": {**syn["run"], "train": {"spec": dict(spec, seed=1), "seed": 0}}}
    (same,) = ss.paired([syn, retrained], [("a", "b")], resamples=10)
    (other,) = ss.paired([syn, regenerated], [("a", "b")], resamples=10)
    assert (same["n_units"], same["n_correct_units"], other["n_units"], other["n_correct_units"]) == (6, 1, 12, 2)


def test_ig_pieces_integrate_the_heads_gradient(explainer, tiny):
    """The ig-* pieces of two images: head_gradient_of (torch autograd on open_clip's head) is the exported
    explain graph's gradient at the activations, and S_IG's rank-p share map is the one built here from the
    export's hand-written head backward (export.graphs.PoolHead) at the 16 path midpoints and numpy's SVD."""
    from export.baselines_reference import finish
    from export.graphs import PoolHead
    from runtime.methods.base import Method, MethodOutput

    captured = {}

    class Capture(Method):
        name = "test-capture-ctx"

        def __call__(self, ctx):
            captured["ctx"] = ctx
            return MethodOutput(np.zeros((ctx.x.shape[0],) + ctx.x.shape[2:], np.float32))

    METHODS[Capture.name] = Capture
    try:
        explainer.explain_arrays(make_images(2, seed=11), method=Capture.name, target=[1, 2], top_p=4)
    finally:
        METHODS.pop(Capture.name)
    ctx = captured["ctx"]
    hg = ss.head_gradient_of(tiny.model)
    act, text = np.asarray(ctx.activations, np.float64), np.asarray(ctx.text)
    scale = np.abs(ctx.gradients).max()
    np.testing.assert_allclose(hg(act, text, ctx.target), ctx.gradients, atol=1e-3 * scale)
    head = PoolHead(tiny.model.visual.attnpool, float(tiny.model.logit_scale.detach().exp()))
    tt, tg = torch.from_numpy(text.astype(np.float32)), torch.as_tensor(np.asarray(ctx.target))
    with torch.no_grad():
        grad = sum(head.backward(head.forward_cache(torch.from_numpy(((k + 0.5) / 16 * act).astype(np.float32)),
                                                    tt)[1], tt, tg).double().numpy() for k in range(16)) / 16
    ds = ss.pieces(ctx, hg)
    b, c, h, w = act.shape
    p = ds[0]["ig"]["H"].shape[0]
    for k in range(b):
        s_ig = (act[k] * grad[k]).reshape(c, -1)
        _, _, vh = np.linalg.svd(s_ig, full_matrices=False)
        proj = vh[:p].T @ (vh[:p] @ s_ig.sum(0))
        expect = finish(torch.from_numpy(proj.reshape(1, h, w)), ctx.x.shape[-1])[0].numpy()
        got = st.variant_saliency("ig-rank-p", ds[k])
        assert np.ptp(expect) > 0
        assert np.abs(got - expect).max() <= 1e-3
        assert np.abs(got - st.variant_saliency("gcam-rank-p", ds[k])).max() > 1e-3   # not the local evidence
        # the rows of the batch: the model on S_IG's masks kept (blurred background) and on x * H_IG
        cfg, size = ctx.config, ctx.x.shape[-1]
        mean = torch.tensor(explainer.artifacts.mean).view(3, 1, 1)
        std = torch.tensor(explainer.artifacts.std).view(3, 1, 1)
        pix = torch.from_numpy(np.asarray(ctx.x[k])).double() * std + mean
        blur = gaussian_blur(pix[None], cfg.sigma(size), cfg.radius(size))[0]
        hm = torch.from_numpy(ds[k]["ig"]["H"]).double()[:, None]
        kept = torch.maximum(pix * hm, blur * (1 - hm))
        z = np.asarray(explainer.classify(((kept - mean) / std).float().numpy()))[:, ctx.target[k]]
        np.testing.assert_allclose(ds[k]["ig"]["y_keep"], z, rtol=1e-3, atol=1e-3)
        zc = np.asarray(explainer.classify((torch.from_numpy(np.asarray(ctx.x[k])).double()[None] * hm)
                                           .float().numpy()))[:, ctx.target[k]]
        np.testing.assert_allclose(ds[k]["ig"]["cic"]["svd"]["y"], zc, rtol=1e-3, atol=1e-3)
        assert np.abs(z - zc).max() > 1e-3
    with pytest.raises(ValueError, match="needs the model's head gradient"):
        ss.study_method("ig-rank-p", {})


def test_merged_real_runs_pair_across_runs(tmp_path, capsys):
    """A+B merges two real-data runs of one model on the same photos (methods, then controls): a pair across
    them equals the pair computed on one run holding both; A~B separates names that carry a colon; runs of
    another model, other photos or a method run twice are refused."""
    import json

    rng = np.random.default_rng(3)
    n = 24
    hit, auc = rng.random((n, 3)) < 0.7, rng.random((n, 3, 2))
    correct = np.arange(n) % 5 != 0
    names = ["decomcam-ig", "gradcam", "gradcam:kernel=bicubic"]

    def images(cols):
        return [{"file": f"images/{i:03d}.JPEG", "correct": bool(correct[i]),
                 "pointing": {names[j]: {"0": bool(hit[i, j])} for j in cols} | {"center_point": {"0": True}},
                 "auc": ({names[j]: {"insertion": auc[i, j, 0], "deletion": auc[i, j, 1]} for j in cols}
                         if correct[i] else {})} for i in range(n)]

    head = {"benchmark": "quality-real", "data": "/photos", "artifacts": {"path": "a/lb", "model": "m", "pretrained": "p"}}
    whole, first, second = ({**head, "images": images(c)} for c in ((0, 1, 2), (0, 1), (2,)))
    files = {}
    for k, run in (("whole", whole), ("first", first), ("second", second)):
        files[k] = tmp_path / f"{k}.json"
        files[k].write_text(json.dumps(run))
    merged = ss.merge_real_runs([first, second], ["first", "second"])
    ref = ss.paired(whole, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300)
    assert ss.paired(merged, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300) == ref
    assert ss.main(["--from-json", f"{files['first']}+{files['second']}",
                    "--pairs", "decomcam-ig~gradcam:kernel=bicubic,gradcam:kernel=bicubic~gradcam"]) == 0
    out = capsys.readouterr().out
    assert "| decomcam-ig - gradcam:kernel=bicubic |" in out and "| gradcam:kernel=bicubic - gradcam |" in out
    other = {**second, "artifacts": {**head["artifacts"], "path": "a/other"}}
    with pytest.raises(ValueError, match="artifacts.path is 'a/other'.*not the same model and photos"):
        ss.merge_real_runs([first, other], ["first", "other"])
    with pytest.raises(ValueError, match="not the same photos"):
        ss.merge_real_runs([first, {**second, "images": second["images"][1:]}], ["first", "short"])
    # a method scored in both runs counts once when the records agree photo by photo, and is refused otherwise
    both = ss.merge_real_runs([first, whole], ["first", "whole"])
    assert ss.paired(both, [("decomcam-ig", "gradcam:kernel=bicubic")], resamples=300) == ref
    moved = json.loads(json.dumps(whole))
    moved["images"][5]["pointing"]["decomcam-ig"]["0"] = not moved["images"][5]["pointing"]["decomcam-ig"]["0"]
    with pytest.raises(ValueError, match="method 'decomcam-ig' is in more than one of the merged runs and differs "
                                         "on images/005.JPEG"):
        ss.merge_real_runs([first, moved], ["first", "moved"])
    drift = json.loads(json.dumps(whole))
    drift["images"][1]["auc"]["gradcam"]["insertion"] += 1e-6
    with pytest.raises(ValueError, match="method 'gradcam' .* differs on images/001.JPEG"):
        ss.merge_real_runs([first, drift], ["first", "drift"])
