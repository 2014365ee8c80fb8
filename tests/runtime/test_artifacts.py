"""runtime/artifacts.py and runtime/manifest.py against malformed or contradictory exports: one line naming
manifest.json (or the graph), exit 2, before any image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts import ArtifactsError, load_artifacts, sha256_path
from tests.conftest import make_images
from tests.runtime.test_cli import run_cli, write_good


def _copy(src, dest: Path, edit=None, raw: str | None = None) -> Path:
    shutil.copytree(src, dest)
    if raw is not None:
        (dest / "manifest.json").write_text(raw)
    elif edit is not None:
        man = json.loads((dest / "manifest.json").read_text())
        edit(man, dest)
        (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def _usage_error(art: Path, tmp_path, capsys, method: str = "decomcam") -> str:
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "o"
    code, stdout, err = run_cli([img, "--artifacts", art, "--out", out, "--method", method], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not (out / "good0.json").exists()
    return lines[0]


@pytest.mark.parametrize("raw, problem", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
    ('{"input_size": 1' + "0" * 5000 + "}", "not valid JSON (Exceeds the limit (4300 digits)"),
])
def test_unparsable_manifests_are_one_line(resnet_tiny_artifacts, tmp_path, capsys, raw, problem):
    """100,000 nested arrays (RecursionError, exit 1 with a traceback before) and a 5,000-digit integer (exit 2
    without naming manifest.json before)."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", raw=raw)
    line = _usage_error(art, tmp_path, capsys)
    assert line.startswith(f"error: {art / 'manifest.json'}: {problem}"), line


def test_a_huge_integer_is_a_field_error(resnet_tiny_artifacts, tmp_path, capsys):
    """A 400-digit input_size raised OverflowError (exit 1, traceback)."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", edit=lambda m, d: m.update(input_size=10 ** 400))
    line = _usage_error(art, tmp_path, capsys)
    assert line.startswith(f"error: {art / 'manifest.json'}: field 'input_size': 10000000000000000000... (401 "
                           f"digits) is out of range"), line


def _swap(man: dict, dest: Path) -> None:
    """explain.onnx replaced by classify.onnx, its sha256 updated in the manifest."""
    shutil.copy(dest / "classify.onnx", dest / "explain.onnx")
    man["graphs"]["explain"]["sha256"] = hashlib.sha256((dest / "explain.onnx").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit, method, problem", [
    (lambda m, d: m.update(input_size=m["input_size"] // 2), "decomcam",
     "manifest.json: field 'dims.H': 64 differs from input_size 32"),
    (lambda m, d: (m.update(input_size=m["input_size"] // 2),
                   m["dims"].update(H=m["input_size"], W=m["input_size"])), "decomcam",
     "classify.onnx: input 'image' axis H is 64 in the graph and 32 in manifest.json"),
    (_swap, "decomcam", "explain.onnx: has no input 'target'"),
    (lambda m, d: m["dims"].update(C=m["dims"]["C"] // 2), "gradcam",
     "explain.onnx: output 'activations' axis C is 512 in the graph and 256 in manifest.json"),
    (lambda m, d: m["dims"].update(h=m["dims"]["h"] + 1), "decomcam-ig",
     "features.onnx: output 'activations' axis h is 2 in the graph and 3 in manifest.json"),
    (lambda m, d: m["dims"].update(K=m["dims"]["K"] + 1), "scorecam",
     "classes/voc10.txt: 10 labels for a classifier with 11 classes"),
])
def test_a_manifest_that_contradicts_its_graphs_is_refused_at_load(resnet_tiny_artifacts, tmp_path, capsys, edit,
                                                                     method, problem):
    """input_size halved, explain.onnx swapped for classify.onnx with its sha256 updated, dims.C / h / K
    changed: before, each failed per image with exit 1, or not at all."""
    art = _copy(resnet_tiny_artifacts, tmp_path / "art", edit=edit)
    line = _usage_error(art, tmp_path, capsys, method)
    assert problem in line, line


# -- the shared image pool (runtime.artifacts.image_pool) ------------------------------------------------

def test_image_pool_is_shared_and_never_nested():
    import threading

    from runtime.artifacts import image_pool

    assert image_pool(1) is None                               # one worker: the calling thread does it
    p = image_pool(2)
    assert p is not None and image_pool(2) is p                # one pool per (process, size)
    inner = p.submit(lambda: (threading.current_thread().name, image_pool(2))).result()
    assert inner[0].startswith("decomcam-images") and inner[1] is None   # no pool from inside the pool


def test_preprocess_images_in_the_pool_equal_one_by_one(tiny_artifacts):
    from runtime.artifacts import load_artifacts

    art = load_artifacts(tiny_artifacts.out_dir)
    ims = make_images(5, seed=11)
    x, geoms = art.preprocess_images(ims, "stretch")
    for i, im in enumerate(ims):
        xi, gi = art.preprocess_image(im, "stretch")
        np.testing.assert_array_equal(x[i], xi)
        assert geoms[i] == gi
    x0, g0 = art.preprocess_images([])
    assert x0.shape == (0, 3, art.input_size, art.input_size) and g0 == []


def test_image_pool_threads_are_daemons_and_render_many_stays_a_window_ahead(monkeypatch):
    """A run that stops (a second Ctrl-C) does not wait for queued picture encodings at exit: the pool's
    threads are daemons; and the writer's generator keeps at most one job per pool thread ahead of it,
    submitting nothing more once it is closed. Synchronised with events only (no sleeps): a fast or a slow
    machine goes through the same steps."""
    import threading

    import runtime.render as render
    from runtime.artifacts import image_pool

    pool = image_pool(2)
    assert pool.size == 2 and pool.submit(lambda: threading.current_thread().daemon).result() is True
    submitted, real_submit = [], pool.submit
    monkeypatch.setattr(pool, "submit", lambda fn, *args: (submitted.append(args), real_submit(fn, *args))[1])
    release, holding, out = threading.Event(), threading.Semaphore(0), []

    def slow(rgb, exp, extra):
        holding.release()                 # this pool thread now holds a job
        release.wait(600)                 # a cap against a hang, not a timing condition
        return [rgb]

    monkeypatch.setattr(render, "render_outputs", slow)
    gen = render.render_many([(i, None) for i in range(10)], {}, workers=2)
    consumer = threading.Thread(target=lambda: out.append(next(gen)))
    consumer.start()                      # the generator submits its window, then waits on the first result
    assert holding.acquire(timeout=600) and holding.acquire(timeout=600)   # both threads hold a job
    assert len(submitted) == 2            # the generator is blocked on job 0: two submitted, not ten
    release.set()
    consumer.join(600)
    assert out == [[0]]
    gen.close()                           # the writer stops: the job still pending is cancelled
    assert len(submitted) == 2            # and nothing more is submitted


@pytest.fixture(name="art")
def art_copy(tiny_artifacts, tmp_path) -> Path:
    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    return a


def edit_manifest(a: Path, fn) -> None:
    m = json.loads((a / "manifest.json").read_text())
    m = fn(m)
    (a / "manifest.json").write_text(json.dumps(m))


# -- 5. class-set files are checked before use ------------------------------------------------------

def test_reordered_embeddings_are_refused(art):
    npy = art / "classes" / "voc.npy"
    np.save(npy, np.load(npy)[::-1])
    with pytest.raises(ArtifactsError, match=r"voc\.npy: sha256 .* does not match the manifest"):
        load_artifacts(art).load_class_set("voc")


def test_altered_labels_are_refused(art):
    lab = art / "classes" / "voc.txt"
    lines = lab.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    lab.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactsError, match=r"voc\.txt: sha256 does not match the manifest's labels_sha256"):
        load_artifacts(art).load_class_set("voc")


@pytest.mark.parametrize("array, match", [
    (np.array([["x"] * 64] * 20), "dtype <U1, expected a float type"),
    (np.ones((20, 64), np.int64), "dtype int64, expected a float type"),
    (np.ones((20, 64), np.complex64), "dtype complex64, expected a float type"),
    (np.ones((20, 63), np.float32), r"shape \(20, 63\), expected \(20, 64\)"),
    (np.array([None] * 20, dtype=object), "dtype object"),
])
def test_embeddings_of_the_wrong_dtype_or_shape_are_refused(art, array, match):
    npy = art / "classes" / "voc.npy"
    np.save(npy, array, allow_pickle=True)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match=match):
        load_artifacts(art).load_class_set("voc")


def test_header_claiming_a_huge_shape_is_refused_before_reading(art):
    npy = art / "classes" / "voc.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (20, 1 << 40)}
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match=r"shape \(20, 1099511627776\), expected \(20, 64\)"):
        load_artifacts(art).load_class_set("voc")
    header["shape"] = (20, 64)
    with open(npy, "wb") as f:  # right header, truncated data
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    edit_manifest(art, lambda m: (m["class_sets"]["voc"].update(sha256=sha256_path(npy)), m)[1])
    with pytest.raises(ArtifactsError, match="file size does not match its header"):
        load_artifacts(art).load_class_set("voc")


def test_cli_refuses_tampered_class_set_with_exit_2(art, tmp_path, capsys):
    npy = art / "classes" / "voc.npy"
    np.save(npy, np.load(npy)[::-1])
    img = write_good(tmp_path / "in", 1)[0]
    code, _, err = run_cli([img, "--artifacts", art, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "voc.npy: sha256" in err and err.count("error:") == 1


