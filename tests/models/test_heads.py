"""Heads: sine-cosine positions, the MIM decoder's un-shuffle, MLM weight tying, patchify, the alignment head."""

import math

import pytest
import torch

from medvlp.models import (
    AlignmentHead,
    MIMDecoder,
    MIMDecoderConfig,
    MLMHead,
    patchify,
    random_masking,
    sincos_2d,
    unpatchify,
)


def test_sincos_2d_values_by_hand():
    pos = sincos_2d(2, 3, 8)  # quarter = 2 frequencies: 1 and 1/100
    assert pos.shape == (6, 8)
    row, col = 1, 2
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(pos[row * 3 + col], torch.tensor(expected))
    torch.testing.assert_close(pos[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert len({tuple(p.tolist()) for p in sincos_2d(7, 5, 16)}) == 35
    with pytest.raises(ValueError):
        sincos_2d(2, 2, 6)


def test_mim_decoder_puts_the_mask_token_at_every_dropped_position():
    torch.manual_seed(0)
    cfg = MIMDecoderConfig(hidden_size=16, num_layers=0, num_heads=2, intermediate_size=32)
    decoder = MIMDecoder(in_width=12, cfg=cfg, patch_size=2).eval()  # no blocks: each output sees only its token
    patches = torch.randn(2, 9, 12)
    visible, masking = random_masking(patches, 0.6, torch.Generator().manual_seed(0))
    states = torch.cat([torch.randn(2, 1, 12), visible], 1)
    out = decoder(states, masking.ids_restore, (3, 3))
    assert out.shape == (2, 9, 2 * 2 * 3)
    mask_pixels = decoder.predict(decoder.norm(decoder.mask_token[0, 0] + sincos_2d(3, 3, 16)))
    torch.testing.assert_close(out[masking.mask], mask_pixels.expand(2, 9, 12)[masking.mask])
    kept = decoder.predict(decoder.norm(decoder.embed(patches) + sincos_2d(3, 3, 16)))
    torch.testing.assert_close(out[~masking.mask], kept[~masking.mask])


def test_mim_decoder_without_masking_predicts_every_patch():
    cfg = MIMDecoderConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    decoder = MIMDecoder(12, cfg, patch_size=4)
    assert decoder(torch.randn(3, 1 + 6, 12), None, (2, 3)).shape == (3, 6, 48)
    with pytest.raises(ValueError):
        decoder(torch.randn(3, 1 + 5, 12), None, (2, 3))


def test_mlm_head_ties_only_a_matching_embedding():
    embedding = torch.nn.Embedding(50, 16)
    tied = MLMHead(16, 50, embedding.weight)
    assert tied.tied and tied.decoder.weight is embedding.weight
    own = MLMHead(16, 50)
    assert not own.tied and own.decoder.weight.shape == (50, 16)
    with pytest.raises(ValueError):
        MLMHead(24, 50, embedding.weight)


def test_patchify_layout_and_round_trip():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)
    # patch 4 = second row of patches, second column: rows 2..3, columns 2..3; values ordered (row, col, channel)
    block = images[1, :, 2:4, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4], block)
    assert torch.equal(unpatchify(patches, 2, (2, 3)), images)


def test_alignment_head_normalises_any_number_of_tokens_and_clamps_its_scale():
    head = AlignmentHead(image_width=12, text_width=20, embed_dim=8, temperature=0.05)
    assert head.image_proj.bias is None and head.text_proj.bias is None
    image, text = head.embed_image(torch.randn(3, 5, 12)), head.embed_text(torch.randn(3, 7, 20))
    assert image.shape == (3, 5, 8) and text.shape == (3, 7, 8)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close(head.embed_image(torch.randn(4, 12)).norm(dim=-1), torch.ones(4))
    assert head.scale().item() == pytest.approx(20.0)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.scale().item() == pytest.approx(100.0)
    with pytest.raises(ValueError):
        AlignmentHead(12, 20, embed_dim=8, temperature=0.0)
