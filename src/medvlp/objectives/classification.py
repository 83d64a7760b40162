"""Image-text classification (MELINDA): cross-entropy over the labels."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from medvlp.models.model import MedVLPOutput


def classification_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of the class logits against ``batch["label"]`` [B] (-1, a label outside the label set, is
    ignored). Metric ``accuracy``."""
    logits = outputs.class_logits
    if logits is None:
        raise ValueError("classification_loss needs class logits: run the model with classify=True")
    logits = logits.float()
    labels = batch["label"].to(logits.device)
    if not (labels >= 0).any():
        zero = logits.sum() * 0.0
        return zero, {"accuracy": zero.detach()}
    loss = F.cross_entropy(logits, labels, ignore_index=-1)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, {"accuracy": accuracy.detach()}
