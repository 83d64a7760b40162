"""MLM, MIM and ITM losses: what they count, their metrics, and their edge cases."""

import torch
import torch.nn.functional as F

from medvlp.models import FusionOutput, Masking, MedVLPOutput, normalize_pixels, patchify
from medvlp.objectives import itm_batch, itm_loss, itm_negatives, mim_loss, mim_targets, mlm_loss


def outputs(**heads) -> MedVLPOutput:
    """A stand-in for a model output with only the heads a loss reads."""
    empty = torch.zeros(1)
    fusion = FusionOutput(text_states=[], image_states=[], text_pooled=empty, image_pooled=empty, joint=empty)
    return MedVLPOutput(text_features=empty, image_features=empty, fusion=fusion, **heads)


def masking(mask: torch.Tensor) -> Masking:
    return Masking(ids_keep=torch.empty(0), ids_restore=torch.empty(0), mask=mask)


# -- MIM --------------------------------------------------------------------------------------------------------


def test_mim_targets_normalise_each_patch_by_its_own_mean_and_variance():
    pixels = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    raw = patchify(normalize_pixels(pixels), 2)
    patch = raw[0, 3]  # the bottom-right 2x2 patch: 12 values
    mean = patch.sum() / 12
    var = ((patch - mean) ** 2).sum() / 11  # Bessel's correction, as in MAE
    expected = (patch - mean) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(mim_targets(pixels, 2)[0, 3], expected)
    torch.testing.assert_close(mim_targets(pixels, 2, norm_pix_loss=False), raw)


def test_mim_targets_of_a_uniform_image_are_finite():
    target = mim_targets(torch.full((1, 3, 4, 4), 128, dtype=torch.uint8), 2)
    assert torch.isfinite(target).all() and target.abs().max() < 10


def test_mim_loss_counts_dropped_patches_only():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    pred = torch.randn(2, 4, 12)
    batch = {"pixels": pixels}
    loss, metrics = mim_loss(outputs(mim_pred=pred, masking=masking(mask)), batch)
    target = mim_targets(pixels, 2)
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)
    assert metrics == {}
    changed = pred.clone()
    changed[~mask] = 1000.0  # anything at the visible patches
    torch.testing.assert_close(mim_loss(outputs(mim_pred=changed, masking=masking(mask)), batch)[0], loss)
    changed[0, 0] += 1.0  # a dropped patch
    assert mim_loss(outputs(mim_pred=changed, masking=masking(mask)), batch)[0] > loss


def test_mim_loss_without_dropped_patches_is_zero_and_differentiable():
    pred = torch.randn(2, 4, 12, requires_grad=True)
    batch = {"pixels": torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)}
    for masked in (masking(torch.zeros(2, 4, dtype=torch.bool)), None):
        loss, _ = mim_loss(outputs(mim_pred=pred, masking=masked), batch)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(pred.grad).all()


# -- MLM --------------------------------------------------------------------------------------------------------


def test_mlm_loss_is_cross_entropy_over_labelled_positions_with_accuracy():
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 2, 0
    logits = torch.randn(3, 6)
    logits[0, 4] = 10.0  # right
    logits[1, 2] = 10.0  # right
    logits[2, 5] = 10.0  # wrong (label 0)
    loss, metrics = mlm_loss(outputs(mlm_logits=logits), {"mlm_labels": labels})
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([4, 2, 0])))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(2 / 3))


def test_mlm_loss_without_masked_tokens_is_zero_and_differentiable():
    logits = torch.randn(0, 6, requires_grad=True)
    loss, metrics = mlm_loss(outputs(mlm_logits=logits), {"mlm_labels": torch.full((2, 5), -100)})
    assert loss.item() == 0.0 and metrics["accuracy"].item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_mlm_loss_rejects_logits_of_another_batch():
    labels = torch.full((1, 4), -100)
    labels[0, 0] = 1
    try:
        mlm_loss(outputs(mlm_logits=torch.randn(2, 6)), {"mlm_labels": labels})
    except ValueError as error:
        assert "labelled positions" in str(error)
    else:
        raise AssertionError("expected a ValueError")


# -- ITM --------------------------------------------------------------------------------------------------------


def test_itm_negatives_swap_half_the_batch_among_themselves():
    pixels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    swapped, labels = itm_negatives(pixels, torch.Generator().manual_seed(0))
    owner = swapped[:, 0, 0, 0].long()
    assert labels.tolist().count(0) == 5 and labels.dtype == torch.long
    assert torch.equal(owner == torch.arange(10), labels.bool())  # swapped samples never keep their own image
    assert set(owner[labels == 0].tolist()) == set(torch.arange(10)[labels == 0].tolist())  # a derangement
    again, labels_again = itm_negatives(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(again, swapped) and torch.equal(labels_again, labels)
    other, _ = itm_negatives(pixels, torch.Generator().manual_seed(1))
    assert not torch.equal(other, swapped)


def test_itm_negatives_small_batches():
    for size in (2, 3):
        pixels = torch.arange(size, dtype=torch.uint8).view(size, 1, 1, 1)
        swapped, labels = itm_negatives(pixels, torch.Generator().manual_seed(0))
        owner = swapped.view(-1).long()
        assert labels.tolist().count(0) == 1 and owner[labels == 0].item() != torch.nonzero(labels == 0).item()
        assert torch.equal(owner[labels == 1], torch.arange(size)[labels == 1])
    single, labels = itm_negatives(torch.zeros(1, 3, 2, 2))
    assert labels.tolist() == [1] and single.shape == (1, 3, 2, 2)


def test_itm_batch_and_loss():
    batch = {"pixels": torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1), "input_ids": torch.zeros(4, 2)}
    swapped = itm_batch(batch, torch.Generator().manual_seed(0))
    assert swapped["input_ids"] is batch["input_ids"] and "itm_labels" not in batch
    labels = swapped["itm_labels"]
    logits = torch.stack([1.0 - labels.float(), labels.float()], dim=1) * 5  # all correct
    logits[0] = logits[0].flip(0)  # one wrong
    loss, metrics = itm_loss(outputs(itm_logits=logits), swapped)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor(0.75))
