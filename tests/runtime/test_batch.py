"""runtime/batch.py, the runner the CLI and the Ray job share: what a resumed run compares (input, content,
export, settings), distinct names for another input's outputs, failures that stay the failing image's,
bounded memory for extreme shapes, and error lines that are never lost."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.batch import BatchRunner
from runtime.explainer import Explainer
from runtime.inputs import output_items
from tests.runtime.test_cli import OUTPUTS, ROOT, run_cli, write_good


def art(path) -> list[str]:
    return ["--artifacts", str(path)]


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def png_bytes(width: int, height: int, value: int = 128) -> bytes:
    """A grey RGB PNG written by hand (zlib keeps a 40,000,000 x 1 image at ~116 KB)."""
    raw = b"".join(b"\x00" + bytes([value]) * (width * 3) for _ in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def two_cats(tmp_path) -> tuple[Path, Path]:
    a = write_good(tmp_path / "dA", 1, seed=1, prefix="cat")[0]
    b = write_good(tmp_path / "dB", 1, seed=2, prefix="cat")[0]
    return a.rename(a.with_name("cat.png")), b.rename(b.with_name("cat.png"))


# -- what a resumed run compares --------------------------------------------------------------------------

def test_another_inputs_outputs_are_kept_and_this_input_gets_its_own_name(resnet_tiny_artifacts, tmp_path, capsys):
    """The probe's case: dA/cat.png into o, then dB/cat.png --report into o. Before: "1 skipped", cat.json
    still named dA's file and the report showed dA's maps under dB's title."""
    a, b = two_cats(tmp_path)
    out = tmp_path / "o"
    assert run_cli([a, *art(resnet_tiny_artifacts), "--out", out], capsys)[0] == 0
    first = {s: (out / f"cat{s}").read_bytes() for s in OUTPUTS}
    code, stdout, err = run_cli([b, *art(resnet_tiny_artifacts), "--out", out, "--report"], capsys)
    assert code == 0 and errors(err) == [], err
    assert "explained 1 of 1" in stdout and "0 skipped" in stdout
    assert {s: (out / f"cat{s}").read_bytes() for s in OUTPUTS} == first           # dA's outputs untouched
    stem = output_items([str(b)])[0].tagged_stem()
    mine = json.loads((out / f"{stem}.json").read_text())
    assert mine["source"] == str(b) and mine["provenance"]["source"] == str(b.resolve())
    want = Explainer.from_artifacts(resnet_tiny_artifacts).explain(str(b))
    np.testing.assert_allclose(np.load(out / f"{stem}.npz")["saliency"], want.saliency, atol=1e-6)
    page = (out / "index.html").read_text()
    assert f'src="{stem}.overlay.png"' in page and 'src="cat.overlay.png"' not in page
    # each input resumes onto its own outputs
    for src, name in ((a, "cat"), (b, stem)):
        code, stdout, _ = run_cli([src, *art(resnet_tiny_artifacts), "--out", out], capsys)
        assert code == 0 and "1 skipped" in stdout


def test_other_settings_content_or_export_fail_the_input_in_one_line(resnet_tiny_artifacts, tiny_export, tmp_path,
                                                                       capsys):
    """Outputs of this input made differently are never a silent skip: one line says what differs, exit 1,
    the files stay; --overwrite replaces them."""
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "o"
    assert run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)[0] == 0
    before = (out / "good0.json").read_bytes()
    cases = [(["--method", "gradcam"], "method 'decomcam' (now 'gradcam')"),
             (["--top-p", "3"], "top_p 10 (now 3)"),
             (["--target", "2"], "target -1 (now 2)"),
             (["--resize", "stretch"], "resize 'crop' (now 'stretch')")]
    for extra, what in cases:
        code, _, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out, *extra], capsys)
        lines = errors(err)
        assert code == 1 and len(lines) == 1, err
        assert lines[0].startswith(f"error: {img}: {out / 'good0.json'} holds an explanation of this input that "
                                   f"differs: {what}; --overwrite replaces it"), lines[0]
        assert (out / "good0.json").read_bytes() == before
    other = tiny_export("resnet-tiny", seed=1)                                 # the same model, other weights
    code, _, err = run_cli([img, *art(other), "--out", out], capsys)
    assert code == 1 and "differs: another export" in err
    cv2.imwrite(str(img), np.full((60, 80, 3), 30, np.uint8))                 # the file changed
    code, _, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)
    assert code == 1 and "differs: the file's content changed" in err
    code, _, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out, "--overwrite"], capsys)
    assert code == 0 and errors(err) == []
    assert json.loads((out / "good0.json").read_text())["provenance"]["source_sha256"] != \
        json.loads(before)["provenance"]["source_sha256"]


def test_files_without_a_provenance_are_not_taken_for_this_inputs_outputs(resnet_tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "o"
    out.mkdir()
    (out / "good0.overlay.png").write_bytes(b"the user's picture")
    code, _, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)
    assert code == 1 and "good0.overlay.png exist without good0.json: not provably this input's outputs" in err
    assert (out / "good0.overlay.png").read_bytes() == b"the user's picture"
    (out / "good0.json").write_text(json.dumps({"source": str(img)}))          # an older version's record
    code, _, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)
    assert code == 1 and "records no provenance" in err


def test_own_outputs_with_a_file_missing_are_written_again(resnet_tiny_artifacts, tmp_path, capsys):
    img = write_good(tmp_path / "in", 1)[0]
    out = tmp_path / "o"
    assert run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)[0] == 0
    (out / "good0.npz").unlink()
    code, stdout, err = run_cli([img, *art(resnet_tiny_artifacts), "--out", out], capsys)
    assert code == 0 and "explained 1 of 1" in stdout and (out / "good0.npz").is_file()


def test_the_json_is_written_first(resnet_tiny_artifacts, tmp_path, monkeypatch):
    """Outputs on disk always carry their record: a run killed after the first file leaves NAME.json, never a
    picture without it."""
    import runtime.render as render

    order = []
    real = render.atomic_write_bytes
    monkeypatch.setattr(render, "atomic_write_bytes", lambda p, d: (order.append(Path(p).name), real(p, d)))
    img = write_good(tmp_path / "in", 1)[0]
    ex = Explainer.from_artifacts(resnet_tiny_artifacts)
    outcomes = BatchRunner(ex, tmp_path / "o").run(output_items([str(img)]))
    assert [o.status for o in outcomes] == ["ok"]
    assert order[0] == "good0.json" and sorted(order) == sorted(f"good0{s}" for s in OUTPUTS)


# -- a failure is the failing image's alone ----------------------------------------------------------------

def test_one_very_wide_image_fails_alone(resnet_tiny_artifacts, tmp_path, capsys):
    """The probe's case: good.png w.png prog.jpg, w.png a 40,000,000 x 1 PNG under --max-pixels: before, all
    three failed with OverflowError."""
    good = write_good(tmp_path / "in", 1, prefix="good")[0]
    wide = tmp_path / "in" / "w.png"
    wide.write_bytes(png_bytes(40_000_000, 1))
    prog = tmp_path / "in" / "prog.jpg"
    cv2.imwrite(str(prog), np.full((90, 120, 3), 100, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    for pipeline in ([], ["--no-pipeline"]):
        out = tmp_path / f"o{len(pipeline)}"
        code, stdout, err = run_cli([good, wide, prog, *art(resnet_tiny_artifacts), "--out", out, "--group", "3",
                                     *pipeline], capsys)
        lines = errors(err)
        assert code == 1 and len(lines) == 1 and "explained 2 of 3" in stdout, err
        assert lines[0] == (f"error: {wide}: 40000000 x 1 pixels: the long side is 40,000,000 times the short "
                            f"side, over the aspect-ratio limit max_aspect=64; refused before decoding")
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{s}" for n in ("good0", "prog") for s in OUTPUTS)


def test_an_explanation_that_fails_fails_only_its_image(resnet_tiny_artifacts, tmp_path, monkeypatch):
    """A group whose explanation raises is explained again image by image: only the image that fails is
    reported, with its reason; an EngineError still ends the run."""
    from runtime.engines import EngineError

    paths = write_good(tmp_path / "in", 3)
    ex = Explainer.from_artifacts(resnet_tiny_artifacts)
    real = ex.explain_arrays

    def flaky(rgbs, sources, **kw):
        if any(s.endswith("good1.png") for s in sources):
            raise FloatingPointError("bad numbers")
        return real(rgbs, sources, **kw)

    monkeypatch.setattr(ex, "explain_arrays", flaky)
    outcomes = BatchRunner(ex, tmp_path / "o").run(output_items([str(p) for p in paths]))
    assert [o.status for o in outcomes] == ["ok", "failed", "ok"]
    assert outcomes[1].error == f"{paths[1]}: explanation failed (FloatingPointError: bad numbers)"

    def dead(*a, **k):
        raise EngineError("the GPU fell off the bus")

    monkeypatch.setattr(ex, "explain_arrays", dead)
    with pytest.raises(EngineError):
        BatchRunner(ex, tmp_path / "o2").run(output_items([str(p) for p in paths]))


def test_an_empty_or_bool_input_to_the_api_is_a_clear_error(resnet_tiny_artifacts):
    """Explainer.explain(np.zeros((0, 0, 3))) raised ZeroDivisionError; target=True was taken as class 1."""
    from runtime.explainer import TargetError

    ex = Explainer.from_artifacts(resnet_tiny_artifacts)
    with pytest.raises(ValueError, match=r"0 x 0 pixels: an image needs at least one pixel on each side"):
        ex.explain(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="over the aspect-ratio limit max_aspect=64"):
        ex.explain(np.zeros((1, 100, 3), np.uint8))
    for bad in (True, False, 1.0):
        with pytest.raises(TargetError, match="target must be a class index, a class name or None"):
            ex.explain(np.zeros((32, 32, 3), np.uint8), target=bad)


# -- memory ---------------------------------------------------------------------------------------------

_RSS = ("import resource, sys\nfrom runtime.explain import main\nrc = main(sys.argv[1:])\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, rc)\n")


def peak_rss_mb(args) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", _RSS, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RSS ")][-1].split()
    return int(line[1]), int(line[2])


def test_peak_memory_is_bounded_for_extreme_shapes(resnet_tiny_artifacts, tmp_path):
    """The probe's case: a 376-byte 100,000 x 1 PNG peaked at 1.9 GB RSS (it is now refused from its header),
    and the widest accepted shape (64:1) stays near a small image's peak. Measured in a child process:
    ru_maxrss, the same model and settings."""
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(120, 90))
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_bytes(64 * 60, 60))
    thin = tmp_path / "thin.png"
    thin.write_bytes(png_bytes(100_000, 1))
    base = ["--artifacts", resnet_tiny_artifacts, "--quiet", "--threads", "1"]
    rss_small, rc = peak_rss_mb([small, *base, "--out", tmp_path / "o1"])
    assert rc == 0
    rss_wide, rc = peak_rss_mb([wide, *base, "--out", tmp_path / "o2"])
    assert rc == 0
    rss_thin, rc = peak_rss_mb([thin, *base, "--out", tmp_path / "o3"])
    assert rc == 1
    assert rss_thin - rss_small < 64, (rss_small, rss_thin)
    assert rss_wide - rss_small < 160, (rss_small, rss_wide)


# -- error lines ----------------------------------------------------------------------------------------

def test_decoding_never_silences_other_threads_lines(capfd):
    """While an image decodes, another thread's line on the process's stderr arrives (decoding used to point
    file descriptor 2 at /dev/null meanwhile, so lines written then were lost)."""
    import io

    from PIL import Image

    import runtime.images as images

    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="TIFF", compression="tiff_deflate")
    data = bytearray(buf.getvalue())
    for i in range(20, len(data) // 2):          # corrupt the compressed strip, keep the header
        data[i] ^= 0x5A
    real = images._open

    def open_and_talk(d):
        t = threading.Thread(target=lambda: (sys.stderr.write("another thread's line\n"), sys.stderr.flush()))
        t.start()
        t.join()
        return real(d)

    images._open = open_and_talk
    try:
        with pytest.raises(images.ImageError, match="corrupt TIFF"):
            images.decode_image(bytes(data), "bad.tif")
    finally:
        images._open = real
    err = capfd.readouterr().err
    assert "another thread's line" in err
    assert "ZIPDecode" not in err and "Decoding error" not in err   # libtiff's own line stays silent


def test_every_failure_has_its_line(resnet_tiny_artifacts, tmp_path, capsys):
    """Many bad files among good ones, through the pipeline's threads: as many error lines as failures."""
    folder = tmp_path / "in"
    write_good(folder, 6)
    for i in range(40):
        (folder / f"junk{i:02d}.jpg").write_bytes(b"not an image " * (i + 1))
    code, stdout, err = run_cli([folder, *art(resnet_tiny_artifacts), "--out", tmp_path / "o", "--group", "2"],
                                capsys)
    assert code == 1 and "40 failed" in stdout
    assert len(errors(err)) == 40 and len({ln.split(":")[1] for ln in errors(err)}) == 40


@pytest.mark.parametrize("name, shown", [
    ("evil\nerror: fake.jpg", "evil\\nerror: fake.jpg"),
    ("x\x1b[2J\x1b[31m.png", "x\\x1b[2J\\x1b[31m.png"),
    ("rtl\u202egnp.png", "rtl\\u202egnp.png"),
])
def test_file_names_cannot_forge_or_drive_the_terminal(resnet_tiny_artifacts, tmp_path, capsys, name, shown):
    """A file named `evil\nerror: fake.jpg` printed a forged `error: fake.jpg` line; escapes reached the
    terminal raw. The name is quoted with its control characters escaped: one failure, one line."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / name).write_bytes(b"junk")
    for inputs in ([folder / name], [folder]):
        code, stdout, err = run_cli([*inputs, *art(resnet_tiny_artifacts), "--out", tmp_path / "o", "--report"],
                                    capsys)
        assert code == 1
        assert errors(err) == [f"error: '{folder}/{shown}': not an image (unrecognised format or unreadable "
                               f"header; PNG, JPEG, GIF, BMP, WebP and TIFF are supported)"]
        assert all(ln.startswith(("error: ", "note: ")) for ln in err.splitlines())
        assert not any(c in err + stdout for c in "\x1b\u202e")
        page = (tmp_path / "o" / "index.html").read_text()
        assert not any(c in page for c in "\x1b\u202e") and shown in page


def test_report_with_a_name_that_is_not_utf8(resnet_tiny_artifacts, tmp_path, capsys):
    """`ok\\xff.png` crashed --report with UnicodeEncodeError (no index.html, no summary line)."""
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    src = write_good(folder, 1)[0]
    raw = os.fsencode(folder) + b"/ok\xff.png"
    os.rename(src, raw)
    code, stdout, err = run_cli([folder, *art(resnet_tiny_artifacts), "--out", tmp_path / "o", "--report"], capsys)
    assert code == 0, err
    assert "explained 1 of 1" in stdout
    page = (tmp_path / "o" / "index.html").read_bytes().decode("utf-8")   # valid UTF-8
    assert 'src="ok%FF.overlay.png"' in page and "ok\\xff.png" in page
    assert os.path.exists(os.fsencode(tmp_path / "o") + b"/ok\xff.overlay.png")
