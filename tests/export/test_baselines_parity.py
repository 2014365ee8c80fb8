"""Parity of the CAM baselines on the same random model, layer and inputs:

    runtime   runtime.explainer.Explainer (ORT CPU, runtime/methods/) on the model's exported graphs
    eager     export/baselines_reference.py (torch autograd, eager forwards)
    pgc       pytorch-grad-cam 1.5.7, an independent implementation, on open_clip's module wrapped as
              image -> logits against fixed class embeddings, target layer visual.layer4,
              ClassifierOutputTarget(target)

Maps are compared after min-max normalisation by Pearson correlation (>= 0.999). pytorch-grad-cam ReLUs,
min-max scales, resizes with cv2 (bilinear) and scales again; the runtime ReLUs, resizes (cv2 bilinear) and
min-max scales: the same maps up to an affine map, which Pearson ignores.

Where the runtime differs from pytorch-grad-cam on purpose, the test undoes the difference:
    gradcam++   pytorch-grad-cam adds eps = 1e-6 to alpha's denominator (not in the paper, and not
                negligible for CLIP's ~1e-3 gradients): compared with GradCamPlusPlus(eps=1e-6).
    scorecam    pytorch-grad-cam upsamples the masks with UpsamplingBilinear2d (align_corners=True); the
                runtime uses half-pixel bilinear like every other method: compared with
                ScoreCam(upsample="align_corners"). Both mask the normalised input by multiplication.
    eigencam,   pytorch-grad-cam leaves the sign of the principal component to LAPACK, so its map is
    eigengradcam sometimes the ReLU of the wrong half; the runtime orients it (positive dot product with the
                channel sum). pytorch-grad-cam's get_2d_projection is wrapped to orient its result the same
                way before its ReLU.
    ablationcam pytorch-grad-cam zeroes the channel only when the layer's minimum is 0 (else it writes
                min - 1e7): layer4 ends in a ReLU, asserted here.

The class embeddings: the export's class set comes from the random text tower, whose cosines with the
random image tower are all negative, and Ablation-CAM's relative drop (y - y_c) / y assumes a positive target
score (a negative y inverts the map). The test adds a class set "probe" whose first two embeddings lie near
the test images' features (target logits ~ +90) and three random ones.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from export.baselines_reference import cam_reference
from export.classes import class_set_from_names
from export.models import load_model
from export.onnx_export import export_model, write_class_set
from export.reference import decomcam_reference
from runtime.artifacts import load_artifacts
from runtime.engines import EngineOptions
from runtime.explainer import Explainer
from runtime.images import preprocess
from runtime.methods import get_method, list_methods
from runtime.spec import MANIFEST_NAME
from tests.conftest import make_images

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

MODEL = "RN-tiny-96"        # 256 channels at 3 x 3: one forward per channel stays cheap
TARGETS = [0, 1]            # one per test image
PEARSON = 0.999

# method -> (pytorch-grad-cam class, constructor kwargs, runtime method options that undo a deliberate difference)
PGC = {
    "gradcam": ("GradCAM", {}, {}),
    "gradcam++": ("GradCAMPlusPlus", {}, {"eps": 1e-6}),
    "xgradcam": ("XGradCAM", {}, {}),
    "layercam": ("LayerCAM", {}, {}),
    "scorecam": ("ScoreCAM", {}, {"upsample": "align_corners"}),
    "ablationcam": ("AblationCAM", {"batch_size": 64}, {}),
    "eigencam": ("EigenCAM", {}, {}),
    "eigengradcam": ("EigenGradCAM", {}, {}),
}
# method -> the parity test that covers it against an independent implementation
PARITY_TESTS = {
    **{m: "test_runtime_matches_pytorch_grad_cam + test_runtime_matches_eager_reference" for m in PGC},
    "wgradcam": "test_runtime_matches_eager_reference",
    "scorecam++": "test_runtime_matches_eager_reference",
    "decomcam": "test_decomcam_matches_eager_reference",
    "decomcam-authors": "test_decomcam_matches_eager_reference",
    "decomcam-ig": "test_decomcam_matches_eager_reference",
}
EAGER = [m for m in PARITY_TESTS if not m.startswith("decomcam")]
TABLE: dict[str, dict] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # torch single-threaded: the tiny model gains little from a second thread, and on a shared 2-core machine
    # every parallel region then waits on a busy core (measured 5-8x slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _setup(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _setup(tmp_path_factory):
    lm = load_model(MODEL, "none")
    out = tmp_path_factory.mktemp("baselines") / MODEL
    export_model(lm, [class_set_from_names(["a", "b", "c", "d", "e"], "t")], out)
    imgs = make_images(2, seed=3)
    x = torch.from_numpy(np.stack([preprocess(im, lm.image_size, lm.mean, lm.std)[0] for im in imgs]))
    with torch.no_grad():
        feats = lm.model.encode_image(x, normalize=True)                       # [2, D]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, feats.shape[1], generator=g)
    text = torch.nn.functional.normalize(torch.cat([feats + 0.02 * noise[:2], noise[2:]]), dim=-1)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["class_sets"]["probe"] = write_class_set(out, class_set_from_names(list("vwxyz"), "probe"), text.numpy())
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    ex = Explainer(load_artifacts(out), class_set="probe", batch_size=32,
                   engine_options=EngineOptions(allow_spinning=False))  # ORT's spinning threads starve torch
    text = torch.from_numpy(ex.classes.embeddings)
    logits = (lm.model.logit_scale.exp() * feats @ text.T).detach()
    assert np.all(logits[[0, 1], TARGETS].numpy() > 10), "the probe targets need positive logits"
    return {"lm": lm, "ex": ex, "imgs": imgs, "x": x, "text": text, "dir": out}


def pearson(a: np.ndarray, b: np.ndarray) -> list[float]:
    out = []
    for u, v in zip(a, b):
        assert u.std() > 1e-3 and v.std() > 1e-3, "degenerate (constant) map: nothing to compare"
        out.append(float(np.corrcoef(u.ravel().astype(np.float64), v.ravel().astype(np.float64))[0, 1]))
    return out


def runtime_maps(setup, name, **options) -> tuple[np.ndarray, int]:
    """The runtime's maps [2, S, S] for the test images and targets, and its extra forwards per image."""

    class Counting(type(get_method(name))):
        def __call__(self, ctx):
            out = super().__call__(ctx)
            self.forwards_per_image = out.forwards
            return out

    meth = Counting(**options)
    res = setup["ex"].explain(setup["imgs"], method=meth, target=TARGETS)
    assert all(e.method == name for e in res)
    return np.stack([e.saliency for e in res]), meth.forwards_per_image


class ClipLogits(torch.nn.Module):
    """open_clip CLIP as pytorch-grad-cam expects: image -> logits against fixed class embeddings."""

    def __init__(self, clip, text):
        super().__init__()
        self.clip = clip
        self.register_buffer("text", text)

    def forward(self, image):
        return self.clip.logit_scale.exp() * self.clip.encode_image(image, normalize=True) @ self.text.T


def oriented(project):
    """pytorch-grad-cam's get_2d_projection with our sign rule: positive dot with the channel sum."""

    def wrapped(batch):
        p = project(batch)                                                     # [B, h, w]
        dots = (p.astype(np.float64) * batch.sum(1)).sum((1, 2))
        assert np.all(np.abs(dots) > 1e-6 * np.abs(p).sum((1, 2)) * np.abs(batch.sum(1)).sum((1, 2)))
        return p * np.where(dots < 0, -1, 1)[:, None, None].astype(p.dtype)

    return wrapped


def pgc_maps(setup, name, monkeypatch, undo: bool = True) -> np.ndarray:
    cls_name, kwargs, _ = PGC[name]
    lm = setup["lm"]
    if name.startswith("eigen") and undo:
        import pytorch_grad_cam.eigen_cam as ec
        import pytorch_grad_cam.eigen_grad_cam as egc

        monkeypatch.setattr(ec, "get_2d_projection", oriented(ec.get_2d_projection))
        monkeypatch.setattr(egc, "get_2d_projection", oriented(egc.get_2d_projection))
    if name == "ablationcam":
        store = {}
        h = lm.model.visual.layer4.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
        with torch.no_grad():
            lm.model.encode_image(setup["x"])
        h.remove()
        assert float(store["a"].min()) == 0.0  # so pytorch-grad-cam zeroes the ablated channel, as the paper
    cam = getattr(pgc, cls_name)(ClipLogits(lm.model, setup["text"]), [lm.model.visual.layer4], **kwargs)
    if name == "scorecam":
        cam.batch_size = 64
    try:
        return cam(setup["x"], [ClassifierOutputTarget(t) for t in TARGETS])
    finally:
        cam.activations_and_grads.release()


@pytest.mark.parametrize("name", sorted(PGC))
def test_runtime_matches_pytorch_grad_cam(setup, name, monkeypatch):
    theirs = pgc_maps(setup, name, monkeypatch)
    ours, _ = runtime_maps(setup, name, **PGC[name][2])
    r = pearson(ours, theirs)
    row = TABLE.setdefault(name, {})
    row["pgc"] = min(r)
    assert min(r) >= PEARSON, f"{name}: Pearson {r} vs pytorch-grad-cam"
    if PGC[name][2] or name.startswith("eigen"):  # for the record: the size of the deliberate difference
        raw = pgc_maps(setup, name, monkeypatch, undo=False) if name.startswith("eigen") else theirs
        row["pgc_as_is"] = min(pearson(runtime_maps(setup, name)[0], raw))


@pytest.mark.parametrize("name", EAGER)
def test_runtime_matches_eager_reference(setup, name):
    t = time.perf_counter()
    ours, forwards = runtime_maps(setup, name)
    t_rt = time.perf_counter() - t
    t = time.perf_counter()
    ref = cam_reference(name, setup["lm"].model, setup["x"], setup["text"], setup["lm"].mean, setup["lm"].std,
                        target=torch.tensor(TARGETS))
    t_ref = time.perf_counter() - t
    r = pearson(ours, ref)
    TABLE.setdefault(name, {}).update(eager=min(r), max_abs=float(np.abs(ours - ref).max()), forwards=forwards,
                                      runtime_s=t_rt, eager_s=t_ref)
    assert min(r) >= PEARSON, f"{name}: Pearson {r} vs the eager reference"
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("name", ["decomcam", "decomcam-authors", "decomcam-ig"])
def test_decomcam_matches_eager_reference(setup, name):
    ours, _ = runtime_maps(setup, name)
    ref = decomcam_reference(setup["lm"].model, setup["x"], setup["text"], setup["lm"].mean, setup["lm"].std,
                             target=torch.tensor(TARGETS), config=setup["ex"].config, method=name)
    np.testing.assert_allclose(ours, ref.saliency, atol=2e-3)
    live = [i for i in range(len(ours)) if ref.saliency[i].std() > 1e-3]  # the authors' clamp can zero a map
    assert live and min(pearson(ours[live], ref.saliency[live])) >= PEARSON


def test_every_registered_method_has_a_parity_test():
    assert set(PARITY_TESTS) == set(list_methods()), (
        f"registered without a parity test: {sorted(set(list_methods()) - set(PARITY_TESTS))}; "
        f"tests for unregistered methods: {sorted(set(PARITY_TESTS) - set(list_methods()))}")
    assert set(PGC) == {"gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam",
                        "eigengradcam"}


def test_every_method_runs_through_the_explainer(setup):
    ex = Explainer(load_artifacts(setup["dir"]), class_set="probe")
    for name in list_methods():
        e = ex.explain(setup["imgs"][0], method=name)                         # top-1 target
        assert e.method == name and e.saliency.shape == (96, 96) and e.target == int(np.argmax(e.logits))
        assert 0 <= e.saliency.min() and e.saliency.max() <= 1 + 1e-6


def test_gradient_free_methods_skip_the_backward_graph(setup):
    ex = Explainer(load_artifacts(setup["dir"]), class_set="probe")
    for name in ("scorecam", "ablationcam", "eigencam"):
        ex.explain(setup["imgs"][0], method=name)
    assert "explain" not in ex._sessions and {"features", "classify", "head"} <= set(ex._sessions)
    # an export from before features.onnx: the forward outputs of explain.onnx, same maps
    old = Explainer(load_artifacts(setup["dir"]), class_set="probe")
    del old.artifacts.manifest["graphs"]["features"]
    for name in ("eigencam", "ablationcam"):
        a = ex.explain(setup["imgs"][0], method=name).saliency
        b = old.explain(setup["imgs"][0], method=name).saliency
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert "features" not in old._sessions and "explain" in old._sessions


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if TABLE:
        print(f"\n{MODEL}: 1 - Pearson of the runtime's maps (worst of {len(TARGETS)} images) with pytorch-grad-cam "
              f"(after undoing the deliberate differences; 'as is' without) and the eager reference")
        print(f"{'method':<14} {'pgc':>9} {'pgc as is':>10} {'eager':>9} {'max abs':>9} {'fwd/img':>8} "
              f"{'runtime s':>10} {'eager s':>8}")
        for m, row in TABLE.items():
            def f(key, fmt, one_minus=False):
                return "-" if key not in row else format(1 - row[key] if one_minus else row[key], fmt)
            print(f"{m:<14} {f('pgc', '.1e', True):>9} {f('pgc_as_is', '.1e', True):>10} {f('eager', '.1e', True):>9} "
                  f"{f('max_abs', '.1e'):>9} {f('forwards', 'd'):>8} {f('runtime_s', '.2f'):>10} {f('eager_s', '.2f'):>8}")


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    """RN50 with random weights, exported once, with a probe class set aligned with one test image."""
    lm = load_model("RN50", "none")
    out = tmp_path_factory.mktemp("rn50") / "RN50"
    export_model(lm, [class_set_from_names(["a", "b", "c", "d", "e"], "t")], out)
    img = make_images(1, seed=3)[0]
    x = torch.from_numpy(preprocess(img, lm.image_size, lm.mean, lm.std)[0][None])
    with torch.no_grad():
        feats = lm.model.encode_image(x, normalize=True)
    noise = torch.randn(5, feats.shape[1], generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(torch.cat([feats + 0.02 * noise[:1], noise[1:]]), dim=-1)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["class_sets"]["probe"] = write_class_set(out, class_set_from_names(list("vwxyz"), "probe"), text.numpy())
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    ex = Explainer(load_artifacts(out), class_set="probe", engine_options=EngineOptions(allow_spinning=False))
    return {"lm": lm, "ex": ex, "img": img, "x": x, "text": torch.from_numpy(ex.classes.embeddings)}


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("name", ["scorecam", "scorecam++", "ablationcam"])
def test_rn50_perturbation_methods(rn50, name):
    """RN50, one image: 2048 channels, one forward per live channel in chunks of the batch size."""
    lm, ex = rn50["lm"], rn50["ex"]

    class Counting(type(get_method(name))):
        def __call__(self, ctx):
            out = super().__call__(ctx)
            self.forwards_per_image = out.forwards
            return out

    meth = Counting()
    t = time.perf_counter()
    e = ex.explain(rn50["img"], method=meth, target=0)
    t_rt = time.perf_counter() - t
    t = time.perf_counter()
    ref = cam_reference(name, lm.model, rn50["x"], rn50["text"], lm.mean, lm.std, target=torch.tensor([0]))
    t_ref = time.perf_counter() - t
    r = pearson(e.saliency[None], ref)[0]
    print(f"\nRN50 {name}: Pearson {r:.6f}, max abs {np.abs(e.saliency - ref[0]).max():.1e}, "
          f"{meth.forwards_per_image} forwards, runtime {t_rt:.1f} s, eager {t_ref:.1f} s")
    assert r >= PEARSON
    assert 0 < meth.forwards_per_image <= 2048
