"""The one weights save/load path: ``MedVLP.save_pretrained(folder)`` / ``MedVLP.from_pretrained(folder)``
round-trip every kind of model a run holds (pre-training, with the Lightning prefix; fine-tuned with a classifier;
MPMA's memory and M3AE's untied decoder) from the folder alone (weights + ``model.yaml``), and refuse what does
not fit or was damaged, in one line."""

import dataclasses

import pytest
import torch

from medvlp.errors import MedvlpError
from medvlp.integrity import checksum_path
from medvlp.models import build_model
from medvlp.models.model import MedVLP

KINDS = {
    "pre-training (MPMA memory)": (dict(memory_slots=4), "model."),
    "fine-tuned classifier": (dict(num_classes=5), ""),
    "M3AE reference choices": (dict(tie_mlm_weights=False, classifier_expansion=1, num_classes=3), ""),
}


def batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
            "input_ids": torch.randint(5, vocab, (2, 9), generator=generator),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_model_loads_back_identical_from_its_folder_alone(tmp_path, tiny_config, kind):
    overrides, prefix = KINDS[kind]
    cfg = dataclasses.replace(tiny_config, **overrides)
    if kind.startswith("M3AE"):
        cfg = dataclasses.replace(cfg, mim_decoder=dataclasses.replace(cfg.mim_decoder, activation="quick_gelu",
                                                                        positions="column_first"))
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    model.resize_image(48)  # a fine-tuning size: the saved config says so, nobody has to remember it
    weights = model.save_pretrained(tmp_path / "saved", {"step": "7"}, prefix=prefix)
    assert weights == tmp_path / "saved" / "model.safetensors" and checksum_path(weights).is_file()
    assert (tmp_path / "saved" / "model.yaml").is_file()

    loaded = MedVLP.from_pretrained(tmp_path / "saved", prefix=prefix)
    assert not loaded.training and loaded.cfg == model.cfg
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        pixels = {**batch(300), "pixels": batch(300)["pixels"][..., :48, :48]}
        a = model(pixels, itm=True, classify=bool(cfg.num_classes))
        b = loaded(pixels, itm=True, classify=bool(cfg.num_classes))
    assert torch.equal(a.itm_logits, b.itm_logits)


def test_weights_of_another_model_are_one_line(tmp_path, tiny_config):
    build_model(dataclasses.replace(tiny_config, memory_slots=4)).save_pretrained(tmp_path)
    own = tmp_path / "model.yaml"
    own.write_text(own.read_text().replace("memory_slots: 4", "memory_slots: 0"))
    with pytest.raises(MedvlpError, match=r"model.safetensors does not fit the model of .*model.yaml: 0 weights "
                                          r"missing.*, \d+ unexpected \(e.g. \['fusion.image_memory"):
        MedVLP.from_pretrained(tmp_path)
    own.write_text(own.read_text().replace("memory_slots: 0", "memory_slots: 4").replace("embed_dim: 128",
                                                                                         "embed_dim: 64"))
    with pytest.raises(MedvlpError, match=r"does not fit the model of .*model.yaml: 2 weights of another "
                                          r"shape \(e.g. align_head.image_proj.weight: \[128, 128\] in the file, "
                                          r"\[64, 128\]"):
        MedVLP.from_pretrained(tmp_path)


def test_without_its_config_a_folder_needs_a_default(tmp_path, tiny_model, tiny_config):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "model.yaml").unlink()  # as a run written before model.yaml existed
    with pytest.raises(MedvlpError, match="no model.yaml beside the weights"):
        MedVLP.from_pretrained(tmp_path)
    loaded = MedVLP.from_pretrained(tmp_path, default_config=tiny_config)
    mine, theirs = tiny_model.state_dict(), loaded.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_damaged_weights_file_fails_its_checksum(tmp_path, tiny_model):
    path = tiny_model.save_pretrained(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the tensor data: still a readable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(MedvlpError, match="checksum"):
        MedVLP.from_pretrained(tmp_path)
