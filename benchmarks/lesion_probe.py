"""Can the tiny vision encoder learn to see the synthetic lesions, alone and supervised, in a demo's budget?

Trains the ``tiny`` CLIP ViT from scratch with a linear head on the class token to predict the synthetic
classification label (the finding pattern: normal, single lesion, multiple unilateral, bilateral) or, with
``--binary``, only whether there is a lesion. Images are decoded once into memory at the pre-training size, so
the run measures learning, not loading. Prints held-out accuracy every ``--every`` steps beside the majority
class. If a supervised encoder cannot learn the label, no pre-training objective will teach it in that budget.

    python benchmarks/lesion_probe.py [--data runs/demo/data/classification] [--binary] [--steps 600]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medvlp.data.loader import FamilyDataset
from medvlp.models.config import model_config
from medvlp.models.encoders import build_vision_encoder
from medvlp.models.model import normalize_pixels


def load(root: Path, split: str, size: int, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = FamilyDataset(root, split, size, train=False)
    samples = [dataset[row] for row in range(len(dataset))]
    labels = torch.tensor([s["label"] for s in samples])
    return torch.stack([s["pixels"] for s in samples]), (labels > 0).long() if binary else labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/classification"))
    parser.add_argument("--binary", action="store_true", help="lesion or none, instead of the four patterns")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--patch-size", type=int, default=16)
    args = parser.parse_args()

    config = model_config("tiny", patch_size=args.patch_size)
    train_x, train_y = load(args.data, "train", config.image_size, args.binary)
    val_x, val_y = load(args.data, "val", config.image_size, args.binary)
    majority = val_y.bincount().max().item() / len(val_y)
    torch.manual_seed(0)
    encoder = build_vision_encoder(config.vision, config.image_size, config.patch_size)
    head = torch.nn.Linear(encoder.hidden_size, int(train_y.max()) + 1)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.lr)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return head(encoder(normalize_pixels(pixels)).cls)  # grey broadcasts to three channels

    print(f"{len(train_y)} training images, {len(val_y)} held out; majority class {100 * majority:.1f}%")
    start, generator = time.perf_counter(), torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train_y), (32,), generator=generator)
        loss = F.cross_entropy(logits(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            with torch.no_grad():
                accuracy = (logits(val_x).argmax(-1) == val_y).float().mean().item()
            print(f"step {step:5d}  train loss {loss.item():.3f}  held-out accuracy {100 * accuracy:5.1f}%  "
                  f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
