"""Image-text retrieval: Recall@k, and the three ways of scoring every image against every text.

- **zero-shot**: cosine similarity of the global embeddings (``MedVLP.embed_image`` / ``embed_text``).
- **exhaustive**: every image-text pair through the fusion module, ranked by the ITM score, as the reference
  code evaluates a fine-tuned model: I x T fusion passes.
- **two-stage** (the default): the global embeddings pick each query's ``k`` nearest candidates, and only
  those pairs go through the fusion module (ALBEF's recipe); candidates outside the top ``k`` rank last. About
  ``(I + T) * k`` fusion passes instead of ``I * T``.

Each image and text is encoded once (``encode_pairs``); the fusion passes reuse those states.

Recall@k: the fraction of queries whose match is among the k most similar candidates. Image-to-text: an image
counts as found when any of its texts is in its top k (an image may have several captions); text-to-image: a
text counts when its own image is in its top k. Ties count against the query (a candidate scoring the same as
the match ranks ahead of it), so a constant model scores no better than chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.errors import ConfigError, DataError

KS = (1, 5, 10)
MODES = ("two-stage", "exhaustive", "zero-shot")


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


@dataclass
class EncodedPairs:
    """A retrieval split encoded once. I distinct images, T texts (rows of the dataset).

    ``image_embeds`` [I, E] / ``text_embeds`` [T, E]: unit-length global embeddings; ``image_states`` [I, 1 + P,
    Dv] / ``text_states`` [T, L, Dt] and ``text_mask`` [T, L]: the encoder outputs the fusion module reads
    (``None`` when only embeddings were asked for); ``image_of_text`` [T]: each text's image.
    """

    image_embeds: Tensor
    text_embeds: Tensor
    image_of_text: Tensor
    image_states: Tensor | None = None
    text_states: Tensor | None = None
    text_mask: Tensor | None = None


def _pad_cat(chunks: list[Tensor], value: float = 0) -> Tensor:
    """Concatenate [n, L_i, ...] chunks along dim 0, padding dim 1 to the longest L_i."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, 0) * (c.dim() - 2) + (0, length - c.shape[1]), value=value) for c in chunks])


@torch.no_grad()
def encode_pairs(model, loader, image_ids: Sequence[int], states: bool = True) -> EncodedPairs:
    """Encode every row of ``loader`` (batches in dataset order: ``pixels``, ``input_ids``, ``attention_mask``);
    ``image_ids`` names each row's image, so rows sharing an image are one candidate. ``states=False`` keeps the
    embeddings only (zero-shot)."""
    was_training = model.training
    model.eval()
    image_embeds, text_embeds, image_states, text_states, masks = [], [], [], [], []
    for batch in loader:
        if batch["n_bad"]:
            raise DataError(f"{batch['n_bad']} images in the retrieval set could not be read (the lines above "
                            "name them); prepare the dataset again")
        image = model.encode_image(batch["pixels"]).states
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        image_embeds.append(model.align_head.embed_image(image[:, 0]).float())
        text_embeds.append(model.align_head.embed_text(text[:, 0]).float())
        if states:
            image_states.append(image)
            text_states.append(text)
            masks.append(batch["attention_mask"].to(text.device))
    model.train(was_training)
    ids = torch.as_tensor(list(image_ids))
    unique, image_of_text = torch.unique(ids, return_inverse=True)
    first_row = torch.full((len(unique),), len(ids), dtype=torch.long).scatter_reduce(
        0, image_of_text, torch.arange(len(ids)), reduce="amin")
    device = image_embeds[0].device
    first_row, image_of_text = first_row.to(device), image_of_text.to(device)
    encoded = EncodedPairs(torch.cat(image_embeds)[first_row], torch.cat(text_embeds), image_of_text)
    if states:
        encoded.image_states = torch.cat(image_states)[first_row]
        encoded.text_states, encoded.text_mask = _pad_cat(text_states), _pad_cat([m[..., None] for m in masks])[..., 0]
    return encoded


@torch.no_grad()
def pair_scores(model, encoded: EncodedPairs, images: Tensor, texts: Tensor, batch_size: int = 256) -> Tensor:
    """ITM scores (``model.match_score``) of the pairs ``(images[n], texts[n])`` [N], fused ``batch_size`` at a
    time from the stored encoder states. The pairs are fused in order of text length and each chunk is cut to its
    longest text, so that little of the fusion's work goes to padding; the scores come back in the given order."""
    was_training = model.training
    model.eval()
    lengths = encoded.text_mask.sum(dim=1)
    order = lengths[texts].argsort()
    images, texts = images[order], texts[order]
    scores = torch.empty(len(order), device=order.device)
    for start in range(0, len(order), batch_size):
        i, t = images[start:start + batch_size], texts[start:start + batch_size]
        length = int(lengths[t].max())
        logits = model.match(encoded.text_states[t, :length], encoded.text_mask[t, :length], encoded.image_states[i])
        scores[order[start:start + batch_size]] = model.match_score(logits).float().to(scores.device)
    model.train(was_training)
    return scores


def exhaustive_scores(model, encoded: EncodedPairs, batch_size: int = 256) -> Tensor:
    """The ITM score of every image against every text: [I, T]."""
    num_images, num_texts = encoded.image_states.shape[0], encoded.text_states.shape[0]
    device = encoded.image_embeds.device
    images = torch.arange(num_images, device=device).repeat_interleave(num_texts)
    texts = torch.arange(num_texts, device=device).repeat(num_images)
    return pair_scores(model, encoded, images, texts, batch_size).view(num_images, num_texts)


def two_stage_scores(model, encoded: EncodedPairs, k: int = 16, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Scores for image-to-text [I, T] and text-to-image [I, T] retrieval: each image's ``k`` nearest texts and
    each text's ``k`` nearest images (by global embedding) get their ITM score, everything else ``-inf``. A
    pair that is a candidate both ways is fused once."""
    similarity = encoded.image_embeds @ encoded.text_embeds.T
    num_images, num_texts = similarity.shape
    i2t = similarity.topk(min(k, num_texts), dim=1).indices  # [I, k] texts per image
    t2i = similarity.topk(min(k, num_images), dim=0).indices  # [k, T] images per text
    rows = torch.arange(num_images, device=similarity.device)
    cols = torch.arange(num_texts, device=similarity.device)
    flat_i2t = (rows[:, None] * num_texts + i2t).flatten()
    flat_t2i = (t2i * num_texts + cols[None, :]).flatten()
    pairs = torch.unique(torch.cat([flat_i2t, flat_t2i]))
    scores = torch.full((num_images * num_texts,), float("-inf"), device=similarity.device)
    scores[pairs] = pair_scores(model, encoded, pairs // num_texts, pairs % num_texts, batch_size).to(scores.device)
    keep_i2t = torch.zeros_like(scores, dtype=torch.bool)
    keep_i2t[flat_i2t] = True
    keep_t2i = torch.zeros_like(scores, dtype=torch.bool)
    keep_t2i[flat_t2i] = True
    minus_inf = torch.full_like(scores, float("-inf"))
    return (torch.where(keep_i2t, scores, minus_inf).view(num_images, num_texts),
            torch.where(keep_t2i, scores, minus_inf).view(num_images, num_texts))


def retrieval_metrics(model, encoded: EncodedPairs, mode: str = "two-stage", k: int = 16,
                      batch_size: int = 256) -> dict[str, float]:
    """Recall@1/5/10 both ways (%) of an encoded split, scored as ``mode`` says (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"retrieval mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "zero-shot":
        return recall_at_k(encoded.image_embeds @ encoded.text_embeds.T, encoded.image_of_text)
    if mode == "exhaustive":
        return recall_at_k(exhaustive_scores(model, encoded, batch_size), encoded.image_of_text)
    i2t, t2i = two_stage_scores(model, encoded, k, batch_size)
    by_image = recall_at_k(i2t, encoded.image_of_text)
    by_text = recall_at_k(t2i, encoded.image_of_text)
    return {name: (by_image if name.startswith("i2t") else by_text)[name] for name in by_image}


def zero_shot_retrieval(model, loader, image_ids: Sequence[int]) -> dict[str, float]:
    """Recall@1/5/10 both ways from the global embeddings alone (no fusion, no fine-tuning)."""
    return retrieval_metrics(model, encode_pairs(model, loader, image_ids, states=False), "zero-shot")
