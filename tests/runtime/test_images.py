"""Tests for runtime/images.py: header sizes, error paths, decoding, preprocessing parity with open_clip.

Every image is generated and written under pytest's tmp_path; PIL, torch and open_clip serve as references.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from runtime.images import (
    DEFAULT_MAX_PIXELS,
    Geometry,
    ImageError,
    decode_image,
    load_image,
    preprocess,
    preprocess_batch,
    read_image_size,
    unnormalize,
)
from tests.runtime.test_cli import run_cli, write_good

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
STD = (0.26862954, 0.26130258, 0.27577711)
STEP = 1 / 255 / min(STD)                     # one 8-bit step in normalised units (~0.0150)

# Tolerances for preprocess("crop") against open_clip's PIL transform, in normalised units. Pillow does the
# resize, as in open_clip: the pixels are identical, only the float32 normalisation may round differently.
CROP_MEAN_ABS_TOL = 1e-7
CROP_MAX_ABS_TOL = 1e-6


# ----------------------------------------------------------------------------------------------------
# Generated images

def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 RGB [h, w, 3]: smooth gradients, hard-edged discs and boxes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 17 + yy / 23)], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        y0, x0 = int(rng.uniform(0, h)), int(rng.uniform(0, w))
        img[y0:y0 + int(r), x0:x0 + int(1.5 * r)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def marked(h: int = 48, w: int = 80) -> np.ndarray:
    """Non-square uint8 RGB with no symmetry: a red block top-left, a blue block bottom-right-ish,
    a green ramp left to right. Any rotation or mirror of it is distinguishable."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    rgb[: h // 4, : w // 3] = (255, 0, 0)
    rgb[h // 2:, w // 2: w - 8] = (0, 0, 255)
    return rgb


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def cv2_bytes(bgr: np.ndarray, ext: str, params: tuple = ()) -> bytes:
    ok, buf = cv2.imencode(ext, bgr, list(params))
    assert ok
    return buf.tobytes()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def pil_rgb(data: bytes) -> np.ndarray:
    """PIL's reading of a file: EXIF orientation applied, converted to RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


# ----------------------------------------------------------------------------------------------------
# read_image_size

W, H = 53, 37  # odd, non-square: a swapped or off-by-one size shows
RGB = photo(H, W)


def _tiff_by_hand(order: str) -> bytes:
    """A minimal uncompressed 8-bit grey TIFF in the given byte order (Pillow writes little-endian only):
    width as SHORT, height as LONG."""
    tags = [(256, 3, W), (257, 4, H), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, H), (279, 4, W * H)]
    pixels_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack(order + "H", len(tags))
    for tag, kind, value in tags:
        value = pixels_at if tag == 273 else value
        packed = struct.pack(order + ("H" if kind == 3 else "I"), value).ljust(4, b"\0")
        ifd += struct.pack(order + "HHI", tag, kind, 1) + packed
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    return head + ifd + struct.pack(order + "I", 0) + RGB[..., 0].tobytes()


SIZE_CASES = {
    "png-cv2": lambda: cv2_bytes(RGB, ".png"),
    "png-pil-palette": lambda: pil_bytes(Image.fromarray(RGB).convert("P"), "PNG"),
    "jpeg-cv2": lambda: cv2_bytes(RGB, ".jpg"),
    "jpeg-pil-progressive-exif": lambda: pil_bytes(Image.fromarray(RGB), "JPEG", progressive=True, exif=exif(6)),
    "jpeg-pil-gray": lambda: pil_bytes(Image.fromarray(RGB).convert("L"), "JPEG"),
    "gif-pil": lambda: pil_bytes(Image.fromarray(RGB), "GIF"),
    "bmp-cv2": lambda: cv2_bytes(RGB, ".bmp"),
    "bmp-pil-rgba": lambda: pil_bytes(Image.fromarray(RGB).convert("RGBA"), "BMP"),
    "webp-lossy-vp8": lambda: pil_bytes(Image.fromarray(RGB), "WEBP", quality=80),
    "webp-lossless-vp8l": lambda: pil_bytes(Image.fromarray(RGB), "WEBP", lossless=True),
    "webp-extended-vp8x": lambda: pil_bytes(Image.fromarray(RGB), "WEBP", exif=exif(1)),
    "tiff-cv2": lambda: cv2_bytes(RGB, ".tiff"),
    "tiff-pil-deflate": lambda: pil_bytes(Image.fromarray(RGB), "TIFF", compression="tiff_adobe_deflate"),
    "tiff-big-endian": lambda: _tiff_by_hand(">"),
    "bigtiff": lambda: pil_bytes(Image.fromarray(RGB), "TIFF", big_tiff=True),
}


@pytest.mark.parametrize("case", SIZE_CASES)
def test_read_image_size(case):
    data = SIZE_CASES[case]()
    if case.startswith("webp-"):  # make sure each WebP bitstream kind is really covered
        assert data[12:16] == {"lossy": b"VP8 ", "lossless": b"VP8L", "extended": b"VP8X"}[case.split("-")[1]]
    assert read_image_size(data) == (W, H)


@pytest.mark.parametrize("data", [b"", b"hello, world", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00"],
                         ids=["empty", "text", "png-signature-only", "jpeg-cut-in-app0"])
def test_read_image_size_unknown_or_cut_short(data):
    assert read_image_size(data) is None


# ----------------------------------------------------------------------------------------------------
# Error paths: one line each, naming the file

def _raises(path_or_data, match: str, **kw) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        if isinstance(path_or_data, bytes):
            decode_image(path_or_data, "upload.png", **kw)
        else:
            load_image(path_or_data, **kw)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.png", r"nope\.png: no such file$")


def test_directory(tmp_path):
    _raises(tmp_path, r": is a directory")


def test_zero_byte_file(tmp_path):
    _raises(write(tmp_path, "empty.jpg", b""), r"empty\.jpg: empty file \(0 bytes\)$")


def test_text_file_named_jpg(tmp_path):
    _raises(write(tmp_path, "notes.jpg", b"these are my notes, not a picture\n" * 10), r"notes\.jpg: not an image")


@pytest.mark.parametrize("ext, what", [(".jpg", "JPEG: Premature end of JPEG file"),
                                       (".png", "PNG data ends early: image file is truncated")])
def test_truncated(tmp_path, ext, what):
    data = cv2_bytes(photo(120, 160), ext)
    path = write(tmp_path, "half" + ext, data[: len(data) // 2])
    assert read_image_size(path.read_bytes()) == (160, 120)  # the header survives the cut
    _raises(path, rf"half\{ext}: truncated \({what}")


def test_trailing_bytes_after_jpeg_end_are_accepted(tmp_path):
    data = cv2_bytes(photo(40, 60), ".jpg")
    assert load_image(write(tmp_path, "padded.jpg", data + b"\0" * 100)).shape == (40, 60, 3)


def test_corrupt_png_body(tmp_path):
    data = bytearray(cv2_bytes(photo(40, 60), ".png"))
    at = bytes(data).index(b"IDAT") + 20
    data[at:at + 40] = bytes(40)  # breaks the zlib stream and the chunk CRC; IEND is still there
    _raises(write(tmp_path, "bad.png", bytes(data)), r"bad\.png: corrupt PNG")


def _jpeg_scan_at(data: bytes) -> int:
    return data.rfind(b"\xff\xda")


def test_corrupt_jpeg_scans_are_refused(tmp_path):
    """A cut scan followed by EOI, and bit-flipped scan data: Pillow (and OpenCV) decode both without an
    error; libjpeg's corrupt-data warnings make them refused here."""
    data = cv2_bytes(photo(240, 320), ".jpg")
    sos = _jpeg_scan_at(data)
    cut_eoi = data[: sos + (len(data) - sos) // 2] + b"\xff\xd9"
    Image.open(io.BytesIO(cut_eoi)).load()  # what Pillow alone accepts
    _raises(write(tmp_path, "cut.jpg", cut_eoi), r"cut\.jpg: truncated \(JPEG: Corrupt JPEG data: premature end of data")
    flipped = bytearray(data)
    for i in range(sos + 400, len(data) - 100, 97):
        flipped[i] ^= 0x55
    _raises(write(tmp_path, "flip.jpg", bytes(flipped)), r"flip\.jpg: (corrupt JPEG|truncated)")
    one = bytearray(data)
    one[sos + 200] ^= 0x01  # a single flipped bit in the entropy-coded data
    try:
        rgb = decode_image(bytes(one))
    except ImageError as e:
        assert "JPEG" in str(e)
    else:  # a bit flip that still decodes to valid Huffman codes is not detectable; then it decoded fully
        assert rgb.shape == (240, 320, 3)


def test_float_tiff_with_nan_is_refused_quietly(tmp_path):
    f = np.full((10, 12), 0.5, np.float32)
    data = cv2_bytes(f, ".tiff")
    np.testing.assert_array_equal(decode_image(data), np.full((10, 12, 3), 128, np.uint8))
    f[3, 4] = np.nan
    _raises(write(tmp_path, "nan.tiff", cv2_bytes(f, ".tiff")), r"nan\.tiff: float image holds NaN or infinite")


def test_c_libraries_print_nothing_of_their_own(tmp_path):
    """Bad files give our one line only: nothing from libjpeg, libpng, libtiff or OpenCV on stderr."""
    data = cv2_bytes(photo(120, 160), ".jpg")
    sos = _jpeg_scan_at(data)
    (tmp_path / "cut.jpg").write_bytes(data[: sos + 300] + b"\xff\xd9")
    png = bytearray(cv2_bytes(photo(40, 60), ".png"))
    at = bytes(png).index(b"IDAT") + 20
    png[at:at + 40] = bytes(40)
    (tmp_path / "bad.png").write_bytes(bytes(png))
    (tmp_path / "half.png").write_bytes(bytes(png)[: len(png) // 2])
    tif = cv2_bytes(photo(40, 60), ".tiff")
    (tmp_path / "cut.tiff").write_bytes(tif[: len(tif) // 3])
    code = ("import sys\nfrom runtime.images import load_image, ImageError\n"
            "for p in sys.argv[1:]:\n    try:\n        load_image(p)\n    except ImageError as e:\n"
            "        print(e)\n")
    names = ["cut.jpg", "bad.png", "half.png", "cut.tiff"]
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code, *[str(tmp_path / n) for n in names]], cwd=root,
                       capture_output=True, text=True)
    assert r.stderr == ""
    assert len(r.stdout.splitlines()) == len(names) and all(n in r.stdout for n in names)


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 RGB pixels
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(100_001) * 4)) + png_chunk(b"IEND", b""))
    assert len(data) < 1000

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the image was decoded")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    err = _raises(write(tmp_path, "bomb.png", data), r"bomb\.png: 100000 x 100000 = 10,000,000,000 pixels "
                                                     r"is over the pixel limit max_pixels=64,000,000")
    assert "before decoding" in str(err)


def test_max_pixels_argument():
    data = cv2_bytes(photo(100, 100), ".png")
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    _raises(data, r"upload\.png: 100 x 100 = 10,000 pixels is over the pixel limit max_pixels=9,999", max_pixels=9_999)
    assert DEFAULT_MAX_PIXELS == 64_000_000


# ----------------------------------------------------------------------------------------------------
# Decoding: channels, depth, colour spaces, orientation

def _check_rgb8(rgb: np.ndarray, shape: tuple[int, int]):
    assert rgb.dtype == np.uint8 and rgb.shape == (*shape, 3) and rgb.flags.c_contiguous


def test_load_and_decode_agree(tmp_path):
    data = cv2_bytes(photo(30, 50)[..., ::-1], ".png")
    rgb = load_image(write(tmp_path, "a.png", data))
    _check_rgb8(rgb, (30, 50))
    np.testing.assert_array_equal(rgb, photo(30, 50))  # RGB order, lossless
    np.testing.assert_array_equal(decode_image(data), rgb)


@pytest.mark.parametrize("fmt, kw", [("GIF", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}),
                                     ("JPEG", {"quality": 95}), ("WEBP", {"quality": 90})],
                         ids=["gif", "bmp", "webp-lossless", "tiff", "jpeg", "webp-lossy"])
def test_formats_match_pil(fmt, kw):
    data = pil_bytes(Image.fromarray(photo(60, 90)), fmt, **kw)
    rgb = decode_image(data)
    _check_rgb8(rgb, (60, 90))
    assert mean_abs(rgb, pil_rgb(data)) < 1.0


def test_grayscale_becomes_three_equal_channels():
    gray = photo(40, 60)[..., 0]
    rgb = decode_image(cv2_bytes(gray, ".png"))
    _check_rgb8(rgb, (40, 60))
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def _over_grey(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return np.rint(rgb * a + 128 * (1 - a))


def test_rgba_composited_over_mid_grey():
    rgb = photo(40, 60)
    alpha = np.tile(np.linspace(0, 255, 60).astype(np.uint8), (40, 1))  # transparent -> opaque, left to right
    data = pil_bytes(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    out = decode_image(data)
    _check_rgb8(out, (40, 60))
    assert np.abs(out - _over_grey(rgb, alpha)).max() <= 1
    assert (out[:, 0] == 128).all()                  # fully transparent: mid-grey
    np.testing.assert_array_equal(out[:, -1], rgb[:, -1])  # opaque: untouched


def test_la_and_palette_transparency():
    gray = photo(40, 60)[..., 1]
    alpha = np.zeros((40, 60), np.uint8)
    alpha[:, 30:] = 255
    out = decode_image(pil_bytes(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"))
    assert (out[:, :30] == 128).all()
    np.testing.assert_array_equal(out[:, 30:], np.repeat(gray[:, 30:, None], 3, axis=2))

    palette = Image.fromarray(marked()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    index = np.asarray(palette)[0, 0]  # the red block's palette entry becomes transparent
    out = decode_image(pil_bytes(palette, "PNG", transparency=int(index)))
    assert (out[0, 0] == 128).all()
    assert mean_abs(out[-1, -1], pil_rgb(pil_bytes(palette, "PNG"))[-1, -1]) < 1


def test_16_bit_png_and_tiff_scale_to_8_bit():
    """16-bit colour as Pillow (and so open_clip) reads it, the high byte; 16-bit grey as round(v / 257)."""
    rng = np.random.default_rng(1)
    bgr16 = rng.integers(0, 65536, (40, 60, 3), dtype=np.uint16)
    expected = bgr16[..., ::-1] >> 8
    assert np.abs(expected - np.rint(bgr16[..., ::-1] / 257.0)).max() == 1  # the two conventions differ by 1
    for ext in (".png", ".tiff"):
        out = decode_image(cv2_bytes(bgr16, ext))
        _check_rgb8(out, (40, 60))
        np.testing.assert_array_equal(out, expected)
    gray16 = rng.integers(0, 65536, (40, 60), dtype=np.uint16)
    out = decode_image(cv2_bytes(gray16, ".png"))
    np.testing.assert_array_equal(out, np.repeat(np.rint(gray16 / 257.0)[..., None], 3, axis=2))
    # 16-bit with alpha goes through the same compositing
    bgra16 = np.dstack([bgr16, np.full((40, 60), 65535, np.uint16)])
    np.testing.assert_array_equal(decode_image(cv2_bytes(bgra16, ".png")), expected)


def test_cmyk_jpeg():
    rgb = photo(60, 90)
    data = pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    _check_rgb8(out, (60, 90))
    ref = pil_rgb(data)
    print(f"CMYK JPEG: mean abs vs PIL {mean_abs(out, ref):.3f}, vs source {mean_abs(out, rgb):.3f}")
    np.testing.assert_array_equal(out, ref)  # Pillow converts CMYK
    assert mean_abs(out, rgb) < 4.0


def test_exif_rotated_jpeg(tmp_path):
    src = marked(48, 80)
    path = write(tmp_path, "rotated.jpg", pil_bytes(Image.fromarray(src), "JPEG", exif=exif(6), quality=95))
    out = load_image(path)
    ref = pil_rgb(path.read_bytes())
    _check_rgb8(out, (80, 48))                      # orientation 6: displayed rotated 90 degrees clockwise
    assert ref.shape == out.shape
    assert mean_abs(out, ref) < 1.0
    assert mean_abs(out, np.rot90(src, -1)) < 3.0   # the red block is now top-right
    assert out[2, -2, 0] > 200 and out[2, -2, 2] < 60


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(fmt, orientation):
    im = Image.fromarray(marked(24, 40))
    kw = {"tiffinfo": {274: orientation}} if fmt == "TIFF" else {"exif": exif(orientation)}
    if fmt == "WEBP":
        kw["lossless"] = True
    data = pil_bytes(im, fmt, **kw)
    np.testing.assert_array_equal(decode_image(data), pil_rgb(data))


def test_exif_orientation_with_alpha():
    rgba = np.dstack([marked(24, 40), np.full((24, 40), 255, np.uint8)])
    data = pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG", exif=exif(8))
    out = decode_image(data)
    np.testing.assert_array_equal(out, np.rot90(marked(24, 40), 1))


# ----------------------------------------------------------------------------------------------------
# preprocess: parity with open_clip's eval transform

def _cv2_crop(rgb: np.ndarray, size: int, down: int, up: int) -> np.ndarray:
    """The plain-OpenCV alternative, for the record: same geometry, cv2 interpolation."""
    h, w = rgb.shape[:2]
    rh, rw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    resized = cv2.resize(rgb, (rw, rh), interpolation=down if rh < h else up)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    pixels = resized[top:top + size, left:left + size].astype(np.float32) / 255
    return ((pixels - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)


CROP_SHAPES = [(480, 640), (640, 427), (1200, 1600), (300, 1000), (150, 100), (97, 131), (224, 224)]


@pytest.mark.parametrize("size", [224, 288])
def test_crop_matches_open_clip(size):
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD)
    rows, ours_all, cubic_all, area_all = [], [], [], []
    for seed, (h, w) in enumerate(CROP_SHAPES):
        rgb = photo(h, w, seed)
        ref = transform(Image.fromarray(rgb)).numpy()                      # [3, S, S]
        x, geometry = preprocess(rgb, size, MEAN, STD)
        assert x.shape == ref.shape == (3, size, size) and x.dtype == np.float32
        ours = np.abs(x - ref)
        cubic = np.abs(_cv2_crop(rgb, size, cv2.INTER_CUBIC, cv2.INTER_CUBIC) - ref)
        area = np.abs(_cv2_crop(rgb, size, cv2.INTER_AREA, cv2.INTER_CUBIC) - ref)
        ours_all.append(ours)
        cubic_all.append(cubic)
        area_all.append(area)
        rows.append(f"  {h:>5} x {w:<5} {'down' if min(h, w) > size else 'up  ' if min(h, w) < size else 'same'}"
                    f"  ours mean {ours.mean():.6f} max {ours.max():.6f}"
                    f"  | cv2 cubic mean {cubic.mean():.4f} max {cubic.max():.3f}"
                    f"  | cv2 area/cubic mean {area.mean():.4f} max {area.max():.3f}")
        assert ours.mean() < CROP_MEAN_ABS_TOL, rows[-1]
        assert ours.max() < CROP_MAX_ABS_TOL, rows[-1]

    def summary(diffs):
        return f"mean abs {np.mean([d.mean() for d in diffs]):.4f}, max abs {max(d.max() for d in diffs):.4f}"

    print(f"\npreprocess crop vs open_clip.image_transform({size}), normalised units:")
    print("\n".join(rows))
    print(f"  all: ours {summary(ours_all)} | cv2 INTER_CUBIC {summary(cubic_all)}"
          f" | cv2 INTER_AREA down {summary(area_all)}")


@pytest.mark.parametrize("resize_size, interpolation", [(256, "bicubic"), (232, "bilinear"), (224, "bilinear")])
def test_resize_size_and_interpolation_match_torchvision(resize_size, interpolation):
    """Resize(resize_size, interpolation) + CenterCrop(224) on a PIL image, as timm/torchvision eval transforms."""
    T = pytest.importorskip("torchvision.transforms")
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    tf = T.Compose([T.Resize(resize_size, interpolation=mode), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    for seed, (h, w) in enumerate([(480, 640), (333, 500), (150, 100)]):
        rgb = photo(h, w, seed)
        x, g = preprocess(rgb, 224, MEAN, STD, resize_size=resize_size, interpolation=interpolation)
        ref = tf(Image.fromarray(rgb)).numpy()
        assert np.abs(x - ref).max() < 1e-5, (h, w)
        assert min(round(g.scale_h * h), round(g.scale_w * w)) == resize_size
    with pytest.raises(ValueError, match="resize_size 200 is smaller than the crop size 224"):
        preprocess(photo(300, 300), 224, MEAN, STD, resize_size=200)
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        preprocess(photo(300, 300), 224, MEAN, STD, interpolation="lanczos")


def test_crop_geometry_follows_torchvision():
    # torchvision Resize(224): long side int(224 * 500 / 333) = 336; CenterCrop: int(round(112 / 2)) = 56
    _, g = preprocess(photo(333, 500), 224, MEAN, STD)
    assert g == Geometry(orig_h=333, orig_w=500, size=224, mode="crop", scale_h=224 / 333, scale_w=336 / 500,
                         crop_top=0, crop_left=56)
    # Odd margin: 225 -> round(0.5) = 0 (banker's rounding, as torchvision)
    _, g = preprocess(photo(225, 224), 224, MEAN, STD)
    assert (g.crop_top, g.crop_left) == (0, 0)


def test_stretch_mode():
    rgb = np.full((50, 80, 3), (100, 150, 200), np.uint8)
    x, g = preprocess(rgb, 64, MEAN, STD, mode="stretch")
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    expected = (np.array([100, 150, 200], np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(x, np.broadcast_to(expected[:, None, None], x.shape), atol=1e-6)
    assert g == Geometry(orig_h=50, orig_w=80, size=64, mode="stretch", scale_h=64 / 50, scale_w=64 / 80,
                         crop_top=0, crop_left=0)


def test_stretch_matches_pil_resize():
    rgb = photo(300, 500)
    x, _ = preprocess(rgb, 224, MEAN, STD, mode="stretch")
    ref = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    ref = ((ref - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)
    assert np.abs(x - ref).max() < CROP_MAX_ABS_TOL


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match=r"unknown mode 'pad'; valid modes: crop, stretch"):
        preprocess(photo(10, 10), 8, MEAN, STD, mode="pad")
    with pytest.raises(ValueError, match=r"expected uint8 RGB \[H, W, 3\]"):
        preprocess(np.zeros((10, 10, 3), np.float32), 8, MEAN, STD)
    with pytest.raises(ValueError, match=r"mean and std need 3 values"):
        preprocess(photo(10, 10), 8, (0.5,), STD)


def test_preprocess_batch():
    imgs = [photo(60, 90, 0), photo(90, 60, 1), photo(40, 40, 2)]
    x, geometries = preprocess_batch(imgs, 32, MEAN, STD, mode="crop")
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    for i, rgb in enumerate(imgs):
        xi, gi = preprocess(rgb, 32, MEAN, STD)
        np.testing.assert_array_equal(x[i], xi)
        assert geometries[i] == gi
    with pytest.raises(ValueError, match="no images"):
        preprocess_batch([], 32, MEAN, STD)


# ----------------------------------------------------------------------------------------------------
# Geometry.to_original and unnormalize

def _box(m: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) inclusive bounds of m > threshold."""
    rows, cols = np.flatnonzero((m > threshold).any(axis=1)), np.flatnonzero((m > threshold).any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def test_to_original_crop():
    # 300 x 400 -> resized 224 x 298 -> crop columns 37 .. 260; scale 224 / 300 on both axes
    _, g = preprocess(photo(300, 400), 224, MEAN, STD)
    assert (g.crop_top, g.crop_left) == (0, 37)
    s = 224 / 300
    m = np.zeros((224, 224), np.float32)
    m[50:150, 60:160] = 1.0                        # rows 50..149, cols 60..159 of the model input
    out = g.to_original(m)
    assert out.shape == (300, 400) and out.dtype == np.float32
    top, bottom, left, right = _box(out)
    assert abs(top - 50 / s) <= 1 and abs(bottom - 150 / s) <= 1
    assert abs(left - (60 + 37) / s) <= 1 and abs(right - (160 + 37) / s) <= 1
    assert out[int(100 / s), int((110 + 37) / s)] == pytest.approx(1.0)

    everywhere = g.to_original(np.ones((224, 224), np.float32))
    first_seen, last_seen = 37 / s, (37 + 224) / s        # 49.6 and 349.6 in original columns
    assert (everywhere[:, : int(first_seen) - 1] == 0).all()  # outside the crop: nothing was seen
    assert (everywhere[:, int(last_seen) + 2:] == 0).all()
    np.testing.assert_allclose(everywhere[:, int(first_seen) + 1: int(last_seen) - 1], 1.0, atol=1e-6)


def test_to_original_stretch_and_batch_dims():
    _, g = preprocess(photo(120, 300), 60, MEAN, STD, mode="stretch")
    m = np.zeros((2, 3, 60, 60), np.float32)
    m[1, 2, 10:20, 30:45] = 1.0
    out = g.to_original(m)
    assert out.shape == (2, 3, 120, 300)
    assert not out[0].any() and not out[1, :2].any()
    top, bottom, left, right = _box(out[1, 2])
    assert abs(top - 10 * 2) <= 1 and abs(bottom - 20 * 2) <= 1      # scale_h = 60 / 120
    assert abs(left - 30 * 5) <= 1 and abs(right - 45 * 5) <= 1      # scale_w = 60 / 300
    with pytest.raises(ValueError, match=r"expected a map \[\.\.\., 60, 60\]"):
        g.to_original(np.zeros((60, 59)))


def test_unnormalize_round_trip():
    rgb = photo(64, 64)
    for mode in ("crop", "stretch"):  # 64 -> 64: the resize is the identity
        x, _ = preprocess(rgb, 64, MEAN, STD, mode=mode)
        back = unnormalize(x, MEAN, STD)
        assert back.shape == (3, 64, 64) and back.dtype == np.float32
        np.testing.assert_allclose(back, rgb.transpose(2, 0, 1) / 255.0, atol=1e-6)
    x, _ = preprocess_batch([photo(90, 70), photo(50, 50)], 32, MEAN, STD)
    back = unnormalize(x, MEAN, STD)
    assert back.shape == (2, 3, 32, 32) and back.min() >= 0 and back.max() <= 1
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 3, H, W\]"):
        unnormalize(np.zeros((4, 8, 8)), MEAN, STD)


# ----------------------------------------------------------------------------------------------------
# The runtime rule: no torch, torchvision or open_clip behind runtime.images (Pillow is a runtime dependency)

def test_runtime_images_imports_no_torch():
    code = ("import sys, runtime.images; "
            "bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# -- through the command line ---------------------------------------------------------------------


def art(tiny_artifacts) -> list[str]:
    return ["--artifacts", str(tiny_artifacts.out_dir)]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.timeout(60)
def test_devices_and_fifos_are_refused_without_reading_or_blocking(tiny_artifacts, tmp_path, capsys):
    good = write_good(tmp_path / "in", 1)[0]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code, stdout, err = run_cli(["/dev/zero", fifo, good, *art(tiny_artifacts), "--out", tmp_path / "out"], capsys)
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 2, lines
    assert "/dev/zero: is a character device; only regular image files are read" in lines[0]
    assert "pipe.png: is a FIFO" in lines[1]
    assert (tmp_path / "out" / "good0.json").is_file() and "explained 1 of 3" in stdout


def test_max_bytes_refuses_big_files_before_reading(tiny_artifacts, tmp_path, capsys):
    good = write_good(tmp_path / "in", 1)[0]
    size = good.stat().st_size
    code, _, err = run_cli([good, *art(tiny_artifacts), "--out", tmp_path / "out", "--max-bytes", size - 1], capsys)
    assert code == 1 and f"{size:,} bytes is over the file size limit max_bytes={size - 1:,}" in err
    code, _, err = run_cli([good, *art(tiny_artifacts), "--out", tmp_path / "out", "--max-bytes", size], capsys)
    assert code == 0, err
