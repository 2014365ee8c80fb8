"""benchmarks/quality/integration_study.py without the real model or photos: its `gcam-relu-gain` variant is
the runtime's gain-share integration, its paper variant is eqs. 11-12, and the manifest reader scales boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.quality import integration_study as st
from runtime.backend import NumpyBackend
from runtime.config import DecomCamConfig
from runtime.decomcam import decompose, integrate_share


class FakeModel:
    """A linear 'classifier' over mean colours, and a random last-layer weight for the gradient."""

    def __init__(self, c: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.fc_w = rng.standard_normal((5, c))
        self.mix = rng.standard_normal((5, 3)) * 3

    def gradient(self, act, target):
        c, h, w = act.shape
        return np.broadcast_to((self.fc_w[target] / (h * w))[:, None, None], (c, h, w)).astype(np.float32)

    def forward(self, x):
        return (x.reshape(x.shape[0], 3, -1).mean(2) @ self.mix.T).astype(np.float32), None


@pytest.fixture(scope="module")
def pieces():
    rng = np.random.default_rng(1)
    c, h, w = 64, 7, 7
    act = rng.random((c, h, w)).astype(np.float32)
    x = rng.standard_normal((3, st.SIZE, st.SIZE)).astype(np.float32) * 0.5
    model = FakeModel(c)
    torch.manual_seed(0)
    return model, x, act, st.decompose_and_mask(model, x, act, 2, 10)


def test_gcam_relu_gain_is_the_runtime_gain_share(pieces):
    model, _, act, d = pieces
    grad = model.gradient(act, 2)
    be = NumpyBackend()
    dec = decompose(be, act[None], np.ascontiguousarray(grad)[None], DecomCamConfig(top_p=10))
    sal, _, _ = integrate_share(be, d["y_keep"][None].astype(np.float32), np.float32([d["y_blur"]]), dec, 7, 7,
                                st.SIZE)
    study = st.variant_saliency("gcam-relu-gain", d)
    assert np.ptp(study) > 0
    assert np.abs(study - sal[0]).max() <= 1e-4
    np.testing.assert_allclose(d["share"], dec.share[0], rtol=1e-6, atol=1e-9)


def test_paper_variant_is_softmax_of_gains(pieces):
    _, _, _, d = pieces
    gain = d["y_keep"] - d["y_blur"]
    w = np.exp(gain - gain.max())
    w /= w.sum()
    np.testing.assert_allclose(st.variant_saliency("paper", d), np.einsum("p,pij->ij", w, d["H"]), atol=1e-5)
    for name in st.VARIANTS:
        if name == "contrast-share":                   # needs the photo's logits: its own test below
            continue
        s = st.variant_saliency(name, d)
        assert s.shape == (st.SIZE, st.SIZE) and np.all(np.isfinite(s))


def test_manifest_boxes_are_scaled(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "file,class_index,synset,class_name,width,height,orig_width,orig_height,n_boxes,boxes_xyxy\n"
        "images/a.JPEG,7,n0,cock,227,227,500,375,2,0 0 227 227;10.0 20.0 30.0 40.0\n")
    rows = st.read_manifest(tmp_path)
    assert rows[0]["label"] == 7
    np.testing.assert_allclose(rows[0]["boxes"], np.array([[0, 0, 227, 227], [10, 20, 30, 40]]) * 224 / 227)
    with pytest.raises(FileNotFoundError, match="no manifest.csv"):
        st.read_manifest(tmp_path / "missing")


def test_use_model_sets_the_studys_input_size(tmp_path, monkeypatch):
    """--model efficientnet-lite1|2: boxes are scaled to 240 / 260 px, maps are finished at that size, and the
    model class refuses a size that is not its own."""
    monkeypatch.setattr(st, "SIZE", st.SIZE)               # put Lite0's size back afterwards
    (tmp_path / "manifest.csv").write_text(
        "file,class_index,synset,class_name,width,height,orig_width,orig_height,n_boxes,boxes_xyxy\n"
        "images/a.JPEG,7,n0,cock,227,227,500,375,1,10.0 20.0 30.0 40.0\n")
    for name, size in (("efficientnet-lite1", 240), ("efficientnet-lite2", 260), ("efficientnet-lite0", 224)):
        st.use_model(name)
        assert st.SIZE == size
        np.testing.assert_allclose(st.read_manifest(tmp_path)[0]["boxes"], [[10 * size / 227, 20 * size / 227,
                                                                             30 * size / 227, 40 * size / 227]])
        cam = np.random.default_rng(0).standard_normal((size // 30, size // 30))
        assert st.finish_map(cam).shape == (size, size) and st.finish_map(cam, "bicubic").shape == (size, size)
    # the masks' blur follows the size (the runtime's 10 S / 224, radius ceil(4 sigma)); every variant is
    # finished at S on the model's h x w grid
    import export.reference as ref

    seen = []
    real_blur = ref.gaussian_blur
    monkeypatch.setattr(ref, "gaussian_blur", lambda img, sigma, radius: seen.append((sigma, radius))
                        or real_blur(img, sigma, radius))
    for name, size, grid in (("efficientnet-lite1", 240, 8), ("efficientnet-lite2", 260, 9)):
        st.use_model(name)
        rng = np.random.default_rng(size)
        act = rng.random((32, grid, grid)).astype(np.float32)
        x = rng.standard_normal((3, size, size)).astype(np.float32) * 0.5
        d = st.decompose_and_mask(FakeModel(32), x, act, 1, 4)
        assert seen[-1] == (pytest.approx(10 * size / 224), int(np.ceil(40 * size / 224)))
        assert d["H"].shape[-2:] == (size, size)
        for v in ("paper", "gcam-relu-gain", "top1", "rect-rank-p"):
            sal = st.variant_saliency(v, d)
            assert sal.shape == (size, size) and np.all(np.isfinite(sal))
    st.use_model("efficientnet-lite0")
    with pytest.raises(ValueError, match="unknown model 'efficientnet-lite9'"):
        st.use_model("efficientnet-lite9")
    with pytest.raises(ValueError, match="call use_model"):
        st.Lite0(1, tmp_path, "efficientnet-lite2")


def test_cli_errors(tmp_path, capsys):
    assert st.main(["run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.csv" in capsys.readouterr().err
    # a folder of one model's records is neither resumed nor reported with another model's
    for name, model in (("a", None), ("b", "efficientnet-lite1")):
        (tmp_path / name).mkdir()
        rec = {"index": 0, "file": "x", "pointing": {}, "del_ins": {}, **({"model": model} if model else {})}
        (tmp_path / name / "records.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "manifest.csv").write_text("file,class_index,boxes_xyxy\n")
    assert st.main(["run", str(tmp_path), "--out", str(tmp_path / "a"), "--model", "efficientnet-lite2"]) == 2
    assert "holds records of efficientnet-lite0, not efficientnet-lite2" in capsys.readouterr().err
    assert st.main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "efficientnet-lite0, efficientnet-lite1 cannot be merged" in capsys.readouterr().err
    (tmp_path / "manifest.csv").write_text("file,class_index,boxes_xyxy\n")
    assert st.main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--del-ins-methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_lcam_variants_project_layercams_map_onto_the_top_p_components(pieces):
    """lcam-rank-p = Grad-CAM's finish of V_p V_p^T g+, V_p the top-p right singular vectors of S* = dy/dA * A
    (numpy's SVD here) and g+ = sum_c relu(dy/dA_c) A_c; lcam-relu-gain re-weights the same shares by the gains."""
    model, _, act, d = pieces
    grad = model.gradient(act, 2).astype(np.float64)
    c = act.shape[0]
    s = (grad * act).reshape(c, -1)
    _, _, vh = np.linalg.svd(s, full_matrices=False)
    vp = vh[:10]                                                         # [p, n]
    g_pos = (np.maximum(grad, 0) * act).reshape(c, -1).sum(0)            # [n]
    assert (grad < 0).any() and (grad > 0).any()                         # g+ differs from Grad-CAM's sum
    proj = vp.T @ (vp @ g_pos)
    from export.baselines_reference import finish

    expect = finish(torch.from_numpy(proj.reshape(1, 7, 7)), st.SIZE)[0].numpy()
    got = st.variant_saliency("lcam-rank-p", d)
    assert np.ptp(got) > 0
    assert np.abs(got - expect).max() <= 1e-5
    d2 = dict(d, y_keep=d["y_blur"] + np.linspace(-1.0, 3.0, 10))         # gains: 3 negative, 7 positive
    gain = np.maximum(d2["y_keep"] - d2["y_blur"], 0)
    r = gain / gain.mean()
    coef = vp @ g_pos                                                    # <v_i, g+>
    weighted = finish(torch.from_numpy((vp.T @ (r * coef)).reshape(1, 7, 7)), st.SIZE)[0].numpy()
    got = st.variant_saliency("lcam-relu-gain", d2)
    assert np.abs(got - weighted).max() <= 1e-5 and np.abs(got - expect).max() > 1e-3


def test_third_round_variants_against_independent_computations(pieces):
    """gcam-rank-1 and contrast-share are Grad-CAM's finish of V V^T g (numpy SVD of S*); contrast-share's g
    is the log-softmax's class map, its gradient taken by torch autograd; the bicubic variants differ from
    the bilinear ones only by the kernel."""
    model, x, act, _ = pieces
    from export.baselines_reference import finish

    logits = np.array([0.3, -1.0, 2.0, 0.5, 1.5])
    torch.manual_seed(0)
    d = st.decompose_and_mask(model, x, act, 2, 10, logits)
    c = act.shape[0]
    grad = model.gradient(act, 2).astype(np.float64)
    _, _, vh = np.linalg.svd((grad * act).reshape(c, -1), full_matrices=False)
    g = (grad * act).reshape(c, -1).sum(0)
    v1 = vh[:1]
    expect = finish(torch.from_numpy((v1.T @ (v1 @ g)).reshape(1, 7, 7)), st.SIZE)[0].numpy()
    assert np.abs(st.variant_saliency("gcam-rank-1", d) - expect).max() <= 1e-5
    # d log softmax(y)_t / dA by autograd, y = fc_w @ mean(A) + (logits - fc_w @ mean(A)): same logits, same slope
    a = torch.from_numpy(act.astype(np.float64)).requires_grad_(True)
    w = torch.from_numpy(model.fc_w)
    pooled = a.mean((1, 2))
    y = w @ pooled + (torch.from_numpy(logits) - (w @ pooled).detach())
    (dg,) = torch.autograd.grad(torch.log_softmax(y, 0)[2], a)
    np.testing.assert_allclose(st.logprob_gradient(model, act, 2, logits), dg.numpy(), rtol=1e-5, atol=1e-9)
    g_con = (dg.numpy() * act).reshape(c, -1).sum(0)
    vp = vh[:10]
    expect = finish(torch.from_numpy((vp.T @ (vp @ g_con)).reshape(1, 7, 7)), st.SIZE)[0].numpy()
    got = st.variant_saliency("contrast-share", d)
    assert np.ptp(got) > 0 and np.abs(got - expect).max() <= 1e-5
    bil, bic = st.variant_saliency("gcam-rank-p", d), st.variant_saliency("gcam-rank-p-bicubic", d)
    cam = vp.T @ (vp @ g)
    ref = torch.nn.functional.interpolate(torch.relu(torch.from_numpy(cam.reshape(1, 1, 7, 7))).float(),
                                          size=(st.SIZE, st.SIZE), mode="bicubic", align_corners=False)[0, 0].numpy()
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert np.abs(bic - ref).max() <= 1e-5 and np.abs(bic - bil).max() > 1e-3


def test_gain_lsq_explains_the_gains_as_mask_averages(pieces):
    """gain-lsq: the map b @ H reproduces each measured gain as its mask average (up to the small ridge)."""
    _, _, _, d = pieces
    valid = ~d["null"]
    hv = d["H"][valid].reshape(int(valid.sum()), -1).astype(np.float64)
    gain = np.linspace(1.0, 5.0, int(valid.sum()))
    b = st.gain_lsq(hv, gain, ridge=1e-9)
    np.testing.assert_allclose((hv * (b @ hv)).mean(1), gain, rtol=1e-4)
    b_r = st.gain_lsq(hv, gain)                            # the study's ridge: close, not exact
    assert np.abs((hv * (b_r @ hv)).mean(1) - gain).max() < 0.5 * np.abs(gain).max()


def test_controls_are_the_baselines_changed_one_way(pieces):
    """gradcam-bicubic / layercam-bicubic: the baselines' maps upsampled bicubically; *-logprob: the baselines
    with the log-softmax gradient."""
    model, _, act, _ = pieces
    from export import baselines_reference as br

    grad = model.gradient(act, 2)
    a = torch.from_numpy(act[None]).double()
    for name, fn in (("gradcam", br.gradcam), ("layercam", br.layercam)):
        cam = fn(a, torch.from_numpy(np.ascontiguousarray(grad)[None]).double())[0].numpy()
        got = st.baseline_saliency(f"{name}-bicubic", act, grad, model, 2, 0.0)
        assert np.abs(got - st.finish_map(cam, "bicubic")).max() <= 1e-6
        assert np.abs(got - st.baseline_saliency(name, act, grad, model, 2, 0.0)).max() > 1e-3
    logits = np.array([0.3, -1.0, 2.0, 0.5, 1.5])
    z = np.exp(logits - logits.max())
    prob = z / z.sum()
    wc = (model.fc_w[2] - prob @ model.fc_w) / 49                                  # d log p_t / d A_c
    assert (wc > 0).any() and (wc < 0).any()
    a64 = act.astype(np.float64)
    expect = {"gradcam-logprob": (wc[:, None, None] * a64).sum(0),                  # constant gradient: CAM
              "layercam-logprob": (np.maximum(wc, 0)[:, None, None] * a64).sum(0)}
    for name, cam in expect.items():
        got = st.baseline_saliency(name, act, grad, model, 2, 2.0, logits)
        ref = br.finish(torch.from_numpy(cam)[None], st.SIZE)[0].numpy()
        assert np.ptp(got) > 0 and np.abs(got - ref).max() <= 1e-5, name
    with pytest.raises(ValueError, match="needs the photo's logits"):
        st.baseline_saliency("gradcam-logprob", act, grad, model, 2, 2.0)


def test_kernel_check_switches_only_the_named_upsampling_and_puts_it_back():
    """benchmarks/quality/kernel_check.bicubic: inside the block the named CAM upsampling is OpenCV's bicubic
    (compared with cv2 directly), outside it is bilinear again; the other one is untouched."""
    import cv2

    import runtime.decomcam as dc
    import runtime.methods.base_cam as bc
    from benchmarks.quality.kernel_check import bicubic

    be = NumpyBackend()
    rng = np.random.default_rng(3)
    maps = rng.random((2, 7, 7)).astype(np.float32)

    def cv(m, flag):
        return np.stack([cv2.resize(x, (32, 32), interpolation=flag) for x in m])

    with bicubic("baselines"):
        np.testing.assert_allclose(bc.upsample(be, maps, 32), cv(maps, cv2.INTER_CUBIC), atol=1e-6)
        assert dc.integrate_share.__module__ == "runtime.decomcam"
    np.testing.assert_allclose(bc.upsample(be, maps, 32), cv(maps, cv2.INTER_LINEAR), atol=1e-6)

    act = rng.random((1, 16, 7, 7)).astype(np.float32)
    grad = rng.standard_normal((1, 16, 7, 7)).astype(np.float32)
    dec = decompose(be, act, grad, DecomCamConfig(top_p=4))
    y = np.float32([[3.0, 1.0, -1.0, 2.0]])
    y_blur = np.float32([0.5])
    plain, wts, _ = integrate_share(be, y, y_blur, dec, 7, 7, 32)
    with bicubic("gain-share"):
        cubic, wts2, _ = dc.integrate_share(be, y, y_blur, dec, 7, 7, 32)
        np.testing.assert_allclose(bc.upsample(be, maps, 32), cv(maps, cv2.INTER_LINEAR), atol=1e-6)
    np.testing.assert_array_equal(wts2, wts)                                 # the same weights
    cam = np.einsum("bp,bpn->bn", wts, dec.feature_maps).reshape(1, 7, 7)  # weights sum to 1: same map up to scale
    assert wts.sum() > 0
    ref = cv(np.maximum(cam, 0).astype(np.float32), cv2.INTER_CUBIC)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(cubic, ref, atol=1e-5)
    assert np.abs(cubic - plain).max() > 1e-3
    again, _, _ = dc.integrate_share(be, y, y_blur, dec, 7, 7, 32)
    np.testing.assert_array_equal(again, plain)
    with pytest.raises(ValueError, match="unknown choice"):
        with bicubic("nope"):
            pass


def test_third_round_reweightings_against_independent_formulas(pieces):
    """The share re-weightings (numpy SVD: a_i F_i = v_i v_i^T g), the gain attributions (numpy lstsq of the
    ridge system), and contrast-share's refusal without logits."""
    model, x, act, d_t2 = pieces
    from export.baselines_reference import finish

    torch.manual_seed(0)
    d = st.decompose_and_mask(model, x, act, 0, 10)                      # target 0: every map below is non-zero
    c = act.shape[0]
    grad = model.gradient(act, 0).astype(np.float64)
    s_ = (grad * act).reshape(c, -1)
    _, _, vh = np.linalg.svd(s_, full_matrices=False)
    vp = vh[:10]
    g, gp = s_.sum(0), np.maximum(s_, 0).sum(0)
    parts = vp * (vp @ g)[:, None]                                       # a_i F_i  [p, n]
    gain = np.linspace(-1.0, 3.0, 10)[::-1]                              # 3 negative gains, 7 positive
    d2 = dict(d, y_keep=d["y_blur"] + gain)
    valid = ~d["null"]
    assert valid.all()

    def fin(m):
        return finish(torch.from_numpy(m.reshape(1, 7, 7)), st.SIZE)[0].numpy()

    mass = d["H"].mean((1, 2))
    r_area = np.maximum(gain / mass, 0)
    r_area /= r_area.mean()
    r_gain = np.maximum(gain, 0) / np.maximum(gain, 0).mean()
    cases = {
        "gcam-rank-3": fin(parts[:3].sum(0)),
        "gcam-area-relu": fin((r_area[:, None] * parts).sum(0)),
        "posparts": fin(np.maximum(parts, 0).sum(0)),
        "posparts-gain": fin(np.maximum(r_gain[:, None] * parts, 0).sum(0)),
        "gcam-lcam-mean": st.minmax_np(fin(parts.sum(0)) + fin(vp.T @ (vp @ gp))),
    }
    for name, ref in cases.items():
        got = st.variant_saliency(name, d2)
        assert np.ptp(got) > 0 and np.abs(got - ref).max() <= 1e-5, name
    h = d["H"].astype(np.float64)
    rise = (np.maximum(gain, 0)[:, None, None] * h).sum(0) / (h.sum(0) + 1e-3)
    np.testing.assert_allclose(st.variant_saliency("rise-gain", d2), st.minmax_np(rise), atol=1e-6)
    hf = h.reshape(10, -1)
    gram = hf @ hf.T / hf.shape[1]
    lam = 1e-3 * np.trace(gram) / 10
    # the ridge system (G + lam I) b = C, G = H H^T / n, solved by numpy's least squares instead of solve
    b = np.linalg.lstsq(gram + lam * np.eye(10), gain, rcond=None)[0]
    ref = st.minmax_np(np.maximum(b @ hf, 0).reshape(st.SIZE, st.SIZE))
    np.testing.assert_allclose(st.variant_saliency("gain-lsq", d2), ref, atol=1e-6)
    assert np.abs((hf * (b @ hf)).mean(1) - gain).max() < 0.2 * np.abs(gain).max()
    with pytest.raises(ValueError, match="needs the photo's logits"):
        st.variant_saliency("contrast-share", d_t2)


def test_report_pairs_are_paired_differences(tmp_path, capsys):
    """report --pairs: A - B per photo, averaged (pointing over all photos, overall = ins - del over the photos
    with both methods' curves); an unknown method is a one-line error."""
    import json

    stats = {"gain": [1.0, 2.0, 3.0], "mass": [0.3, 0.5, 0.4], "keep_remove": [0.5, 1.0, 0.2], "null": [False] * 3,
             "paper_weights": [0.2, 0.3, 0.5], "component_hits": [True, False, True]}
    hits_a = [True, False, True, True]
    hits_b = [False, False, True, False]
    recs = []
    for i in range(4):
        di = {"gradcam": [20.0, 60.0], "layercam": [10.0 + i, 70.0]} if i < 3 else {}
        recs.append({"index": i, "pointing": {"gradcam": [hits_b[i]] * 2, "layercam": [hits_a[i]] * 2},
                     "del_ins": di, "stats": stats})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert st.main(["report", str(tmp_path), "--split", "2", "--resamples", "50", "--pairs", "layercam:gradcam"]) == 0
    res = json.loads((tmp_path / "report.json").read_text())["pairs"]
    assert res["layercam:gradcam/all"]["pointing"][0] == pytest.approx(50.0)          # (1 + 0 + 0 + 1) / 4
    assert res["layercam:gradcam/all"]["overall"][0] == pytest.approx(np.mean([20.0, 19.0, 18.0]))
    assert res["layercam:gradcam/all"]["n_del_ins"] == 3
    assert res["layercam:gradcam/confirm"]["overall"][0] == pytest.approx(18.0)
    table = json.loads((tmp_path / "report.json").read_text())["splits"]["all"]
    assert res["layercam:gradcam/all"]["overall"] == table["del_ins"]["layercam"]["diff_gradcam_overall"]
    ref = [100 * v for v in table["pointing"]["layercam"]["diff_gradcam_tol0"]]
    assert res["layercam:gradcam/all"]["pointing"] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # the same pair asked for after another one: the same resamples, the same interval
    assert st.main(["report", str(tmp_path), "--split", "2", "--resamples", "50",
                    "--pairs", "gradcam:layercam,layercam:gradcam"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())["pairs"]
    assert again["layercam:gradcam/all"] == res["layercam:gradcam/all"]
    assert again["gradcam:layercam/all"]["overall"][0] == pytest.approx(-res["layercam:gradcam/all"]["overall"][0])
    capsys.readouterr()
    assert st.main(["report", str(tmp_path), "--pairs", "layercam:nope"]) == 2
    assert "both methods must be in every record" in capsys.readouterr().err


def test_equal_mass_masks_share_one_histogram_and_keep_each_maps_order():
    rng = np.random.default_rng(3)
    hmap = rng.random((4, 9, 9)).astype(np.float32)
    hmap[1, :3] = 0.25                                     # ties: broken in raster order
    null = np.array([False, False, False, True])
    q = st.equal_mass(hmap, null)
    n = 81
    for i in range(3):
        np.testing.assert_allclose(np.sort(q[i].ravel()), np.arange(n) / (n - 1), atol=1e-7)
        h, v = hmap[i].ravel(), q[i].ravel()
        less = h[:, None] < h[None, :]
        assert np.all(np.broadcast_to(v[:, None], less.shape)[less] < np.broadcast_to(v[None, :], less.shape)[less])
        tied = np.flatnonzero(h == 0.25)
        if tied.size:
            assert np.all(np.diff(v[tied]) > 0)            # raster order among equal values
    assert not q[3].any()
    assert q[:3].mean((1, 2)) == pytest.approx([0.5] * 3, abs=1e-6)


def kept_logits(model, x: np.ndarray, masks: np.ndarray, target: int) -> np.ndarray:
    """The model's target logit on max(P M_i, blur(P) (1 - M_i)) for masks M [k, S, S], with OpenCV's blur
    (sigma 10, 81 taps, reflect-101) in [0, 1] pixels, mean = std = 0.5."""
    import cv2

    m = np.float32(0.5)
    pix = x * m + m
    pix_b = np.stack([cv2.GaussianBlur(ch, (81, 81), 10.0, borderType=cv2.BORDER_REFLECT_101) for ch in pix])
    keep = np.maximum(pix[None] * masks[:, None], pix_b[None] * (1 - masks[:, None]))
    return model.forward(((keep - m) / m).astype(np.float32))[0][:, target]


def masked_softmax(gain: np.ndarray, valid: np.ndarray) -> np.ndarray:
    w = np.where(valid, np.exp(gain - gain[valid].max()), 0.0)
    return w / w.sum()


def test_fourth_round_variants_use_the_gains_of_equal_mass_masks(pieces):
    """y_eq is the model on max(P Q_i, blur(P)(1 - Q_i)), the blur from OpenCV here; the four variants are
    the paper's softmax, relu weights, gain-share and the LayerCAM share with E_i in place of C_i."""
    from export.baselines_reference import finish

    model, x, act, d = pieces
    y_eq = kept_logits(model, x, st.equal_mass(d["H"], d["null"]), 2)
    np.testing.assert_allclose(d["y_eq"], y_eq, rtol=1e-4, atol=1e-4)
    e = d["y_eq"] - d["y_blur"]
    valid = ~d["null"]
    w = masked_softmax(e, valid)
    got = st.variant_saliency("eqmass-softmax", d)
    assert np.abs(got - np.einsum("p,pij->ij", w, d["H"])).max() <= 1e-5
    r = np.where(valid, np.maximum(e, 0), 0.0)
    if r.sum() > 0:
        assert np.abs(st.variant_saliency("eqmass-relu", d) - np.einsum("p,pij->ij", r / r.sum(), d["H"])).max() <= 1e-5
        rr = r / r[valid].mean()
    else:
        rr = valid.astype(np.float64)
    for name, share in (("gcam-eqmass-gain", "share"), ("lcam-eqmass-gain", "share_pos")):
        cam = np.einsum("p,pij->ij", rr * d[share], d["fm"])
        expect = finish(torch.from_numpy(cam[None]), st.SIZE)[0].numpy()
        assert np.abs(st.variant_saliency(name, d) - expect).max() <= 1e-5
    assert np.abs(d["y_eq"] - d["y_keep"]).max() > 1e-3     # other masks, other gains


class FieldModel(FakeModel):
    """FakeModel with a gradient that varies over positions and changes sign (an attention-pool-like head),
    so that relu(dy/dA) * A differs from both S* and LayerCAM's per-channel weighting."""

    def __init__(self, c: int, seed: int = 3):
        super().__init__(c, seed)
        self.field = np.random.default_rng(seed + 1).standard_normal((5, c, 7, 7)).astype(np.float32)

    def gradient(self, act, target):
        return self.field[target].copy()


def field_photo(model, seed: int, p: int):
    """Random activations [C, 7, 7] >= 0 for `model`, a random photo, and the study's pieces for target 1."""
    rng = np.random.default_rng(seed)
    act = rng.random((model.fc_w.shape[1], 7, 7)).astype(np.float32)
    x = rng.standard_normal((3, st.SIZE, st.SIZE)).astype(np.float32) * 0.5
    return act, x, model, st.decompose_and_mask(model, x, act, 1, p)


def test_fifth_round_variants_decompose_the_rectified_map():
    """rect-*: numpy's SVD of S+* = relu(dy/dA) * A; rect-top1 is the min-max of the top right singular
    vector upsampled (one-signed, as S+* >= 0), rect-rank-p / rect-rank-3 Grad-CAM's finish of the projection
    of g+ = sum_c S+*[c] onto the top components, rect-paper softmax(C+) over the H+_i with C+ from the
    model on the H+_i masks, rect-relu-gain the projection re-weighted by relu(C+)."""
    from export.baselines_reference import finish

    c, p = 32, 10
    act, x, model, d = field_photo(FieldModel(c), 4, p)
    grad = model.gradient(act, 1).astype(np.float64)
    sp = (np.maximum(grad, 0) * act).reshape(c, -1)
    assert (grad < 0).any()
    _, sv, vh = np.linalg.svd(sp, full_matrices=False)
    g_pos = sp.sum(0)
    assert np.all(vh[0] >= -1e-12) or np.all(vh[0] <= 1e-12)                 # Perron vector: one sign
    v1 = np.abs(vh[0]).reshape(1, 1, 7, 7)
    up = torch.nn.functional.interpolate(torch.from_numpy(v1), size=(st.SIZE, st.SIZE), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    expect_top1 = (up - up.min()) / (up.max() - up.min())
    assert np.abs(st.variant_saliency("rect-top1", d) - expect_top1).max() <= 1e-5
    for name, k in (("rect-rank-p", p), ("rect-rank-3", 3)):
        proj = vh[:k].T @ (vh[:k] @ g_pos)
        expect = finish(torch.from_numpy(proj.reshape(1, 7, 7)), st.SIZE)[0].numpy()
        assert np.abs(st.variant_saliency(name, d) - expect).max() <= 1e-5
    evr = sv[:p] ** 2 / (sv ** 2).sum()
    hr = d["rect"]["H"]
    expect = np.einsum("p,pij->ij", evr / evr.sum(), hr)
    assert np.abs(st.variant_saliency("rect-evr", d) - expect).max() <= 1e-5
    # differs from the study's projection of the same g+ onto the components of S* (lcam-rank-p)
    assert np.abs(st.variant_saliency("rect-rank-p", d) - st.variant_saliency("lcam-rank-p", d)).max() > 1e-3
    # the gains: the model on max(P H+_i, blur(P) (1 - H+_i)), the blur from OpenCV here
    r = d["rect"]
    np.testing.assert_allclose(r["y_keep"], kept_logits(model, x, r["H"], 1), rtol=1e-4, atol=1e-4)
    gain = r["y_keep"] - d["y_blur"]
    valid = ~r["null"]
    w = masked_softmax(gain, valid)
    assert np.abs(st.variant_saliency("rect-paper", d) - np.einsum("p,pij->ij", w, r["H"])).max() <= 1e-5
    rr = np.where(valid, np.maximum(gain, 0), 0.0)
    rr = rr / rr[valid].mean() if rr.sum() > 0 else valid.astype(np.float64)
    coef = vh[:p] @ g_pos
    signs = np.sign(np.einsum("pn,pn->p", r["fm"].reshape(p, -1), vh[:p]))    # the study's sign per component
    proj = (vh[:p] * signs[:, None]).T @ (rr * coef * signs)
    expect = finish(torch.from_numpy(proj.reshape(1, 7, 7)), st.SIZE)[0].numpy()
    assert np.abs(st.variant_saliency("rect-relu-gain", d) - expect).max() <= 1e-5


def test_analysis_counts_how_often_the_largest_gains_component_points_right():
    """C picks component 3 (hit), C/m picks component 1 (hit) in the first record; in the second every pick
    misses; E is counted only over the records that have it."""
    base = {"keep_remove": [0.1, 0.5, 0.2], "null": [False] * 3, "paper_weights": [0.2, 0.3, 0.5]}
    recs = [{"stats": {**base, "gain": [1.0, 2.0, 3.0], "mass": [0.1, 0.5, 0.9], "eq_gain": [0.0, 5.0, 1.0],
                       "component_hits": [True, False, True]}},
            {"stats": {**base, "gain": [3.0, 2.0, 1.0], "mass": [0.9, 0.1, 0.5],
                       "component_hits": [False, False, True]}},
            {"stats": {**base, "gain": [1.0, 9.0, 2.0], "mass": [0.5, 0.5, 0.5], "eq_gain": [1.0, 9.0, 0.0],
                       "null": [False, True, False], "component_hits": [True, False, False]}}]
    a = st.analysis(recs)
    # the third record's largest gains (component 2) are null: its picks are component 3 (C, C/m), 1 (E)
    assert a["largest_gain_component_pointing_tol0"] == {"C": pytest.approx(1 / 3), "C/m": pytest.approx(1 / 3),
                                                         "E": 0.5}
    assert a["largest_gain_n"] == {"C": 3, "C/m": 3, "E": 2}
    assert a["any_component_pointing_tol0"] == 1.0
    np.testing.assert_allclose(a["component_pointing_tol0"], [2 / 3, 0.0, 2 / 3])


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_nmf_parts_against_scikit_learn(k, monkeypatch):
    """nmf_parts is scikit-learn's NMF(init="nndsvda", solver="mu", tol=0, 200 iterations) of s / mean(s),
    once scikit-learn's randomized SVD is replaced by an exact one: the same parts after the same scaling
    (peak 1) and ordering (share of the sum), to 1e-9; and the parts do not depend on the scale of s."""
    import warnings

    pytest.importorskip("sklearn")
    import sklearn.decomposition._nmf as sk_nmf
    from sklearn.decomposition import NMF

    def exact_svd(m, n_components, **_):
        u, sv, vh = np.linalg.svd(m, full_matrices=False)
        return u[:, :n_components], sv[:n_components], vh[:n_components]

    monkeypatch.setattr(sk_nmf, "_randomized_svd", exact_svd)
    rng = np.random.default_rng(0)
    s = np.maximum(rng.standard_normal((128, 49)), 0) * rng.random((128, 1)) * 3
    parts, w, frac, null = st.nmf_parts(s, k)
    assert parts.shape == (k, 49) and not null.any()
    assert parts.min() >= 0 and np.allclose(parts.max(1), 1.0) and w.min() >= 0
    contrib = w * parts.sum(1)
    assert np.all(np.diff(contrib) <= 1e-12) and frac.sum() == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                          # max_iter reached: wanted here
        model = NMF(n_components=k, init="nndsvda", solver="mu", max_iter=st.PARTS_ITERS, tol=0)
        w_sk = model.fit_transform(s / s.mean()) * s.mean()
    h_sk = model.components_
    peak = h_sk.max(1)
    h_sk, w_sk = h_sk / peak[:, None], w_sk * peak
    order = np.argsort(-(w_sk.sum(0) * h_sk.sum(1)), kind="stable")
    np.testing.assert_allclose(parts, h_sk[order], atol=1e-9)
    np.testing.assert_allclose(w, w_sk[:, order].sum(0), rtol=1e-9)
    # scale-free: the parts of c * s are those of s
    p2, w2, _, _ = st.nmf_parts(s * 1e-4, k)
    np.testing.assert_allclose(p2, parts, atol=1e-9)
    np.testing.assert_allclose(w2, w * 1e-4, rtol=1e-9)


def test_nmf_parts_stay_finite_when_a_part_vanishes():
    """Blob-shaped evidence on which a part decays towards 0 during the multiplicative updates: with the
    denominators only kept from 0, its update factor reached 1e300 and the parts overflowed to inf / NaN
    (a real case: S+* of a Lite2 photo at k = 5). Floored denominators keep them finite, a valid split."""
    rng = np.random.default_rng(695)
    c = int(rng.integers(20, 200))
    yy, xx = np.mgrid[0:9, 0:9]
    cy, cx = rng.uniform(0, 9, (2, c, 1, 1))
    rad = rng.uniform(0.5, 4, (c, 1, 1))
    blob = np.maximum(1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / rad ** 2, 0)
    s = (blob * rng.exponential(1, (c, 1, 1)) ** 2).reshape(c, 81)
    parts, w, frac, null = st.nmf_parts(s, 3)
    assert np.all(np.isfinite(parts)) and np.all(np.isfinite(w)) and np.all(np.isfinite(frac))
    assert parts.min() >= 0 and frac.sum() == pytest.approx(1.0)


def test_nmf_parts_of_a_low_rank_or_empty_map():
    """Rank 2 asked for 5 parts: 2 parts that fit the map to 1% (200 multiplicative updates), 3 null rows of
    zeros; an all-zero map: every part null."""
    rng = np.random.default_rng(2)
    s = rng.random((20, 2)) @ rng.random((2, 16))
    parts, w, frac, null = st.nmf_parts(s, 5)
    assert null.tolist() == [False, False, True, True, True]
    assert np.all(parts[2:] == 0) and np.all(w[2:] == 0) and np.all(frac[2:] == 0)
    assert np.linalg.norm(s - np.linalg.lstsq(parts[:2].T, s.T, rcond=None)[0].T @ parts[:2]) <= 1e-2 * np.linalg.norm(s)
    parts, w, frac, null = st.nmf_parts(np.zeros((20, 16)), 3)
    assert null.all() and not parts.any() and not w.any()


def test_sixth_round_variants_are_the_first_rounds_on_the_parts(pieces):
    """parts<k>-*: the masks s(Up(P_j)) of nmf_parts(relu(dy/dA * A), k), the model's logits on them, and the
    first round's integrations over them."""
    import torch.nn.functional as F

    from export.baselines_reference import finish

    model, x, act, d = pieces
    grad = model.gradient(act, 2).astype(np.float64)
    s_pos = np.maximum(act.astype(np.float64) * grad, 0).reshape(act.shape[0], -1)
    for k in st.PARTS_K:
        parts, w, frac, null = st.nmf_parts(s_pos, k)
        pk = d["parts"][k]
        np.testing.assert_allclose(pk["fm"].reshape(k, -1), parts, atol=1e-12)
        up = F.interpolate(torch.from_numpy(parts.reshape(1, k, 7, 7)), size=(st.SIZE, st.SIZE), mode="bilinear",
                           align_corners=False)[0].numpy()
        lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
        hm = np.where(null[:, None, None], 0.0, (up - lo) / (hi - lo + 1e-7))
        assert np.abs(pk["H"] - hm).max() <= 1e-5
        np.testing.assert_allclose(pk["y_keep"], kept_logits(model, x, pk["H"], 2), rtol=1e-4, atol=1e-4)
        gain = pk["y_keep"] - d["y_blur"]
        valid = ~null
        got = st.variant_saliency(f"parts{k}-paper", d)
        assert np.abs(got - np.einsum("p,pij->ij", masked_softmax(gain, valid), pk["H"])).max() <= 1e-5
        assert np.abs(st.variant_saliency(f"parts{k}-top1", d) - pk["H"][0]).max() == 0
        r = np.where(valid, np.maximum(gain, 0), 0.0)
        r = r / r[valid].mean() if r.sum() > 0 else valid.astype(np.float64)
        expect = finish(torch.from_numpy(np.einsum("p,pn->n", r * w, parts).reshape(1, 7, 7)), st.SIZE)[0].numpy()
        assert np.abs(st.variant_saliency(f"parts{k}-gain-share", d) - expect).max() <= 1e-5
        rv = np.where(valid, np.maximum(gain, 0), 0.0)
        if rv.sum() > 0:
            expect = np.einsum("p,pij->ij", rv / rv.sum(), pk["H"])
            assert np.abs(st.variant_saliency(f"parts{k}-relu-gain", d) - expect).max() <= 1e-5
    parts, w, frac, null = st.nmf_parts(s_pos, 10)
    expect = finish(torch.from_numpy((w @ parts).reshape(1, 7, 7)), st.SIZE)[0].numpy()
    assert np.abs(st.variant_saliency("parts10-rank-p", d) - expect).max() <= 1e-5
    expect = np.einsum("p,pij->ij", frac, d["parts"][10]["H"])                   # shares of g+ sum to 1
    assert np.abs(st.variant_saliency("parts10-evr", d) - expect).max() <= 1e-5
    assert np.abs(st.variant_saliency("parts10-evr", d) - st.variant_saliency("parts10-paper", d)).max() > 1e-4


def test_seventh_round_scores_components_as_score_cam(pieces):
    """cic-*: the model on the normalised photo times each mask (no blur, substrate 0), softmax over those
    logits (or the target's probability), on the shares of the components (a_i F_i) and of the parts
    (w_j P_j), or on the masks."""
    import torch.nn.functional as F

    from export.baselines_reference import finish

    model, x, act, d = pieces
    for key, name in (("svd", "svd"), (3, "parts3"), (10, "parts10"), ("rect", "rect")):
        src = d if key == "svd" else d["rect"] if key == "rect" else d["parts"][key]
        hm = src["H"]
        z = model.forward((x[None] * hm[:, None]).astype(np.float32))[0].astype(np.float64)
        np.testing.assert_allclose(d["cic"][key]["y"], z[:, 2], rtol=1e-4, atol=1e-4)
        pz = np.exp(z - z.max(1, keepdims=True))
        pz /= pz.sum(1, keepdims=True)
        np.testing.assert_allclose(d["cic"][key]["prob"], pz[:, 2], rtol=1e-4, atol=1e-7)
        valid = ~np.asarray(src["null"])
        sm = masked_softmax(z[:, 2], valid)
        shares = np.where(valid, src["share"], 0.0)
        fm = src["fm"].reshape(len(shares), -1)
        for base, wts in (("share", sm), ("prob", np.where(valid, pz[:, 2], 0.0))):
            cam = (wts * shares) @ fm
            expect = finish(torch.from_numpy(cam.reshape(1, 7, 7)), st.SIZE)[0].numpy()
            assert np.abs(st.variant_saliency(f"cic-{name}-{base}", d) - expect).max() <= 1e-5
            if f"cic-{name}-{base}-bicubic" in st.VARIANTS:     # the same share map, upsampled bicubically
                up = F.interpolate(torch.from_numpy(np.maximum(cam, 0).reshape(1, 1, 7, 7)),
                                   size=(st.SIZE, st.SIZE), mode="bicubic", align_corners=False)[0, 0].numpy()
                expect = (up - up.min()) / (up.max() - up.min())
                got = st.variant_saliency(f"cic-{name}-{base}-bicubic", d)
                assert np.abs(got - expect).max() <= 1e-5
                assert np.abs(got - st.variant_saliency(f"cic-{name}-{base}", d)).max() > 1e-3
        m = np.einsum("p,pij->ij", sm, hm)
        expect = (m - m.min()) / (m.max() - m.min())
        assert np.abs(st.variant_saliency(f"cic-{name}-masks", d) - expect).max() <= 1e-5
    assert np.abs(d["cic"]["svd"]["y"] - d["y_keep"]).max() > 1e-3          # not the blurred masks' logits
    assert np.abs(d["cic"]["rect"]["y"] - d["cic"]["svd"]["y"]).max() > 1e-3  # S+*'s masks, not S*'s
    assert sum(f"cic-{name}-{base}-bicubic" in st.VARIANTS for name in ("svd", "rect", "parts3", "parts10")
               for base in ("share", "prob", "masks")) == 4


class CurvedModel(FieldModel):
    """A head with curvature: y_t = sum f1[t] A + 1/2 sum f2[t] A^2, so dy/dA = f1 + f2 A changes with A. Its
    integrated-gradient evidence from 0 is S_IG = f1 A + 1/2 f2 A^2 exactly (the midpoint rule integrates the
    linear path gradient exactly), which is not proportional to S* = f1 A + f2 A^2."""

    def __init__(self, c: int, seed: int = 5):
        super().__init__(c, seed)
        self.curve = np.random.default_rng(seed + 2).standard_normal((5, c, 7, 7)).astype(np.float32)

    def gradient(self, act, target):
        return (self.field[target] + self.curve[target] * act).astype(np.float32)


def test_ig_gradient_is_the_path_average():
    rng = np.random.default_rng(2)
    act = rng.random((6, 7, 7))
    model = CurvedModel(6)
    got = st.ig_gradient(lambda a: model.gradient(a, 3), act)
    np.testing.assert_allclose(got, model.field[3] + 0.5 * model.curve[3] * act, rtol=1e-5, atol=1e-6)
    # completeness: sum(A * mean gradient) = y(A) - y(0) for this head
    y = (model.field[3] * act).sum() + 0.5 * (model.curve[3] * act ** 2).sum()
    assert (act * got).sum() == pytest.approx(y, rel=1e-5)
    # steps: a head with a cubic term is integrated exactly only in the limit
    cubic = st.ig_gradient(lambda a: a ** 2, act, steps=64)
    np.testing.assert_allclose(cubic, act ** 2 / 3, rtol=1e-3)


def test_ninth_round_variants_decompose_the_integrated_gradient_evidence():
    """ig-*: numpy's SVD of S_IG = f1 A + 1/2 f2 A^2 for the curved head; the S* variants' formulas on its
    components (rank-p share map, bilinear and bicubic; Score-CAM's probabilities on x * H_IG; the gains of
    the masks H_IG kept); for a head linear in A (FieldModel) every ig-* variant is its S* variant."""
    import torch.nn.functional as F

    from export.baselines_reference import finish

    c, p = 32, 10
    act, x, model, d = field_photo(CurvedModel(c), 6, p)
    a64 = act.astype(np.float64)
    s_ig = (model.field[1] * a64 + 0.5 * model.curve[1] * a64 ** 2).reshape(c, -1)
    _, sv, vh = np.linalg.svd(s_ig, full_matrices=False)
    g = s_ig.sum(0)
    proj = vh[:p].T @ (vh[:p] @ g)
    expect = finish(torch.from_numpy(proj.reshape(1, 7, 7)), st.SIZE)[0].numpy()
    assert np.abs(st.variant_saliency("ig-rank-p", d) - expect).max() <= 1e-4
    up = F.interpolate(torch.from_numpy(np.maximum(proj, 0).reshape(1, 1, 7, 7)), size=(st.SIZE, st.SIZE),
                       mode="bicubic", align_corners=False)[0, 0].numpy()
    assert np.abs(st.variant_saliency("ig-rank-p-bicubic", d) - (up - up.min()) / (up.max() - up.min())).max() <= 1e-4
    np.testing.assert_allclose(d["ig"]["sigma"], sv[:p], rtol=1e-4)
    # not the local evidence's map
    assert np.abs(st.variant_saliency("ig-rank-p", d) - st.variant_saliency("gcam-rank-p", d)).max() > 1e-2
    ig = d["ig"]
    np.testing.assert_allclose(ig["y_keep"], kept_logits(model, x, ig["H"], 1), rtol=1e-4, atol=1e-4)
    z = model.forward((x[None] * ig["H"][:, None]).astype(np.float32))[0].astype(np.float64)
    np.testing.assert_allclose(ig["cic"]["svd"]["y"], z[:, 1], rtol=1e-4, atol=1e-4)
    pz = np.exp(z - z.max(1, keepdims=True))
    pz /= pz.sum(1, keepdims=True)
    valid = ~ig["null"]
    cam = (np.where(valid, pz[:, 1], 0.0) * np.where(valid, ig["share"], 0.0)) @ ig["fm"].reshape(p, -1)
    expect = finish(torch.from_numpy(cam.reshape(1, 7, 7)), st.SIZE)[0].numpy()
    assert np.abs(st.variant_saliency("ig-cic-prob", d) - expect).max() <= 1e-5
    gain = ig["y_keep"] - d["y_blur"]
    w = masked_softmax(gain, valid)
    assert np.abs(st.variant_saliency("ig-paper", d) - np.einsum("p,pij->ij", w, ig["H"])).max() <= 1e-5
    # a head linear in A: S_IG = S*, every ig-* variant is the S* variant it is named after
    lin = st.decompose_and_mask(FieldModel(c), x, act, 1, p)
    for name, base in st.IG.items():
        assert np.abs(st.variant_saliency(name, lin) - st.variant_saliency(base, lin)).max() <= 1e-5, name
