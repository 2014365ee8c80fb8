"""Image input for the runtime: decode files safely, preprocess like open_clip, map saliency back.

Decoding and resizing use Pillow, the library open_clip's own transform uses, so preprocessing is
identical to open_clip's by construction (no torch, torchvision or open_clip here).

Reading (``load_image``): regular files only (a FIFO, /dev/zero or a socket is refused without being
read or waited on), and at most ``max_bytes`` bytes (``DEFAULT_MAX_BYTES`` = 1 GiB).

Decoding (``decode_image``) returns uint8 RGB [H, W, 3]:
    * Pillow detects the format (PNG, JPEG, GIF, BMP, WebP and TIFF only) and reads the size from the
      header; it is checked against ``max_pixels`` before anything is decoded, so a decompression bomb
      costs nothing.
    * Decoding is strict: a truncated or corrupt file is refused (Pillow raises; for JPEG, whose
      corrupt-data warnings Pillow ignores, libjpeg-turbo's strict mode checks the scans through
      simplejpeg). The C libraries' own stderr lines are silenced: the one-line ImageError names the file.
    * Grayscale becomes 3 equal channels; 16-bit grey is scaled to 8 bits as round(v / 257), 16-bit
      colour as Pillow reads it (the high byte, what open_clip sees); float samples (float TIFF) are read
      as 0..1, and NaN or infinity is refused. CMYK and palette images are converted by Pillow.
    * Alpha (RGBA, LA, palette transparency) is composited over mid-grey (``ALPHA_BACKGROUND`` = 128):
      transparent pixels become neutral grey rather than black or white, close to the mean colour
      that CLIP's normalisation removes.
    * The EXIF orientation (and a TIFF's orientation tag) is applied, as ``PIL.ImageOps.exif_transpose``.

Preprocessing (``preprocess``) gives the model input x [3, S, S] float32 and a ``Geometry``:
    "crop"     as open_clip's eval transform (torchvision Resize + CenterCrop on a PIL image): resize the
               shortest side to R = resize_size (default S; long side int(R * long / short)) with Pillow's
               filter (bicubic by default, or bilinear), centre crop S x S (offsets int(round((R' - S) / 2))),
               then (x / 255 - mean) / std.
    "stretch"  resize the whole image to S x S (the paper's VOC evaluation).
The model input is open_clip.image_transform(S, is_train=False)'s, bit for bit (tests/runtime/test_images.py);
`preprocess_on` computes the same on a device back end. Speeds and the pass-order rule: docs/implementation.md.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from .names import show

DEFAULT_MAX_PIXELS = 64_000_000  # refuse larger images before decoding
DEFAULT_MAX_BYTES = 1 << 30      # refuse larger files before reading them (1 GiB; a 12 Mpx JPEG is ~5 MB)
DEFAULT_MAX_ASPECT = 64          # refuse images whose long side is more than this many times the short side
ALPHA_BACKGROUND = 128           # grey level that transparent pixels are composited over
MODES = ("crop", "stretch")      # preprocess modes
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageError(ValueError):
    """An image file that cannot be used. The message is one line: "{path}: {problem}"."""


def _fail(name: str, problem: str) -> ImageError:
    return ImageError(f"{show(name)}: {problem}")


# ----------------------------------------------------------------------------------------------------
# Decoding with Pillow

_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # what Image.open may detect; nothing else is tried
_ORIENTATION = 0x0112


_TIFF_LOCK = threading.Lock()
_TIFF_DONE = False


def _silence_libtiff() -> None:
    """Turn off libtiff's default error and warning handlers, which print lines without a file name to the
    process's stderr (the one-line ImageError says what went wrong instead). Done once, through the handler
    API of the libtiff that Pillow loaded; the process's stderr itself is never touched, so no other
    thread's line is lost. Where that libtiff cannot be found, its lines stay (harmless, never lost)."""
    global _TIFF_DONE
    if _TIFF_DONE:
        return
    with _TIFF_LOCK:
        if _TIFF_DONE:
            return
        _TIFF_DONE = True
        try:
            import ctypes

            from PIL import _imaging  # noqa: F401  (links Pillow's libtiff into the process)

            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                paths = {line.split()[-1] for line in f if "libtiff" in line and "/" in line}
            for path in sorted(paths):
                lib = ctypes.CDLL(path)  # the already loaded library: the same global handlers
                for fn in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
                    setter = getattr(lib, fn)
                    setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                    setter(None)
        except (OSError, AttributeError, ImportError):
            pass


_PIL_LIMIT_LOCK = threading.Lock()


def _open(data: bytes):
    """Image.open restricted to the supported formats (header only), or None. ``max_pixels`` replaces
    Pillow's own decompression-bomb limit: past Pillow's, the header is read again without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning and format notices: checked and reported here
        try:
            return Image.open(io.BytesIO(data), formats=_FORMATS)
        except Image.DecompressionBombError:
            pass
        except Exception:  # UnidentifiedImageError, SyntaxError, struct.error, ...: not a usable header
            return None
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(io.BytesIO(data), formats=_FORMATS)
            except Exception:
                return None
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def read_image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP, WebP or TIFF file (Pillow reads only the
    header); None if the format is not one of these or the header is unreadable."""
    im = _open(bytes(data))
    return None if im is None else (int(im.size[0]), int(im.size[1]))


def _check_jpeg_scans(data: bytes, name: str) -> None:
    """Refuse a JPEG whose entropy-coded data is corrupt or cut (libjpeg's warnings, which Pillow ignores
    and decodes as grey or garbled blocks). libjpeg-turbo through simplejpeg with strict=True, grey and at
    1/8 scale: the whole bit stream is checked at a fraction of a full decode's cost."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, min_height=1, min_width=1, min_factor=8)
    except ValueError as e:
        msg = str(e).strip().rstrip(".")
        if "premature end" in msg.lower() or "truncated" in msg.lower():
            raise _fail(name, f"truncated (JPEG: {msg})") from None
        raise _fail(name, f"corrupt JPEG ({msg})") from None


def _to_rgb8(im, name: str) -> np.ndarray:
    """A loaded Pillow image of any supported mode -> uint8 RGB [H, W, 3], alpha composited over
    ALPHA_BACKGROUND; 16-bit grey as round(v / 257), float as 0..1 (NaN or infinity refused)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        v = np.asarray(im).astype(np.float32)                                   # [H, W]
        g = np.clip(np.rint(v / np.float32(257.0)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        v = np.asarray(im, np.float32)                                          # [H, W]
        if not np.isfinite(v).all():
            raise _fail(name, "float image holds NaN or infinite samples")
        g = np.rint(np.clip(v, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        return np.asarray(im if mode == "RGB" else im.convert("RGB"))
    rgba = np.asarray(im.convert("RGBA"))                                      # [H, W, 4] uint8
    a = rgba[:, :, 3:].astype(np.float32) / np.float32(255.0)                  # [H, W, 1]
    c = rgba[:, :, :3].astype(np.float32) * a + np.float32(ALPHA_BACKGROUND) * (1.0 - a)
    return np.clip(np.rint(c), 0, 255).astype(np.uint8)


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to [H, W, C] (what PIL.ImageOps.exif_transpose does)."""
    if orientation == 2:
        return rgb[:, ::-1]                         # mirror left-right
    if orientation == 3:
        return rgb[::-1, ::-1]                      # rotate 180
    if orientation == 4:
        return rgb[::-1]                            # mirror top-bottom
    if orientation == 5:
        return rgb.transpose(1, 0, 2)               # transpose
    if orientation == 6:
        return np.rot90(rgb, -1)                    # rotate 90 clockwise
    if orientation == 7:
        return rgb[::-1, ::-1].transpose(1, 0, 2)   # transverse
    if orientation == 8:
        return np.rot90(rgb, 1)                     # rotate 90 counter-clockwise
    return rgb


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Decode image file bytes to uint8 RGB [H, W, 3] (C-contiguous); ``name`` labels errors.

    Raises ImageError for empty data, an unrecognised format, more than ``max_pixels`` pixels or a long
    side more than ``max_aspect`` times the short side (both checked from the header, before decoding), a
    truncated or corrupt file (Pillow's strict decoding, plus libjpeg's corrupt-data warnings for JPEG),
    and float samples that are not finite.
    """
    data = bytes(data)  # bytearray / memoryview welcome; bytes pass through uncopied
    if len(data) == 0:
        raise _fail(name, "empty file (0 bytes)")
    _silence_libtiff()
    im = _open(data)
    if im is None:
        raise _fail(name, "not an image (unrecognised format or unreadable header; "
                          "PNG, JPEG, GIF, BMP, WebP and TIFF are supported)")
    kind = im.format
    width, height = im.size
    if width * height > max_pixels:
        raise _fail(name, f"{width} x {height} = {width * height:,} pixels is over the pixel limit "
                          f"max_pixels={max_pixels:,}; refused before decoding")
    if width == 0 or height == 0:
        raise _fail(name, f"corrupt header: size {width} x {height}")
    problem = aspect_problem(width, height, max_aspect)
    if problem:
        raise _fail(name, problem + "; refused before decoding")
    if kind == "JPEG":
        _check_jpeg_scans(data, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            orientation = im.getexif().get(_ORIENTATION, 1)
            rgb = _to_rgb8(im, name)
    except ImageError:
        raise
    except Exception as e:  # OSError (truncated, broken stream), SyntaxError, ValueError, ...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if "truncated" in msg:
            raise _fail(name, f"truncated ({kind} data ends early: {msg})") from None
        raise _fail(name, f"corrupt {kind} ({msg})") from None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    return np.ascontiguousarray(_orient(rgb, orientation))


def read_file_capped(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes; ImageError otherwise.

    The file is opened without blocking (a FIFO never stalls the run) and must be a regular file (not a
    FIFO, device such as /dev/zero, socket or folder); at most ``max_bytes + 1`` bytes are ever read, so a
    file that grows while it is read cannot exhaust memory either."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _fail(name, "no such file") from None
    except OSError as e:
        raise _fail(name, f"cannot read ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _fail(name, "is a directory, not an image file")
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise _fail(name, f"is {kind}; only regular image files are read")
    with os.fdopen(fd, "rb", buffering=0) as f:
        if st.st_size > max_bytes:
            raise _fail(name, f"{st.st_size:,} bytes is over the file size limit max_bytes={max_bytes:,}")
        try:
            os.set_blocking(fd, True)
            chunks, total = [], 0
            while total <= max_bytes:
                block = f.read(min(1 << 22, max_bytes + 1 - total))
                if not block:
                    break
                chunks.append(block)
                total += len(block)
        except OSError as e:
            raise _fail(name, f"cannot read ({e.strerror or type(e).__name__})") from None
    if total > max_bytes:
        raise _fail(name, f"grew past the file size limit max_bytes={max_bytes:,} while being read")
    return b"".join(chunks)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES, max_aspect: float = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Read an image file to uint8 RGB [H, W, 3] (C-contiguous); see ``read_file_capped`` and ``decode_image``."""
    return decode_image(read_file_capped(path, max_bytes), path, max_pixels, max_aspect)


def aspect_problem(width: int, height: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> str | None:
    """Why an image of this size is refused for its shape, or None. The preprocessing resizes the short side
    to the model's resize size, so memory grows with long / short: the limit bounds it."""
    if width < 1 or height < 1:
        return f"{width} x {height} pixels: an image needs at least one pixel on each side"
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect:
        return (f"{width} x {height} pixels: the long side is {ratio:,.0f} times the short side, over the "
                f"aspect-ratio limit max_aspect={max_aspect:g}")
    return None


# ----------------------------------------------------------------------------------------------------
# Preprocessing and the way back

@dataclass(frozen=True)
class Geometry:
    """How a model-input pixel maps back to the original image."""
    orig_h: int        # original image size
    orig_w: int
    size: int          # model input side (square S x S)
    mode: str          # "crop" or "stretch"
    scale_h: float     # resized size / original size
    scale_w: float
    crop_top: int      # offset of the crop in the resized image (0 for stretch)
    crop_left: int

    def to_original(self, m: np.ndarray) -> np.ndarray:
        """Map(s) [..., S, S] in model-input coordinates -> float32 [..., orig_h, orig_w].

        In crop mode the map is placed at its crop offset in the resized image (zeros elsewhere: nothing
        was seen there), which is then resized to the original size; bilinear (cv2.INTER_LINEAR).
        """
        m = np.asarray(m, dtype=np.float32)
        s = self.size
        if m.ndim < 2 or m.shape[-2:] != (s, s):
            raise ValueError(f"to_original: expected a map [..., {s}, {s}], got shape {m.shape}")
        flat = m.reshape(-1, s, s)                                              # [N, S, S]
        if self.mode == "crop":
            rh, rw = round(self.orig_h * self.scale_h), round(self.orig_w * self.scale_w)
            canvas = np.zeros((len(flat), rh, rw), np.float32)                  # [N, rh, rw]
            canvas[:, self.crop_top:self.crop_top + s, self.crop_left:self.crop_left + s] = flat
            flat = canvas
        out = np.stack([cv2.resize(f, (self.orig_w, self.orig_h), interpolation=cv2.INTER_LINEAR)
                        for f in flat])                                         # [N, orig_h, orig_w]
        return out.reshape(*m.shape[:-2], self.orig_h, self.orig_w)


def _channel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean32.shape != (3,) or std32.shape != (3,):
        raise ValueError(f"mean and std need 3 values (R, G, B), got {list(mean)} and {list(std)}")
    return mean32, std32


def preprocess(rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
               mode: str = "crop", resize_size: int | None = None,
               interpolation: str = "bicubic", max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[np.ndarray, Geometry]:
    """uint8 RGB [H, W, 3] -> (x float32 [3, size, size] normalised, Geometry); modes in the module docstring.

    resize_size: crop mode's shortest side before the centre crop (None = size; at least size).
    interpolation: "bicubic" or "bilinear", Pillow's filters (as torchvision's Resize on PIL images).
    An empty image, or one past ``max_aspect`` (see ``aspect_problem``), is a ValueError."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError(f"preprocess: expected uint8 RGB [H, W, 3], got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    problem = aspect_problem(rgb.shape[1], rgb.shape[0], max_aspect)
    if problem:
        raise ValueError(f"preprocess: {problem}")
    if size < 1:
        raise ValueError(f"preprocess: size must be a positive number of pixels, got {size}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"preprocess: unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    resize_size = size if resize_size is None else int(resize_size)
    if resize_size < size:
        raise ValueError(f"preprocess: resize_size {resize_size} is smaller than the crop size {size}")
    mean32, std32 = _channel_stats(mean, std)
    h, w = rgb.shape[:2]
    if mode == "crop":  # torchvision Resize(resize_size) + CenterCrop(size), as open_clip's eval transform
        if w <= h:
            rh, rw = int(resize_size * h / w), resize_size
        else:
            rh, rw = resize_size, int(resize_size * w / h)
        top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    elif mode == "stretch":
        rh, rw, top, left = size, size, 0, 0
    else:
        raise ValueError(f"preprocess: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    resized = Image.fromarray(rgb).resize((rw, rh), resample=INTERPOLATIONS[interpolation])
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)))    # uint8 [S, S, 3]
    x = (pixels.astype(np.float32) / np.float32(255) - mean32) / std32         # [S, S, 3]
    geometry = Geometry(orig_h=h, orig_w=w, size=size, mode=mode, scale_h=rh / h, scale_w=rw / w,
                        crop_top=top, crop_left=left)
    return np.ascontiguousarray(x.transpose(2, 0, 1)), geometry               # [3, S, S]


def preprocess_batch(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float],
                     mode: str = "crop", **kw) -> tuple[np.ndarray, list[Geometry]]:
    """``preprocess`` each image (keyword options passed on): (x float32 [B, 3, size, size], one Geometry each)."""
    if len(images) == 0:
        raise ValueError("preprocess_batch: no images")
    done = [preprocess(rgb, size, mean, std, mode, **kw) for rgb in images]
    return np.stack([x for x, _ in done]), [g for _, g in done]


def unnormalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [..., 3, H, W] -> pixels in [0, 1], float32 [..., 3, H, W]."""
    x = np.asarray(x, np.float32)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"unnormalize: expected [..., 3, H, W], got shape {x.shape}")
    mean32, std32 = _channel_stats(mean, std)
    return np.clip(x * std32[:, None, None] + mean32[:, None, None], 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# The same preprocessing as matrix products, for the device (CuPy) path

PRECISION_BITS = 22   # Pillow's fixed-point weights for 8-bit images (Resample.c)


def _pillow_filter(interpolation: str):
    if interpolation == "bicubic":     # Keys, a = -0.5 (Pillow's)
        def f(x):
            x = abs(x)
            if x < 1.0:
                return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1.0
            if x < 2.0:
                return (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
            return 0.0
        return f, 2.0
    if interpolation == "bilinear":
        return (lambda x: max(0.0, 1.0 - abs(x))), 1.0
    raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")


def pillow_resample_matrix(in_size: int, out_size: int, first: int, count: int, interpolation: str) -> np.ndarray:
    """[count, in_size] float64: rows first..first+count-1 of Pillow's 8-bit resampling of in_size samples to
    out_size (Resample.c: precompute_coeffs + normalize_coeffs_8bpc), as integer weights in units of 2^-22.
    out[o] = clip(floor((W[o] . v + 2^21) / 2^22), 0, 255) is Pillow's output sample, exactly (the sums of
    integer products stay exact in float64)."""
    filt, support = _pillow_filter(interpolation)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ss = 1.0 / filterscale
    m = np.zeros((count, in_size), np.float64)
    one = float(1 << PRECISION_BITS)
    for r in range(count):
        o = first + r
        centre = (o + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), in_size)
        k = [filt((x + xmin - centre + 0.5) * ss) for x in range(xmax - xmin)]
        total = sum(k)
        for x, v in enumerate(k):
            v = v / total if total != 0.0 else v
            m[r, xmin + x] = float(int(v * one + (-0.5 if v < 0 else 0.5)))   # C's (int) truncation
    return m


def resize_plan(h: int, w: int, size: int, mode: str = "crop", resize_size: int | None = None,
                interpolation: str = "bicubic") -> tuple[Geometry, tuple, tuple]:
    """The geometry `preprocess` gives an h x w image, and the two resampling passes of its crop window:
    (geometry, (in, out, first, count) of the horizontal pass, the same of the vertical pass)."""
    resize_size = size if resize_size is None else int(resize_size)
    if mode == "crop":
        rh, rw = (int(resize_size * h / w), resize_size) if w <= h else (resize_size, int(resize_size * w / h))
        top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    else:
        rh, rw, top, left = size, size, 0, 0
    geometry = Geometry(orig_h=h, orig_w=w, size=size, mode=mode, scale_h=rh / h, scale_w=rw / w,
                        crop_top=top, crop_left=left)
    return geometry, (w, rw, left, size), (h, rh, top, size)


def _pass_matrix(xp, cache, spec, interpolation):
    """A pass's [count, in] matrix on the back end (identity rows where Pillow skips the pass)."""
    n_in, n_out, first, count = spec
    key = ("pillow", n_in, n_out, first, count, interpolation)
    m = cache.get(key)
    if m is None:
        if n_in == n_out:   # Pillow resamples an axis only when its size changes
            host = np.zeros((count, n_in), np.float64)
            host[np.arange(count), first + np.arange(count)] = float(1 << PRECISION_BITS)
        else:
            host = pillow_resample_matrix(n_in, n_out, first, count, interpolation)
        m = cache[key] = xp.asarray(host)
    return m


_ORDER_LOCK = threading.Lock()
_VERTICAL_FIRST: list = []   # [bool] once probed: whether this Pillow may run the vertical pass first


def pillow_vertical_first(h: int, w: int, rh: int, rw: int) -> bool:
    """Whether this Pillow resamples h x w -> rh x rw vertically first. Pillow 13 does when the height
    shrinks by more than twice as many pixels as the width (h - rh > 2 (w - rw), rh < h); earlier versions
    always run the horizontal pass first. Which of the two this Pillow is, is probed once on a small image."""
    if not (rh < h and rw != w and (h - rh) > 2 * (w - rw)):
        return False
    if not _VERTICAL_FIRST:
        with _ORDER_LOCK:
            if not _VERTICAL_FIRST:
                rgb = np.random.default_rng(0).integers(0, 256, (24, 6, 3), dtype=np.uint8)
                ref = np.moveaxis(np.asarray(Image.fromarray(rgb).resize((7, 11), Image.Resampling.BILINEAR)), 2, 0)
                rw_, rh_ = (pillow_resample_matrix(6, 7, 0, 7, "bilinear"),
                            pillow_resample_matrix(24, 11, 0, 11, "bilinear"))
                img = np.moveaxis(rgb, 2, 0).astype(np.float64)
                vh = _round8(np, _round8(np, rh_ @ img) @ rw_.T)
                _VERTICAL_FIRST.append(bool(np.array_equal(vh, ref)))
    return _VERTICAL_FIRST[0]


def _round8(xp, acc):
    """Pillow's clip8: the fixed-point sum (with its 2^21 rounding term) -> uint8 values, as float64."""
    return xp.clip(xp.floor((acc + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)), 0.0, 255.0)


def preprocess_on(xp, rgb, size: int, mean: Sequence[float], std: Sequence[float], mode: str = "crop",
                  resize_size: int | None = None, interpolation: str = "bicubic",
                  max_aspect: float = DEFAULT_MAX_ASPECT, cache: dict | None = None):
    """`preprocess` with array module `xp` (CuPy: on the device) on uint8 RGB [H, W, 3] already there:
    Pillow's two fixed-point passes of the crop window as matrix products, in Pillow's order
    (pillow_vertical_first), uint8 rounding after each, then
    the same float32 normalisation. Returns (x float32 [3, S, S], the model input as uint8 [S, S, 3],
    Geometry); equal to `preprocess` bit for bit. `cache` keeps the pass matrices per shape."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"preprocess: expected uint8 RGB [H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}")
    problem = aspect_problem(w, h, max_aspect)
    if problem:
        raise ValueError(f"preprocess: {problem}")
    if interpolation not in INTERPOLATIONS or mode not in MODES:
        raise ValueError(f"preprocess: unknown mode {mode!r} or interpolation {interpolation!r}")
    if (resize_size or size) < size:
        raise ValueError(f"preprocess: resize_size {resize_size} is smaller than the crop size {size}")
    geometry, hpass, vpass = resize_plan(h, w, size, mode, resize_size, interpolation)
    cache = {} if cache is None else cache
    rw = _pass_matrix(xp, cache, hpass, interpolation)                         # [S, W]
    rh = _pass_matrix(xp, cache, vpass, interpolation)                         # [S, H]
    img = xp.moveaxis(rgb, 2, 0).astype(xp.float64)                             # [3, H, W]
    if pillow_vertical_first(h, w, vpass[1], hpass[1]):                        # Pillow's order of the passes
        pix = _round8(xp, xp.matmul(_round8(xp, xp.matmul(rh, img)), rw.T))    # [3, S, W] then [3, S, S]
    else:
        pix = _round8(xp, xp.matmul(rh, _round8(xp, xp.matmul(img, rw.T))))    # [3, H, S] then [3, S, S]
    mean32, std32 = _channel_stats(mean, std)
    x = (pix.astype(xp.float32) / xp.float32(255) - xp.asarray(mean32)[:, None, None]) / xp.asarray(std32)[:, None, None]
    return xp.ascontiguousarray(x), xp.moveaxis(pix, 0, 2).astype(xp.uint8), geometry


def to_original_on(xp, geometry: Geometry, m, cache: dict | None = None):
    """`Geometry.to_original` with array module `xp` (the map stays on the device): the map placed at its
    crop offset and resized bilinearly (OpenCV's INTER_LINEAR operators as matrices) -> float32 [H0, W0]."""
    from .backend import resize_matrix

    g = geometry
    s = g.size
    cache = {} if cache is None else cache
    if g.mode == "crop":
        rh, rw = round(g.orig_h * g.scale_h), round(g.orig_w * g.scale_w)
        top, left = g.crop_top, g.crop_left
    else:
        rh, rw, top, left = s, s, 0, 0

    def op(n_in, n_out, first):
        key = ("orig", n_in, n_out, first, s)
        if key not in cache:
            cache[key] = xp.asarray(resize_matrix(n_in, n_out, "bilinear")[:, first:first + s].astype(np.float32))
        return cache[key]

    return op(rh, g.orig_h, top) @ m.astype(xp.float32) @ op(rw, g.orig_w, left).T
