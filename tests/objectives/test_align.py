"""Global (ITC) and local (FILIP) alignment, gathering across ranks, and the negatives of ITM: known answers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvlp.models import FusionOutput, MedVLPOutput
from medvlp.objectives import (
    alignment_words,
    gather_with_grad,
    gather_with_offset,
    hard_negatives,
    itc_loss,
    itm_loss,
    local_alignment_loss,
    local_similarity,
    random_negatives,
)


def outputs(**fields) -> MedVLPOutput:
    """A stand-in for a model output with only the fields a loss reads."""
    empty = torch.zeros(1)
    fusion = FusionOutput(text_states=[], image_states=[], text_pooled=empty, image_pooled=empty, joint=empty)
    return MedVLPOutput(text_features=empty, image_features=empty, fusion=fusion, **fields)


def global_outputs(image, text, scale=100.0) -> MedVLPOutput:
    return outputs(image_embed=image, text_embed=text, logit_scale=torch.tensor(scale))


# -- ITC --------------------------------------------------------------------------------------------------------


def test_itc_of_identical_orthogonal_pairs_is_near_zero_with_full_accuracy():
    one_hot = torch.eye(4)
    loss, metrics = itc_loss(global_outputs(one_hot, one_hot.clone()))
    assert loss.item() < 1e-6  # log(1 + 3 exp(-100)) in each direction
    assert metrics["i2t_acc"].item() == 1.0 and metrics["t2i_acc"].item() == 1.0


def test_itc_of_permuted_texts_is_higher_with_zero_accuracy():
    one_hot = torch.eye(4)
    matched, _ = itc_loss(global_outputs(one_hot, one_hot))
    loss, metrics = itc_loss(global_outputs(one_hot, one_hot.roll(1, dims=0)))  # nobody keeps its own text
    assert loss > matched and loss.item() == pytest.approx(100.0, abs=1e-3)  # the true pair scores 0, a wrong one 100
    assert metrics["i2t_acc"].item() == 0.0 and metrics["t2i_acc"].item() == 0.0


def test_itc_is_clip_infonce_and_symmetric_in_the_two_roles():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    loss, metrics = itc_loss(global_outputs(image, text, 10.0))
    logits = 10.0 * image @ text.T
    targets = torch.arange(5)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["i2t_acc"], (logits.argmax(1) == targets).float().mean())
    swapped, swapped_metrics = itc_loss(global_outputs(text, image, 10.0))
    torch.testing.assert_close(swapped, loss)
    assert swapped_metrics["i2t_acc"] == metrics["t2i_acc"] and swapped_metrics["t2i_acc"] == metrics["i2t_acc"]


def test_itc_gradient_reaches_embeddings_and_scale_and_bf16_gives_float32():
    image = F.normalize(torch.randn(3, 6), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(3, 6), dim=-1).requires_grad_(True)
    scale = torch.tensor(14.0, requires_grad=True)
    loss, _ = itc_loss(outputs(image_embed=image, text_embed=text, logit_scale=scale))
    loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and scale.grad is not None
    half, _ = itc_loss(global_outputs(image.detach().bfloat16(), text.detach().bfloat16(), 14.0))
    assert half.dtype == torch.float32


def test_alignment_losses_ask_for_align_true():
    with pytest.raises(ValueError, match="align=True"):
        itc_loss(outputs())
    with pytest.raises(ValueError, match="align=True"):
        local_alignment_loss(outputs(), {"attention_mask": torch.ones(1, 3)})


# -- gathering across ranks -------------------------------------------------------------------------------------


def test_gather_without_distributed_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    gathered, offset = gather_with_offset(x)
    assert gathered is x and offset == 0


def test_gather_and_itc_across_two_gloo_processes(tmp_path):
    """Two real ranks (about 5 s: each process imports torch). Ranks hold 2 and 3 rows; each rank's loss
    weights the gathered rows by rank + 1, so every row's gradient is 1 + 2 = 3. ITC over 2 + 2 pairs equals
    ITC of the whole batch in one process: mean of the ranks' losses, and each rank's gradient is that of
    the sum of the ranks' losses (DDP's averaging then halves it)."""
    worker = Path(__file__).with_name("dist_worker.py")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(init), str(tmp_path / f"{rank}.pt")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    logs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), logs
    seen = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)])
    for rank, got in enumerate(seen):
        assert torch.equal(got["gathered"], expected) and torch.equal(got["plain"], expected * 2)
        assert got["offset"] == 2 * rank
        assert torch.equal(got["grad"], torch.full((rank + 2, 3), 3.0))

    full = F.normalize(torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)), dim=-1).requires_grad_(True)
    loss, metrics = itc_loss(outputs(image_embed=full[:, 0], text_embed=full[:, 1], logit_scale=torch.tensor(5.0)))
    loss.backward()
    torch.testing.assert_close((seen[0]["itc_loss"] + seen[1]["itc_loss"]) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([seen[0]["itc_grad"], seen[1]["itc_grad"]]) / 2, full.grad)
    ranks_acc = (seen[0]["itc_metrics"]["i2t_acc"] + seen[1]["itc_metrics"]["i2t_acc"]) / 2
    torch.testing.assert_close(ranks_acc, metrics["i2t_acc"])


# -- local alignment --------------------------------------------------------------------------------------------

B, K, E = 3, 4, 16  # images of 4 patches; patch k of image i is the one-hot e[i * K + k] (orthogonal to all others)


def one_hot_patches() -> torch.Tensor:
    return torch.eye(E)[: B * K].view(B, K, E)


def texts_of_own_patches():
    """Text t = <s>, words equal to patches (0, 1) of image t (text 2 also patch 2), </s>, padding.

    <s>, </s> and the padding get the embedding of a patch of *another* image, so that counting them would show.
    """
    patches = one_hot_patches()
    words = torch.zeros(B, 6, E)
    mask = torch.zeros(B, 6, dtype=torch.long)
    for t in range(B):
        other = patches[(t + 1) % B, 3]
        count = 3 if t == 2 else 2
        words[t, 0] = other
        words[t, 1:1 + count] = patches[t, :count]
        words[t, 1 + count:] = other  # </s> and the padding
        mask[t, :2 + count] = 1
    return words, patches, mask


def test_alignment_words_skip_padding_and_the_first_and_last_real_token():
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(alignment_words(right), expected)  # an empty caption (<s></s>) keeps its real tokens
    left = right.flip(1)
    assert torch.equal(alignment_words(left), expected.flip(1))
    assert torch.equal(alignment_words(right, skip_special=False), right.bool())


def test_local_scores_of_words_copied_from_own_patches():
    words, patches, mask = texts_of_own_patches()
    w2p, p2w = local_similarity(words, patches, alignment_words(mask))
    # every counted word finds itself among its own image's patches and is orthogonal to the other images
    torch.testing.assert_close(w2p, torch.eye(B))
    # patch-to-word: the share of the image's patches that some word of the text copies (2 of 4, 3 of 4)
    torch.testing.assert_close(p2w, torch.diag(torch.tensor([0.5, 0.5, 0.75])))
    assert (w2p.diag()[:, None] > w2p - torch.eye(B) * 10).all()
    # counting <s> and </s> would let every text see a patch of the next image
    w2p_all, p2w_all = local_similarity(words, patches, alignment_words(mask, skip_special=False))
    assert (w2p_all.roll(-1, dims=1).diag() > 0).all() and (p2w_all.roll(-1, dims=1).diag() > 0).all()


def test_local_alignment_loss_ranks_matched_pairs_first_and_mismatched_pairs_last():
    words, patches, mask = texts_of_own_patches()
    out = outputs(word_embeds=words, patch_embeds=patches, logit_scale=torch.tensor(50.0))
    loss, metrics = local_alignment_loss(out, {"attention_mask": mask})
    assert metrics["i2t_acc"].item() == 1.0 and metrics["t2i_acc"].item() == 1.0
    # i2t uses patch-to-word scores (margin at least 0.5 * 50), t2i word-to-patch (margin 50)
    assert loss.item() < 1e-9
    order = torch.tensor([1, 2, 0])
    shuffled = outputs(word_embeds=words[order], patch_embeds=patches, logit_scale=torch.tensor(50.0))
    worse, worse_metrics = local_alignment_loss(shuffled, {"attention_mask": mask[order]})
    assert worse > loss + 10 and worse_metrics["i2t_acc"].item() == 0.0 and worse_metrics["t2i_acc"].item() == 0.0


def test_padding_with_any_embedding_changes_neither_scores_nor_loss():
    g = torch.Generator().manual_seed(0)
    words = F.normalize(torch.randn(4, 7, E, generator=g), dim=-1)
    patches = F.normalize(torch.randn(4, 5, E, generator=g), dim=-1)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:], mask[2, 3:] = 0, 0
    base = outputs(word_embeds=words, patch_embeds=patches, logit_scale=torch.tensor(20.0))
    loss, metrics = local_alignment_loss(base, {"attention_mask": mask})
    scores = local_similarity(words, patches, alignment_words(mask))
    # new values at the padded positions, and three more padded positions, all pointing at image patches
    longer = torch.cat([words, patches[:, :3]], dim=1).clone()
    longer_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    longer[~longer_mask.bool()] = patches[0, 0]
    padded = outputs(word_embeds=longer, patch_embeds=patches, logit_scale=torch.tensor(20.0))
    padded_loss, padded_metrics = local_alignment_loss(padded, {"attention_mask": longer_mask})
    torch.testing.assert_close(padded_loss, loss)
    assert padded_metrics == metrics
    for a, b in zip(scores, local_similarity(longer, patches, alignment_words(longer_mask)), strict=True):
        torch.testing.assert_close(b, a)


def test_local_alignment_gradient_and_mask_shape_check():
    words = F.normalize(torch.randn(2, 5, E), dim=-1).requires_grad_(True)
    patches = F.normalize(torch.randn(2, 3, E), dim=-1).requires_grad_(True)
    out = outputs(word_embeds=words, patch_embeds=patches, logit_scale=torch.tensor(10.0))
    loss, _ = local_alignment_loss(out, {"attention_mask": torch.ones(2, 5, dtype=torch.long)})
    loss.backward()
    assert torch.isfinite(loss) and words.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0
    assert words.grad[:, 0].abs().sum() == 0 and words.grad[:, -1].abs().sum() == 0  # <s> and </s> take no part
    with pytest.raises(ValueError, match="attention_mask"):
        local_alignment_loss(out, {"attention_mask": torch.ones(2, 4, dtype=torch.long)})


# -- negatives for ITM ------------------------------------------------------------------------------------------


def test_hard_negatives_never_pick_the_sample_itself():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 3
    sim.diagonal().add_(20.0)  # the true pairs are by far the most similar: still never drawn
    draws = torch.stack([hard_negatives(sim, g) for _ in range(100)])
    assert draws.dtype == torch.long and draws.shape == (100, 6)
    assert not (draws == torch.arange(6)).any()


def test_hard_negatives_pick_a_much_harder_negative_almost_always():
    target = torch.tensor([3, 0, 4, 1, 2])
    sim = torch.zeros(5, 5)
    sim[torch.arange(5), target] = 30.0  # probability of anything else: 3 exp(-30) per row
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([hard_negatives(sim, g) for _ in range(50)])
    assert (draws == target).all()


def test_hard_negatives_of_equal_similarities_are_uniform_over_the_others():
    size, rounds = 5, 800
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([hard_negatives(torch.full((size, size), 0.3), g) for _ in range(rounds)])
    counts = F.one_hot(draws, size).sum(0)  # [row, donor]
    assert (counts.diag() == 0).all()
    expected = rounds / (size - 1)
    off = counts[~torch.eye(size, dtype=torch.bool)].float()
    chi_square = ((off - expected) ** 2 / expected).sum().item()
    assert chi_square < 60.0, chi_square  # 15 degrees of freedom: mean 15, P(> 60) is about 1e-7


def test_hard_negatives_are_deterministic_for_a_seed_and_reject_a_batch_of_one():
    sim = torch.randn(8, 8, requires_grad=True)
    a = hard_negatives(sim, torch.Generator().manual_seed(5))
    b = hard_negatives(sim, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert any(not torch.equal(a, hard_negatives(sim, torch.Generator().manual_seed(s))) for s in range(6, 9))
    with pytest.raises(ValueError, match="no other sample"):
        hard_negatives(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="square"):
        hard_negatives(torch.zeros(3, 4))
    assert torch.equal(hard_negatives(torch.zeros(2, 2)), torch.tensor([1, 0]))


def test_random_negatives_are_others_uniform_and_seeded():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([random_negatives(4, g) for _ in range(600)])
    assert not (draws == torch.arange(4)).any()
    counts = F.one_hot(draws, 4).sum(0)
    off = counts[~torch.eye(4, dtype=torch.bool)].float()
    assert ((off - 200).abs() < 60).all(), counts  # 200 expected, standard deviation about 11.5
    assert torch.equal(random_negatives(6, torch.Generator().manual_seed(3)),
                       random_negatives(6, torch.Generator().manual_seed(3)))
    assert torch.equal(random_negatives(2), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="no other sample"):
        random_negatives(1)


def test_itm_loss_on_concatenated_positive_and_negative_logits():
    positives = torch.tensor([[0.0, 3.0], [0.0, 2.0], [1.0, 0.0]])  # the last positive is wrong
    negatives = torch.tensor([[4.0, 0.0], [2.0, 1.0], [0.0, 1.0]])  # the last negative is wrong
    logits = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)])
    loss, metrics = itm_loss(outputs(itm_logits=logits), {"itm_labels": labels})
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(4 / 6))
