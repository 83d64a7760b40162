"""DICOM files as 8-bit images: the one place that knows about rescaling, windows and photometric quirks.

``dicom_to_image(source, window=None, frame=None)`` turns a DICOM file (path or bytes) into a PIL image that
the rest of the pipeline treats like any decoded JPEG or PNG:

1. the chosen frame of a multi-frame file (``frame=None``: the middle one, ``n // 2``);
2. grey data is rescaled to modality units (``RescaleSlope``/``RescaleIntercept``: Hounsfield units for CT);
3. then mapped to 0..255 through a window: ``window=None`` uses the file's ``WindowCenter``/``WindowWidth``
   (the first pair where several are stored) and min–max where it has none; a preset name from ``PRESETS``
   (CT, in Hounsfield units), ``"minmax"``, or an explicit ``(center, width)`` (or ``"center,width"``);
4. ``MONOCHROME1`` (where black is the highest value) is inverted, so bone is always bright;
5. colour data (RGB, YBR — pydicom converts it to RGB — or a palette) passes through as RGB.

Files are recognised by the ``DICM`` magic at byte 128 (``is_dicom``), whatever their name. Compressed pixel
data needs the decoder plug-ins pydicom names in its message (e.g. pylibjpeg); without them the image is
refused with that message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medvlp.data.images import ImageError, Window, check_pixels
from medvlp.errors import ConfigError

MAGIC_OFFSET, MAGIC = 128, b"DICM"
# Common CT display windows (center, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40, 80),
    "subdural": (75, 215),
    "stroke": (40, 40),
    "lung": (-600, 1500),
    "mediastinum": (50, 350),
    "abdomen": (50, 400),
    "liver": (30, 150),
    "bone": (400, 1800),
}


# The decoders pydicom documents for compressed transfer syntaxes (JPEG baseline, extended and lossless,
# JPEG-LS, JPEG 2000, RLE), installed by the ``dicom`` extra: ``pip install "medvlp[dicom]"``. Pillow, a core
# dependency, decodes 8-bit JPEG baseline and JPEG 2000 without them.
DECODER_MODULES = ("pylibjpeg", "libjpeg", "openjpeg", "rle")
DECODERS_MISSING = "the decoders medvlp[dicom] installs are missing for"


def decoders_missing() -> bool:
    """Whether any of the compressed-DICOM decoders of the ``dicom`` extra is not installed."""
    import importlib.util

    return any(importlib.util.find_spec(name) is None for name in DECODER_MODULES)


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM file (Part 10: a 128-byte preamble, then ``DICM``)."""
    return data[MAGIC_OFFSET:MAGIC_OFFSET + 4] == MAGIC


def _window(window: Window) -> tuple[float, float] | str | None:
    """The requested window checked: None (the file's), "minmax", or (center, width)."""
    if window is None or window == "minmax":
        return window
    if isinstance(window, str) and "," in window:  # "CENTER,WIDTH", as typed on a command line
        window = window.split(",")
    if isinstance(window, str):
        if window.lower() not in PRESETS:
            raise ConfigError(f"window={window!r}: known presets are {', '.join(PRESETS)}, or minmax, "
                              "or CENTER,WIDTH")
        return PRESETS[window.lower()]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"window={window!r}: give a preset name or (center, width)") from None
    if width <= 0:
        raise ConfigError(f"window={window!r}: the width must be positive")
    return center, width


def _first(value: object) -> float | None:
    """A window value as stored: one number, or several (the first is the default view)."""
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue too
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _to_8bit(pixels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is not None:
        center, width = window
        low = center - width / 2
        scaled = (pixels - low) / width * 255.0
    else:
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def dicom_to_image(source: Path | str | bytes, window: Window = None, frame: int | None = None, *,
                   max_pixels: int | None = None) -> Image.Image:
    """A DICOM file as an 8-bit "L" (grey) or "RGB" image; see the module's docstring for the steps.

    Raises ``ImageError`` for a file that is not a readable DICOM image (no pixel data, an undecodable
    compression, a frame out of range) and ``ConfigError`` for an unknown window preset.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    chosen = _window(window)
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as e:
        raise ImageError(f"not a readable DICOM file ({e})") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data (a report or structure set, not an image)")
    if max_pixels is not None:  # from the header, before the pixel data is decoded
        check_pixels(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises several kinds for missing decoders and damaged data
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        text = "; ".join(lines[:3]) if lines else type(e).__name__
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed and ("missing dependencies" in text or decoders_missing()):
            raise ImageError(f"DICOM pixel data cannot be decoded: {DECODERS_MISSING} {syntax.name} ({text})") \
                from None
        raise ImageError(f"DICOM pixel data cannot be decoded ({text})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else frame
        if not -frames <= index < frames:
            raise ImageError(f"frame {frame} out of range: the file has {frames} frames")
        pixels = pixels[index]
    elif frame not in (None, 0, -1):
        raise ImageError(f"frame {frame} out of range: the file has 1 frame")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels, samples = apply_color_lut(pixels, ds), 3
    if samples == 3:
        if pixels.dtype != np.uint8:  # 16-bit colour: scaled to 8 bits
            pixels = (pixels.astype(np.float64) / (np.iinfo(pixels.dtype).max / 255.0)).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    if chosen is None:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            chosen = (center, width)
        elif pixels.dtype == np.uint8 and slope in (None, 1.0) and not intercept:
            chosen = (127.5, 255.0)  # already 8-bit: keep the values as they are
    grey = _to_8bit(values, None if chosen in (None, "minmax") else chosen)  # type: ignore[arg-type]
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L")
