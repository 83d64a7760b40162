"""The one weights save/load path: ``MedVLP.save_pretrained`` / ``MedVLP.from_pretrained`` round-trip every kind
of model a run holds (pre-training, with the Lightning prefix; fine-tuned with a classifier; MPMA's memory and
M3AE's untied decoder), and refuse what does not fit or was damaged, in one line."""

import pytest
import torch

from medvlp.errors import MedvlpError
from medvlp.integrity import checksum_path
from medvlp.models import build_model, model_config
from medvlp.models.model import MedVLP

KINDS = {
    "pre-training (MPMA memory)": (dict(memory_slots=4), "model."),
    "fine-tuned classifier": (dict(num_classes=5), ""),
    "M3AE reference choices": (dict(tie_mlm_weights=False, classifier_expansion=1, num_classes=3,
                                    mim_decoder={"activation": "quick_gelu", "positions": "column_first"}), ""),
}


def batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
            "input_ids": torch.randint(5, vocab, (2, 9), generator=generator),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_model_loads_back_identical(tmp_path, kind):
    overrides, prefix = KINDS[kind]
    cfg = model_config("tiny", text={"vocab_size": 300}, **overrides)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    model.save_pretrained(tmp_path / "model.safetensors", {"step": "7"}, prefix=prefix)
    assert checksum_path(tmp_path / "model.safetensors").is_file()

    loaded = MedVLP.from_pretrained(cfg, tmp_path / "model.safetensors", prefix=prefix)
    assert not loaded.training
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        a = model(batch(300), itm=True, classify=bool(cfg.num_classes))
        b = loaded(batch(300), itm=True, classify=bool(cfg.num_classes))
    assert torch.equal(a.itm_logits, b.itm_logits)


def test_weights_of_another_model_are_one_line(tmp_path):
    path = tmp_path / "model.safetensors"
    build_model(model_config("tiny", text={"vocab_size": 300}, memory_slots=4)).save_pretrained(path)
    with pytest.raises(MedvlpError, match=r"model.safetensors does not fit the model of run.yaml: 0 weights missing"
                                          r".*, \d+ unexpected \(e.g. \['fusion.image_memory"):
        MedVLP.from_pretrained(model_config("tiny", text={"vocab_size": 300}), path, source="run.yaml")
    with pytest.raises(MedvlpError, match=r"does not fit the model of run.yaml: 2 weights of another shape \(e.g. "
                                          r"align_head.image_proj.weight: \[128, 128\] in the file, \[64, 128\]"):
        MedVLP.from_pretrained(model_config("tiny", text={"vocab_size": 300}, memory_slots=4, embed_dim=64), path,
                               source="run.yaml")


def test_a_damaged_weights_file_fails_its_checksum(tmp_path):
    cfg = model_config("tiny", text={"vocab_size": 300})
    path = tmp_path / "model.safetensors"
    build_model(cfg).save_pretrained(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the tensor data: still a readable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(MedvlpError, match="checksum"):
        MedVLP.from_pretrained(cfg, path)
