"""Image decoding and the papers' image transforms, in Pillow + torch (no torchvision).

Pipeline: encoded bytes → ``decode_image`` (a PIL image in mode "L" or "RGB") → ``EvalTransform`` or
``TrainTransform`` (crop + one antialiased bicubic resize) → ``torch.uint8`` tensor ``[C, size, size]``, with
``C = 1`` for grey and 3 for colour. Grey stays one channel all the way to the model, which repeats it to three
when it normalises (``MedVLP.normalize``, CLIP mean/std, broadcast): most medical images are grey, and one
channel makes the worker → main-process transfer and the collator's copy 3x smaller (uint8 instead of float
makes them 4x smaller again). The returned tensor may be a view (RGB: channels-last strides), so do not write
into it in place: the collator's ``torch.stack`` materialises the batch.

No horizontal flip: captions and answers name sides ("left lower lobe"), and a flip would make them false.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

from medvlp.constants import CLIP_MEAN, CLIP_STD  # noqa: F401 (re-exported)
from medvlp.data.images import to_standard_mode


def decode_image(data: bytes, size_hint: int | None = None) -> Image.Image:
    """Decode encoded image bytes to a PIL image in mode "L" (grey) or "RGB".

    ``size_hint`` is the smallest shorter side the caller needs (``None``: full resolution). A JPEG at least
    twice that size is decoded at a reduced scale (1/2, 1/4 or 1/8) by libjpeg itself, which is much faster.
    High bit-depth grey ("I;16", "I", "F") is scaled to 8 bits by its own min and max; CMYK, palette and
    other colour modes become "RGB"; "1" becomes "L"; alpha is dropped.

    Raises ``ValueError`` for bytes that are not a readable image (the caller counts and skips them).
    """
    try:
        image = Image.open(io.BytesIO(data))
        if size_hint is not None and image.format == "JPEG":
            image.draft(image.mode, (size_hint, size_hint))
        image.load()
        return to_standard_mode(image)
    except Exception as error:  # Pillow signals broken data with many types (OSError, SyntaxError, struct.error…)
        raise ValueError(f"cannot decode image ({len(data)} bytes): {error}") from error


class EvalTransform:
    """Resize the shorter side to ``size`` (bicubic), then take the centre ``size x size`` square.

    Done as one resize of the centre square of the source (the same result, without resampling pixels that the
    crop would throw away). Returns ``torch.uint8 [C, size, size]`` (C = 1 grey, 3 RGB).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.size_hint = size
        """The ``size_hint`` to give ``decode_image``: the smallest shorter side that is never upsampled."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return _crop_resize(image, (left, top, left + side, top + side), self.size)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


class TrainTransform:
    """Random resized crop: a box covering ``scale`` of the image area with aspect ratio (width / height) in
    ``ratio`` (log-uniform), at a uniform position, resized to ``size x size`` (bicubic). Returns
    ``torch.uint8 [C, size, size]`` (C = 1 grey, 3 RGB).

    Randomness: pass ``rng`` to ``__call__``, or let the transform use its own ``random.Random``, created on
    first use from ``seed`` and, inside a DataLoader worker, that worker's seed (see ``worker_seed``), so runs
    are reproducible and workers draw different crops.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.seed = seed
        # The narrowest side of the smallest box is sqrt(scale_low * min(ratio_low, 1 / ratio_high)) of the side
        # of a square image; decoding at least size / that keeps every crop from being upsampled.
        narrowest = math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1], 1.0))
        self.size_hint = math.ceil(size / narrowest)
        """The ``size_hint`` to give ``decode_image``: the smallest shorter side whose crops are never upsampled."""
        self._log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self._rng: random.Random | None = None

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if rng is None:
            if self._rng is None:
                self._rng = random.Random(worker_seed(self.seed))
            rng = self._rng
        return _crop_resize(image, self.crop_box(image.size, rng), self.size)

    def crop_box(self, image_size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """A random ``(left, top, right, bottom)`` box in source pixels."""
        width, height = image_size
        area = width * height
        for _ in range(10):
            box_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self._log_ratio))
            box_width = round(math.sqrt(box_area * aspect))
            box_height = round(math.sqrt(box_area / aspect))
            if 0 < box_width <= width and 0 < box_height <= height:
                left = rng.randint(0, width - box_width)
                top = rng.randint(0, height - box_height)
                return left, top, left + box_width, top + box_height
        # Rarely reached (very elongated images): the largest centred box with an allowed aspect ratio.
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        box_width = max(1, min(width, round(height * aspect)))
        box_height = max(1, min(height, round(width / aspect)))
        left, top = (width - box_width) // 2, (height - box_height) // 2
        return left, top, left + box_width, top + box_height

    def __getstate__(self) -> dict[str, object]:
        # A copy sent to a DataLoader worker starts its own random stream there.
        return {**self.__dict__, "_rng": None}

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, seed={self.seed})"


def _crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop ``box`` out of an "L" or "RGB" image and resize it to ``size x size``: ``uint8 [1 or 3, size, size]``.

    The resize is torch's antialiased bicubic on uint8, which follows Pillow's bicubic filter (a = -0.5, support
    widened when downscaling; same values up to rounding away from the box edges) and runs 1.5x (grey) to 3x
    (RGB) faster than ``Image.resize`` on one core.
    """
    left, top, right, bottom = box
    pixels = torch.from_numpy(np.array(image))  # [H, W] or [H, W, 3]
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(-1)
    crop = pixels[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # [1, C, h, w], channels-last strides
    if crop.shape[-2:] != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    return crop[0]


def worker_seed(seed: int) -> int:
    """The seed for a random stream: ``seed`` in the main process; inside a DataLoader worker, ``seed`` mixed
    with the worker's own seed, which PyTorch derives from the loader's base seed (drawn from the loader's
    ``generator`` or the global torch RNG, so fixed by ``torch.manual_seed``/``seed_everything``) plus the
    worker id. Workers thus differ from each other and from one epoch to the next, reproducibly."""
    info = get_worker_info()
    if info is None:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + info.seed) % 2**63
