"""Co-attention fusion: padding is invisible, streams do see each other, the memory starts as an identity and
costs exactly the parameters worked out by hand."""

import torch

from medvlp.models import CoAttentionFusion, FusionConfig, MemoryBlock

CFG = FusionConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, dropout=0.1)


def _fusion(**memory) -> CoAttentionFusion:
    torch.manual_seed(0)
    return CoAttentionFusion(CFG, text_width=24, image_width=40, **memory).eval()


def _inputs(batch=3, length=7):
    text = torch.randn(batch, length, 24)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return text, mask, torch.randn(batch, 5, 40)


def test_padded_text_positions_change_nothing_at_real_positions():
    fusion = _fusion(memory_slots=6)
    text, mask, image = _inputs()
    base = fusion(text, mask, image)
    # garbage in the padded slots, plus four more padded positions
    garbage = torch.randn(3, 11, 24) * 50
    longer_text = torch.where(torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)[..., None].bool(),
                              torch.cat([text, torch.zeros(3, 4, 24)], 1), garbage)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)
    other = fusion(longer_text, longer_mask, image)
    real = mask.bool()
    for a, b in zip(base.text_states, other.text_states, strict=True):
        torch.testing.assert_close(b[:, :7][real], a[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(base.image_states, other.image_states, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other.joint, base.joint, atol=1e-5, rtol=1e-5)


def test_each_stream_reads_the_other():
    fusion = _fusion()
    text, mask, image = _inputs()
    base = fusion(text, mask, image)
    other = fusion(text, mask, image + 1.0)
    assert not torch.allclose(other.text_states[1], base.text_states[1])
    assert torch.equal(other.text_states[0], base.text_states[0])
    changed_text = text.clone()
    changed_text[0, 0] += 1.0
    other = fusion(changed_text, mask, image)
    assert not torch.allclose(other.image_states[1][0], base.image_states[1][0])
    torch.testing.assert_close(other.image_states[1][1:], base.image_states[1][1:])


def test_outputs_have_per_layer_states_and_a_joint_of_twice_the_width():
    out = _fusion()(*_inputs())
    assert len(out.text_states) == len(out.image_states) == CFG.num_layers + 1
    assert out.text_states[-1].shape == (3, 7, 32) and out.image_states[-1].shape == (3, 5, 32)
    assert out.joint.shape == (3, 64)
    torch.testing.assert_close(out.joint, torch.cat([out.text_pooled, out.image_pooled], -1))


def test_memory_at_initialisation_leaves_the_fusion_output_exactly_unchanged():
    for per_layer in (False, True):
        with_memory = _fusion(memory_slots=8, memory_per_layer=per_layer)
        assert with_memory.memory.shape == ((CFG.num_layers if per_layer else 1), 8, 32)
        without = CoAttentionFusion(CFG, 24, 40).eval()
        missing, unexpected = without.load_state_dict(with_memory.state_dict(), strict=False)
        assert not missing and all("memory" in key for key in unexpected) and unexpected
        inputs = _inputs()
        a, b = with_memory(*inputs), without(*inputs)
        for x, y in zip(a.text_states + a.image_states, b.text_states + b.image_states, strict=True):
            assert torch.equal(x, y)
        assert torch.equal(a.joint, b.joint)


def test_memory_is_read_once_it_has_learned_something():
    fusion = _fusion(memory_slots=8)
    inputs = _inputs()
    before = fusion(*inputs).joint
    for block in fusion.modules():
        if isinstance(block, MemoryBlock):
            torch.nn.init.normal_(block.attn.out.weight, std=0.1)
    assert not torch.allclose(fusion(*inputs).joint, before)
    # and the zero-initialised projection gets a gradient, so it can learn
    fusion = _fusion(memory_slots=8).train()
    fusion(*inputs).joint.square().sum().backward()
    assert fusion.text_memory[0].attn.out.weight.grad.abs().sum() > 0


def test_memory_adds_exactly_the_expected_parameters():
    """With W = width, S = slots, N = fusion layers and M = memory matrices (1 shared, or N per layer):
    extra = M * S * W (the memory) + 2 streams * N layers * 4 linear(W, W) (the read-out's q, k, v, out)
          = M*S*W + 8*N*(W*W + W).  Here W = 32, S = 8, N = 3: 256 * M + 25,344."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    base = count(CoAttentionFusion(CFG, 24, 40))
    w, s, n = CFG.hidden_size, 8, CFG.num_layers
    for per_layer, memories in ((False, 1), (True, n)):
        extra = count(CoAttentionFusion(CFG, 24, 40, memory_slots=s, memory_per_layer=per_layer)) - base
        assert extra == memories * s * w + 8 * n * (w * w + w) == 256 * memories + 25_344


def test_first_only_last_layer_gives_the_whole_layers_first_rows_and_pooled_outputs():
    for memory in ({}, {"memory_slots": 6}):
        fusion = _fusion(**memory)
        text, mask, image = _inputs()
        whole = fusion(text, mask, image)
        for first_only in ((True, True), (True, False), (False, True)):
            short = fusion(text, mask, image, first_only=first_only)
            for states, full, first in ((short.text_states, whole.text_states, first_only[0]),
                                        (short.image_states, whole.image_states, first_only[1])):
                for i, (got, want) in enumerate(zip(states, full, strict=True)):
                    if first and i == len(full) - 1:
                        assert got.shape[1] == 1
                        want = want[:, :1]
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(short.joint, whole.joint, atol=1e-6, rtol=1e-5)


def test_first_only_applies_to_the_last_layer_only_when_the_fusion_runs_to_it():
    fusion = _fusion()
    text, mask, image = _inputs()
    short = fusion(text, mask, image, upto=(3, 1), first_only=(True, True))  # the image stream stops at state 2
    whole = fusion(text, mask, image, upto=(3, 1))
    assert short.text_states[-1].shape[1] == 1 and short.joint is None
    for got, want in zip(short.image_states, whole.image_states, strict=True):
        torch.testing.assert_close(got, want)


def test_attention_dropout_is_unbiased_and_drops_whole_attention_weights():
    """Training on the CPU with attention dropout takes the direct path with ``models.dropout``'s mask: with
    every weight kept it is SDPA's attention scaled by 1 / (1 - p); averaged over many masks it is SDPA's."""
    from unittest import mock

    from medvlp.models import fusion as fusion_module
    from medvlp.models.fusion import MultiHeadAttention

    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 4, dropout=0.25)
    attention.out = torch.nn.Identity()  # compare the attention itself
    query, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    key_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()[:, None, None, :]
    reference = attention.eval()(query, context, key_mask)
    attention.train()
    with mock.patch.object(fusion_module, "dropout", lambda x, p: x / (1 - p)):  # every weight kept
        torch.testing.assert_close(attention(query, context, key_mask), reference / 0.75)
    samples = torch.stack([attention(query, context, key_mask) for _ in range(4000)])
    assert not torch.allclose(samples[0], samples[1])
    torch.testing.assert_close(samples.mean(dim=0), reference, atol=0.03, rtol=0.0)
