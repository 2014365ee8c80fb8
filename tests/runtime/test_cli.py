"""`python -m runtime.explain`: outputs, resuming, bad input (one line, nothing lost), exit codes, no torch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.explain import main as explain_main
from tests.conftest import make_images

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = (".overlay.png", ".components.png", ".json", ".npz")


def write_good(folder: Path, n: int = 2, seed: int = 3, prefix: str = "good") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(make_images(n, seed=seed)):
        p = folder / f"{prefix}{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def run_cli(args, capsys):
    code = explain_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or ".part" in p.name]


def test_explains_files_folders_and_globs(tiny_artifacts, tmp_path, capsys):
    imgs = write_good(tmp_path / "in" / "sub", 2)
    single = write_good(tmp_path / "in2", 1, seed=9, prefix="other")[0]
    twin = write_good(tmp_path / "in3", 1, seed=10)[0]  # same stem as in/sub/good0.png
    out = tmp_path / "out"
    code, stdout, err = run_cli([tmp_path / "in", str(tmp_path / "in2" / "*.png"), twin, "--artifacts",
                                 tiny_artifacts.out_dir, "--out", out, "--top-p", "4"], capsys)
    assert code == 0, err
    for p in imgs[1:] + [single]:
        for s in OUTPUTS:
            assert (out / f"{p.stem}{s}").is_file()
    assert len(list(out.glob("good0-*.json"))) == 2  # a shared stem gets a hash of each path
    j = json.loads((out / "good1.json").read_text())
    assert len(j["weights"]) == 4 and j["random_weights"] is True and j["engine"] == "cpu"
    npz = np.load(out / "good1.npz")
    assert npz["saliency"].dtype == np.float32 and npz["components"].shape[0] == 4
    ov = cv2.imread(str(out / "good1.overlay.png"))
    assert ov.shape[:2] == cv2.imread(str(imgs[1])).shape[:2]
    assert "explained 4 of 4 inputs" in stdout and "0 failed" in stdout
    assert "4/4" not in err  # no progress bar when stderr is not a terminal
    assert not leftovers(out)


def test_existing_outputs_are_skipped_unless_overwrite(tiny_artifacts, tmp_path, capsys):
    imgs = write_good(tmp_path / "in", 2)
    out = tmp_path / "out"
    base = ["--artifacts", tiny_artifacts.out_dir, "--out", out]
    assert run_cli([*imgs, *base], capsys)[0] == 0
    (out / "good1.npz").unlink()  # an interrupted run: good1 is incomplete
    mtime = (out / "good0.json").stat().st_mtime_ns
    code, stdout, _ = run_cli([*imgs, *base], capsys)
    assert code == 0 and "1 skipped" in stdout and (out / "good1.npz").is_file()
    assert (out / "good0.json").stat().st_mtime_ns == mtime
    code, stdout, _ = run_cli([*imgs, *base, "--overwrite"], capsys)
    assert code == 0 and "0 skipped" in stdout and (out / "good0.json").stat().st_mtime_ns != mtime


def _bad_inputs(folder: Path) -> dict[str, str]:
    """name -> the expected message fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_images(1, seed=4)[0]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    ok, jpg = cv2.imencode(".jpg", good)
    (folder / "cut.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    ok, png = cv2.imencode(".png", good)
    (folder / "cut.png").write_bytes(png.tobytes()[: len(png) // 2])
    # a PNG header claiming 100000 x 100000 pixels: refused before decoding
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100_001) * 4))
            + chunk(b"IEND", b""))
    (folder / "bomb.png").write_bytes(bomb)
    return {"empty.jpg": "empty", "notes.png": "not an image", "cut.jpg": "truncated", "cut.png": "truncated",
            "bomb.png": "pixel"}


def test_bad_inputs_fail_one_line_each_and_the_rest_is_processed(tiny_artifacts, tmp_path, capsys):
    folder = tmp_path / "in"
    expected = _bad_inputs(folder)
    good = write_good(folder, 2)
    out = tmp_path / "out"
    code, stdout, err = run_cli([folder, tmp_path / "missing.jpg", "--artifacts", tiny_artifacts.out_dir,
                                 "--out", out, "--quiet"], capsys)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    for name, frag in expected.items():
        hit = [ln for ln in lines if name in ln]
        assert len(hit) == 1, (name, lines)
        assert frag in hit[0].lower(), (name, hit[0])
    assert any("missing.jpg: no such file" in ln for ln in lines)
    assert len(lines) == len(expected) + 1
    for p in good:
        assert all((out / f"{p.stem}{s}").is_file() for s in OUTPUTS)
    for name in expected:
        assert not list(out.glob(f"{Path(name).stem}.*"))
    assert "explained 2 of" in stdout and f"{len(expected) + 1} failed" in stdout
    assert not leftovers(out)


def test_unusual_but_valid_images_are_handled(tiny_artifacts, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rgb = make_images(1, seed=8)[0]
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    cv2.imwrite(str(folder / "deep16.png"), (rgb[:, :, ::-1].astype(np.uint16) * 257))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    code, _, err = run_cli([folder, "--artifacts", tiny_artifacts.out_dir, "--out", out], capsys)
    assert code == 0, err
    h, w = rgb.shape[:2]
    for name in ("gray", "rgba", "deep16", "cmyk"):
        assert np.load(out / f"{name}.npz")["saliency_original"].shape == (h, w)
    assert np.load(out / "rotated.npz")["saliency_original"].shape == (w, h)


def test_unknown_target_is_a_usage_error_with_suggestions(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    code, _, err = run_cli([img, "--artifacts", tiny_artifacts.out_dir, "--out", tmp_path / "o", "--target", "hors"],
                           capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown target class 'hors'" in err and "horse" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_artifacts_errors_are_usage_errors(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    code, _, err = run_cli([img, "--artifacts", tmp_path / "nowhere", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "artifacts folder not found" in err
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifacts.out_dir, bad)
    with open(bad / "explain.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    code, _, err = run_cli([img, "--artifacts", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "explain.onnx: sha256" in err and "does not match" in err
    (bad / "manifest.json").unlink()
    code, _, err = run_cli([img, "--artifacts", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "manifest missing" in err


def test_usage_errors(tiny_artifacts, tmp_path, capsys):
    code, _, err = run_cli(["--artifacts", tiny_artifacts.out_dir], capsys)
    assert code == 2 and "no inputs" in err
    code, _, err = run_cli(["x.jpg", "--artifacts", tiny_artifacts.out_dir, "--method", "magic"], capsys)
    assert code == 2 and "unknown method 'magic'" in err
    with pytest.raises(SystemExit) as e:
        explain_main(["x.jpg", "--artifacts", str(tiny_artifacts.out_dir), "--top-p", "many"])
    assert e.value.code == 2


def test_cuda_engine_errors_are_usage_errors(tiny_artifacts, tmp_path, capsys, monkeypatch):
    """Independent of what is installed: a provider list without CUDA, then one that lists it but whose
    sessions fall back to the CPU (a library failed to load), then --fp16 on cuda: exit 2, one line each."""
    import runtime.engines as eng

    img = write_good(tmp_path / "in", 1)[0]
    args = [img, "--artifacts", tiny_artifacts.out_dir, "--out", tmp_path / "o", "--engine", "cuda"]
    monkeypatch.setattr(eng, "available_providers", lambda: ["CPUExecutionProvider"])
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "needs CUDAExecutionProvider" in err and "available providers" in err

    class CpuOnly:
        def __init__(self, model, so, providers):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(eng, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(eng, "preload_gpu_libraries", lambda: None)
    monkeypatch.setattr(eng.ort, "InferenceSession", CpuOnly)
    eng.probe_engine.cache_clear()
    try:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "CUDAExecutionProvider failed to load" in err
        monkeypatch.setattr(CpuOnly, "get_providers", lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        monkeypatch.setattr(CpuOnly, "run", lambda self, names, feed: [np.maximum(feed["x"], 0)], raising=False)
        eng.probe_engine.cache_clear()
        code, _, err = run_cli([*args, "--fp16"], capsys)
        assert code == 2 and "engine 'cuda' has no fp16 mode of its own" in err
    finally:
        eng.probe_engine.cache_clear()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_outputs_are_written_atomically(tiny_artifacts, tmp_path, capsys, monkeypatch):
    import runtime.render as render

    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    calls = {"n": 0}
    real = render.npz_bytes

    def failing(exp):  # the disk "fills up" while the NPZ is being produced
        calls["n"] += 1
        raise OSError("No space left on device")

    monkeypatch.setattr(render, "npz_bytes", failing)
    code, _, err = run_cli([img, "--artifacts", tiny_artifacts.out_dir, "--out", out], capsys)
    assert code == 1 and "could not write outputs" in err and calls["n"] == 1
    assert not leftovers(out)
    monkeypatch.setattr(render, "npz_bytes", real)
    assert run_cli([img, "--artifacts", tiny_artifacts.out_dir, "--out", out], capsys)[0] == 0


def test_full_explain_without_torch(tiny_artifacts, tmp_path):
    """The deployable runtime: a subprocess where importing torch (or open_clip) fails."""
    img = write_good(tmp_path / "in", 1)[0]
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'open_clip', 'torchvision'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from runtime.explain import main\n"
        f"rc = main([{str(img)!r}, '--artifacts', {str(tiny_artifacts.out_dir)!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "assert not any(m.split('.')[0] in ('torch', 'open_clip') for m in sys.modules), 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "good0.overlay.png").is_file()


def test_lazily_loaded_graphs_are_verified_too(tiny_artifacts, tmp_path):
    """head.onnx and features.onnx are opened only by some methods: their sha256 is checked when they are."""
    from runtime.artifacts import ArtifactsError
    from runtime.explainer import Explainer

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, art)
    img = make_images(1, seed=2)[0]
    for method, graph in (("ablationcam", "head.onnx"), ("eigencam", "features.onnx")):
        with open(art / graph, "ab") as f:
            f.write(b"\0")
        ex = Explainer.from_artifacts(art)  # explain + classify are intact
        ex.explain(img)
        with pytest.raises(ArtifactsError, match=rf"{graph}: sha256 .* does not match"):
            ex.explain(img, method=method)


def test_render_many_in_the_pool_equals_one_by_one(tiny_artifacts, monkeypatch):
    """The CLI's writer encodes a group's pictures in the image pool: the same bytes as render_outputs one
    image at a time, in order; an OSError while rendering comes back in its place, anything else is raised."""
    import runtime.render as render
    from runtime.explainer import Explainer
    from tests.conftest import make_images

    ex = Explainer.from_artifacts(tiny_artifacts.out_dir)
    rgbs = make_images(3, seed=17)
    exps = ex.explain_arrays(rgbs, top_p=2)
    jobs = list(zip(rgbs, exps))
    want = [render.render_outputs(r, e, {"k": 1}) for r, e in jobs]
    assert list(render.render_many(jobs, {"k": 1}, workers=2)) == want
    assert list(render.render_many(jobs, {"k": 1}, workers=1)) == want
    real = render.npz_bytes

    def second_fails(exp):
        if exp is exps[1]:
            raise OSError("No space left on device")
        return real(exp)

    monkeypatch.setattr(render, "npz_bytes", second_fails)
    got = list(render.render_many(jobs, {"k": 1}, workers=2))
    assert got[0] == want[0] and got[2] == want[2] and isinstance(got[1], OSError)
    def third_breaks(exp):
        if exp is exps[2]:
            raise ValueError("a bug, not a full disk")
        return real(exp)

    monkeypatch.setattr(render, "npz_bytes", third_breaks)
    it = render.render_many(jobs, {"k": 1}, workers=2)
    assert next(it) == want[0] and next(it) == want[1]
    with pytest.raises(ValueError, match="a bug"):
        next(it)


def test_ig_steps_reach_the_method(tiny_artifacts, tmp_path, capsys):
    """--ig-steps 4: the written saliency is the API's decomcam-ig with 4 midpoints (not the default 16's)."""
    from runtime.config import DecomCamConfig
    from runtime.explainer import Explainer

    img = write_good(tmp_path / "in", 1, seed=4)[0]
    out = tmp_path / "out"
    code, _, err = run_cli([img, "--artifacts", tiny_artifacts.out_dir, "--out", out, "--method", "decomcam-ig",
                            "--ig-steps", "4"], capsys)
    assert code == 0, err
    ex = Explainer.from_artifacts(tiny_artifacts.out_dir)
    four = ex.explain(str(img), method="decomcam-ig", config=DecomCamConfig(ig_steps=4))
    one = ex.explain(str(img), method="decomcam-ig", config=DecomCamConfig(ig_steps=1))
    got = np.load(out / f"{img.stem}.npz")["saliency"]
    np.testing.assert_allclose(got, four.saliency, atol=1e-6)
    assert np.abs(got - one.saliency).max() > 1e-4


def art(tiny_artifacts) -> list[str]:
    return ["--artifacts", str(tiny_artifacts.out_dir)]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("how, code_, word", [("int", 130, "interrupted (Ctrl-C)"), ("term", 143, "terminated (SIGTERM)")])
def test_interrupt_is_one_line_and_leaves_no_temporaries(tiny_artifacts, tmp_path, capsys, monkeypatch, how, code_, word):
    import runtime.render as render

    imgs = write_good(tmp_path / "in", 2)
    real = render.npz_bytes

    sent = []

    def interrupted(exp):
        if how == "int":
            raise KeyboardInterrupt
        if not sent:  # one SIGTERM, sent while the pictures are encoded (a thread of the image pool)
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(exp)

    monkeypatch.setattr(render, "npz_bytes", interrupted)
    code, _, err = run_cli([*imgs, *art(tiny_artifacts), "--out", tmp_path / "out"], capsys)
    assert code == code_
    assert "Traceback" not in err and [ln for ln in err.splitlines() if word in ln] == [
        f"{word}: finished outputs are kept; rerun the same command to resume"]
    assert not leftovers(tmp_path / "out")


def test_real_sigint_in_a_subprocess(tiny_artifacts, tmp_path):
    """A real Ctrl-C (SIGINT) while the CLI runs: exit 130, one line, no traceback. The child starts with
    Python's own SIGINT handler, as under an interactive shell: a suite launched in the background (nohup,
    `&` without job control) inherits SIGINT ignored, and Python keeps it ignored."""
    imgs = write_good(tmp_path / "in", 2)
    code = ("import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import runtime.render as r\n"
            "r.write_payloads = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)\n"
            "from runtime.explain import main\nsys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, imgs), *art(tiny_artifacts), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")


def test_unusable_out_is_one_line_exit_2(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, frag in ((afile, "cannot create the output folder"), (afile / "sub", "cannot create the output folder"),
                      ("/proc/decomcam-out", "cannot create the output folder")):
        code, _, err = run_cli([img, *art(tiny_artifacts), "--out", out], capsys)
        assert code == 2, (out, err)
        assert error_lines(err) == [ln for ln in err.splitlines() if not ln.startswith("note:")]
        assert len(error_lines(err)) == 1 and f"--out {out}: {frag}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line_exit_2(tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, _, err = run_cli([img, *art(tiny_artifacts), "--out", ro], capsys)
    assert code == 2 and "cannot write in the output folder" in err


@pytest.mark.parametrize("opt, value, rng", [
    ("--group", "-2", "[1, 4,096]"), ("--group", "0", "[1, 4,096]"), ("--max-pixels", "0", "[1, "),
    ("--max-pixels", "-1", "[1, "), ("--max-bytes", "0", "[1, "), ("--blur-sigma", "inf", "(0, 1000]"),
    ("--blur-sigma", "nan", "(0, 1000]"), ("--blur-sigma", "0", "(0, 1000]"), ("--threads", "-1", "[1, 1,024]"),
    ("--threads", "0", "[1, 1,024]"), ("--batch-size", "0", "[1, 4,096]"), ("--top-p", "0", "[1, 4,096]"),
    ("--device-id", "-1", "[0, 1,023]"), ("--top-p", "many", "expected an integer"),
])
def test_options_are_validated_at_parse_time(tiny_artifacts, capsys, opt, value, rng):
    with pytest.raises(SystemExit) as e:
        explain_main(["x.jpg", *art(tiny_artifacts), opt, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: argument {opt}:") and rng in err


@pytest.mark.parametrize("method, graph", [("ablationcam", "head.onnx"), ("eigencam", "features.onnx")])
def test_missing_or_tampered_method_graph_is_exit_2_before_any_image(tiny_artifacts, tmp_path, capsys, method, graph):
    import shutil

    imgs = write_good(tmp_path / "in", 2)
    a = tmp_path / "art"
    shutil.copytree(tiny_artifacts.out_dir, a)
    with open(a / graph, "ab") as f:
        f.write(b"\0")
    code, stdout, err = run_cli([*imgs, "--artifacts", a, "--out", tmp_path / "o", "--method", method], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{graph}: sha256" in err
    (a / graph).unlink()
    code, stdout, err = run_cli([*imgs, "--artifacts", a, "--out", tmp_path / "o", "--method", method], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{graph}: graph file missing" in err
    assert not (tmp_path / "o").exists()


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tiny_artifacts, tmp_path, capsys, monkeypatch):
    import io

    imgs = write_good(tmp_path / "in", 3)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for quiet in (False, True):
        fake = Tty()
        monkeypatch.setattr(sys, "stderr", fake)
        args = [*imgs, *art(tiny_artifacts), "--out", tmp_path / f"o{quiet}", *(["--quiet"] if quiet else [])]
        assert explain_main([str(a) for a in args]) == 0
        monkeypatch.undo()
        text = fake.getvalue()
        assert ("3/3" in text) == (not quiet), text
        assert ("img/s" in text) == (not quiet)


def test_list_methods_needs_no_artifacts(capsys):
    """`--list-methods` prints every registered method and exits 0, without --artifacts or inputs."""
    from runtime.explain import main
    from runtime.methods import list_methods

    assert main(["--list-methods"]) == 0
    assert capsys.readouterr().out.split() == list(list_methods())
