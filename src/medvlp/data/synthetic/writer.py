"""Writing the corpus: every sample from its own random stream, in worker processes, into prepared datasets
(record shards and manifests) that every reader of medvlp opens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from medvlp.config import to_dict
from medvlp.data.prepare import Example, PrepareConfig, write_prepared
from medvlp.data.records import read_manifest
from medvlp.data.synth_config import FAMILIES, SPLITS, SynthConfig
from medvlp.data.synthetic.facts import COUNT_PROBS, FACT_FIELDS, LABELS, Facts, pick, pick_weighted, sample_facts
from medvlp.data.synthetic.language import caption, label_of, questions, request_note
from medvlp.data.synthetic.painters import png, render, sample_scene
from medvlp.errors import DataError

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
