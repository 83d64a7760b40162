"""Image-text retrieval metrics, and zero-shot retrieval from the global embeddings alone.

Recall@k: the fraction of queries whose match is among the k most similar candidates. Image-to-text: an image
counts as found when any of its texts is in its top k (an image may have several captions); text-to-image: a
text counts when its own image is in its top k. Ties count against the query (a candidate scoring the same as
the match ranks ahead of it), so a constant model scores no better than chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medvlp.errors import DataError

KS = (1, 5, 10)


def match_ranks(similarity: Tensor, image_of_text: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-based ranks of the matches. ``similarity`` [I, T] between I images and T texts; ``image_of_text``
    [T] the image of each text. Returns (per image: best rank among its texts [I], per text: its image's rank
    [T]); an image without a text gets rank T (never found)."""
    texts = torch.arange(similarity.shape[1], device=similarity.device)
    true = similarity[image_of_text, texts]  # [T]
    t2i = (similarity >= true[None, :]).sum(dim=0) - 1  # images at least as similar, the match excluded
    rank_in_row = (similarity[image_of_text] >= true[:, None]).sum(dim=1) - 1  # [T]: the text's rank for its image
    i2t = torch.full((similarity.shape[0],), similarity.shape[1], dtype=rank_in_row.dtype, device=similarity.device)
    i2t = i2t.scatter_reduce(0, image_of_text, rank_in_row, reduce="amin")
    return i2t, t2i


def recall_at_k(similarity: Tensor, image_of_text: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"i2t_r1": ..., "t2i_r1": ..., ...}`` in percent, for every k in ``ks``."""
    i2t, t2i = match_ranks(similarity.float(), image_of_text.to(similarity.device))
    has_text = torch.zeros(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    has_text[image_of_text] = True
    i2t = i2t[has_text]
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = 100.0 * (i2t < k).float().mean().item()
        metrics[f"t2i_r{k}"] = 100.0 * (t2i < k).float().mean().item()
    return metrics


@torch.no_grad()
def zero_shot_retrieval(model, loader, image_ids: Sequence[int]) -> dict[str, float]:
    """Recall@1/5/10 both ways from ``model.embed_image`` / ``model.embed_text`` (no fusion, no fine-tuning).

    ``loader`` yields batches in dataset order (``pixels``, ``input_ids``, ``attention_mask``); ``image_ids``
    names each row's image (rows that share an image are one candidate in text-to-image retrieval).
    """
    was_training = model.training
    model.eval()
    image_embeds, text_embeds = [], []
    for batch in loader:
        if batch["n_bad"]:
            raise DataError(f"{batch['n_bad']} images in the retrieval set could not be read (the lines above "
                            "name them); prepare the dataset again")
        image_embeds.append(model.embed_image(batch["pixels"]).float())
        text_embeds.append(model.embed_text(batch["input_ids"], batch["attention_mask"]).float())
    model.train(was_training)
    ids = torch.as_tensor(list(image_ids))
    unique, image_of_text = torch.unique(ids, return_inverse=True)
    first_row = torch.full((len(unique),), len(ids), dtype=torch.long).scatter_reduce(
        0, image_of_text, torch.arange(len(ids)), reduce="amin")
    images = torch.cat(image_embeds)[first_row]
    similarity = images @ torch.cat(text_embeds).T
    return recall_at_k(similarity, image_of_text)
