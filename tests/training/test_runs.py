"""``open_run``: the one way back from a run folder to a model. Every kind of folder medvlp writes (a pre-training
run, one of its checkpoints, a fine-tuned run, an export; converted runs in tests/test_convert.py) opens to the
weights that were saved, built from the model's own ``model.yaml``; a run written before model.yaml existed
still opens; the wrong kind for a job is one line."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import TINY_CORPUS

from medvlp.config import load_config
from medvlp.constants import MODEL_CONFIG, WEIGHTS
from medvlp.errors import MedvlpError
from medvlp.models.config import ModelConfig
from medvlp.training.checkpoint import load_weights, resolve_checkpoint
from medvlp.training.config import FinetuneConfig, PretrainConfig
from medvlp.training.runs import open_run


def same_weights(model, saved: dict, prefix: str = "") -> bool:
    mine = model.state_dict()
    return mine.keys() == {k.removeprefix(prefix) for k in saved} and all(
        torch.equal(mine[k.removeprefix(prefix)], v) for k, v in saved.items())


def test_a_pretraining_run_and_each_of_its_checkpoints(tiny_pretrain_run):
    checkpoint = resolve_checkpoint(tiny_pretrain_run)
    assert (checkpoint / MODEL_CONFIG).is_file()  # the checkpoint carries its model's config
    for path in (tiny_pretrain_run, tiny_pretrain_run / "checkpoints", checkpoint):
        run = open_run(path)
        assert run.kind == "pre-trained" and run.path == checkpoint and isinstance(run.config, PretrainConfig)
        assert run.task is None and run.classes == [] and not run.model.training
        assert run.model.cfg == load_config(ModelConfig, checkpoint / MODEL_CONFIG)
        assert same_weights(run.model, load_weights(checkpoint / WEIGHTS), prefix="model.")
        assert run.max_text_len == run.config.data.max_text_len and run.aligned  # MPMA trains the alignment


def test_a_finetuned_run(tiny_pretrain_run, tiny_finetuned_run):
    run = open_run(tiny_finetuned_run, "fine-tuned")
    assert run.kind == "fine-tuned" and isinstance(run.config, FinetuneConfig) and run.task == "vqa"
    assert run.classes == run.config.classes and run.model.classifier.num_classes == len(run.classes)
    assert run.model.cfg.image_size == 80  # the fine-tuning size, from model.yaml
    assert same_weights(run.model, load_weights(tiny_finetuned_run / WEIGHTS))
    init = open_run(tiny_pretrain_run).tokenizer  # fine-tuning kept the tokenizer of its init
    assert run.tokenizer("a round lesion")["input_ids"] == init("a round lesion")["input_ids"]


def test_an_export_holds_the_pretrained_encoders(tiny_pretrain_run, tmp_path):
    from medvlp.jobs.export import export_encoders

    export_encoders(tiny_pretrain_run, tmp_path / "export")
    run, source = open_run(tmp_path / "export"), open_run(tiny_pretrain_run)
    assert run.kind == "exported" and run.config is None and not run.aligned
    for part in ("vision", "text"):
        a, b = getattr(run.model, part).state_dict(), getattr(source.model, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.max_text_len == run.model.cfg.text.max_position_embeddings - 2


@pytest.mark.parametrize("kind", ["pre-trained", "fine-tuned"])
def test_a_run_written_before_model_yaml_still_opens(tiny_pretrain_run, tiny_finetuned_run, tmp_path, kind):
    source = {"pre-trained": tiny_pretrain_run, "fine-tuned": tiny_finetuned_run}[kind]
    old = shutil.copytree(source, tmp_path / "old")
    for own in old.rglob(MODEL_CONFIG):
        own.unlink()  # the previous version wrote no model.yaml: the run config's model section builds it
    run, now = open_run(old), open_run(source)
    assert run.kind == kind and run.model.cfg == now.model.cfg
    assert same_weights(run.model, now.model.state_dict())


def test_the_wrong_kind_or_no_run_is_one_line(tiny_pretrain_run, tiny_finetuned_run, tmp_path):
    with pytest.raises(MedvlpError, match=r"is not a fine-tuned run .*; it looks like a pre-training run$"):
        open_run(tiny_pretrain_run, "fine-tuned")
    with pytest.raises(MedvlpError, match=r"is not a pre-training run .*; it looks like a fine-tuned run$"):
        open_run(tiny_finetuned_run, "pre-trained")
    with pytest.raises(MedvlpError, match="no such run folder"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedvlpError, match="not a medvlp checkpoint"):
        open_run(tmp_path / "empty")


def test_an_export_is_no_init_for_finetune_and_says_how_to_start_from_it(tiny_pretrain_run, tmp_path):
    from medvlp.jobs.export import export_encoders
    from medvlp.training.config import load_finetune_config
    from medvlp.training.finetune import finetune

    export_encoders(tiny_pretrain_run, tmp_path / "export")
    config = load_finetune_config(None, ["task=vqa", f"run_dir={tmp_path / 'ft'}", f"init={tmp_path / 'export'}",
                                         f"synthetic_dir={tiny_pretrain_run.parent / 'data'}",
                                         *[f"synthetic.{s}" for s in TINY_CORPUS]])
    with pytest.raises(MedvlpError, match=r"is an export \(the encoders only\); start from it with init=null "
                                          r"model.vision.pretrained=.*export/vision"):
        finetune(config)
