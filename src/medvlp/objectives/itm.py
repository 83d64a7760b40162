"""Image-text matching: classify matched vs not.

Two ways to build the pairs:

- M3AE: ``itm_batch`` swaps half of the batch's images and the swapped batch gets its own forward pass (or,
  with ``itm_swap``'s indices, the fusion reads encoder states another pass already computed: the whole
  images indexed by ``source``, the whole texts as they are).
- MPMA (hard negatives, no extra encoding): reuse the encoder states of the paired pass. With
  ``donors = hard_negatives(sim)`` (or ``random_negatives``) for the texts, the positives are
  ``model.match(text, mask, image)`` and the negatives ``model.match(text, mask, image[donors])`` (and, for
  negative texts per image, ``model.match(text[donors_t], mask[donors_t], image)``); concatenate the logits
  and pass ``{"itm_labels": cat(ones, zeros)}`` to ``itm_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.models.model import MedVLPOutput


def itm_swap(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Which image each sample of an ITM batch gets: a random half of the batch (``B // 2`` samples) another
    sample's.

    The chosen samples pass their images round in a cycle (a derangement: nobody keeps their own); with a
    single chosen sample it takes the image of one not chosen. Returns ``source`` [B] (sample ``i`` gets the
    image of sample ``source[i]``) and ``labels`` [B] (1 = image and text still match, 0 = swapped), on the CPU.
    A batch of one stays as it is, all matched.
    """
    source = torch.arange(batch_size)
    labels = torch.ones(batch_size, dtype=torch.long)
    num_swapped = batch_size // 2
    if num_swapped > 0:
        device = generator.device if generator is not None else "cpu"
        order = torch.randperm(batch_size, generator=generator, device=device).cpu()
        chosen = order[:num_swapped]
        donors = order[:max(num_swapped, 2)].roll(-1)[:num_swapped]
        source[chosen] = donors
        labels[chosen] = 0
    return source, labels


def itm_negatives(pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``pixels`` with the images swapped as ``itm_swap`` draws them; returns the new pixels and ``labels`` [B]."""
    source, labels = itm_swap(pixels.shape[0], generator)
    return pixels[source.to(pixels.device)], labels.to(pixels.device)


def itm_batch(batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A shallow copy of ``batch`` with half of its images swapped and ``itm_labels`` added."""
    pixels, labels = itm_negatives(batch["pixels"], generator)
    return {**batch, "pixels": pixels, "itm_labels": labels}


def itm_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the ITM logits [N, 2] against ``batch["itm_labels"]`` [N]; metric ``accuracy``.

    Only ``itm_labels`` is read from ``batch``: it comes from ``itm_batch``, or the caller builds it to match
    logits it concatenated (positives then negatives, say), so ``N`` may differ from the batch size.
    """
    logits = outputs.itm_logits
    if logits is None:
        raise ValueError("itm_loss needs ITM logits: run the model with itm=True")
    labels = batch["itm_labels"].to(logits.device)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, {"accuracy": accuracy.detach()}
