"""Image decoding, the eval and train transforms, and normalisation."""

from __future__ import annotations

import io
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from medvlp.data.transforms import EvalTransform, TrainTransform, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(height: int, width: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- decode_image ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_decode_keeps_l_and_rgb(mode: str) -> None:
    image = Image.fromarray(noise(20, 30, 3 if mode == "RGB" else 0), mode)
    decoded = decode_image(encode(image), None)
    assert decoded.mode == mode and decoded.size == (30, 20)
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_decode_16_bit_is_stretched_to_8_bit() -> None:
    values = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit PNG
    pixels = np.asarray(decode_image(data, None))
    assert decode_image(data, None).mode == "L"
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)  # order kept


def test_decode_cmyk_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(encode(cmyk, "JPEG", quality=95), None)
    assert decoded.mode == "RGB"
    red, green, blue = np.asarray(decoded).reshape(-1, 3).mean(0)
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        (Image.fromarray(noise(8, 8) > 127), "L"),  # mode "1"
        (Image.fromarray(noise(8, 8, 2), "LA"), "L"),
        (Image.fromarray(noise(8, 8, 4), "RGBA"), "RGB"),
        (Image.fromarray(noise(8, 8, 3), "RGB").convert("P"), "RGB"),
    ],
    ids=["1", "LA", "RGBA", "P"],
)
def test_decode_other_modes(image: Image.Image, mode: str) -> None:
    assert decode_image(encode(image), None).mode == mode


def test_decode_palette_with_transparency() -> None:
    image = Image.fromarray(noise(8, 8, 3), "RGB").convert("P")
    image.info["transparency"] = 0
    assert decode_image(encode(image, transparency=0), None).mode == "RGB"


def test_decode_large_jpeg_at_reduced_scale() -> None:
    data = encode(Image.fromarray(noise(1024, 800)), "JPEG")
    assert decode_image(data, None).size == (800, 1024)
    reduced = decode_image(data, 200)  # 800 // 200 = 4: libjpeg decodes at 1/4
    assert reduced.size == (200, 256) and reduced.mode == "L"
    assert decode_image(data, 500).size == (800, 1024)  # less than 2x larger: full scale


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encode(Image.fromarray(noise(64, 64)), "JPEG")[:300]],
    ids=["empty", "garbage", "truncated"],
)
def test_decode_corrupt_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(data, None)


# --- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("transform", [EvalTransform(32), TrainTransform(32)], ids=["eval", "train"])
def test_output_shape_and_dtype(transform: EvalTransform | TrainTransform, mode: str) -> None:
    image = Image.fromarray(noise(50, 70, 3 if mode == "RGB" else 0), mode)
    pixels = transform(image)
    assert pixels.shape == (3 if mode == "RGB" else 1, 32, 32) and pixels.dtype == torch.uint8


def test_grey_stays_one_channel_and_the_model_sees_it_as_three() -> None:
    from medvlp.models.model import normalize_pixels

    pixels = TrainTransform(24)(Image.fromarray(noise(40, 40)), random.Random(0))
    assert pixels.shape == (1, 24, 24) and pixels.float().std() > 10  # a real picture, not a constant
    as_one = normalize_pixels(pixels[None])
    as_three = normalize_pixels(pixels.expand(3, -1, -1)[None])
    assert as_one.shape == (1, 3, 24, 24) and torch.equal(as_one, as_three)


def test_rgb_channels_stay_in_order() -> None:
    image = Image.new("RGB", (40, 30), (10, 120, 230))
    assert EvalTransform(16)(image).reshape(3, -1)[:, 0].tolist() == [10, 120, 230]


@pytest.mark.parametrize(("width", "height"), [(96, 64), (64, 96)])
def test_centre_crop_picks_the_centre(width: int, height: int) -> None:
    # Each pixel holds its own coordinate along the long side: the crop shows which columns/rows it kept.
    along = np.arange(max(width, height), dtype=np.uint8)
    pixels = np.broadcast_to(along if width > height else along[:, None], (height, width))
    out = EvalTransform(64)(Image.fromarray(np.ascontiguousarray(pixels)))[0]
    centre = torch.arange(16, 80, dtype=torch.uint8)
    assert torch.equal(out[0] if width > height else out[:, 0], centre)


def test_centre_crop_resize_drops_the_sides() -> None:
    image = np.zeros((100, 200), dtype=np.uint8)
    image[:, 50:150] = 200  # the centre square is bright, the two side bands black
    out = EvalTransform(40)(Image.fromarray(image))
    assert torch.all(out == 200)


def test_eval_resize_matches_pillow_bicubic() -> None:
    image = Image.fromarray(noise(120, 120, 3, seed=3), "RGB").resize((240, 240), Image.Resampling.BILINEAR)
    ours = EvalTransform(96)(image).permute(1, 2, 0).numpy().astype(int)
    pillow = np.asarray(image.resize((96, 96), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(ours - pillow).mean() < 0.5 and np.abs(ours - pillow).max() <= 8


def test_random_crop_reproducible_per_seed() -> None:
    image = Image.fromarray(noise(80, 120, 3), "RGB")
    transform = TrainTransform(32)
    first = [transform(image, random.Random(7)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], transform(image, random.Random(8)))
    # The transform's own stream: fixed by its seed, fresh after pickling (as in a DataLoader worker).
    one, two, other = TrainTransform(32, seed=1), TrainTransform(32, seed=1), TrainTransform(32, seed=2)
    stream = [one(image) for _ in range(3)]
    assert all(torch.equal(a, two(image)) for a in stream)
    assert not torch.equal(stream[0], other(image))
    assert torch.equal(pickle.loads(pickle.dumps(one))(image), stream[0])


def test_random_crop_boxes_follow_scale_and_ratio() -> None:
    # A square image and boxes small enough that every draw fits: the distributions are not truncated.
    transform, rng = TrainTransform(32, scale=(0.2, 0.4), ratio=(3 / 4, 4 / 3)), random.Random(0)
    fractions, log_aspects = [], []
    for _ in range(500):
        left, top, right, bottom = transform.crop_box((300, 300), rng)
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 300
        fractions.append((right - left) * (bottom - top) / 300**2)
        log_aspects.append(math.log((right - left) / (bottom - top)))
    assert 0.19 <= min(fractions) and max(fractions) <= 0.41 and np.mean(fractions) == pytest.approx(0.3, abs=0.01)
    assert math.log(0.74) <= min(log_aspects) and max(log_aspects) <= math.log(1.35)
    assert np.mean(log_aspects) == pytest.approx(0.0, abs=0.03)  # log-uniform around 1
    assert max(log_aspects) - min(log_aspects) > 0.5  # and spread over the range
    assert TrainTransform(32).size_hint == math.ceil(32 / math.sqrt(0.5 * 0.75))


def test_random_crop_falls_back_on_elongated_images() -> None:
    left, top, right, bottom = TrainTransform(32).crop_box((1000, 10), random.Random(0))
    assert (bottom - top, right - left) == (10, 13)  # full height, widest allowed ratio (4/3), centred
    assert left == (1000 - 13) // 2
