"""Masked language modelling: cross-entropy on the masked (whole-word) positions."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from medvlp.models.model import IGNORE_INDEX, MedVLPOutput


def mlm_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy over the positions where ``batch["mlm_labels"] != -100``.

    ``outputs.mlm_logits`` [M, V] holds the logits of exactly those positions (row-major), as ``MedVLP`` makes them.

    Metrics: ``accuracy`` (top-1 over those positions). With no masked position the loss is an exact zero
    that still depends on the logits (so backward works) and the accuracy is 0.
    """
    logits = outputs.mlm_logits
    if logits is None:
        raise ValueError("mlm_loss needs MLM logits: run the model with mask_text=True")
    labels = batch["mlm_labels"].to(logits.device)
    target = labels[labels != IGNORE_INDEX]  # the model's logits cover exactly these positions, in this order
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} MLM logits for {target.shape[0]} labelled positions: were the logits "
                         "computed on this batch?")
    if target.numel() == 0:
        zero = logits.sum().float() * 0.0
        return zero, {"accuracy": zero.detach()}
    logits = logits.float()
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(dim=-1) == target).float().mean()
    return loss, {"accuracy": accuracy.detach()}
