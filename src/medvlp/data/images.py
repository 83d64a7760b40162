"""Images on their way into a prepared dataset: safe paths, decoding, mode conversion, bounded size.

Everything a raw dataset can throw at us (16-bit grey, CMYK, palettes, alpha, grey stored as RGB, truncated or
corrupt files) is either converted to 8-bit grey ("L") or RGB here, or refused with an ``ImageError`` whose message
says what is
wrong; the prepare pipeline counts and skips those. Stored images keep their original bytes when they are
already a small enough 8-bit JPEG or PNG (no second lossy encoding); others are re-encoded once. DICOM files
(recognised by their magic, not their name) are rendered to 8 bits by ``dicom.py`` and stored as PNG.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medvlp.data.records import StoredImage

Window = str | tuple[float, float] | None  # a DICOM display window: see dicom.dicom_to_image

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # whole-slide scale; anything larger is refused, not decoded
# What medvlp decodes by default (8k x 8k, 67 Mpx: more than a CT slice or a chest X-ray needs); the size is read
# from the file's header first, so a small file that claims a huge image costs nothing
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def safe_join(root: Path, name: str) -> Path:
    """``root / name``, refusing any name that leads outside ``root`` (``..``, absolute paths, links)."""
    if not name or "\x00" in name:
        raise ImageError(f"image name {name!r} is empty or invalid")
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ImageError(f"image name {name!r} leads outside {root}")
    return path


def to_standard_mode(image: Image.Image) -> Image.Image:
    """8-bit "L" or "RGB", whatever came in: 16-bit and float grey are stretched min-max to 0..255."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8), "L")
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow resolves palette transparency through RGBA
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P, PA, RGBA, RGBX, ...


def _is_grey(image: Image.Image, tolerance: int = 2) -> bool:
    """Whether an RGB image's channels agree everywhere (up to JPEG noise): stored as "L", it decodes twice as
    fast and takes a third of the space, and the model sees the same pixels (grey is repeated to 3 channels)."""
    pixels = np.asarray(image, dtype=np.int16)
    return bool(np.abs(pixels[..., 0] - pixels[..., 1]).max() <= tolerance
                and np.abs(pixels[..., 0] - pixels[..., 2]).max() <= tolerance)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image of more than ``max_pixels`` pixels, before it is decoded."""
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels ({width * height / 1e6:.0f} Mpx), more than max_pixels="
                         f"{max_pixels} ({max_pixels / 1e6:.0f} Mpx); shrink the image or raise max_pixels")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode and fully load an image (so a truncated file fails here, not in a training worker); one of more
    than ``max_pixels`` pixels is refused from its header, before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixels(*image.size, max_pixels)
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("not a readable image (unknown format, or too large)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image ({e})") from None
    return image


def _read(source: Path | str | bytes) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image file {source} does not exist") from None
    except OSError as e:
        raise ImageError(f"image file {source} cannot be read ({e.strerror})") from None


def _decode_any(data: bytes, source: Path | str | bytes, window: Window,
                frame: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """The decoded image and its format; DICOM (by its magic, or a ``.dcm`` name) goes through ``dicom.py``."""
    from medvlp.data import dicom  # imports this module

    if dicom.is_dicom(data) or (not isinstance(source, bytes) and Path(source).suffix.lower() == ".dcm"):
        return dicom.dicom_to_image(data, window, frame, max_pixels=max_pixels), "dicom"
    image = decode(data, max_pixels)
    return image, (image.format or "").lower()


def open_image(source: Path | str | bytes, *, window: Window = None, frame: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any image file medvlp reads (path or bytes: JPEG, PNG, ... or DICOM) as an 8-bit "L" or "RGB" image.

    ``window`` and ``frame`` apply to DICOM only (see ``dicom.dicom_to_image``: a preset such as ``"lung"``,
    ``"minmax"`` or ``(center, width)``; the frame of a multi-frame file, the middle one by default).
    Raises ``ImageError`` with a one-line reason for anything unreadable or larger than ``max_pixels``.
    """
    data = _read(source)
    return to_standard_mode(_decode_any(data, source, window, frame, max_pixels)[0])


def load_image(source: Path | bytes, max_short_side: int = 512, *, window: Window = None,
               frame: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[StoredImage, str | None]:
    """Read an image file (or bytes) for storing. Returns the stored image and a note on what was converted.

    ``max_short_side`` bounds the shorter side (0 keeps the size): fine-tuning crops at most 384 pixels, and a
    bounded image keeps the data loader fast. DICOM files are rendered to 8 bits (``window``, ``frame``: see
    ``open_image``) and stored as PNG.
    """
    data = _read(source)
    image, original_format = _decode_any(data, source, window, frame, max_pixels)
    original_mode = "DICOM" if original_format == "dicom" else image.mode
    converted = to_standard_mode(image)
    unchanged = converted is image and original_format != "dicom"
    note = None if unchanged else f"converted {original_mode} to {converted.mode}"
    if converted.mode == "RGB" and _is_grey(converted):  # most radiographs ship as RGB with three equal channels
        converted = converted.convert("L")
        note = f"converted {original_mode} with grey content to L"
    width, height = converted.size
    too_big = max_short_side and min(width, height) > max_short_side
    if note is None and not too_big and original_format in ("jpeg", "png"):
        return StoredImage(data, original_format, width, height), None
    if too_big:
        scale = max_short_side / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        converted = converted.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        width, height = size
    out = io.BytesIO()
    if original_format == "jpeg":  # already lossy: one more high-quality pass keeps it small
        converted.save(out, "JPEG", quality=95)
        fmt = "jpeg"
    else:
        converted.save(out, "PNG", compress_level=1)
        fmt = "png"
    return StoredImage(out.getvalue(), fmt, width, height), note
