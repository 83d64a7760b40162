"""Image-text matching: swap half of the batch's images, classify matched vs not."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.models.model import MedVLPOutput


def itm_negatives(pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Give a random half of the batch (``B // 2`` samples) another sample's image.

    The chosen samples pass their images round in a cycle (a derangement: nobody keeps their own); with a
    single chosen sample it takes the image of one not chosen. Returns the new pixels and ``labels`` [B]
    (1 = image and text still match, 0 = swapped). A batch of one stays as it is, all matched.
    """
    batch = pixels.shape[0]
    source = torch.arange(batch)
    labels = torch.ones(batch, dtype=torch.long)
    num_swapped = batch // 2
    if num_swapped > 0:
        device = generator.device if generator is not None else "cpu"
        order = torch.randperm(batch, generator=generator, device=device).cpu()
        chosen = order[:num_swapped]
        donors = order[:max(num_swapped, 2)].roll(-1)[:num_swapped]
        source[chosen] = donors
        labels[chosen] = 0
    return pixels[source.to(pixels.device)], labels.to(pixels.device)


def itm_batch(batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A shallow copy of ``batch`` with half of its images swapped and ``itm_labels`` added."""
    pixels, labels = itm_negatives(batch["pixels"], generator)
    return {**batch, "pixels": pixels, "itm_labels": labels}


def itm_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the ITM logits against ``batch["itm_labels"]`` (from ``itm_batch``); metric ``accuracy``."""
    logits = outputs.itm_logits
    if logits is None:
        raise ValueError("itm_loss needs ITM logits: run the model with itm=True")
    labels = batch["itm_labels"].to(logits.device)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, {"accuracy": accuracy.detach()}
