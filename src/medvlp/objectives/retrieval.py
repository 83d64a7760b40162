"""Retrieval fine-tuning: rank each true pair above its negatives by the ITM score (METER's and M3AE's rule).

``match_score`` is the scalar a fine-tuned model ranks candidates by: the ITM log-odds of "matched" or, as in
M3AE, the "matched" logit alone (``ModelConfig.itm_score``; ``MedVLP.match_score`` applies the model's rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medvlp.models.heads import match_score

__all__ = ["match_score", "ranking_loss"]


def ranking_loss(scores: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over each row of ``scores`` [N, 1 + k]: the true pair's score in column 0, the scores of
    its ``k`` negatives after it (softmax over the row, target 0). Metric ``accuracy``: the true pair wins."""
    scores = scores.float()
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    loss = F.cross_entropy(scores, target)
    accuracy = (scores.argmax(dim=1) == 0).float().mean()
    return loss, {"accuracy": accuracy.detach()}
