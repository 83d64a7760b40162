"""Model configs: named sizes, overrides, and one-line ConfigErrors for bad values."""

import pytest

from medvlp.errors import ConfigError
from medvlp.models import ModelConfig, model_config, model_sizes, size_spec


def test_base_is_the_papers_model():
    cfg = model_config("base")
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads, cfg.vision.intermediate_size) == (
        768, 12, 12, 3072)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.vocab_size, cfg.text.max_position_embeddings) == (
        768, 12, 50265, 514)
    assert (cfg.fusion.hidden_size, cfg.fusion.num_layers, cfg.fusion.num_heads) == (768, 6, 12)
    assert (cfg.mim_decoder.hidden_size, cfg.mim_decoder.num_layers, cfg.mim_decoder.num_heads) == (384, 4, 6)
    assert (cfg.image_size, cfg.patch_size, cfg.image_mask_ratio, cfg.text_mask_ratio) == (288, 16, 0.75, 0.15)
    assert cfg.mim_layer == 3 and cfg.mlm_layer_index == 6 and cfg.norm_pix_loss and cfg.memory_slots == 0
    assert (cfg.embed_dim, cfg.temperature) == (256, 0.07)


def test_tiny_reads_the_middle_fusion_layer():
    cfg = model_config("tiny")
    assert cfg.fusion.num_layers == 2 and cfg.mim_layer == 1 and cfg.mlm_layer_index == 2
    assert cfg.image_size % cfg.patch_size == 0


def test_overrides_apply_and_do_not_leak_into_the_named_sizes():
    cfg = model_config("tiny", text={"vocab_size": 777}, image_size=96, memory_slots=4)
    assert (cfg.text.vocab_size, cfg.image_size, cfg.memory_slots) == (777, 96, 4)
    cfg.text.vocab_size = 5
    assert model_config("tiny").text.vocab_size == 4096


def test_the_named_sizes_are_data_files_listed_by_a_function():
    assert model_sizes() == ["base", "tiny"]
    assert model_config("base") == ModelConfig()  # the dataclass defaults are the papers' size
    tiny = model_config("tiny")
    assert (tiny.vision.hidden_size, tiny.image_size, tiny.mim_layer) == (128, 64, 1)
    assert size_spec("tiny")["finetune_image_size"] == 80 and size_spec("base")["pretrain_optim"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="unknown model size 'huge'; known sizes: base, tiny"):
        model_config("huge")


def test_unknown_size_names_the_known_ones():
    with pytest.raises(ConfigError, match="tiny.*base|base.*tiny"):
        model_config("huge")


@pytest.mark.parametrize("overrides, words", [
    ({"image_mask_ratio": 0.0}, "image_mask_ratio"),
    ({"image_mask_ratio": 1.0}, "image_mask_ratio"),
    ({"text_mask_ratio": -0.1}, "text_mask_ratio"),
    ({"image_size": 70}, "not divisible"),
    ({"fusion": {"hidden_size": 130}}, "fusion.hidden_size"),
    ({"vision": {"num_heads": 0}}, "vision.hidden_size"),
    ({"mim_decoder": {"hidden_size": 90, "num_heads": 3}}, "divisible by 4"),
    ({"mim_layer": 3}, "mim_layer"),
    ({"mim_layer": -1}, "mim_layer"),
    ({"mlm_layer": 7}, "mlm_layer"),
    ({"memory_slots": -2}, "memory_slots"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -0.07}, "temperature"),
    ({"text": {"vocab_size": 0}}, "vocab_size"),
    ({"text": {"pad_token_id": 5000}}, "pad_token_id"),
    ({"image_sise": 64}, "image_sise"),
    ({"image_size": "big"}, "image_size"),
])
def test_bad_values_give_one_line_config_errors(overrides, words):
    with pytest.raises(ConfigError) as caught:
        model_config("tiny", **overrides)
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_validate_returns_the_config_and_checks_direct_construction():
    assert ModelConfig().validate().image_size == 288
    with pytest.raises(ConfigError, match="mim_layer"):
        ModelConfig(mim_layer=9).validate()
