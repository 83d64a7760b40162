"""Downstream metrics and the retrieval scoring modes."""

import math

import pytest
import torch

from medvlp.evaluation.metrics import classification_metrics, vqa_accuracy
from medvlp.evaluation.retrieval import EncodedPairs, recall_at_k, retrieval_metrics, two_stage_scores
from medvlp.models.heads import match_score


def test_vqa_accuracy_splits_open_and_closed():
    correct = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    closed = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    m = vqa_accuracy(correct, closed)
    assert m["closed_acc"] == pytest.approx(50.0)
    assert m["open_acc"] == pytest.approx(200 / 3)
    assert m["overall_acc"] == pytest.approx(60.0)
    assert (m["open_n"], m["closed_n"]) == (3, 2)
    assert math.isnan(vqa_accuracy(correct, torch.ones(5, dtype=torch.bool))["open_acc"])


def test_classification_metrics_macro_f1_by_hand():
    predicted = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(predicted, target)
    # class 0: P 1/2 R 1 -> F1 2/3; class 1: P 1 R 1/3 -> F1 1/2; class 2: P 0 R 0 -> 0
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)


class FakeFusion:
    """A 'model' whose ITM score of (image i, text t) is a fixed table: enough to test the scoring modes."""

    training = False

    def __init__(self, table: torch.Tensor):
        self.table = table

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def match_score(self, itm_logits):  # MedVLP's rule at its default (model.cfg.itm_score = "log_odds")
        return match_score(itm_logits)

    def match(self, text_states, mask, image_states):
        score = self.table[image_states[:, 0, 0].long(), text_states[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(score), score], dim=1)


def encoded(num: int, embeds_noise: float, seed: int = 0) -> tuple[EncodedPairs, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(num, 8, generator=g), dim=1)
    noisy = torch.nn.functional.normalize(base + embeds_noise * torch.randn(num, 8, generator=g), dim=1)
    ids = torch.arange(num, dtype=torch.float)
    pairs = EncodedPairs(image_embeds=base, text_embeds=noisy, image_of_text=torch.arange(num),
                         image_states=ids.view(num, 1, 1), text_states=ids.view(num, 1, 1),
                         text_mask=torch.ones(num, 1, dtype=torch.long))
    table = torch.randn(num, num, generator=g) + 4 * torch.eye(num)  # ITM: the true pair usually wins
    return pairs, table


def test_two_stage_with_every_candidate_equals_exhaustive():
    pairs, table = encoded(12, 0.5)
    model = FakeFusion(table)
    exhaustive = retrieval_metrics(model, pairs, "exhaustive")
    assert exhaustive == recall_at_k(table, pairs.image_of_text)
    assert retrieval_metrics(model, pairs, "two-stage", k=12) == exhaustive


def test_two_stage_ranks_non_candidates_last():
    pairs, table = encoded(10, 0.1)
    i2t, t2i = two_stage_scores(FakeFusion(table), pairs, k=3)
    assert torch.isfinite(i2t).sum(dim=1).tolist() == [3] * 10
    assert torch.isfinite(t2i).sum(dim=0).tolist() == [3] * 10
    finite = torch.isfinite(i2t)
    assert torch.equal(i2t[finite], table[finite])


def test_zero_shot_mode_reads_the_embeddings_only():
    pairs, _ = encoded(10, 0.0)  # texts embed exactly like their images
    m = retrieval_metrics(None, pairs, "zero-shot")
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0


def test_majority_answer_is_chosen_per_answer_type():
    from medvlp.evaluation.metrics import majority_answer_accuracy

    m = majority_answer_accuracy(["yes", "yes", "no", "lung", "liver", "lung"],
                                 ["closed", "closed", "closed", "open", "open", "open"],
                                 ["yes", "no", "lung", "brain"], ["closed", "closed", "open", "open"])
    assert (m["closed_acc"], m["open_acc"], m["overall_acc"]) == (50.0, 50.0, 50.0)
