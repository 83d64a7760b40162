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


def test_pair_scores_fused_in_length_order_equal_each_pair_fused_alone(tiny_model):
    """pair_scores sorts the pairs by text length to cut padding; every score must still be its own pair's."""
    from medvlp.evaluation.retrieval import EncodedPairs, pair_scores

    torch.manual_seed(0)
    width = tiny_model.cfg.text.hidden_size
    lengths = torch.tensor([3, 17, 9, 30, 5, 12])
    mask = (torch.arange(30)[None, :] < lengths[:, None]).long()
    encoded = EncodedPairs(torch.randn(4, 8), torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    encoded.text_states = torch.randn(6, 30, width) * mask[..., None]
    encoded.text_mask = mask
    encoded.image_states = torch.randn(4, 1 + (tiny_model.cfg.image_size // tiny_model.cfg.patch_size) ** 2,
                                       tiny_model.cfg.vision.hidden_size)
    images = torch.tensor([0, 3, 1, 2, 2, 0, 1, 2, 0])
    texts = torch.tensor([3, 0, 5, 1, 4, 2, 3, 0, 1])
    batched = pair_scores(tiny_model, encoded, images, texts, batch_size=4)
    alone = torch.cat([pair_scores(tiny_model, encoded, images[n:n + 1], texts[n:n + 1], batch_size=1)
                       for n in range(len(images))])
    assert batched.shape == (len(images),)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert len(set(alone.tolist())) == len(images)  # the scores differ, so an order mix-up would show
