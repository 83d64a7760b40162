"""Can the tiny vision encoder learn to see the synthetic lesions, alone and supervised, in a demo's budget?

Trains the ``tiny`` CLIP ViT from scratch with a linear head on the class token to predict the synthetic
classification label (the finding pattern: normal, single lesion, multiple unilateral, bilateral) or, with
``--binary``, only whether there is a lesion. ``--encoder cnn`` trains a small convolutional network instead
(five 3x3 convolutions with BatchNorm, global max pooling), as a reference: it shows whether the lesions can be
seen at this resolution at all. Images are decoded once into memory at the pre-training size, so the run
measures learning, not loading. Prints held-out accuracy every ``--every`` steps beside the majority class. If
a supervised encoder cannot learn the label, no pre-training objective will teach it in that budget.

    python benchmarks/lesion_probe.py [--data runs/demo/data/classification] [--binary] [--encoder vit|cnn]
                                      [--patch-size 16] [--layers 2] [--conv-stem] [--steps 600] [--lr 5e-4]

``--conv-stem`` gives the ViT the convolutional stem (``model.vision.conv_stem``) instead of its patch convolution.
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

CNN_LAYERS = [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]  # (inputs, outputs, stride)


def convolutional() -> torch.nn.Sequential:
    """A small CNN: full resolution first, two stride-2 stages, the maximum over positions."""
    def block(inputs: int, outputs: int, stride: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(inputs, outputs, 3, stride, 1), torch.nn.BatchNorm2d(outputs), torch.nn.ReLU()]

    return torch.nn.Sequential(*[m for layer in CNN_LAYERS for m in block(*layer)], torch.nn.AdaptiveMaxPool2d(1),
                               torch.nn.Flatten())


def load(root: Path, split: str, size: int, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = FamilyDataset(root, split, size, train=False)
    samples = [dataset[row] for row in range(len(dataset))]
    labels = torch.tensor([s["label"] for s in samples])
    normal = dataset.label_index["normal"]  # labels are indexed in sorted order: "normal" is not 0
    return torch.stack([s["pixels"] for s in samples]), (labels != normal).long() if binary else labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/classification"))
    parser.add_argument("--binary", action="store_true", help="lesion or none, instead of the four patterns")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="Transformer layers of the ViT (tiny: 2)")
    parser.add_argument("--conv-stem", action="store_true", help="the ViT with a convolutional stem")
    parser.add_argument("--encoder", choices=("vit", "cnn"), default="vit", help="the tiny ViT or a small CNN")
    args = parser.parse_args()

    config = model_config("tiny", patch_size=args.patch_size, vision={"num_layers": args.layers,
                                                                        "conv_stem": args.conv_stem})
    train_x, train_y = load(args.data, "train", config.image_size, args.binary)
    val_x, val_y = load(args.data, "val", config.image_size, args.binary)
    majority = val_y.bincount().max().item() / len(val_y)
    torch.manual_seed(0)
    if args.encoder == "cnn":
        trunk = convolutional()
        features, width = trunk, CNN_LAYERS[-1][1]
    else:
        trunk = build_vision_encoder(config.vision, config.image_size, config.patch_size)
        features, width = (lambda pixels: trunk(pixels).cls), trunk.hidden_size
    head = torch.nn.Linear(width, int(train_y.max()) + 1)
    network = torch.nn.ModuleList([trunk, head])
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr)

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return head(features(normalize_pixels(pixels)))  # grey broadcasts to three channels

    print(f"{len(train_y)} training images, {len(val_y)} held out; majority class {100 * majority:.1f}%")
    start, generator = time.perf_counter(), torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train_y), (32,), generator=generator)
        loss = F.cross_entropy(logits(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            network.eval()  # BatchNorm's running statistics
            with torch.no_grad():
                accuracy = (logits(val_x).argmax(-1) == val_y).float().mean().item()
            network.train()
            print(f"step {step:5d}  train loss {loss.item():.3f}  held-out accuracy {100 * accuracy:5.1f}%  "
                  f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
