"""The C++ consumer (cpp/, `decomcam-cpp`) against the Python runtime, on tiny exports of both model families.

The program is built by cpp/setup.sh (scripts/setup.sh runs it; the fixture reruns it, a no-op when up to
date). Without a C++ compiler or cmake the tests skip with that reason; a failing build fails them.

Parity (independent implementations: C++ with Eigen/OpenCV/ORT's C API vs runtime/ in numpy/OpenCV/ORT's
Python API), per image, tolerances from the design:
    saliency      Pearson >= 0.99999 and max abs <= 1e-4
    components    max abs <= 1e-4
    weights       same order, max abs <= 1e-5; same target and top-5 classes
From image files (PNG and JPEG) the C++ decoder + Pillow-exact resize must give the Python runtime's
model input exactly (max abs difference 0), so the same bounds hold from files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.explainer import Explainer
from tests.conftest import make_images

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "cpp" / "build" / "decomcam-cpp"

PEARSON_MIN = 0.99999
SALIENCY_ATOL = 1e-4
WEIGHTS_ATOL = 1e-5


@pytest.fixture(scope="session")
def cpp_binary() -> Path:
    missing = [tool for tool in ("g++", "cmake") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no C++ toolchain: {', '.join(missing)} not found (bash scripts/setup.sh installs it as root)")
    r = subprocess.run(["bash", str(ROOT / "cpp" / "setup.sh"), sys.executable], capture_output=True, text=True)
    if r.returncode != 0 or not BINARY.is_file():
        pytest.fail(f"cpp/setup.sh failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return BINARY


@pytest.fixture(scope="session")
def pooled_artifacts(resnet_tiny_artifacts):
    """resnet-tiny (pooled-linear family: no text input, fixed classes), from the session's export registry."""
    return resnet_tiny_artifacts


@pytest.fixture(params=["clip", "pooled-linear"])
def artifacts_dir(request, tiny_artifacts, pooled_artifacts) -> Path:
    return Path(tiny_artifacts.out_dir) if request.param == "clip" else Path(pooled_artifacts)


def run(binary: Path, art: Path, out: Path, inputs, *extra) -> tuple[int, list[dict], list[str]]:
    r = subprocess.run([str(binary), "--artifacts", str(art), "--out", str(out), *extra, *map(str, inputs)],
                       capture_output=True, text=True, timeout=300)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    return r.returncode, lines, [ln for ln in r.stderr.splitlines() if ln.strip()]


def compare(out: Path, stem: str, line: dict, e) -> dict:
    """The C++ outputs of one input against a Python Explanation; returns the measured differences."""
    sal = np.load(out / f"{stem}.saliency.npy")              # [S, S]
    comps = np.load(out / f"{stem}.components.npy")          # [p, S, S]
    wts = np.load(out / f"{stem}.weights.npy")               # [p]
    assert sal.shape == e.saliency.shape and comps.shape == e.components.shape and wts.shape == e.weights.shape
    assert line["target"] == {"index": e.target, "name": e.target_name}
    assert [t["class"] for t in line["top5"]] == [n for n, _ in e.top5]
    np.testing.assert_allclose([t["probability"] for t in line["top5"]], [p for _, p in e.top5], atol=1e-5)
    np.testing.assert_allclose(line["weights"], wts, atol=1e-7)  # the JSON and the .npy agree
    pearson = float(np.corrcoef(sal.ravel(), e.saliency.ravel())[0, 1])
    d = {"pearson": pearson, "saliency": float(np.abs(sal - e.saliency).max()),
         "components": float(np.abs(comps - e.components).max()), "weights": float(np.abs(wts - e.weights).max())}
    assert pearson >= PEARSON_MIN, d
    assert d["saliency"] <= SALIENCY_ATOL, d
    assert d["components"] <= SALIENCY_ATOL, d
    assert d["weights"] <= WEIGHTS_ATOL, d
    assert np.array_equal(np.argsort(-wts, kind="stable"), np.argsort(-e.weights, kind="stable"))  # component order
    return d


def test_parity_from_the_same_input_tensor(cpp_binary, artifacts_dir, tmp_path):
    ex = Explainer.from_artifacts(artifacts_dir)
    labels = ex.classes.labels
    imgs = make_images(3, seed=3)
    paths = []
    for i, im in enumerate(imgs):
        x, _ = ex.artifacts.preprocess_image(im)                # [3, S, S], what the Python runtime feeds
        np.save(tmp_path / f"t{i}.npy", x if i != 1 else x[None])  # [3, S, S] and [1, 3, S, S] are both read
        paths.append(tmp_path / f"t{i}.npy")
    for target, py_target in ((None, None), (labels[2], labels[2]), ("1", 1)):
        out = tmp_path / f"out-{py_target}"
        code, lines, err = run(cpp_binary, artifacts_dir, out, paths, *(["--target", target] if target else []),
                               "--top-p", "6")
        assert code == 0 and err == [], err
        assert [ln["source"] for ln in lines] == [str(p) for p in paths]
        for i, (im, line) in enumerate(zip(imgs, lines)):
            e = ex.explain(im, target=py_target, top_p=6)
            compare(out, f"t{i}", line, e)
            assert set(line["timings_ms"]) >= {"explain", "decompose", "upsample", "blur", "classify", "integrate"}
            assert (out / f"t{i}.overlay.png").stat().st_size > 0


def test_decomcam_ig_parity(cpp_binary, artifacts_dir, tmp_path):
    """--method decomcam-ig: features.onnx, head_grad.onnx at alpha_k A, the decomposition of S_IG and the
    rank-p bicubic map, against the Python runtime's `decomcam-ig` (both families; the same bounds). 40 steps
    take two head_grad calls (32 + 8 rows). The path (alpha_k) matters on the CLIP family only: resnet-tiny's
    head is linear, its S_IG is S*."""
    ex = Explainer.from_artifacts(artifacts_dir)
    imgs = make_images(3, seed=8)
    paths = []
    for i, im in enumerate(imgs):
        np.save(tmp_path / f"t{i}.npy", ex.artifacts.preprocess_image(im)[0])
        paths.append(tmp_path / f"t{i}.npy")
    for steps, target in ((16, None), (5, "2"), (40, None)):
        out = tmp_path / f"out-{steps}"
        code, lines, err = run(cpp_binary, artifacts_dir, out, paths, "--method", "decomcam-ig", "--ig-steps",
                               str(steps), "--top-p", "6", *(["--target", target] if target else []))
        assert code == 0 and err == [], err
        for i, (im, line) in enumerate(zip(imgs, lines)):
            e = ex.explain(im, method="decomcam-ig", top_p=6, target=None if target is None else int(target),
                           config=ex.config.with_(ig_steps=steps))
            compare(out, f"t{i}", line, e)
            assert line["method"] == "decomcam-ig" and line["scores"] is None
            assert set(line["timings_ms"]) >= {"explain", "head_grad", "decompose", "upsample", "integrate"}
            assert "classify" not in line["timings_ms"]
            np.testing.assert_allclose(line["singular_values"], e.singular_values, rtol=1e-5)


def test_decomcam_ig_needs_head_grad(cpp_binary, tiny_artifacts, tmp_path):
    """An export written before head_grad.onnx: decomcam-ig is a one-line usage error; decomcam still runs."""
    art = _manifest_case(Path(tiny_artifacts.out_dir), tmp_path / "old", lambda m: m["graphs"].pop("head_grad"))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_images(1)[0])
    code, lines, err = run(cpp_binary, art, tmp_path / "out", [img], "--method", "decomcam-ig")
    assert code == 2 and lines == []
    assert err == [f"{art / 'manifest.json'}: no 'head_grad' graph listed; re-export with this version"]
    code, lines, err = run(cpp_binary, art, tmp_path / "out", [img])
    assert code == 0 and len(lines) == 1 and lines[0]["method"] == "decomcam"
    # it needs features.onnx too; it does not need explain.onnx or classify.onnx
    nofeat = _manifest_case(Path(tiny_artifacts.out_dir), tmp_path / "nofeat", lambda m: m["graphs"].pop("features"))
    code, lines, err = run(cpp_binary, nofeat, tmp_path / "out", [img], "--method", "decomcam-ig")
    assert code == 2 and err == [f"{nofeat / 'manifest.json'}: no 'features' graph listed; re-export with this version"]
    only = _manifest_case(Path(tiny_artifacts.out_dir), tmp_path / "only",
                          lambda m: [m["graphs"].pop(g) for g in ("explain", "classify")])
    code, lines, err = run(cpp_binary, only, tmp_path / "out", [img], "--method", "decomcam-ig")
    assert code == 0 and err == [] and lines[0]["method"] == "decomcam-ig"
    for bad, problem in ((["--method", "gradcam"], "unknown method 'gradcam'"),
                         (["--method", "decomcam-ig", "--ig-steps", "0"], "--ig-steps must be in 1..1024"),
                         (["--method", "decomcam-ig", "--ig-baseline", "blur"], "unknown option --ig-baseline")):
        code, _, err = run(cpp_binary, art, tmp_path / "out", [img], *bad)
        assert code == 2 and problem in err[0], err


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_parity_from_image_files(cpp_binary, tiny_artifacts, tmp_path, ext):
    """Decoding + Pillow-exact preprocessing in C++: the model input equals the Python runtime's exactly, also
    for tall images, which Pillow 13 resamples vertically first (700 x 300, 520 x 200)."""
    from runtime.images import pillow_vertical_first

    art = Path(tiny_artifacts.out_dir)
    ex = Explainer.from_artifacts(art)
    imgs = make_images(6, seed=4, sizes=((150, 200), (224, 224), (260, 180), (97, 301), (700, 300), (520, 200)))
    s = ex.artifacts.input_size
    assert pillow_vertical_first(700, 300, int(s * 700 / 300), s) == pillow_vertical_first(24, 6, 11, 7)
    paths = []
    for i, im in enumerate(imgs):
        paths.append(tmp_path / f"f{i}.{ext}")
        assert cv2.imwrite(str(paths[-1]), im[:, :, ::-1])
    out = tmp_path / "out"
    code, lines, err = run(cpp_binary, art, out, paths, "--save-input")
    assert code == 0 and err == [], err
    from runtime.images import load_image

    for i, (p, line) in enumerate(zip(paths, lines)):
        x_py, _ = ex.artifacts.preprocess_image(load_image(p))
        x_cpp = np.load(out / f"f{i}.input.npy")
        assert np.abs(x_cpp - x_py).max() == 0.0          # same decoder result, same Pillow resampling
        assert line["original_size"] == list(imgs[i].shape[:2])
        compare(out, f"f{i}", line, ex.explain(p))
    overlay = cv2.imread(str(out / "f3.overlay.png"))
    assert overlay.shape[:2] == imgs[3].shape[:2]          # drawn on the original image


def test_bad_inputs_one_line_each_others_explained(cpp_binary, tiny_artifacts, tmp_path):
    art = Path(tiny_artifacts.out_dir)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), make_images(1, seed=5)[0])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200])
    notimg = tmp_path / "notes.txt"
    notimg.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    badnpy = tmp_path / "wrong.npy"
    np.save(badnpy, np.zeros((3, 8, 8), np.float32))
    out = tmp_path / "out"
    inputs = [missing, good, corrupt, truncated, notimg, badnpy]
    code, lines, err = run(cpp_binary, art, out, inputs)
    assert code == 1
    assert [ln["source"] for ln in lines] == [str(good)]
    assert (out / "good.saliency.npy").is_file() and (out / "good.overlay.png").is_file()
    assert len(err) == 5, err
    for path, line, problem in zip([missing, corrupt, truncated, notimg, badnpy], err,
                                   ["no such file", "corrupt", "truncated", "not an image", "shape"]):
        assert line.startswith(f"{path}: ") and problem in line, line
    assert not list(out.glob("*.tmp")) and not list(out.glob("missing*")) and not list(out.glob("corrupt*"))


def test_tampered_graph_refused(cpp_binary, tiny_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, art)
    data = bytearray((art / "classify.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "classify.onnx").write_bytes(bytes(data))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_images(1)[0])
    code, lines, err = run(cpp_binary, art, tmp_path / "out", [img])
    assert code == 2 and lines == []
    assert len(err) == 1 and "classify.onnx: sha256" in err[0] and "does not match the manifest" in err[0], err


def test_unknown_target(cpp_binary, tiny_artifacts, tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), make_images(1)[0])
    for target, problem in (("giraffe", "unknown target class 'giraffe' in class set 'voc'"),
                            ("20", "target index 20 is out of range for class set 'voc' (20 classes)")):
        code, lines, err = run(cpp_binary, Path(tiny_artifacts.out_dir), tmp_path / "out", [img], "--target", target)
        assert code == 2 and lines == [] and err == [problem]


def _manifest_case(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    text = edit(m)
    (dst / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(m))
    return dst


@pytest.mark.parametrize("name, edit, problem", [
    ("dims-C", lambda m: m["dims"].pop("C"), "field 'dims.C' is missing"),
    ("mean", lambda m: m.update(mean=[0.5, 0.5]), "field 'mean' must be a list of 3 numbers"),
    ("input-size", lambda m: m.update(input_size="224"), "field 'input_size' must be an integer >= 1"),
    ("version", lambda m: m.update(format_version=2), "field 'format_version' is 2, this consumer reads 1"),
    ("family", lambda m: m.update(family="vit"), "field 'family' is 'vit'; valid families: clip, pooled-linear"),
    ("sha", lambda m: m["graphs"]["explain"].update(sha256="abc"), "field 'graphs.explain.sha256' must be 64 hex"),
    ("not-json", lambda m: '{"format_version": 1,', "not valid JSON"),
])
def test_malformed_manifest_one_line(cpp_binary, tiny_artifacts, tmp_path, name, edit, problem):
    art = _manifest_case(Path(tiny_artifacts.out_dir), tmp_path / name, edit)
    code, lines, err = run(cpp_binary, art, tmp_path / "out", [tmp_path / "unused.png"])
    assert code == 2 and lines == []
    assert len(err) == 1 and err[0].startswith(f"{art / 'manifest.json'}: ") and problem in err[0], err


def _swap_explain(m, dst):
    shutil.copy(dst / "classify.onnx", dst / "explain.onnx")
    m["graphs"]["explain"]["sha256"] = hashlib.sha256((dst / "explain.onnx").read_bytes()).hexdigest()


@pytest.mark.parametrize("edit, problem", [
    (lambda m, d: m["dims"].update(C=m["dims"]["C"] // 2), "explain.onnx: output 'activations' axis C is 512 in the "
                                                         "graph and 256 in manifest.json"),
    (lambda m, d: m["dims"].update(h=3), "explain.onnx: output 'activations' axis h is 2 in the graph and 3 in "
                                         "manifest.json"),
    (lambda m, d: (m.update(input_size=32), m["dims"].update(H=32, W=32)),
     "explain.onnx: input 'image' axis H is 64 in the graph and 32 in manifest.json"),
    (_swap_explain, "explain.onnx: has no input 'target'"),
])
def test_a_manifest_that_contradicts_its_graphs_is_a_usage_error(cpp_binary, pooled_artifacts, tmp_path, edit,
                                                                  problem):
    """Checked on the graphs' own declared inputs and outputs when they are loaded, before any image."""
    art = tmp_path / "art"
    shutil.copytree(pooled_artifacts, art)
    m = json.loads((art / "manifest.json").read_text())
    edit(m, art)
    (art / "manifest.json").write_text(json.dumps(m))
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((40, 50, 3), 90, np.uint8))
    code, lines, err = run(cpp_binary, art, tmp_path / "out", [img])
    assert code == 2 and lines == [] and len(err) == 1 and problem in err[0], err


def test_names_are_quoted_and_wide_images_refused_before_decoding(cpp_binary, pooled_artifacts, tmp_path):
    """A name with a line break or escape codes is one quoted line with them escaped (the line break used to
    become a space and escape codes reached the terminal); a 100,000 x 1 PNG is refused from its header."""
    import struct
    import zlib

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("evil\nerror: fake.jpg", "x\x1b[2J.png"):
        (folder / name).write_bytes(b"junk")
    raw = b"".join(b"\x00" + b"\x80" * 300_000 for _ in range(1))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    (folder / "wide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 1, 8, 2, 0, 0, 0))
                                      + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    code, lines, err = run(cpp_binary, pooled_artifacts, tmp_path / "out", sorted(folder.iterdir()))
    assert code == 1 and lines == []
    assert err == [f"'{folder}/evil\\nerror: fake.jpg': not an image or corrupt (OpenCV cannot decode it)",
                   f"{folder}/wide.png: 100000 x 1 pixels: the long side is 100000 times the short side, over the "
                   f"aspect-ratio limit 64; refused before decoding",
                   f"'{folder}/x\\x1b[2J.png': not an image or corrupt (OpenCV cannot decode it)"], err


def test_missing_manifest_and_usage(cpp_binary, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(cpp_binary, tmp_path / "empty", tmp_path / "out", [tmp_path / "a.png"])
    assert code == 2 and err == [f"{tmp_path / 'empty' / 'manifest.json'}: manifest missing; "
                                  "not an artifacts folder written by `python -m export`"]
    r = subprocess.run([str(cpp_binary), "--artifacts", str(tmp_path), "--top-p", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--top-p needs an integer" in r.stderr
