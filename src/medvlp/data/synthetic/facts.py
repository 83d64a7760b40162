"""The facts of a synthetic scan (modality, region, lesions: how many, where, what they look like), drawn at
random, and the small random helpers the generator uses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

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
# Lesion radius, in units of half the field: a small lesion is 10 px across at the tiny model's 64 px, so that a
# 16-px patch sees it (at 0.06 / 0.09 / 0.125 the tiny ViT could not learn them, even supervised: docs/results.md).
RADIUS = {"small": 0.15, "medium": 0.22, "large": 0.31}
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
    grows a little, letting lesions reach into the tissue around, but never across the midline. Where none fits
    even then, the draw on the zone's side whose closest two lesions lie farthest apart."""
    cx, cy, rx, ry = zone
    if k == 1:
        r, a = math.sqrt(rng.random()), rng.random() * 2 * math.pi
        return np.array([[cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)]])
    for grow in (1.0, 1.25, 1.5, 2.0):
        r, a = np.sqrt(rng.random((128, k))) * grow, rng.random((128, k)) * 2 * np.pi
        points = np.stack([cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)], axis=-1)
        gaps = np.linalg.norm(points[:, :, None] - points[:, None, :], axis=-1) + np.eye(k) * 9
        on_side = (np.sign(cx) * points[..., 0] > 0.1).all(axis=1)
        closest = gaps.min(axis=(1, 2))
        fits = (closest >= 2 * reach + 0.03) & on_side
        if fits.any():
            return points[int(np.argmax(fits))]
    return points[int(np.argmax(np.where(on_side, closest, -np.inf)))]


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
