"""Pretrained encoders load through Hugging Face's own code; bad paths and wrong architectures are ConfigErrors."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    RobertaConfig,
    RobertaModel,
)

from medvlp.errors import ConfigError
from medvlp.models import build_model, model_config

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=16)
TEXT = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    vision.save_pretrained(root / "clip-vision")
    clip = CLIPModel(CLIPConfig(vision_config=VISION, projection_dim=16,
                                text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4)))
    clip.save_pretrained(root / "clip")
    roberta = RobertaModel(RobertaConfig(**TEXT))
    roberta.save_pretrained(root / "roberta")
    bert = BertModel(BertConfig(**{**TEXT, "pad_token_id": 0}))
    bert.save_pretrained(root / "bert")
    (root / "empty").mkdir()
    return root, {"clip-vision": vision, "clip": clip.vision_model, "roberta": roberta, "bert": bert}


def _build(vision=None, text=None):
    return build_model(model_config("tiny", image_size=32, vision={"pretrained": vision}, text={"pretrained": text}))


def _assert_same_weights(ours, theirs):
    theirs = {k: v for k, v in theirs.state_dict().items() if not k.startswith("pooler.")}  # we drop the pooler
    ours = ours.state_dict()
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("name", ["clip-vision", "clip"])
def test_vision_weights_arrive_from_a_vision_or_a_full_clip_checkpoint(checkpoints, name):
    root, originals = checkpoints
    model = _build(vision=str(root / name))
    _assert_same_weights(model.vision.model, originals[name])
    assert model.cfg.vision.hidden_size == 64 and model.fusion.image_proj.in_features == 64
    out = model({"pixels": torch.zeros(2, 3, 48, 48, dtype=torch.uint8), "input_ids": torch.zeros(2, 5).long(),
                 "attention_mask": torch.ones(2, 5).long()})  # 48 px on a 32-px checkpoint: interpolated positions
    assert out.image_features.shape == (2, 1 + 9, 64)


@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_text_weights_arrive_and_sizes_come_from_the_checkpoint(checkpoints, name):
    root, originals = checkpoints
    model = _build(text=str(root / name))
    _assert_same_weights(model.text.model, originals[name])
    assert model.text.model.pooler is None
    assert (model.cfg.text.hidden_size, model.cfg.text.vocab_size) == (48, 120)
    assert model.fusion.text_proj.in_features == 48
    assert not model.mlm_head.tied  # 48-wide embeddings, 128-wide fusion


def test_missing_path_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "clip"
    for kwargs in ({"vision": str(missing)}, {"text": str(missing)}):
        with pytest.raises(ConfigError, match="does not exist") as caught:
            _build(**kwargs)
        assert str(missing) in str(caught.value) and "\n" not in str(caught.value)


def test_wrong_architecture_is_a_config_error_naming_path_and_expectation(checkpoints):
    root, _ = checkpoints
    with pytest.raises(ConfigError, match="'bert'.*CLIP vision") as caught:
        _build(vision=str(root / "bert"))
    assert str(root / "bert") in str(caught.value)
    with pytest.raises(ConfigError, match="'clip'.*text encoder") as caught:
        _build(text=str(root / "clip"))
    assert str(root / "clip") in str(caught.value)
    with pytest.raises(ConfigError, match="no config.json"):
        _build(vision=str(root / "empty"))


def test_patch_size_must_match_the_checkpoint(checkpoints):
    root, _ = checkpoints
    with pytest.raises(ConfigError, match="patch"):
        build_model(model_config("tiny", image_size=64, patch_size=8,
                                 vision={"pretrained": str(root / "clip-vision")}))


def test_a_checkpoint_missing_weights_is_a_config_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = checkpoints
    CLIPVisionConfig(**VISION).save_pretrained(tmp_path)
    weights = load_file(root / "clip-vision" / "model.safetensors")
    del weights["encoder.layers.1.mlp.fc2.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lacks 1 weights.*fc2"):
        _build(vision=str(tmp_path))


def test_drop_last_layers_keeps_the_first_blocks_of_a_pretrained_vision_tower(checkpoints):
    root, originals = checkpoints  # M3AE uses 11 of CLIP's 12 blocks: model.vision.drop_last_layers=1
    model = build_model(model_config("tiny", image_size=32, vision={"pretrained": str(root / "clip-vision"),
                                                                    "drop_last_layers": 1}))
    assert len(model.vision.model.encoder.layers) == 1 and model.cfg.vision.num_layers == 1
    kept = originals["clip-vision"].encoder.layers[0].state_dict()
    assert all(torch.equal(v, kept[k]) for k, v in model.vision.model.encoder.layers[0].state_dict().items())
    with pytest.raises(ConfigError, match="drop_last_layers"):
        build_model(model_config("tiny", image_size=32, vision={"pretrained": str(root / "clip-vision"),
                                                                "drop_last_layers": 2}))
