"""Med-VQA as classification over the answer vocabulary: binary cross-entropy against soft answer scores."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.models.model import MedVLPOutput


def vqa_targets(answers: Tensor, num_answers: int) -> Tensor:
    """Soft scores [B, A] from answer indices [B]: 1 for the annotated answer, 0 elsewhere (VQA-RAD, SLAKE and
    VQA-Med-2019 give one answer per question, so the soft score of VQA v2's ten annotators reduces to this).
    An index of -1 (an answer outside the vocabulary) gives a row of zeros."""
    known = answers >= 0
    targets = torch.zeros(answers.shape[0], num_answers, device=answers.device)
    targets[known, answers[known]] = 1.0
    return targets


def vqa_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Binary cross-entropy of every answer's logit against its soft score, summed over answers and averaged
    over the questions whose answer is in the vocabulary (METER's and M3AE's VQA loss).

    Reads ``batch["answer"]`` [B] (index, -1 when unknown), or dense soft scores ``batch["answer_scores"]``
    [B, A] when the batch has them (several scored answers per question, as in VQA v2; every row counts).
    Metric ``accuracy``: the score of the top answer (exact match with one answer per question).
    """
    logits = outputs.class_logits
    if logits is None:
        raise ValueError("vqa_loss needs answer logits: run the model with classify=True")
    logits = logits.float()
    if "answer_scores" in batch:
        targets = batch["answer_scores"].to(logits.device).float()
        known = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        answers = batch["answer"].to(logits.device)
        known = answers >= 0
        targets = vqa_targets(answers, logits.shape[1])
    per_answer = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = (per_answer.sum(dim=1) * known).sum() / known.sum().clamp(min=1)
    accuracy = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).mean()
    return loss, {"accuracy": accuracy.detach()}
