"""Retrieval fine-tuning: rank each true pair above its negatives by the ITM score (METER's and M3AE's rule).

``match_score`` is the scalar the fine-tuned model ranks candidates by: the ITM head's log-odds of "matched".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def match_score(itm_logits: Tensor) -> Tensor:
    """ITM logits [..., 2] -> log-odds that image and text match [...] (index 1 = matched)."""
    return itm_logits[..., 1] - itm_logits[..., 0]


def ranking_loss(scores: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over each row of ``scores`` [N, 1 + k]: the true pair's score in column 0, the scores of
    its ``k`` negatives after it (softmax over the row, target 0). Metric ``accuracy``: the true pair wins."""
    scores = scores.float()
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    loss = F.cross_entropy(scores, target)
    accuracy = (scores.argmax(dim=1) == 0).float().mean()
    return loss, {"accuracy": accuracy.detach()}
