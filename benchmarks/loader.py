"""Data-loader throughput: samples/s from prepared shards to model-ready batches.

Prepares the real VQA-RAD (../shared/data/vqa_rad) into a temporary folder unless --data names a prepared
dataset, then reads batches of 64 with 2 workers: decode, random resized crop, whole-word masking,
tokenisation, collation. Prints samples/s over the timed batches (after warm-up).

    python benchmarks/loader.py [--data DIR] [--image-size 288] [--batch-size 64] [--workers 2] [--batches 40]
                                [--image-cache-mb 128]   # 0: decode every sample's image afresh
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medvlp.data.collate import Collator
from medvlp.data.loader import FamilyDataset, make_loader
from medvlp.data.records import Records
from medvlp.data.registry import prepare
from medvlp.data.sampler import StreamSampler
from medvlp.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: prepare ../shared/data/vqa_rad)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--image-cache-mb", type=float, default=128, help="decoded images kept per worker")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "vqa_rad"
            prepare("vqa_rad", ROOT.parent / "shared" / "data" / "vqa_rad", data, report=lambda line: None)
        records = Records(data, args.split)
        text_field = {"vqa": "question", "pretrain": "captions", "retrieval": "caption",
                      "classification": "text"}[records.family]
        texts = [t if isinstance(t, str) else t[0] for t in records.column(text_field)]
        tokenizer = train_tokenizer(texts, Path(tmp) / "tokenizer", vocab_size=2048)
        dataset = FamilyDataset(data, args.split, args.image_size, train=True,
                                image_cache_mb=args.image_cache_mb)
        total = args.warmup + args.batches
        sampler = StreamSampler(len(dataset), args.batch_size, total)
        loader = make_loader(dataset, Collator(tokenizer, max_length=64, mlm_probability=0.15),
                             batch_size=args.batch_size, num_workers=args.workers, sampler=sampler)
        samples = 0
        for i, batch in enumerate(loader):
            if i == args.warmup:
                start = time.perf_counter()
            elif i > args.warmup:
                samples += batch["n"]
        elapsed = time.perf_counter() - start
        # the batch read at i == warmup started the clock, so count the batches after it
        print(f"data: {data} ({records.family}, split {args.split}, {len(dataset):,} records)")
        print(f"batch {args.batch_size}, {args.workers} workers, image {args.image_size}px, whole-word MLM, "
              f"decoded-image cache {args.image_cache_mb:g} MB per worker")
        print(f"loader throughput: {samples / elapsed:,.0f} samples/s over {args.batches - 1} batches")


if __name__ == "__main__":
    main()
