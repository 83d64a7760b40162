"""Vision encoder: MAE masking, visible-only encoding, agreement with Hugging Face, position interpolation."""

import pytest
import torch

from medvlp.models import model_config, random_masking
from medvlp.models.encoders import build_vision_encoder, num_visible


@pytest.fixture(scope="module")
def vision():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    return build_vision_encoder(cfg.vision, cfg.image_size, cfg.patch_size).eval()


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (36, 0.75), (324, 0.75), (49, 0.5), (10, 0.15)])
def test_random_masking_keeps_round_n_times_one_minus_ratio_per_sample(n, ratio):
    x = torch.randn(6, n, 8)
    visible, masking = random_masking(x, ratio, torch.Generator().manual_seed(1))
    keep = round(n * (1 - ratio))
    assert visible.shape == (6, keep, 8) and num_visible(n, ratio) == keep
    assert masking.ids_keep.shape == (6, keep) and masking.ids_restore.shape == (6, n)
    assert masking.mask.dtype == torch.bool
    assert (masking.mask.sum(dim=1) == n - keep).all()
    # the visible tokens are the rows named by ids_keep, and those rows are exactly the not-dropped ones
    assert torch.equal(visible, x[torch.arange(6)[:, None], masking.ids_keep])
    kept = torch.zeros(6, n, dtype=torch.bool).scatter_(1, masking.ids_keep, True)
    assert torch.equal(kept, ~masking.mask)


def test_ids_restore_inverts_the_shuffle():
    x = torch.randn(4, 16, 3)
    visible, masking = random_masking(x, 0.75, torch.Generator().manual_seed(2))
    shuffle = masking.ids_restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :4], masking.ids_keep)
    shuffled = x.gather(1, shuffle[..., None].expand(-1, -1, 3))  # visible first, then the dropped ones
    assert torch.equal(shuffled[:, :4], visible)
    restored = shuffled.gather(1, masking.ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(restored, x)


def test_masks_differ_between_samples_and_follow_the_generator():
    x = torch.randn(8, 36, 4)
    _, a = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, b = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    _, c = random_masking(x, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert len({tuple(row.tolist()) for row in a.mask}) == 8


def test_vision_sequence_is_class_token_plus_visible_patches(vision):
    pixels = torch.randn(3, 3, 64, 64)
    full = vision(pixels)
    assert full.states.shape == (3, 1 + 16, 128) and full.masking is None
    masked = vision(pixels, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert masked.states.shape == (3, 1 + 4, 128)
    assert masked.masking.mask.shape == (3, 16)


def test_visible_patch_states_do_not_depend_on_dropped_pixels(vision):
    pixels = torch.randn(2, 3, 64, 64)
    out = vision(pixels, 0.75, torch.Generator().manual_seed(5))
    dropped = out.masking.mask[0].nonzero()[:, 0]
    changed = pixels.clone()
    for index in dropped.tolist():  # overwrite every dropped patch of sample 0
        r, c = divmod(index, 4)
        changed[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 9.0
    again = vision(changed, 0.75, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.states, out.states)


def test_unmasked_forward_matches_hugging_face_at_native_and_other_sizes(vision):
    hf = vision.model
    pixels = torch.randn(2, 3, 64, 64)
    ours = vision(pixels).states
    theirs = hf.post_layernorm(hf(pixel_values=pixels).last_hidden_state)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    larger = torch.randn(2, 3, 96, 96)
    ours = vision(larger).states
    theirs = hf.post_layernorm(hf(pixel_values=larger, interpolate_pos_encoding=True).last_hidden_state)
    assert ours.shape == (2, 1 + 36, 128)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_position_interpolation_is_identity_at_native_size_and_keeps_class_position(vision):
    table = vision.model.embeddings.position_embedding.weight
    assert vision.position_embeddings(4, 4) is table
    larger = vision.position_embeddings(6, 8)
    assert larger.shape == (1 + 48, 128)
    assert torch.equal(larger[0], table[0])
    # resizing the grid to its own size with the same bicubic resampling gives the table back
    grid = table[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(16, -1), table[1:])


def test_a_conv_stem_gives_the_patch_grid_masks_after_it_and_follows_resizing():
    from medvlp.errors import ConfigError
    from medvlp.models.encoders import ConvStem

    cfg = model_config("tiny", vision={"conv_stem": True})
    torch.manual_seed(0)
    stem_vision = build_vision_encoder(cfg.vision, cfg.image_size, cfg.patch_size).eval()
    assert isinstance(stem_vision.stem, ConvStem) and stem_vision.model.embeddings.patch_embedding is None
    assert not any(k.startswith("model.embeddings.patch_embedding") for k in stem_vision.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    assert stem_vision(pixels).states.shape == (2, 1 + 16, 128)
    masked = stem_vision(pixels, 0.75, torch.Generator().manual_seed(0))
    assert masked.states.shape == (2, 1 + 4, 128) and masked.masking.mask.sum(1).tolist() == [12, 12]
    # the stem's weights are what it computes with: a copy with them loaded encodes identically
    copy = build_vision_encoder(cfg.vision, cfg.image_size, cfg.patch_size).eval()
    assert not torch.allclose(copy(pixels).states, stem_vision(pixels).states)
    copy.load_state_dict(stem_vision.state_dict())
    assert torch.equal(copy(pixels).states, stem_vision(pixels).states)
    copy.resize_positions(5)  # fine-tuning at 80 px: a 5 x 5 grid
    assert copy(torch.randn(2, 3, 80, 80)).states.shape == (2, 1 + 25, 128)
    with pytest.raises(ConfigError, match="power of 2"):
        model_config("tiny", patch_size=8 * 3, image_size=72, vision={"conv_stem": True})
    with pytest.raises(ConfigError, match="conv_stem needs a vision encoder trained from scratch"):
        model_config("tiny", vision={"conv_stem": True, "pretrained": "openai/clip-vit-base-patch16"})
