"""Downstream metrics, from predictions gathered over a whole split (percentages, as the papers report)."""

from __future__ import annotations

import torch
from torch import Tensor


def vqa_accuracy(correct: Tensor, closed: Tensor) -> dict[str, float]:
    """Open, closed and overall accuracy (%) from per-question ``correct`` [N] and ``closed`` [N] (answer type
    from the data), plus how many questions of each type there were. A type with no question gets NaN."""
    correct, closed = correct.bool().cpu(), closed.bool().cpu()

    def percent(rows: Tensor) -> float:
        return 100.0 * correct[rows].float().mean().item() if rows.any() else float("nan")

    return {"open_acc": percent(~closed), "closed_acc": percent(closed),
            "overall_acc": percent(torch.ones_like(closed)), "open_n": int((~closed).sum()),
            "closed_n": int(closed.sum())}


def classification_metrics(predicted: Tensor, target: Tensor) -> dict[str, float]:
    """Accuracy and macro F1 (%) of predicted class indices against targets (-1: a label outside the set,
    always wrong). Macro F1 averages the F1 of every class that occurs among the targets or the predictions."""
    predicted, target = predicted.long().cpu(), target.long().cpu()
    classes = torch.unique(torch.cat([predicted, target[target >= 0]]))
    hit = (predicted[:, None] == classes) & (target[:, None] == classes)  # [N, C]
    true_pos = hit.sum(0).float()
    predicted_pos = (predicted[:, None] == classes).sum(0).float()
    actual_pos = (target[:, None] == classes).sum(0).float()
    f1 = 2 * true_pos / (predicted_pos + actual_pos).clamp(min=1)
    return {"accuracy": 100.0 * (predicted == target).float().mean().item(), "macro_f1": 100.0 * f1.mean().item()}


def majority_answer_accuracy(train_answers: list[str], train_types: list[str], test_answers: list[str],
                             test_types: list[str]) -> dict[str, float]:
    """The baseline that ignores the image and the question: every closed test question gets the commonest
    closed training answer, every open one the commonest open training answer; accuracy as ``vqa_accuracy``."""
    from collections import Counter

    commonest = {kind: Counter(a for a, t in zip(train_answers, train_types) if t == kind).most_common(1)
                 for kind in ("open", "closed")}
    guess = {kind: top[0][0] if top else None for kind, top in commonest.items()}
    correct = torch.tensor([answer == guess[kind] for answer, kind in zip(test_answers, test_types)])
    return vqa_accuracy(correct, torch.tensor([kind == "closed" for kind in test_types]))
