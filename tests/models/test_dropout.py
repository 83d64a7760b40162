"""Dropout with the cheaper CPU mask: the rate, the scale, the gradient, reproducibility, and the swap into a
Hugging Face encoder."""

import pytest
import torch

from medvlp.models.dropout import Dropout, dropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_element_is_dropped_with_probability_p(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1001), p)  # an odd count: the last 64-bit draw is used by half
    assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
    dropped = 1 - mask.float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    # no pattern along either axis: every row and column drops about p
    assert (1 - mask.float().mean(dim=0)).sub(p).abs().max() < 0.07
    assert (1 - mask.float().mean(dim=1)).sub(p).abs().max() < 0.07


def test_kept_values_are_scaled_dropped_ones_are_zero_and_the_gradient_follows_the_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.2)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    weight = torch.randn(64, 33)
    (out * weight).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, weight / 0.8, 0.0))


def test_eval_mode_and_rate_zero_return_the_input_and_draw_nothing():
    x = torch.randn(8, 8)
    state = torch.get_rng_state()
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_the_same_seed_gives_the_same_mask():
    x = torch.randn(100, 100)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1), a)
    assert not torch.equal(dropout(x, 0.1), a)


def test_the_text_encoders_dropout_layers_are_swapped_and_its_weights_keep_their_names():
    from medvlp.models.config import TextConfig
    from medvlp.models.encoders import build_text_encoder

    encoder = build_text_encoder(TextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                            vocab_size=300, max_position_embeddings=40, dropout=0.1))
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert layers and all(type(m) is Dropout and m.p == 0.1 for m in layers)
    assert use_fast_dropout(encoder) == 0  # nothing plain left
    names = set(encoder.state_dict())
    assert any("word_embeddings" in n for n in names) and not any("dropout" in n for n in names)
