"""Retrieval evaluation cost: exhaustive (every image-text pair through the fusion module) vs two-stage (global
embeddings pick each query's k candidates, the fusion module re-ranks only those), in one run.

Both modes score the same encoded split of a fine-tuned retrieval run, so the timings compare the scoring
alone (encoding is shared and timed once). Prints seconds, fusion passes and R@1/5/10 both ways of each mode,
and the speed-up.

    python benchmarks/retrieval.py RUN [--data DIR] [--split test] [--pairs 1000] [--k 16]

RUN is a fine-tuned retrieval run, e.g. the demo's runs/demo/benchmark/retrieval/pre-trained-seed0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medvlp.data.loader import FamilyDataset, eval_loader
from medvlp.data.splits import Rows
from medvlp.evaluation.retrieval import encode_pairs, retrieval_metrics
from medvlp.training.runs import open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a fine-tuned retrieval run folder")
    parser.add_argument("--data", type=Path, help="prepared retrieval pairs (default: the run's own dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pairs", type=int, default=1000, help="the first N pairs of the split")
    parser.add_argument("--k", type=int, default=16, help="candidates per query in two-stage scoring")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per fusion pass")
    args = parser.parse_args()

    run = open_run(args.run, "fine-tuned")
    config, model, tokenizer = run.config, run.model, run.tokenizer
    dataset = FamilyDataset(args.data or config.data, args.split, model.cfg.image_size, train=False)
    subset = Rows(dataset, range(min(args.pairs, len(dataset))))
    start = time.perf_counter()
    encoded = encode_pairs(model, eval_loader(subset, tokenizer, config.max_text_len, 2 * config.batch_size,
                                              config.num_workers),
                           subset.image_ids())
    encode_s = time.perf_counter() - start
    images, texts = encoded.image_embeds.shape[0], encoded.text_embeds.shape[0]
    print(f"{args.run}: {texts:,} texts, {images:,} images, {torch.get_num_threads()} threads; "
          f"encoding (shared) {encode_s:.1f} s")
    seconds = {}
    for mode in ("two-stage", "exhaustive"):
        start = time.perf_counter()
        metrics = retrieval_metrics(model, encoded, mode, args.k, args.batch_size)
        seconds[mode] = time.perf_counter() - start
        passes = f"{images * texts:,}" if mode == "exhaustive" else f"<= {(images + texts) * args.k:,}"
        ranks = "  ".join(f"{name} {value:5.1f}" for name, value in metrics.items())
        print(f"{mode:>10}: {seconds[mode]:7.1f} s, fusion passes {passes}\n            {ranks}")
    print(f"two-stage (k={args.k}) is {seconds['exhaustive'] / seconds['two-stage']:.1f}x faster than exhaustive")


if __name__ == "__main__":
    main()
