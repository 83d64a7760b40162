"""Which mismatched pairs a pre-training run's ITM head rejects, by what the two samples share.

On a split of the synthetic pre-training corpus (whose records keep the facts they were drawn from), every text
is fused with its own image and with ``--negatives`` other images drawn at random. The negatives are grouped by
what their image shares with the text's own: another modality; the same modality but another body region; the
same modality and region (they differ in the findings alone, if at all). Prints ITM accuracy on the positives
and on each group, so one sees what the fusion module has learned to compare.

    python benchmarks/itm_breakdown.py RUN [--data DIR] [--split val] [--negatives 8]

RUN is a pre-training run, e.g. the demo's runs/demo/pretrain; DIR defaults to its synthetic corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medvlp.data.loader import FamilyDataset, eval_loader
from medvlp.data.records import Records
from medvlp.errors import DataError
from medvlp.training.runs import open_run

GROUPS = ("another modality", "same modality, another region", "same modality and region")


def facts(values: list[str]) -> torch.Tensor:
    """Each record's value of one fact as an integer code (equal codes, equal facts)."""
    codes = {value: i for i, value in enumerate(sorted(set(values)))}
    return torch.tensor([codes[value] for value in values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a pre-training run folder (or one of its checkpoints/step-*)")
    parser.add_argument("--data", type=Path, help="a synthetic pretrain dataset (default: the run's own)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--negatives", type=int, default=8, help="random other images per text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = open_run(args.run, "pre-trained")
    config, model, tokenizer = run.config, run.model, run.tokenizer
    root = args.data or Path(config.data.synthetic_dir) / "pretrain"
    records = Records(root, args.split)
    if len(records) < 2 or "modality" not in records[0]:
        raise DataError(f"{root} ({args.split}): needs two or more synthetic records, which keep their facts")
    modality, region = (facts([records[i][name] for i in range(len(records))]) for name in ("modality", "region"))
    dataset = FamilyDataset(root, args.split, model.cfg.image_size, train=False)
    loader = eval_loader(dataset, tokenizer, config.data.max_text_len)

    with torch.no_grad():
        texts, images = [], []
        for batch in loader:
            texts.append((model.encode_text(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]))
            images.append(model.encode_image(batch["pixels"]).states)
        images = torch.cat(images)
        n, generator = len(images), torch.Generator().manual_seed(args.seed)
        positives = 0
        rejected, total = torch.zeros(len(GROUPS)), torch.zeros(len(GROUPS))
        start = 0
        for states, mask in texts:
            rows = torch.arange(start, start + len(states))
            start += len(states)
            positives += int((model.match(states, mask, images[rows]).argmax(-1) == 1).sum())
            for _ in range(args.negatives):
                donors = (rows + torch.randint(1, n, rows.shape, generator=generator)) % n  # never the row itself
                right = (model.match(states, mask, images[donors]).argmax(-1) == 0).float()
                group = torch.where(modality[rows] != modality[donors], 0,
                                    torch.where(region[rows] != region[donors], 1, 2))
                rejected += torch.bincount(group, weights=right, minlength=len(GROUPS))
                total += torch.bincount(group, minlength=len(GROUPS)).float()
    print(f"{args.run}: {n} {args.split} pairs of {root}, {args.negatives} random negatives per text")
    print(f"  {'positives (accepted)':44s} {positives / n:.3f}  ({n})")
    for name, hits, count in zip(GROUPS, rejected.tolist(), total.tolist()):
        print(f"  {'negatives, ' + name:44s} {hits / max(count, 1):.3f}  ({int(count)})")


if __name__ == "__main__":
    main()
