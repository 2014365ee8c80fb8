"""benchmarks/quality/integration_study.py without the real model or photos: its `gcam-relu-gain` variant is
the runtime's gain-share integration, its paper variant is eqs. 11-12, and the manifest reader scales boxes."""

from __future__ import annotations

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


def test_cli_errors(tmp_path, capsys):
    assert st.main(["run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.csv" in capsys.readouterr().err
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
