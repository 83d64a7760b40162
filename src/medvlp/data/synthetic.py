"""The built-in synthetic radiology corpus: the default data of medvlp, generated, deterministic for a seed.

No real pre-training corpus can be downloaded everywhere, so ``generate`` writes one in the record format of
real data (through the same ``write_prepared``): four prepared datasets, each with train/val/test splits.

==================  =========================================================  ===================
dataset             record                                                     plays the part of
==================  =========================================================  ===================
``pretrain``        image + 1-2 captions                                       ROCO, MedICaT
``vqa``             image + question + answer (closed yes/no, or open)         VQA-RAD, SLAKE
``classification``  image + a short request note + a label                     MELINDA
``retrieval``       image + one caption that states every fact                 ROCO retrieval
==================  =========================================================  ===================

**Images.** Grey "scans" (stored at ``image_size``, 128 px by default) of three modalities and three body
regions (head, chest, abdomen). An X-ray is a frontal projection: dark outside the body, bright bones (skull,
ribs, clavicles, spine, pelvis), dark lungs and bowel gas, a little blur. CT and MRI are axial cross-sections
in a dark surrounding field with the scanner table beneath: CT shows bone white and fat dark grey; MRI
(T2-like) shows bone black and fat and fluid bright, under a smooth coil bias and Rician noise. Each image is
drawn from one of 32 anatomy variants (body build, bowel gas, size and tilt), shifted by a few pixels, with its
own exposure, tissue texture and noise.

**Findings.** 0-3 lesions inside the organ of the region (brain hemispheres, lungs, the liver or spleen side
of the abdomen), on the patient's left, right or both sides. All lesions of an image share a size (small,
medium, large), a brightness against the surrounding tissue (brighter, darker), a shape (round, oval) and a
margin (well-defined, ill-defined, i.e. a sharp or a blurred edge). Sides are the *patient's*: as radiology
displays images, the patient's left is on the image's right. Each lesion's position in its organ (upper/mid/
lower on an X-ray, anterior/mid/posterior on a cross-section) shows too.

**Captions** put these facts in varied words: several sentence patterns, synonyms for every fact ("lesion",
"mass", "nodule"; "hyperdense" on CT, "hyperintense" on MRI, "radiopaque" on an X-ray; "ill-defined",
"indistinct"), attributes as adjectives or as separate sentences, varied order, and now and then a fact left
out, so two images with the same facts rarely get the same caption. Retrieval captions always state every
fact, lesion positions included, which makes text-to-image retrieval well posed (in a test split of 1,000,
about 820 images have facts no other one shares).

**Questions** can be answered only from the image: the question never contains its answer, and the closed
questions are built so that "yes" and "no" are about equally frequent (a question about a modality names the
true one half of the time; "Is there a lesion?" alternates with "Is this scan normal?"; ...). Answers: yes/no,
x-ray/ct/mri, head/chest/abdomen, 0-3, left/right/both, small/medium/large, brighter/darker, round/oval,
well-defined/ill-defined.

**The classification label** is the finding pattern, one of ``LABELS``: "normal", "single lesion", "multiple
unilateral lesions", "bilateral lesions", a quarter each. The text is a referral note (age, sex, indication,
sometimes the requested study) that never states the finding, and its indication is only weakly tied to the
label (a staging request makes multiple lesions likelier, as in real referrals). So the label needs the image:
counting the lesions and seeing on which sides they are; the note adds a little.

Captions, questions and labels all speak of the same visible facts, so the corpus shows what pre-training is
for: a model pre-trained on the captions answers the questions (and classifies and retrieves) better after
fine-tuning than the same model trained from scratch. Downstream datasets have images of their own (other
random streams), as real downstream datasets are other images than the pre-training corpus.

Every image and its texts come from their own random stream ``np.random.default_rng([seed, family, split,
index])``, so the output is byte-identical for a seed whatever the number of worker processes, and differs for
another seed.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medvlp.config import to_dict
from medvlp.data.prepare import Example, PrepareConfig, write_prepared
from medvlp.data.records import read_manifest
from medvlp.data.synth_config import FAMILIES, QUESTION_KINDS, SPLITS, SynthConfig
from medvlp.errors import DataError

MODALITIES = ("xray", "ct", "mri")
REGIONS = ("head", "chest", "abdomen")
SIDES = ("left", "right", "both")
SIZES = ("small", "medium", "large")
BRIGHTNESS = ("brighter", "darker")
SHAPES = ("round", "oval")
MARGINS = ("well-defined", "ill-defined")
FACT_FIELDS = ("modality", "region", "count", "side", "size", "brightness", "shape", "margin")
LABELS = ("normal", "single lesion", "multiple unilateral lesions", "bilateral lesions")

COUNT_PROBS = {  # P(0, 1, 2, 3 lesions)
    "pretrain": (0.3, 0.3, 0.2, 0.2), "vqa": (0.3, 0.3, 0.2, 0.2), "retrieval": (0.0, 0.4, 0.3, 0.3)}
RADIUS = {"small": 0.06, "medium": 0.09, "large": 0.125}  # lesion radius, in units of half the field
ASPECTS = {"round": (0.9, 1.1), "oval": (1.5, 1.7)}  # a lesion's long axis over its short one
BLUR = {"well-defined": 0.0, "ill-defined": 0.7}  # width of a lesion's edge, as a fraction of its radius
T = TypeVar("T")


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One of ``options``, uniformly (``rng.random`` is several times quicker than ``rng.integers``)."""
    return options[int(rng.random() * len(options))]


def pick_weighted(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """An index drawn with the given probabilities (which sum to 1)."""
    u, total = rng.random(), 0.0
    for i, weight in enumerate(weights):
        total += weight
        if u < total:
            return i
    return len(weights) - 1


# ================================================================================================ facts
def view_of(modality: str) -> str:
    """An X-ray is a frontal projection; CT and MRI are axial cross-sections."""
    return "frontal" if modality == "xray" else "axial"


@dataclass(frozen=True)
class Lesion:
    """One lesion, in anatomy coordinates: [-1, 1] across the field, x to the image's right (the patient's
    left), y down (towards the feet on an X-ray, posterior on a cross-section)."""

    x: float
    y: float
    radius: float
    aspect: float  # long over short axis
    angle: float  # of the long axis, radians
    side: str  # the patient's: "left" | "right"
    position: str  # third of the organ: "upper" | "mid" | "lower" (X-ray), "anterior" | "mid" | "posterior"


@dataclass(frozen=True)
class Facts:
    """What an image shows; its captions, questions and label are all made from these."""

    modality: str
    region: str
    count: int
    side: str  # "left" | "right" | "both" | "none"
    size: str  # "small" | "medium" | "large" | "none"
    brightness: str  # "brighter" | "darker" | "none"
    shape: str  # "round" | "oval" | "none"
    margin: str  # "well-defined" | "ill-defined" | "none"
    lesions: tuple[Lesion, ...] = ()

    @property
    def view(self) -> str:
        return view_of(self.modality)

    def fields(self) -> dict[str, str]:
        """The facts as the string fields stored beside each record."""
        return {name: str(getattr(self, name)) for name in FACT_FIELDS}


# Where lesion centres lie, per region and view: the patient's side -> ellipse (cx, cy, rx, ry).
ZONES: dict[tuple[str, str], dict[str, tuple[float, float, float, float]]] = {
    ("head", "frontal"): {"right": (-0.32, -0.22, 0.2, 0.4), "left": (0.32, -0.22, 0.2, 0.4)},
    ("chest", "frontal"): {"right": (-0.42, -0.1, 0.17, 0.45), "left": (0.47, -0.18, 0.13, 0.38)},
    ("abdomen", "frontal"): {"right": (-0.55, -0.1, 0.18, 0.55), "left": (0.55, -0.1, 0.18, 0.55)},
    ("head", "axial"): {"right": (-0.32, 0.0, 0.17, 0.52), "left": (0.32, 0.0, 0.17, 0.52)},
    ("chest", "axial"): {"right": (-0.42, 0.0, 0.18, 0.32), "left": (0.47, 0.02, 0.14, 0.3)},
    ("abdomen", "axial"): {"right": (-0.4, -0.1, 0.22, 0.24), "left": (0.5, 0.02, 0.12, 0.26)},
}
POSITIONS = {"frontal": ("upper", "mid", "lower"), "axial": ("anterior", "mid", "posterior")}


def _place(rng: np.random.Generator, zone: tuple[float, float, float, float], k: int,
           reach: float) -> np.ndarray:
    """``k`` centres in a zone, far enough apart for lesions of ``reach`` not to touch; shape (k, 2). Of 128
    random draws the first that fits is taken; where none does (large lesions crowding a small organ) the zone
    grows a little, letting lesions reach into the tissue around, but never across the midline."""
    cx, cy, rx, ry = zone
    if k == 1:
        r, a = math.sqrt(rng.random()), rng.random() * 2 * math.pi
        return np.array([[cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)]])
    for grow in (1.0, 1.25, 1.5, 2.0):
        r, a = np.sqrt(rng.random((128, k))) * grow, rng.random((128, k)) * 2 * np.pi
        points = np.stack([cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)], axis=-1)
        gaps = np.linalg.norm(points[:, :, None] - points[:, None, :], axis=-1) + np.eye(k) * 9
        on_side = (np.sign(cx) * points[..., 0] > 0.1).all(axis=1)
        fits = (gaps.min(axis=(1, 2)) >= 2 * reach + 0.03) & on_side
        if fits.any():
            break
    return points[int(np.argmax(fits))]


def sample_facts(rng: np.random.Generator, count: int, side: str | None = None) -> Facts:
    """Random facts with ``count`` lesions, on ``side`` if given (else 2+ lesions are bilateral half the time)."""
    modality, region = pick(rng, MODALITIES), pick(rng, REGIONS)
    if count == 0:
        return Facts(modality, region, 0, "none", "none", "none", "none", "none")
    if side is None:
        side = pick(rng, ("left", "right")) if count == 1 else pick(rng, ("left", "right", "both", "both"))
    size, brightness = pick(rng, SIZES), pick(rng, BRIGHTNESS)
    shape, margin = pick(rng, SHAPES), pick(rng, MARGINS)
    if side == "both":
        on_left = int(rng.integers(1, count))
        per_side = {"left": on_left, "right": count - on_left}
    else:
        per_side = {side: count}
    view = view_of(modality)
    lesions = []
    for where, k in per_side.items():
        zone = ZONES[(region, view)][where]
        radii, aspects = RADIUS[size] * rng.uniform(0.88, 1.12, k), rng.uniform(*ASPECTS[shape], k)
        centres = _place(rng, zone, k, float(radii.max() * np.sqrt(aspects.max())))  # half the long axis
        for (x, y), radius, aspect in zip(centres, radii, aspects):
            third = min(2, max(0, math.floor((y - zone[1] + zone[3]) / (2 * zone[3]) * 3)))
            lesions.append(Lesion(float(x), float(y), float(radius), float(aspect), float(rng.uniform(0, np.pi)),
                                  where, POSITIONS[view][third]))
    return Facts(modality, region, count, side, size, brightness, shape, margin, tuple(lesions))


# ============================================================================================== images
@dataclass(frozen=True)
class Scene:
    """Everything ``render`` needs: the facts and the drawing's own random choices."""

    facts: Facts
    variant: int  # anatomy template: body build, bowel gas, size and tilt in the field (see ``pose``)
    shift: tuple[float, float]  # of the field, as a fraction (-1..1) of the largest shift, SHIFT
    contrast: float  # lesion minus surrounding tissue, in grey levels of [0, 1]
    gain: float  # exposure
    seed: int  # texture and noise


VARIANTS = 32  # anatomy templates per modality and region
SHIFT = 0.06  # the largest shift of the field, as a fraction of its half-width


def sample_scene(rng: np.random.Generator, facts: Facts) -> Scene:
    """A random way of drawing the facts."""
    shift = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    return Scene(facts, int(rng.integers(VARIANTS)), shift, float(rng.uniform(0.26, 0.36)),
                 float(rng.uniform(0.92, 1.08)), int(rng.integers(2**63)))


@functools.lru_cache(maxsize=None)
def pose(variant: int) -> tuple[float, float]:
    """(scale, angle) of an anatomy variant: how large and how tilted the anatomy is in the field."""
    rng = np.random.default_rng([len(REGIONS), variant])
    return float(rng.uniform(0.9, 1.05)), float(rng.uniform(-0.07, 0.07))


# Grey value of each tissue per modality (0 black, 1 white).
TISSUES: dict[str, dict[str, float]] = {
    "xray": dict(air=0.04, fat=0.42, soft=0.55, bone=0.92, lung=0.3, fluid=0.5, brain=0.5, white=0.5,
                 liver=0.62, organ=0.58, blood=0.62, gas=0.16, table=0.04),
    "ct": dict(air=0.0, fat=0.22, soft=0.5, bone=0.97, lung=0.3, fluid=0.36, brain=0.5, white=0.56,
               liver=0.62, organ=0.54, blood=0.58, gas=0.03, table=0.72),
    "mri": dict(air=0.02, fat=0.85, soft=0.46, bone=0.06, lung=0.3, fluid=0.95, brain=0.55, white=0.42,
                liver=0.34, organ=0.6, blood=0.08, gas=0.03, table=0.02),
}


class Canvas:
    """A float image painted with soft-edged shapes given in anatomy coordinates.

    Pixel (column, row) sits at field coordinates p = (column, row) * 2 / (size - 1) - 1, and the anatomy is
    the field shifted, tilted and scaled: anatomy = R(-angle) (p - shift) / scale. A shape's own coordinates
    are thus affine in column and row, each the sum of a row vector and a column vector: one broadcast
    addition per axis, no coordinate images.
    """

    def __init__(self, size: int, shift: tuple[float, float] = (0.0, 0.0), scale: float = 1.0,
                 angle: float = 0.0):
        self.size, self.shift, self.scale, self.angle = size, shift, scale, angle
        self.index = np.arange(size, dtype=np.float32)
        self.image = np.empty((size, size), np.float32)
        self.step = 2.0 / (size - 1) / scale  # one pixel, in anatomy units

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """(column, row) of an anatomy point."""
        s, cos, sin = self.scale, math.cos(self.angle), math.sin(self.angle)
        px, py = s * (cos * x - sin * y) + self.shift[0], s * (sin * x + cos * y) + self.shift[1]
        return (px + 1) * (self.size - 1) / 2, (py + 1) * (self.size - 1) / 2

    def local(self, cx: float, cy: float, angle: float = 0.0, box: tuple[slice, slice] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the pixels in ``box`` (default: all) in the frame centred on the anatomy point
        (cx, cy) and turned by ``angle``, as two arrays broadcasting to (rows, columns)."""
        rows, cols = box or (slice(None), slice(None))
        theta = angle + self.angle
        cos, sin = math.cos(theta) * self.step, math.sin(theta) * self.step
        (sx, sy), (ca, sa) = self.shift, (math.cos(angle), math.sin(angle))
        ox, oy = (-1 - sx) / self.scale, (-1 - sy) / self.scale  # pixel (0, 0), unturned
        x0 = (cos * ox + sin * oy) / self.step - (ca * cx + sa * cy)
        y0 = (cos * oy - sin * ox) / self.step - (ca * cy - sa * cx)
        col, row = self.index[cols], self.index[rows][:, None]
        return (cos * col + x0) + sin * row, (cos * row + y0) - sin * col

    def weights(self, cx: float, cy: float, rx: float, ry: float, power: int = 2, angle: float = 0.0,
                blur: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray]:
        """Coverage (0..1) of the shape |x/rx|^p + |y/ry|^p <= 1 (power 2: an ellipse, 4: a rounded box) on the
        box of pixels it can touch. Its edge is a ramp ``blur`` wide (anatomy units), at least a pixel."""
        col, row = self.to_pixel(cx, cy)
        reach = (math.hypot(rx, ry) + blur) * self.scale * (self.size - 1) / 2 + 2
        box = (slice(max(0, int(row - reach)), max(0, int(row + reach) + 2)),
               slice(max(0, int(col - reach)), max(0, int(col + reach) + 2)))
        x, y = self.local(cx, cy, angle, box)
        u, v = np.square(x * (1 / rx)), np.square(y * (1 / ry))
        if power == 4:
            u, v = u * u, v * v
        slope = min(rx, ry) / (power * max(blur, self.step))  # 1 - (u + v) ~ power * depth / radius
        w = u
        w += v
        w *= -slope
        w += slope + 0.5
        return box, np.minimum(np.maximum(w, 0, out=w), 1, out=w)

    def paint(self, value: float, cx: float, cy: float, rx: float, ry: float, power: int = 2,
              angle: float = 0.0, alpha: float = 1.0) -> None:
        """Cover a shape with tissue of grey ``value`` (``alpha`` < 1: partly, as overlapping shadows)."""
        box, w = self.weights(cx, cy, rx, ry, power, angle)
        if alpha != 1.0:
            w *= alpha
        region = self.image[box]
        region += (value - region) * w

    def add(self, delta: float, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
            blur: float = 0.0) -> None:
        """Brighten (or darken) an ellipse by ``delta`` over whatever lies beneath."""
        box, w = self.weights(cx, cy, rx, ry, 2, angle, blur)
        w *= delta
        self.image[box] += w


Anatomy = Callable[[Canvas, dict[str, float], np.random.Generator], None]


def _head_frontal(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["soft"], 0, 0.05, 0.8 * w, 1.0)  # scalp and neck
    c.paint(t["bone"], 0, -0.08, 0.76 * w, 0.88)  # skull vault
    c.paint(t["brain"], 0, -0.1, 0.68 * w, 0.78)
    for side in (-1, 1):
        c.paint(t["gas"], side * 0.27 * w, 0.38, 0.16, 0.12, alpha=0.6)  # orbits
        c.paint(t["bone"], side * 0.27 * w, 0.38, 0.19, 0.15, alpha=0.25)
    c.paint(t["gas"], 0, 0.6, 0.07, 0.14, alpha=0.6)  # nasal cavity
    c.paint(t["bone"], 0, 0.9, 0.5 * w, 0.14, power=4, alpha=0.7)  # jaw


def _chest_frontal(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["soft"], 0, 0.2, 0.95 * w, 1.15, power=4)  # torso
    for side, rx in ((-1, 0.32), (1, 0.3)):
        c.paint(t["lung"], side * 0.43 * w, -0.08, rx * w, 0.62)
    lungs = (c.image < (t["lung"] + t["soft"]) / 2) & (c.image > (t["lung"] + t["air"]) / 2)
    x, y = c.local(0, 0)
    ribs = np.cos(2 * np.pi * (4.5 * y + 1.6 * x ** 2)) > 0.55  # rib shadows across the lungs
    c.image += lungs * ribs * (t["bone"] - t["lung"]) * 0.3
    c.paint(t["blood"], 0.13, 0.34, 0.3 * w, 0.25)  # heart
    c.paint(t["bone"], 0, 0.15, 0.07, 1.3, power=4, alpha=0.45)  # spine
    for side in (-1, 1):
        c.paint(t["bone"], side * 0.36, -0.74, 0.36, 0.045, angle=side * 0.25, alpha=0.7)  # clavicles


def _abdomen_frontal(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["fat"], 0, 0.05, 1.0 * w, 1.3, power=4)  # flanks
    c.paint(t["soft"], 0, 0.05, 0.9 * w, 1.3, power=4)
    c.paint(t["liver"], -0.45, -0.6, 0.45, 0.3, alpha=0.5)
    for k in range(5):  # lumbar vertebrae
        c.paint(t["bone"], 0, -0.82 + 0.36 * k, 0.11, 0.14, power=4, alpha=0.6)
    for side in (-1, 1):  # iliac wings
        c.paint(t["bone"], side * 0.45 * w, 0.85, 0.36, 0.22, angle=-side * 0.4, alpha=0.55)
    for _ in range(int(rng.integers(3, 7))):  # bowel gas, kept off the lesion zones
        c.paint(t["gas"], rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.55), rng.uniform(0.04, 0.1),
                rng.uniform(0.03, 0.06), angle=rng.uniform(0, np.pi), alpha=0.6)


def _head_axial(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["fat"], 0, 0, 0.74 * w, 0.9)  # scalp
    c.paint(t["bone"], 0, 0, 0.7 * w, 0.86)  # skull
    c.paint(t["brain"], 0, 0, 0.63 * w, 0.79)  # grey matter
    c.paint(t["white"], 0, 0.02, 0.48 * w, 0.64)  # white matter
    c.paint(t["fluid"], 0, 0, 0.012, 0.72, alpha=0.7)  # falx
    for side in (-1, 1):
        c.paint(t["fluid"], side * 0.1, -0.06, 0.055, 0.24, angle=side * 0.2)  # lateral ventricles


def _chest_axial(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["table"], 0, 0.84, 0.98, 0.05, power=4)
    c.paint(t["fat"], 0, 0.05, 0.92 * w, 0.64)  # body wall
    c.paint(t["soft"], 0, 0.05, 0.85 * w, 0.57)  # muscle
    c.paint(t["lung"], -0.41 * w, 0.0, 0.34 * w, 0.44)
    c.paint(t["lung"], 0.42 * w, 0.02, 0.32 * w, 0.42)
    c.paint(t["blood"], 0.1, -0.17, 0.24, 0.2)  # heart
    c.paint(t["blood"], 0.1, 0.17, 0.07, 0.07)  # aorta
    c.paint(t["bone"], 0, 0.43, 0.11, 0.1)  # vertebra
    c.paint(t["fluid"], 0, 0.43, 0.04, 0.04)  # spinal canal
    c.paint(t["bone"], 0, -0.5, 0.08, 0.04)  # sternum


def _abdomen_axial(c: Canvas, t: dict[str, float], rng: np.random.Generator) -> None:
    w = rng.uniform(0.94, 1.06)
    c.paint(t["table"], 0, 0.84, 0.98, 0.05, power=4)
    c.paint(t["fat"], 0, 0.05, 0.9 * w, 0.68)
    c.paint(t["soft"], 0, 0.05, 0.82 * w, 0.6)
    c.paint(t["liver"], -0.37 * w, -0.1, 0.4 * w, 0.36)
    c.paint(t["organ"], 0.5 * w, 0.02, 0.2, 0.32, angle=-0.3)  # spleen
    c.paint(t["gas"], 0.2, -0.3, 0.17, 0.12)  # stomach
    for side in (-1, 1):
        c.paint(t["organ"], side * 0.3, 0.33, 0.09, 0.14, angle=side * 0.4)  # kidneys
    c.paint(t["bone"], 0, 0.4, 0.12, 0.1)
    c.paint(t["fluid"], 0, 0.4, 0.04, 0.04)
    c.paint(t["blood"], 0.06, 0.2, 0.055, 0.055)  # aorta
    for _ in range(int(rng.integers(2, 5))):  # bowel loops
        c.paint(t[pick(rng, ("gas", "fluid"))], rng.uniform(-0.1, 0.25), rng.uniform(-0.05, 0.25),
                rng.uniform(0.04, 0.08), rng.uniform(0.04, 0.08))


ANATOMY: dict[tuple[str, str], Anatomy] = {
    ("head", "frontal"): _head_frontal, ("chest", "frontal"): _chest_frontal,
    ("abdomen", "frontal"): _abdomen_frontal, ("head", "axial"): _head_axial,
    ("chest", "axial"): _chest_axial, ("abdomen", "axial"): _abdomen_axial,
}


def _border(size: int) -> int:
    """Pixels a template extends beyond the field on each side, for the largest shift."""
    return math.ceil(SHIFT * (size - 1) / 2)


def _offset(scene: Scene, size: int) -> tuple[int, int]:
    """The scene's shift in whole pixels."""
    return round(scene.shift[0] * _border(size)), round(scene.shift[1] * _border(size))


@functools.lru_cache(maxsize=None)
def anatomy_template(modality: str, region: str, variant: int, size: int) -> np.ndarray:
    """The bare anatomy of a variant (no lesions, texture or noise), drawn once per process: a read-only float
    image ``_border(size)`` pixels larger than the field on each side, in the variant's pose, unshifted."""
    scale, angle = pose(variant)
    n = size + 2 * _border(size)
    c = Canvas(n, scale=scale * (size - 1) / (n - 1), angle=angle)  # pixels as large as the field's
    c.image[:] = TISSUES[modality]["air"]
    anatomy = ANATOMY[(region, view_of(modality))]
    anatomy(c, TISSUES[modality], np.random.default_rng([REGIONS.index(region), variant]))
    c.image.flags.writeable = False
    return c.image


def frame(scene: Scene, size: int) -> Canvas:
    """An empty canvas with the scene's field: its variant's pose, shifted by whole pixels."""
    step, (dx, dy) = 2 / (size - 1), _offset(scene, size)
    return Canvas(size, (dx * step, dy * step), *pose(scene.variant))


@functools.lru_cache(maxsize=None)
def _stretcher(cells: int, size: int) -> np.ndarray:
    """The (size, cells) matrix of linear interpolation from ``cells`` points to ``size`` points."""
    at = np.linspace(0, cells - 1, size)
    low = np.minimum(at.astype(np.int64), cells - 2)
    matrix = np.zeros((size, cells), np.float32)
    matrix[np.arange(size), low] = 1 - (at - low)
    matrix[np.arange(size), low + 1] = at - low
    return matrix


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field of about unit scale: ``cells`` x ``cells`` noise, bilinearly enlarged."""
    stretch = _stretcher(cells, size)
    return stretch @ rng.standard_normal((cells, cells), np.float32) @ stretch.T


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    """Zero-mean noise of standard deviation ``sd`` (uniform: several times quicker to draw than Gaussian)."""
    noise = rng.random(shape, np.float32)
    noise -= 0.5
    noise *= sd * math.sqrt(12)
    return noise


def render(scene: Scene, size: int) -> np.ndarray:
    """The scan as 8-bit grey pixels, shape (size, size)."""
    facts = scene.facts
    rng = np.random.default_rng(scene.seed)
    (dx, dy), border = _offset(scene, size), _border(size)
    anatomy = anatomy_template(facts.modality, facts.region, scene.variant, size)
    anatomy = anatomy[border - dy:border - dy + size, border - dx:border - dx + size]
    c = frame(scene, size)
    c.image = image = anatomy * (scene.gain + 0.06 * _smooth(rng, size, 12))  # exposure, tissue texture
    sign = 1.0 if facts.brightness == "brighter" else -1.0
    for lesion in facts.lesions:
        stretch = math.sqrt(lesion.aspect)
        c.add(sign * scene.contrast, lesion.x, lesion.y, lesion.radius / stretch, lesion.radius * stretch,
              lesion.angle, BLUR[facts.margin] * lesion.radius)
    np.maximum(image, 0, out=image)  # nothing darker than black (MRI's magnitude would turn it bright)
    if facts.modality == "xray":  # slight blur, exposure gradient (heel effect), quantum noise
        padded = np.pad(image, 1, mode="edge")
        image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
        image = (image[:, :-2] + 2 * image[:, 1:-1] + image[:, 2:]) / 4
        image *= 1 + rng.uniform(-0.1, 0.1) * np.linspace(-1, 1, size, dtype=np.float32)[:, None]
        image += _noise(rng, image.shape, 0.02)
    elif facts.modality == "ct":  # fine noise inside the body; the air around stays black
        image += (image > 0.08) * _noise(rng, image.shape, 0.03)
    else:  # MRI: coil bias field, Rician noise (in the background too)
        image *= 1 + 0.15 * _smooth(rng, size, 3)
        noise = _noise(rng, (2, size, size), 0.025)
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    np.minimum(np.maximum(image, 0, out=image), 1, out=image)
    image *= 255
    image += 0.5
    return image.astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    """8-bit grey pixels as a PNG file: rows "Sub"-filtered (vectorised), then zlib run-length coded."""
    height, width = pixels.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus its left neighbour
    rows[:, 1] = pixels[:, 0]
    np.subtract(pixels[:, 1:], pixels[:, :-1], out=rows[:, 2:])
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = packer.compress(rows.tobytes()) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, not interlaced
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ============================================================================================ captions
MODALITY_NAMES = {"xray": ("X-ray", "radiograph", "plain radiograph", "plain film"),
                  "ct": ("CT", "CT scan", "CT image", "computed tomography image"),
                  "mri": ("MRI", "MR image", "MRI scan", "magnetic resonance image")}
VIEWS = {"xray": ("frontal", "AP", "PA"), "ct": ("axial", "transverse", "non-contrast"),
         "mri": ("axial", "T2-weighted", "axial T2-weighted")}
REGION_NOUNS = {"head": ("head", "brain"), "chest": ("chest", "thorax"), "abdomen": ("abdomen",)}
REGION_ADJECTIVES = {"head": ("head", "cranial", "brain"), "chest": ("chest", "thoracic"),
                     "abdomen": ("abdominal", "abdomen")}
ORGANS = {"head": ("hemisphere", "cerebral hemisphere"), "chest": ("lung", "hemithorax"),
          "abdomen": ("abdomen", "hemiabdomen")}
BOTH_SIDES = {"head": ("in both hemispheres", "bilaterally", "on both sides"),
              "chest": ("in both lungs", "bilaterally", "on both sides"),
              "abdomen": ("on both sides of the abdomen", "bilaterally", "on both sides")}
SURROUNDINGS = {"head": ("brain", "brain tissue"), "chest": ("lung", "lung tissue"),
                "abdomen": ("tissue", "parenchyma")}
NOUNS = {"head": ("lesion", "mass", "focus"), "chest": ("lesion", "mass", "nodule"),
         "abdomen": ("lesion", "mass", "nodule", "focus")}
PLURALS = {"lesion": "lesions", "mass": "masses", "nodule": "nodules", "focus": "foci", "opacity": "opacities"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
SIZE_WORDS = {"small": ("small", "tiny"), "medium": ("medium-sized", "moderate-sized", "mid-sized"),
              "large": ("large", "big", "sizeable")}
SIZE_PREDICATES = {"small": ("small",), "medium": ("of medium size", "medium-sized"), "large": ("large",)}
BRIGHTNESS_WORDS = {
    ("xray", "brighter"): ("bright", "dense", "radiopaque"), ("xray", "darker"): ("dark", "lucent", "radiolucent"),
    ("ct", "brighter"): ("bright", "hyperdense", "high-attenuation"),
    ("ct", "darker"): ("dark", "hypodense", "low-attenuation"),
    ("mri", "brighter"): ("bright", "hyperintense", "high-signal"),
    ("mri", "darker"): ("dark", "hypointense", "low-signal"),
}
SHAPE_WORDS = {"round": ("round", "rounded", "circular"), "oval": ("oval", "ovoid", "elongated")}
MARGIN_WORDS = {"well-defined": ("well-defined", "well-circumscribed", "sharply marginated"),
                "ill-defined": ("ill-defined", "poorly defined", "indistinct")}
MARGIN_PREDICATES = {"well-defined": ("well defined", "sharply outlined"), "ill-defined": ("ill defined", "blurred")}
NORMAL = ("No focal lesion is seen.", "No lesion is identified.", "No focal abnormality.",
          "No mass or nodule is present.", "No abnormality is detected.")
NORMAL_BY_REGION = {"head": "The brain parenchyma is unremarkable.", "chest": "The lungs are clear.",
                    "abdomen": "The abdominal organs are unremarkable."}


def _a(words: str) -> str:
    """``words`` after the indefinite article they need ("an MRI", "an X-ray", "an 81-year-old", "a CT")."""
    vowel_sound = words[0].lower() in "aeiou" or words.startswith(("MR", "X-", "8", "18-"))
    return ("an " if vowel_sound else "a ") + words


def _join(words: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _study(facts: Facts, rng: np.random.Generator) -> str:
    """What the image is, e.g. "axial CT of the abdomen", "PA chest radiograph"."""
    modality, view = pick(rng, MODALITY_NAMES[facts.modality]), pick(rng, VIEWS[facts.modality])
    skull = facts.region == "head" and facts.modality == "xray"
    noun = pick(rng, ("skull", "head") if skull else REGION_NOUNS[facts.region])
    adjective = pick(rng, REGION_ADJECTIVES[facts.region])
    return pick(rng, (f"{view} {modality} of the {noun}", f"{modality} of the {noun}", f"{adjective} {modality}",
                      f"{view} {adjective} {modality}"))


def _where(facts: Facts, rng: np.random.Generator, detailed: bool) -> str:
    """Where the lesions are: "in the left lung", "bilaterally", ...; ``detailed`` with each one's position:
    "in the upper and lower left lung", "one in the mid right lung and two in the upper and lower left lung"."""
    organ = pick(rng, ORGANS[facts.region])
    if not detailed:
        if facts.side == "both":
            return pick(rng, BOTH_SIDES[facts.region])
        return pick(rng, (f"in the {facts.side} {organ}", f"on the {facts.side}", f"on the {facts.side} side"))
    order = POSITIONS[facts.view]
    groups = []
    for side in ("right", "left") if rng.random() < 0.5 else ("left", "right"):
        here = [lesion for lesion in facts.lesions if lesion.side == side]
        if here:
            place = f"in the {_join(sorted({h.position for h in here}, key=order.index))} {side} {organ}"
            groups.append(f"{NUMBERS[len(here)]} {place}" if facts.side == "both" else place)
    return " and ".join(groups)


def _finding(facts: Facts, rng: np.random.Generator, complete: bool) -> tuple[str, str, list[str]]:
    """The lesions in random words: noun phrase ("two small hyperdense nodules"), location, and sentences
    for the attributes not in the noun phrase ("They are oval in shape."). Unless ``complete``, an attribute
    or the location is sometimes left out."""
    plural = facts.count > 1
    modes = ("phrase", "phrase", "predicate") if complete else ("phrase", "phrase", "phrase", "predicate", "omit")
    size_mode, margin_mode, shape_mode, bright_mode = (pick(rng, modes) for _ in range(4))
    opacity = ("opacity",) if facts.brightness == "brighter" and facts.modality != "mri" else ()
    noun = pick(rng, NOUNS[facts.region] + opacity)
    adjectives = [pick(rng, words) for mode, words in (
        (size_mode, SIZE_WORDS[facts.size]), (margin_mode, MARGIN_WORDS[facts.margin]),
        (shape_mode, SHAPE_WORDS[facts.shape]), (bright_mode, BRIGHTNESS_WORDS[(facts.modality, facts.brightness)]),
    ) if mode == "phrase"]
    words = " ".join([*adjectives, PLURALS[noun] if plural else noun])
    if plural:
        exact = complete or rng.random() < 0.75
        vague = ("multiple", "several") if facts.count == 3 else ("multiple",)
        phrase = f"{NUMBERS[facts.count] if exact else pick(rng, vague)} {words}"
    else:
        first = pick(rng, ("a", "a single", "one", "a solitary"))
        phrase = _a(words) if first == "a" else f"{first} {words}"
    where = "" if not complete and rng.random() < 0.08 else _where(facts, rng, complete or rng.random() < 0.3)
    subject = pick(rng, ("They are", "The lesions are") if plural else ("It is", "The lesion is"))
    sentences = []
    if size_mode == "predicate":
        sentences.append(f"{subject} {pick(rng, SIZE_PREDICATES[facts.size])}.")
    if margin_mode == "predicate":
        sentences.append(f"{'Their' if plural else 'Its'} margins are {pick(rng, MARGIN_PREDICATES[facts.margin])}.")
    if shape_mode == "predicate":
        sentences.append(f"{subject} {pick(rng, SHAPE_WORDS[facts.shape])} in shape.")
    if bright_mode == "predicate":
        sentences.append(f"{subject} {facts.brightness} than the surrounding {pick(rng, SURROUNDINGS[facts.region])}.")
    rng.shuffle(sentences)
    return phrase, where, sentences


def caption(facts: Facts, rng: np.random.Generator, complete: bool = False) -> str:
    """One description of the image in random words. Some facts may be left out, unless ``complete``: then
    every fact is stated, each lesion's position included."""
    study = _study(facts, rng)
    with_study = complete or rng.random() < 0.9
    if facts.count == 0:
        normal = pick(rng, NORMAL + (NORMAL_BY_REGION[facts.region],))
        if not with_study:
            return normal
        return pick(rng, (f"{_capital(study)}. {normal}", f"{normal} {_capital(study)}.",
                          f"{_capital(study)}: {normal[0].lower()}{normal[1:]}", f"Normal {study}."))
    phrase, where, sentences = _finding(facts, rng, complete)
    verb = "are" if facts.count > 1 else "is"
    if where.startswith(tuple(f"{n} " for n in NUMBERS.values())):  # "two nodules: one in ... and one in ..."
        located = f"{phrase}: {where}"
        clause = pick(rng, (located, f"there {verb} {located}"))
        merged = f"{_capital(study)} shows {located}."
    else:
        located = f"{phrase} {where}".rstrip()
        clause = pick(rng, (located, f"there {verb} {located}",
                            f"{located} {verb} {pick(rng, ('seen', 'noted', 'visible'))}"))
        merged = pick(rng, (f"{_capital(study)} shows {located}.", f"{_capital(located)} on {_a(study)}."))
    if not with_study:
        text = f"{_capital(clause)}."
    else:
        text = pick(rng, (f"{_capital(study)}. {_capital(clause)}.", f"{_capital(clause)}. {_capital(study)}.",
                          merged))
    return " ".join([text, *sentences])


# =========================================================================================== questions
@dataclass(frozen=True)
class Question:
    kind: str  # what is asked: "modality", "presence", "side_check", ... (stored as ``question_kind``)
    text: str
    answer: str
    answer_type: str  # "open" | "closed"


OPEN_QUESTIONS = {
    "modality": ("What modality is this?", "What imaging modality was used?", "What kind of scan is this?",
                 "How was this image acquired?", "Which imaging technique produced this image?"),
    "region": ("Which part of the body is shown?", "What body region is imaged?",
               "Which anatomical region does this image show?", "What part of the body was scanned?"),
    "count": ("How many lesions are there?", "How many lesions can be seen?",
              "How many focal abnormalities are present?", "What is the number of lesions?"),
    "side": ("Which side is affected?", "On which side is the abnormality?",
             "Which side of the patient shows the findings?", "Where is the lesion, on which side?"),
    "size": ("What size is the lesion?", "How big is the abnormality?", "What is the size of the lesion?",
             "How big are the findings?"),
    "brightness": ("How does the lesion compare in intensity with the surrounding tissue?",
                   "What is the intensity of the lesion relative to its surroundings?",
                   "Compared with the tissue around it, how does the lesion appear?"),
    "shape": ("What shape is the lesion?", "What is the shape of the abnormality?",
              "How would you describe the outline of the lesion?"),
    "margin": ("What are the margins of the lesion like?", "How are the lesion's borders?",
               "What kind of edges does the abnormality have?"),
}
CLOSED_KINDS = ("presence", "multiple", "bilateral", "side_check", "modality_check", "region_check",
                "size_check", "brightness_check")
assert len(OPEN_QUESTIONS) + len(CLOSED_KINDS) == QUESTION_KINDS  # SynthConfig.validate bounds it
NEEDS_LESION = {"side", "size", "brightness", "shape", "margin", "bilateral", "size_check", "brightness_check"}
TWO_WAY = {  # closed questions asked for a fact or against it: (the fact holds?, its opposite holds?)
    "presence": (("Is there a lesion?", "Is any lesion visible?", "Is there a focal abnormality?",
                  "Does this image show a lesion?"),
                 ("Is this image normal?", "Is the study free of lesions?", "Is this a normal scan?")),
    "multiple": (("Are there multiple lesions?", "Is there more than one lesion?", "Are several lesions visible?"),
                 ("Is there at most one lesion?", "Is there no more than one lesion?")),
    "bilateral": (("Are both sides affected?", "Is the disease bilateral?"),
                  ("Is only one side affected?", "Is the abnormality confined to one side?")),
}
MODALITY_ASKED = {"xray": ("an X-ray", "a radiograph"), "ct": ("a CT scan", "a CT image"),
                  "mri": ("an MRI", "an MR image")}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ask_closed(kind: str, f: Facts, rng: np.random.Generator) -> tuple[str, str]:
    """A yes/no question of one kind and its answer; each kind is answered "yes" about half of the time."""
    if kind in TWO_WAY:  # asked one way or the opposite way, half and half
        truth = {"presence": f.count > 0, "multiple": f.count > 1, "bilateral": f.side == "both"}[kind]
        ask, opposite = TWO_WAY[kind]
        return (pick(rng, ask), _yes(truth)) if rng.random() < 0.5 else (pick(rng, opposite), _yes(not truth))
    if kind == "side_check":  # asked of one-sided findings only
        side = pick(rng, ("left", "right"))
        return pick(rng, (f"Is there a lesion on the {side}?", f"Is the {side} side affected?",
                          f"Does the {side} side show a lesion?")), _yes(f.side == side)
    if kind == "brightness_check":
        asked = pick(rng, BRIGHTNESS)
        return pick(rng, (f"Is the lesion {asked} than the surrounding tissue?",
                          f"Does the lesion appear {asked} than its surroundings?")), _yes(asked == f.brightness)
    # modality, region or size: the true one half of the time, else another
    options = {"modality_check": MODALITIES, "region_check": REGIONS, "size_check": SIZES}[kind]
    truth = {"modality_check": f.modality, "region_check": f.region, "size_check": f.size}[kind]
    asked = truth if rng.random() < 0.5 else pick(rng, [o for o in options if o != truth])
    if kind == "modality_check":
        named = pick(rng, MODALITY_ASKED[asked])
        text = pick(rng, (f"Is this {named}?", f"Was this image acquired as {named}?"))
    elif kind == "region_check":
        text = pick(rng, (f"Is this an image of the {asked}?", f"Does this image show the {asked}?",
                          f"Was the {asked} imaged?"))
    else:
        word = "medium-sized" if asked == "medium" else asked
        text = pick(rng, (f"Is the lesion {word}?", f"Is the abnormality {word}?"))
    return text, _yes(asked == truth)


def _open_answer(kind: str, f: Facts) -> str:
    return {"modality": f.modality.replace("xray", "x-ray"), "count": str(f.count)}.get(kind) or getattr(f, kind)


def questions(facts: Facts, rng: np.random.Generator, n: int) -> list[Question]:
    """``n`` questions of different kinds about the image (fewer where fewer kinds apply)."""
    kinds = [k for k in (*OPEN_QUESTIONS, *CLOSED_KINDS)
             if (facts.count > 0 or k not in NEEDS_LESION) and (k != "side_check" or facts.side in ("left", "right"))]
    out = []
    for i in sorted(rng.permutation(len(kinds))[:n]):
        kind = kinds[i]
        if kind in OPEN_QUESTIONS:
            out.append(Question(kind, pick(rng, OPEN_QUESTIONS[kind]), _open_answer(kind, facts), "open"))
        else:
            out.append(Question(kind, *_ask_closed(kind, facts, rng), "closed"))
    return out


# ====================================================================================== classification
INDICATIONS = {  # why a study was requested
    "routine": ("routine screening", "pre-operative work-up", "annual check-up", "occupational health examination"),
    "known": ("follow-up of a previously reported finding", "evaluation of an incidental finding on an earlier scan",
              "assessment of a possible mass"),
    "staging": ("staging of a known primary tumour", "follow-up of metastatic disease",
                "surveillance after cancer treatment"),
}
SYMPTOMS = {"head": ("headache", "dizziness", "blurred vision", "a first seizure"),
            "chest": ("cough", "shortness of breath", "chest pain", "haemoptysis"),
            "abdomen": ("abdominal pain", "weight loss", "nausea", "deranged liver tests")}
INDICATION_WEIGHTS = {  # P(kind of indication | label) over routine, known, staging, symptom: a weak hint only
    "normal": (0.4, 0.15, 0.15, 0.3), "single lesion": (0.15, 0.4, 0.15, 0.3),
    "multiple unilateral lesions": (0.15, 0.15, 0.4, 0.3), "bilateral lesions": (0.15, 0.15, 0.4, 0.3),
}


def label_of(facts: Facts) -> str:
    """The classification label: the finding pattern (see the module's docstring)."""
    if facts.count < 2:
        return ("normal", "single lesion")[facts.count]
    return "bilateral lesions" if facts.side == "both" else "multiple unilateral lesions"


def request_note(facts: Facts, rng: np.random.Generator) -> str:
    """A short referral note (who, why, sometimes which study); it never states the finding."""
    kind = ("routine", "known", "staging", "symptom")[pick_weighted(rng, INDICATION_WEIGHTS[label_of(facts)])]
    why = pick(rng, SYMPTOMS[facts.region] if kind == "symptom" else INDICATIONS[kind])
    who = f"{int(rng.integers(18, 90))}-year-old {pick(rng, ('man', 'woman', 'male', 'female', 'patient'))}"
    study = _study(facts, rng)
    return pick(rng, (f"{_capital(who)}. Indication: {why}.", f"Clinical history: {why}. {_capital(who)}.",
                      f"{_capital(why)} in {_a(who)}. {_capital(study)} requested.",
                      f"{_capital(study)} for {why}; {who}."))


# ========================================================================================== generation
EXTRA_FIELDS = {"pretrain": FACT_FIELDS, "vqa": (*FACT_FIELDS, "question_kind"),
                "classification": FACT_FIELDS, "retrieval": FACT_FIELDS}
CHUNK = 200  # images per task handed to a worker


def _facts_for(family: str, rng: np.random.Generator) -> Facts:
    if family != "classification":
        return sample_facts(rng, pick_weighted(rng, COUNT_PROBS[family]))
    label = pick(rng, LABELS)  # a quarter each
    if label in ("normal", "single lesion"):
        return sample_facts(rng, LABELS.index(label))
    side = "both" if label == "bilateral lesions" else pick(rng, ("left", "right"))
    return sample_facts(rng, int(rng.integers(2, 4)), side)


def sample(family: str, split: str, index: int, seed: int = 0, size: int = 128,
           n_questions: int = 5) -> list[Example]:
    """The record(s) of one image (several for VQA), from the image's own random stream."""
    rng = np.random.default_rng([seed, FAMILIES.index(family), SPLITS.index(split), index])
    facts = _facts_for(family, rng)
    image = png(render(sample_scene(rng, facts), size))
    key = f"{family}-{split}-{index:06d}"

    def record(id: str, **fields: Any) -> Example:
        return Example(split, id, image, key, {**facts.fields(), **fields}, f"synthetic {key}")

    if family == "pretrain":
        return [record(key, captions=[caption(facts, rng) for _ in range(1 + int(rng.random() < 0.5))])]
    if family == "vqa":
        return [record(f"{key}-q{j}", question=q.text, answer=q.answer, answer_type=q.answer_type,
                       question_kind=q.kind) for j, q in enumerate(questions(facts, rng, n_questions))]
    if family == "classification":
        return [record(key, text=request_note(facts, rng), label=label_of(facts))]
    return [record(key, caption=caption(facts, rng, complete=True))]


def _chunk(task: tuple[str, str, int, int, int, int, int]) -> list[Example]:
    family, split, start, stop, seed, size, n_questions = task
    return [e for i in range(start, stop) for e in sample(family, split, i, seed, size, n_questions)]


def generate(out: Path, config: SynthConfig, report: Callable[[str], None] | None = None,
             report_every: float = 5.0) -> dict[str, dict]:
    """Write the four datasets under ``out`` (``out/pretrain``, ``out/vqa``, ``out/classification``,
    ``out/retrieval``); returns their manifests by dataset. ``report`` receives a progress line (images drawn so
    far) every ``report_every`` seconds, and one per dataset written."""
    config.validate()
    report = report or logging.getLogger("medvlp").info
    out = Path(out)
    total = sum(config.count(family, split) for family in FAMILIES for split in SPLITS)
    report(f"synthetic corpus: drawing {total:,} images into {out} with {config.workers} worker(s)")
    begun = last = time.monotonic()
    done = 0

    def drawn(family_tasks: list, chunks: Iterator[list[Example]]) -> Iterator[Example]:
        nonlocal done, last
        for task, chunk in zip(family_tasks, chunks):
            yield from chunk
            done += task[3] - task[2]
            now = time.monotonic()
            if now - last >= report_every or done == total:
                report(f"synthetic corpus: {done:,} of {total:,} images ({100 * done / total:.0f}%), "
                       f"{now - begun:.0f} s")
                last = now

    tasks = {family: [(family, split, start, min(start + CHUNK, config.count(family, split)), config.seed,
                       config.image_size, config.questions_per_image)
                      for split in SPLITS for start in range(0, config.count(family, split), CHUNK)]
             for family in FAMILIES}
    settings = {k: v for k, v in to_dict(config).items() if k != "workers"}  # what the output depends on
    # fork, where there is one, starts at once and needs no ``if __name__ == "__main__"`` in the caller
    context = get_context("fork" if "fork" in get_all_start_methods() else None)
    pool = ProcessPoolExecutor(config.workers, mp_context=context) if config.workers > 1 else None
    try:
        every = [task for family in FAMILIES for task in tasks[family]]  # all queued: workers never wait
        results: Iterator[list[Example]] = pool.map(_chunk, every) if pool else map(_chunk, every)
        manifests = {}
        for family in FAMILIES:
            items = drawn(tasks[family], islice(results, len(tasks[family])))
            manifests[family] = write_prepared(
                f"synthetic_{family}", family, items, out / family, PrepareConfig(seed=config.seed, max_short_side=0),
                source={"generator": "medvlp.data.synthetic", "synth": settings},
                extra_fields=EXTRA_FIELDS[family], report=report)
            rows = ", ".join(f"{s} {manifests[family]['splits'][s]['rows']}" for s in SPLITS)
            report(f"synthetic {family}: {rows} records in {out / family}")
        return manifests
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def corpus_ready(out: Path, config: SynthConfig) -> bool:
    """Whether ``out`` already holds the complete corpus of ``config`` (all four datasets written with its
    settings)."""
    settings = {k: v for k, v in to_dict(config).items() if k != "workers"}
    try:
        return all(read_manifest(out / family)["source"].get("synth") == settings for family in FAMILIES)
    except DataError:
        return False


def ensure_corpus(out: Path, config: SynthConfig) -> Path:
    """``out`` holding the corpus of ``config``: generated unless an identical one is already there. A corpus
    made with other settings is never replaced behind the user's back: that is a one-line ``DataError``."""
    settings = {k: v for k, v in to_dict(config).items() if k != "workers"}
    present = 0
    for family in FAMILIES:
        try:
            source = read_manifest(out / family)["source"]
        except DataError:
            continue  # absent (generated now) or not a dataset (the writer refuses to replace it)
        have = source.get("synth")
        if not isinstance(have, dict):
            raise DataError(f"{out / family} holds a prepared dataset that is not the synthetic corpus; point the "
                            "synthetic_dir setting at another folder")
        if have != settings:
            differ = ", ".join(f"{k}={have.get(k)} there, {v} asked" for k, v in settings.items()
                               if have.get(k) != v)
            raise DataError(f"{out} holds a synthetic corpus made with other settings ({differ}); point the "
                            f"synthetic_dir setting at another folder, or delete {out} to make it anew")
        present += 1
    if present < len(FAMILIES):
        generate(out, config)
    return out
