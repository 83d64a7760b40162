"""How often a heat-map's hottest cell falls on the lesion, against chance.

Draws fresh synthetic scans with exactly one lesion (``medvlp.data.synthetic``: the same facts, scenes and
renderer as the corpus, with a seed of their own so the images are new to the model), asks a VQA run a
question about the lesion, and checks the hottest cell of each method's heat-map (``medvlp.explain``):

- **centre**: the lesion's centre lies in the hottest cell (chance: 1 / cells);
- **touch**: the hottest cell overlaps the lesion's bounding circle (chance: the share of cells that do,
  averaged over the images).

    python benchmarks/explain_hits.py RUN [--n 200] [--seed 7]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from PIL import Image

from medvlp import predict
from medvlp.data import synthetic
from medvlp.explain import METHODS, explain

QUESTIONS = ("Is there a lesion?", "Where is the lesion, on which side?", "What size is the lesion?",
             "What shape is the lesion?")


def lesion_scan(seed: int, index: int, size: int = 128) -> tuple[Image.Image, tuple[float, float], float]:
    """A scan with one lesion: the image, the lesion's centre (x, y) in pixels and its radius along the long
    axis in pixels."""
    rng = np.random.default_rng([seed, index])
    facts = synthetic.sample_facts(rng, 1)
    scene = synthetic.sample_scene(rng, facts)
    pixels = synthetic.render(scene, size)
    canvas = synthetic.frame(scene, size)
    lesion = facts.lesions[0]
    x, y = canvas.to_pixel(lesion.x, lesion.y)
    radius = lesion.radius * math.sqrt(lesion.aspect) * canvas.scale * (size - 1) / 2
    return Image.fromarray(pixels, "L"), (x, y), radius


def cells_touching(centre: tuple[float, float], radius: float, cells: int,
                   box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean [cells, cells]: which grid cells (over ``box``) a circle overlaps."""
    left, top, right, bottom = box
    width, height = (right - left) / cells, (bottom - top) / cells
    edges_x, edges_y = left + np.arange(cells) * width, top + np.arange(cells) * height
    nearest_x = np.clip(centre[0], edges_x, edges_x + width)  # the point of each cell closest to the centre
    nearest_y = np.clip(centre[1], edges_y, edges_y + height)
    return (nearest_y[:, None] - centre[1]) ** 2 + (nearest_x[None, :] - centre[0]) ** 2 <= radius ** 2


def measure(model, n: int, seed: int, size: int = 128) -> dict[str, dict[str, float]]:
    """Hit rates per method (``centre``, ``touch``) and their chance levels over ``n`` scans."""
    hits = {method: {"centre": 0, "touch": 0} for method in METHODS}
    chance_touch = 0.0
    cells = None
    for i in range(n):
        image, centre, radius = lesion_scan(seed, i, size)
        question = QUESTIONS[i % len(QUESTIONS)]
        for method in METHODS:
            result = explain(model, image, question, method=method)
            cells = result.grid.shape[0]
            touching = cells_touching(centre, radius, cells, result.box)
            hottest = int(result.grid.argmax())
            row, col = divmod(hottest, cells)
            left, top, right, bottom = result.box
            inside = (int((centre[1] - top) * cells / (bottom - top)), int((centre[0] - left) * cells / (right - left)))
            hits[method]["centre"] += inside == (row, col)
            hits[method]["touch"] += bool(touching[row, col])
        chance_touch += touching.mean()
    out = {method: {k: v / n for k, v in counts.items()} for method, counts in hits.items()}
    out["chance"] = {"centre": 1 / cells ** 2, "touch": chance_touch / n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a VQA run of `medvlp finetune` (on the synthetic corpus)")
    parser.add_argument("--n", type=int, default=200, help="scans with one lesion (default 200)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the scans (default 7)")
    args = parser.parse_args()
    model = predict.load(args.run)
    start = time.perf_counter()
    rates = measure(model, args.n, args.seed)
    print(f"{args.n} scans with one lesion, {time.perf_counter() - start:.1f} s")
    print(f"{'':10s} {'centre in hottest cell':>24s} {'hottest cell touches lesion':>28s}")
    for name, rate in rates.items():
        print(f"{name:10s} {100 * rate['centre']:23.1f}% {100 * rate['touch']:27.1f}%")


if __name__ == "__main__":
    main()
