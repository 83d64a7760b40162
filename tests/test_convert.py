"""`medvlp convert m3ae`: checkpoint formats, refusals in one line, and convert -> evaluate -> predict as a user
would, on the golden M3AE fixture A (../shared/reference/m3ae/A)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from safetensors.torch import load_file, save_file

from medvlp.cli import main
from medvlp.convert import convert_m3ae
from medvlp.data.text import reference_answer
from medvlp.errors import MedvlpError
from medvlp.training.checkpoint import load_weights

FIXTURE = ROOT.parent / "shared" / "reference" / "m3ae" / "A"
pytestmark = pytest.mark.skipif(not (FIXTURE / "config.json").is_file(), reason=f"no fixture at {FIXTURE}")


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    """Fixture A's VQA state dict, its reference configs as files, and a small local tokenizer."""
    from medvlp.data.tokenizer import train_tokenizer

    work = tmp_path_factory.mktemp("convert")
    config = json.loads((FIXTURE / "config.json").read_text())
    (work / "vqa.json").write_text(json.dumps(config["tasks"]["vqa"]["resolved"]))
    (work / "roberta.json").write_text(json.dumps(next(v for k, v in config.items() if k.startswith("tiny_roberta"))))
    train_tokenizer(["is there a mass in the brain", "which side is the lesion on"] * 4, work / "tok", vocab_size=300)
    return work, config, load_file(str(FIXTURE / "state_dict_vqa.safetensors"))


def convert_args(work: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "m3ae", str(checkpoint), "--out", str(out), "--reference-config", str(work / "vqa.json"),
            "--text-config", str(work / "roberta.json"), "--tokenizer", str(work / "tok"), *extra]


def refused(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- formats ------------------------------------------------------------------------------------------------------
def test_lightning_ckpt_with_hyper_parameters_converts_like_the_safetensors_file(fixture_files, tmp_path):
    work, config, state = fixture_files
    ckpt = tmp_path / "m3ae.ckpt"  # what Lightning writes: the weights and the run's config, plain containers
    from lightning.fabric.utilities.data import (
        AttributeDict,  # Lightning stores hyper_parameters in one
    )

    torch.save({"epoch": 3, "global_step": 10, "state_dict": state,
                "hyper_parameters": AttributeDict(config=config["tasks"]["vqa"]["resolved"])}, ckpt)
    safetensors = tmp_path / "m3ae.safetensors"
    save_file(state, str(safetensors))
    quiet = {"tokenizer": str(work / "tok"), "text_config": work / "roberta.json", "report": lambda line: None}
    a = convert_m3ae(ckpt, tmp_path / "a", **quiet)  # heads and sizes from the ckpt's hyper_parameters
    b = convert_m3ae(safetensors, tmp_path / "b", reference_config=work / "vqa.json", **quiet)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "config.yaml").read_text() == (b / "config.yaml").read_text().replace(str(tmp_path / "b"),
                                                                                        str(tmp_path / "a"))
    assert json.loads((a / "converted.json").read_text())["task"] == "vqa"


# -- refusals -----------------------------------------------------------------------------------------------------
def test_a_missing_key_is_refused_naming_it_and_its_shape(fixture_files, tmp_path, capsys):
    work, _, state = fixture_files
    name = "multi_modal_vision_layers.1.crossattention.self.key.bias"
    save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / "cut.safetensors"))
    err = refused(capsys, convert_args(work, tmp_path / "cut.safetensors", tmp_path / "run"))
    assert f"missing key {name} [{state[name].shape[0]}]" in err
    assert not (tmp_path / "run").exists()


def test_a_wrong_shape_is_refused_naming_the_key_and_both_shapes(fixture_files, tmp_path, capsys):
    work, _, state = fixture_files
    name = "multi_modal_language_layers.2.intermediate.dense.weight"
    bad = dict(state, **{name: torch.zeros(7, state[name].shape[1])})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    err = refused(capsys, convert_args(work, tmp_path / "bad.safetensors", tmp_path / "run"))
    assert f"key {name} has shape [7, {state[name].shape[1]}], expected {list(state[name].shape)}" in err


def test_an_unexpected_key_is_refused(fixture_files, tmp_path, capsys):
    work, _, state = fixture_files
    save_file(dict(state, **{"extra_head.weight": torch.zeros(3, 2)}), str(tmp_path / "x.safetensors"))
    assert "unexpected key extra_head.weight [3, 2]" in refused(
        capsys, convert_args(work, tmp_path / "x.safetensors", tmp_path / "run"))


class _Touch:
    """A pickled callable: unpickling it would create a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_ckpt_carrying_a_pickled_callable_is_refused_without_running_it(fixture_files, tmp_path, capsys):
    work, _, state = fixture_files
    witness = tmp_path / "it-ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callbacks": _Touch(witness)}, ckpt)
    err = refused(capsys, convert_args(work, ckpt, tmp_path / "run"))
    assert "refused" in err and "pickled objects" in err
    assert not witness.exists()


# -- convert -> evaluate -> predict --------------------------------------------------------------------------------
ANSWERS = [("yes", "closed"), ("no", "closed"), ("left", "open"), ("right", "open"), ("two", "open"),
           ("the brain", "open"), ("CT", "open"), ("2", "open"), ("brain", "open")]
"""Nine stored answers, seven labels by the reference's normalisation ("two" = "2", "the brain" = "brain"), as
many as fixture A's VQA head."""


def vqa_rad_like(raw: Path) -> None:
    """A tiny raw VQA-RAD in the layout M3AE uses (trainset.json, testset.json, the image folder)."""
    images = raw / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (72, 80), dtype=np.uint8), "L").save(images / f"img{i}.png")
    rows = [{"qid": i, "image_name": f"img{i % 6}.png", "question": f"question {i} about the scan?",
             "answer": answer, "answer_type": kind.upper()} for i, (answer, kind) in enumerate(ANSWERS * 2)]
    (raw / "trainset.json").write_text(json.dumps(rows[:9]))
    (raw / "testset.json").write_text(json.dumps(rows[9:]))


def test_convert_evaluate_predict_as_a_user(fixture_files, tmp_path, capsys):
    work, _, state = fixture_files
    save_file(state, str(tmp_path / "m3ae_vqa.safetensors"))
    vqa_rad_like(tmp_path / "raw")
    assert main(["prepare", "vqa_rad", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "data")]) == 0
    run = tmp_path / "m3ae-vqa"
    assert main(convert_args(work, tmp_path / "m3ae_vqa.safetensors", run, "--data", str(tmp_path / "data"))) == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "tokenizer" in out

    labels = list(dict.fromkeys(reference_answer(a) for a, _ in ANSWERS))
    from medvlp.config import load_config
    from medvlp.training.finetune import FinetuneConfig

    config = load_config(FinetuneConfig, run / "config.yaml")
    assert config.classes == labels and len(labels) == 7 and config.answer_normalization == "m3ae"

    assert main(["evaluate", str(run)]) == 0
    line = capsys.readouterr().out
    assert "test (9 rows)" in line and "overall_acc" in line and "closed_acc" in line

    assert main(["predict", str(run), "--image", str(tmp_path / "raw" / "VQA_RAD Image Folder" / "img0.png"),
                 "--question", "is there a mass?", "--top", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and all(line.split(maxsplit=1)[1] in labels for line in printed)

    from medvlp.predict import load

    answers = load(run).answer(tmp_path / "raw" / "VQA_RAD Image Folder" / "img1.png", "which side?", k=7)
    assert sorted(a for a, _ in answers) == sorted(labels)
    assert all(0.0 <= p <= 1.0 for _, p in answers)


def test_a_converted_pretraining_checkpoint_is_an_init_for_finetune(tmp_path, fixture_files):
    work, config, _ = fixture_files
    (work / "pretrain.json").write_text(json.dumps(config["tasks"]["pretrain"]["resolved"]))
    run = convert_m3ae(FIXTURE / "state_dict_pretrain.safetensors", tmp_path / "pre", tokenizer=str(work / "tok"),
                       reference_config=work / "pretrain.json", text_config=work / "roberta.json",
                       report=lambda line: None)
    from medvlp.training.runs import open_run

    opened = open_run(run)
    model, classes, task = opened.model, opened.classes, opened.task
    assert opened.kind == "pre-trained" and task is None and classes == []
    assert (opened.path / "model.yaml").is_file()  # written as a pre-training checkpoint, with its model's config
    assert model.cfg.fusion.num_layers == config["tasks"]["pretrain"]["resolved"]["num_top_layer"]
    assert not model.cfg.tie_mlm_weights and model.cfg.mim_decoder.activation == "quick_gelu"
    with pytest.raises(MedvlpError, match="not empty"):
        convert_m3ae(FIXTURE / "state_dict_pretrain.safetensors", run, report=lambda line: None)


def test_sizes_come_from_the_tensors_not_from_set_a(fixture_files, tmp_path):
    """Another CLIP width and grid, another fusion width and depth, another head size: a reference-layout state
    dict written from a medvlp model of those sizes converts back to the same weights."""
    import re

    from medvlp.convert import V, _reference_name
    from medvlp.models.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
    from medvlp.models.model import build_model
    from medvlp.training.runs import open_run

    work, _, _ = fixture_files
    cfg = ModelConfig(vision=VisionConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
                      text=TextConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                                      vocab_size=400, max_position_embeddings=40),
                      fusion=FusionConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=384),
                      image_size=96, num_classes=9, classifier_expansion=1, tie_mlm_weights=False)
    model = build_model(cfg)
    reference, packed = {}, {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("mlm_head.", "mim_decoder.", "itm_head.", "align_head.")):
            continue  # a VQA model of the reference has none of these
        m = re.match(r"vision\.model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            key = f"{V}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}"
            packed.setdefault(key, {})[m.group(2)] = tensor
        else:
            reference[_reference_name(name, "vqa")] = tensor
    reference.update({key: torch.cat([parts["q"], parts["k"], parts["v"]]) for key, parts in packed.items()})
    reference["vision_encoder.token_embedding.weight"] = torch.zeros(5, 4)  # CLIP text-tower leftover: dropped
    save_file(reference, str(tmp_path / "other.safetensors"))
    run = convert_m3ae(tmp_path / "other.safetensors", tmp_path / "run", tokenizer=str(work / "tok"),
                       reference_config={"num_heads": 4}, text_config={"num_attention_heads": 4},
                       report=lambda line: None)
    opened = open_run(run)
    converted, classes, task = opened.model, opened.classes, opened.task
    assert task == "vqa" and len(classes) == 9 and converted.cfg.image_size == 96
    assert (converted.cfg.vision.hidden_size, converted.cfg.vision.num_heads, converted.cfg.fusion.num_layers) == (
        128, 2, 3)
    mine = converted.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in model.state_dict().items()
               if not k.startswith(("mlm_head.", "mim_decoder.", "itm_head.", "align_head.")))
    from medvlp.config import load_config
    from medvlp.models.config import ModelConfig

    assert opened.kind == "fine-tuned" and converted.cfg == load_config(ModelConfig, run / "model.yaml")
    assert converted.cfg.itm_score == "matched"  # the reference's choices travel with the model's own config
