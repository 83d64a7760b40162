"""``medvlp zero-shot``: image-text retrieval by a pre-trained run's global embeddings, with no fine-tuning."""

from __future__ import annotations

from pathlib import Path

from medvlp.data.loader import FamilyDataset, eval_loader
from medvlp.data.records import read_manifest
from medvlp.errors import DataError
from medvlp.evaluation.retrieval import zero_shot_retrieval
from medvlp.training.runs import open_run


def zero_shot(run: Path | str, data: Path | str | None = None, split: str = "test",
              batch_size: int = 64) -> dict[str, float]:
    """Zero-shot image-text retrieval of a pre-trained run: whole images and whole texts embedded
    (``MedVLP.embed_image``/``embed_text``) and ranked by cosine similarity.

    Args:
        run: a pre-training run folder or one of its ``checkpoints/step-*``.
        data: a prepared retrieval (or pre-training) dataset; by default the synthetic retrieval set the run's
            corpus came with.
        split: the split to rank.
        batch_size: pairs per encoder batch.

    Returns:
        ``{"pairs": N, "i2t_r1": ..., "t2i_r10": ...}``: Recall@1/5/10 both ways, in percent.
    """
    opened = open_run(run, "pre-trained")
    config = opened.config
    root = Path(data) if data else Path(config.data.synthetic_dir) / "retrieval"
    family = read_manifest(root)["family"]
    if family not in ("retrieval", "pretrain"):
        raise DataError(f"{root} holds {family} data; zero-shot retrieval needs image-caption pairs")
    dataset = FamilyDataset(root, split, opened.model.cfg.image_size, train=False)
    loader = eval_loader(dataset, opened.tokenizer, config.data.max_text_len, batch_size)
    return {"pairs": len(dataset), **zero_shot_retrieval(opened.model, loader, dataset.image_ids())}


def describe(metrics: dict[str, float], title: str) -> list[str]:
    """The lines that report ``zero_shot``'s ``metrics`` under ``title``: the pair count and chance, then the
    recalls of each direction."""
    pairs = metrics["pairs"]
    lines = [f"{title} ({pairs:,} pairs; chance R@1 {100 / pairs:.2f}%):"]
    for prefix, direction in (("i2t_r", "image-to-text"), ("t2i_r", "text-to-image")):
        ranks = ", ".join(f"R@{k.removeprefix(prefix)} {v:.1f}%" for k, v in metrics.items() if k.startswith(prefix))
        lines.append(f"  {direction}: {ranks}")
    return lines
