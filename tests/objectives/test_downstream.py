"""Fine-tuning objectives: known answers for the VQA, classification and ranking losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from medvlp.models.model import MedVLPOutput
from medvlp.objectives import classification_loss, hard_negatives, match_score, ranking_loss, vqa_loss, vqa_targets


def output(logits: torch.Tensor) -> MedVLPOutput:
    return MedVLPOutput(text_features=torch.zeros(1), image_features=torch.zeros(1), fusion=None,
                        class_logits=logits)


def test_vqa_targets_are_one_hot_and_unknown_answers_are_zero():
    targets = vqa_targets(torch.tensor([2, -1, 0]), 4)
    assert targets.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_vqa_loss_sums_bce_over_answers_and_skips_unknown_answers():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    loss, metrics = vqa_loss(output(logits), {"answer": torch.tensor([0, -1])})
    expected = F.binary_cross_entropy_with_logits(logits[0], torch.tensor([1.0, 0, 0]), reduction="sum")
    assert loss.item() == pytest.approx(expected.item())
    assert metrics["accuracy"].item() == pytest.approx(0.5)  # the unknown answer counts as wrong


def test_vqa_loss_falls_when_the_right_answer_rises():
    batch = {"answer": torch.tensor([1])}
    low, _ = vqa_loss(output(torch.tensor([[0.0, 0.0, 0.0]])), batch)
    high, _ = vqa_loss(output(torch.tensor([[0.0, 3.0, 0.0]])), batch)
    assert high < low


def test_classification_loss_is_cross_entropy_ignoring_unknown_labels():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    loss, metrics = classification_loss(output(logits), {"label": torch.tensor([1, 1, -1])})
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:2], torch.tensor([1, 1])).item())
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)


def test_ranking_loss_prefers_the_true_pair_in_column_zero():
    loss, metrics = ranking_loss(torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))
    assert metrics["accuracy"].item() == 0.5
    uniform, _ = ranking_loss(torch.zeros(2, 3))
    assert uniform.item() == pytest.approx(math.log(3))
    assert loss.item() == pytest.approx((F.cross_entropy(torch.tensor([[5.0, 0, 0], [0, 5.0, 0]]),
                                                          torch.tensor([0, 0]))).item())


def test_match_score_is_the_log_odds_of_a_match():
    assert match_score(torch.tensor([[1.0, 3.0], [2.0, -1.0]])).tolist() == [2.0, -3.0]


def test_hard_negatives_draws_k_distinct_others_per_row():
    similarity = torch.randn(6, 6) * 10  # peaked rows must still give k distinct others
    donors = hard_negatives(similarity, torch.Generator().manual_seed(0), k=5)
    assert donors.shape == (6, 5)
    for row, drawn in enumerate(donors.tolist()):
        assert row not in drawn and len(set(drawn)) == 5
    with pytest.raises(ValueError, match="cannot draw 6"):
        hard_negatives(similarity, k=6)
