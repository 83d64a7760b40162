"""What did pre-training teach the encoders about the findings? Linear probes on frozen features.

For each pre-training run given, and for a freshly initialised model of the first run's config (the baseline
that learned nothing), the script encodes the synthetic classification images (whole images, at the run's
pre-training size, with their referral notes) once, then fits a linear classifier (softmax regression, full
batch, Adam, a small L2 penalty) on the training split's features and reports its test accuracy, for the
finding pattern (``label``: normal, single lesion, multiple unilateral, bilateral; chance 25%) and, with
``--binary``, for "lesion or none". Feature sets:

- ``vision cls``: the vision encoder's class token;
- ``vision mean``: the mean of its patch tokens;
- ``vision patches``: all patch tokens side by side (keeps where each token is: counting and siding need it);
- ``joint``: the fusion's joint representation (what the downstream classifier reads).

Nothing is fine-tuned, so the figures say what the pre-trained features hold, separately from how well a short
fine-tuning finds it.

    python benchmarks/feature_probe.py RUN [RUN ...] [--data runs/demo/data/classification] [--binary]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from medvlp.data.loader import FamilyDataset, eval_loader
from medvlp.models.model import build_model
from medvlp.training.runs import open_run

FEATURES = ("vision cls", "vision mean", "vision patches", "joint")


@torch.no_grad()
def encode(model, tokenizer, max_text_len: int, root: Path, split: str, binary: bool) -> tuple[dict, torch.Tensor]:
    """Every feature set of a split, and its targets."""
    dataset = FamilyDataset(root, split, model.cfg.image_size, train=False)
    features: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    targets = []
    for batch in eval_loader(dataset, tokenizer, max_text_len, batch_size=128):
        image = model.encode_image(batch["pixels"]).states
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        features["vision cls"].append(image[:, 0])
        features["vision mean"].append(image[:, 1:].mean(dim=1))
        features["vision patches"].append(image[:, 1:].flatten(1))
        features["joint"].append(model.fuse(text, batch["attention_mask"], image).joint)
        targets.append(batch["label"])
    y = torch.cat(targets)
    if binary:
        y = (y != dataset.label_index["normal"]).long()
    return {name: torch.cat(parts) for name, parts in features.items()}, y


def probe(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
          steps: int = 500) -> float:
    """Test accuracy (%) of softmax regression fitted on standardised training features."""
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(train_y.max()) + 1
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(train @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * ((test @ weight + bias).argmax(dim=1) == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pre-training run folders")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/classification"))
    parser.add_argument("--binary", action="store_true", help="lesion or none, instead of the four patterns")
    args = parser.parse_args()

    opened = [open_run(run, kind="pre-trained") for run in args.runs]
    torch.manual_seed(0)
    first = opened[0]
    models = {"fresh (no pre-training)": (build_model(first.model.cfg).eval(), first.tokenizer, first.max_text_len)}
    models.update({str(run.path.parent.parent): (run.model, run.tokenizer, run.max_text_len) for run in opened})
    rows = []
    for name, (model, tokenizer, max_text_len) in models.items():
        train, train_y = encode(model, tokenizer, max_text_len, args.data, "train", args.binary)
        test, test_y = encode(model, tokenizer, max_text_len, args.data, "test", args.binary)
        accuracies = [probe(train[f], train_y, test[f], test_y) for f in FEATURES]
        rows.append((name, accuracies))
        print(f"{name}: " + ", ".join(f"{f} {a:.1f}%" for f, a in zip(FEATURES, accuracies)), flush=True)
    majority = 100 * test_y.bincount().max().item() / len(test_y)
    print(f"\n| model | {' | '.join(FEATURES)} |\n| --- |{' --- |' * len(FEATURES)}")
    for name, accuracies in rows:
        print(f"| {name} | {' | '.join(f'{a:.1f}' for a in accuracies)} |")
    print(f"\ntest split: {len(test_y)} images; majority class {majority:.1f}%")


if __name__ == "__main__":
    main()
