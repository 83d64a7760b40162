"""Does a pre-trained run know the finding pattern? Zero-shot classification by image-text matching.

For each synthetic classification test image the script writes complete captions (the corpus's own caption
generator, ``complete=True``) for the image's own modality and region and each possible lesion pattern: none;
one lesion on the left or right; two or three on one side; two or three on both sides (the lesions' size,
brightness, shape and margin are the image's where it has lesions). The run's ITM head scores every caption
against the image; the predicted class is the label of the best-scoring caption. Nothing is trained, so the
accuracy (chance 25%) says whether pre-training taught the fused model to tell the patterns apart, which is what
a short classification fine-tuning can then read out. Give a run folder or one of its ``checkpoints/step-*``
folders, to follow a run over its steps.

    python benchmarks/zero_shot_itm.py RUN [RUN ...] [--data runs/demo/data/classification] [--n 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medvlp.data.loader import FamilyDataset
from medvlp.data.synthetic import LABELS, POSITIONS, Facts, Lesion, caption, label_of, view_of
from medvlp.training.runs import open_run

PATTERNS = [(0, "none"), (1, "left"), (1, "right"), (2, "left"), (2, "right"), (3, "left"), (3, "right"),
            (2, "both"), (3, "both")]  # (count, side): every pattern of 0-3 lesions
WORDINGS = 2  # captions per pattern, in different random words


def candidates(record: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Captions of every lesion pattern for a record's modality and region, and the label each caption means."""
    modality, region = record["modality"], record["region"]
    view = view_of(modality)
    looks = [record[f] if record[f] != "none" else default for f, default in
             (("size", "medium"), ("brightness", "brighter"), ("shape", "round"), ("margin", "well-defined"))]
    texts, labels = [], []
    for count, side in PATTERNS:
        sides = [side] * count if side != "both" else ["left"] + ["right"] * (count - 1)
        lesions = tuple(Lesion(0.0, 0.0, 0.1, 1.0, 0.0, s, POSITIONS[view][i]) for i, s in enumerate(sides))
        facts = Facts(modality, region, count, side, *(["none"] * 4 if count == 0 else looks), lesions=lesions)
        for _ in range(WORDINGS):
            texts.append(caption(facts, rng, complete=True))
            labels.append(label_of(facts))
    return texts, labels


@torch.no_grad()
def accuracy(run: Path, data: Path, n: int, batch: int = 16) -> tuple[float, np.ndarray]:
    """Zero-shot accuracy (%) on the first ``n`` test images, and the confusion matrix (rows: truth)."""
    opened = open_run(run, kind="pre-trained")
    model, tokenizer = opened.model, opened.tokenizer
    dataset = FamilyDataset(data, "test", model.cfg.image_size, train=False)
    names = {index: label for label, index in dataset.label_index.items()}
    rng = np.random.default_rng(0)
    confusion = np.zeros((len(LABELS), len(LABELS)), np.int64)
    for start in range(0, min(n, len(dataset)), batch):
        rows = range(start, min(start + batch, n, len(dataset)))
        samples = [dataset[i] for i in rows]
        texts, labels = zip(*(candidates(dataset.records[i], rng) for i in rows))
        flat = [t for group in texts for t in group]
        encoded = tokenizer(flat, padding=True, truncation=True, max_length=opened.max_text_len,
                            return_tensors="pt")
        text = model.encode_text(encoded["input_ids"], encoded["attention_mask"])
        pixels = torch.stack([sample["pixels"] for sample in samples])
        image = model.encode_image(pixels).states.repeat_interleave(len(texts[0]), dim=0)
        scores = model.match_score(model.match(text, encoded["attention_mask"], image)).view(len(rows), -1)
        for sample, captions_labels, row_scores in zip(samples, labels, scores):
            predicted = captions_labels[int(row_scores.argmax())]
            confusion[LABELS.index(names[sample["label"]]), LABELS.index(predicted)] += 1
    return 100 * np.trace(confusion) / confusion.sum(), confusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pre-training run folders or checkpoint folders")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/classification"))
    parser.add_argument("--n", type=int, default=400, help="test images scored")
    args = parser.parse_args()
    for run in args.runs:
        score, confusion = accuracy(run, args.data, args.n)
        print(f"{run}: zero-shot ITM accuracy {score:.1f}% on {confusion.sum()} test images (chance 25%)")
        print("  rows: truth, columns: predicted, in the order " + ", ".join(LABELS))
        for label, row in zip(LABELS, confusion):
            print(f"  {label:>28}: " + " ".join(f"{v:4d}" for v in row))


if __name__ == "__main__":
    main()
