"""Recall@k on similarity matrices with known answers."""

from __future__ import annotations

import torch

from medvlp.evaluation.retrieval import match_ranks, recall_at_k


def test_perfect_and_reversed_similarities():
    n = 12
    truth = torch.arange(n)
    perfect = torch.eye(n) + 0.01 * torch.rand(n, n)
    assert set(recall_at_k(perfect, truth).values()) == {100.0}
    # every match is the least similar candidate: rank n - 1, found only at k >= n
    worst = -torch.eye(n)
    metrics = recall_at_k(worst, truth, ks=(1, 10, 12))
    assert metrics["i2t_r1"] == metrics["t2i_r10"] == 0.0 and metrics["t2i_r12"] == 100.0


def test_ranks_on_a_small_case():
    # 3 images, 4 texts; texts 0, 1 describe image 0, text 2 image 1, text 3 image 2
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.0],
                        [0.2, 0.7, 0.5, 0.3],
                        [0.1, 0.6, 0.4, 0.2]])
    image_of_text = torch.tensor([0, 0, 1, 2])
    i2t, t2i = match_ranks(sim, image_of_text)
    assert i2t.tolist() == [0, 1, 2]  # image 0: text 0 first; image 1: text 2 second; image 2: text 3 third
    assert t2i.tolist() == [0, 2, 1, 1]  # text 1: its image 0 scores lowest; text 2: image 0 beats image 1
    metrics = recall_at_k(sim, image_of_text, ks=(1, 2))
    assert abs(metrics["i2t_r1"] - 100 / 3) < 1e-4 and metrics["t2i_r1"] == 25.0 and metrics["t2i_r2"] == 75.0


def test_ties_count_against_the_query():
    constant = torch.zeros(5, 5)
    metrics = recall_at_k(constant, torch.arange(5), ks=(1, 5))
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 0.0 and metrics["t2i_r5"] == 100.0
