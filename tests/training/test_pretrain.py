"""Pre-training end to end on a small synthetic corpus: a run, resume equivalence, NaN stop, bad configs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import tiny_model_and_batch

from medvlp.errors import ConfigError, MedvlpError
from medvlp.training.checkpoint import WEIGHTS, load_weights, resolve_checkpoint
from medvlp.training.pretrain import TrainingDiverged, load_pretrain_config, pretrain

SMALL_CORPUS = [f"data.synthetic.{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
                for split, n in (("train", 48), ("val", 8), ("test", 4))]


def config(tmp_path, name, *extra):
    return load_pretrain_config(None, [
        f"run_dir={tmp_path / name}", f"data.synthetic_dir={tmp_path / 'data'}", "data.batch_size=4",
        "data.num_workers=0", "trainer.max_steps=6", "trainer.val_every=3", "trainer.val_batches=1",
        "trainer.checkpoint_every=3", "trainer.pictures=2", "trainer.progress_bar=false", "data.vocab_size=400",
        "data.synthetic.workers=1", *SMALL_CORPUS, *extra])


class StopAfter(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_run_writes_checkpoints_logs_pictures_and_config(tmp_path):
    run = pretrain(config(tmp_path, "run"))
    checkpoint = resolve_checkpoint(run)
    assert checkpoint.name == "step-000006" and (checkpoint / WEIGHTS).is_file()
    assert sorted(p.name for p in (run / "pictures").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert (run / "logs" / "version_0" / "metrics.csv").read_text().count("val/mlm_acc") == 1
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert "val/itm_acc" in json.loads((run / "metrics.json").read_text())  # M3AE: its ITM pass is the protocol
    with pytest.raises(MedvlpError, match="already holds a run"):
        pretrain(config(tmp_path, "run"))


def test_resumed_run_reaches_the_same_weights(tmp_path):
    whole = resolve_checkpoint(pretrain(config(tmp_path, "whole")))
    part = pretrain(config(tmp_path, "part"), callbacks=[StopAfter(3)])
    assert resolve_checkpoint(part).name == "step-000003"
    resumed = resolve_checkpoint(pretrain(config(tmp_path, "part"), resume=True))
    assert resumed.name == "step-000006"
    assert sorted(p.name for p in (tmp_path / "part" / "logs").iterdir()) == ["version_0", "version_1"]
    a, b = load_weights(whole / WEIGHTS), load_weights(resumed / WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = load_weights(resolve_checkpoint(part).parent / "step-000003" / WEIGHTS)
    assert not all(torch.equal(a[k], changed[k]) for k in a)  # the second half did train


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    module.model.mim_decoder.predict.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss became nan at step 4 .*last good checkpoint"):
        pretrain(config(tmp_path, "nan"), callbacks=[Poison()])
    assert resolve_checkpoint(tmp_path / "nan").name == "step-000003"


@pytest.mark.parametrize("override, message", [
    ("model_size=huge", "unknown model size 'huge'; known sizes: base, tiny"),
    ("model.image_mask_ratio=1.5", "image_mask_ratio = 1.5 must lie strictly between 0 and 1"),
    ("model.image_size=70", "image_size = 70 is not divisible by model.patch_size = 16"),
    ("model.vision.pretrained=/no/such/dir", "/no/such/dir"),
    ("trainer.max_step=3", "did you mean 'max_steps'"),
    ("data.crop_scale=[0.8,0.5]", r"data.crop_scale = \[0.8, 0.5\]: need 0 < low <= high <= 1"),
])
def test_bad_config_values_give_one_line(tmp_path, override, message):
    with pytest.raises((ConfigError, MedvlpError), match=message) as error:
        pretrain(config(tmp_path, "bad", override))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("off", ["mlm", "mim"])
def test_pictures_of_a_paired_run_without_mlm_or_mim(tmp_path, off):
    from medvlp.data.tokenizer import train_tokenizer
    from medvlp.objectives.recipes import pretrain_losses
    from medvlp.training.config import TasksConfig
    from medvlp.training.pictures import save_pretrain_picture

    net, batch = tiny_model_and_batch()
    _, _, passes = pretrain_losses(net, batch, TasksConfig(paired_masking=True, **{off: 0.0}))
    assert off not in passes and "pair" in passes
    tokenizer = train_tokenizer(["a small round lesion in the left lung"] * 4, tmp_path / "tok", vocab_size=300)
    assert save_pretrain_picture(tmp_path / "p.png", net, batch, passes, tokenizer, 2).is_file()


@pytest.mark.parametrize("name", ["m3ae-tiny", "mpma-tiny", "m3ae-base", "mpma-base"])
def test_shipped_configs_load_and_say_what_the_papers_do(name):
    from pathlib import Path

    from medvlp.cli import config_path

    config = load_pretrain_config(config_path(Path(name)), [])
    mpma = name.startswith("mpma")
    assert config.model_size == name.split("-")[1]
    assert config.tasks.hard_negatives == mpma
    assert config.tasks.paired_masking == (name == "mpma-base")  # tiny: MLM needs the whole image (its config)
    assert bool(config.tasks.itc) == bool(config.tasks.local) == mpma
    assert (config.model.memory_slots > 0) == mpma
    assert not config.tasks.align_whole_image  # it only matters under paired masking; mpma-base keeps FLIP's pass
    assert not config.model.vision.conv_stem  # opt-in until it shows margins in the main job (docs/results.md)
    if name.endswith("base"):
        assert config.model.fusion.hidden_size == 768 and config.optim.lr == 1e-5 and config.data.batch_size == 256


def test_mpma_run_and_zero_shot_retrieval_from_its_checkpoint(tmp_path):
    from medvlp.jobs.zero_shot import zero_shot
    from medvlp.training.runs import open_run

    run = pretrain(config(tmp_path, "mpma", "tasks.paired_masking=true", "tasks.itc=1", "tasks.local=1",
                          "tasks.hard_negatives=true", "model.memory_slots=4"))
    metrics = zero_shot(run)
    assert metrics["pairs"] == 4 and set(metrics) == {"pairs"} | {f"{d}_r{k}" for d in ("i2t", "t2i")
                                                                   for k in (1, 5, 10)}
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if k != "pairs")
    assert metrics["i2t_r5"] == metrics["t2i_r5"] == 100.0  # 4 candidates: all of them within 5
    final = json.loads((run / "metrics.json").read_text())  # ITM by M3AE's protocol, and the objective's own
    assert {"val/itm_acc", "val/itm_objective_acc"} <= final.keys()
    model = open_run(run).model
    saved = load_weights(resolve_checkpoint(run) / WEIGHTS)
    assert torch.equal(model.fusion.memory, saved["model.fusion.memory"])
    assert not model.training


def test_open_run_refuses_weights_of_another_model(tmp_path):
    from medvlp.training.runs import open_run

    run = pretrain(config(tmp_path, "run", "trainer.max_steps=3"))
    own = resolve_checkpoint(run) / "model.yaml"  # the model's own config, beside its weights
    own.write_text(own.read_text().replace("memory_slots: 0", "memory_slots: 8"))
    with pytest.raises(MedvlpError, match=r"does not fit the model of .*model.yaml: 0 weights missing .* 33 "
                                          r"unexpected|does not fit the model of .*model.yaml: 33 weights missing"):
        open_run(run)


def test_exported_encoders_start_another_run_with_their_weights(tmp_path, capsys):
    from medvlp.cli import main
    from medvlp.data.tokenizer import load_tokenizer
    from medvlp.models.model import build_model
    from medvlp.training.pretrain import with_tokenizer
    from medvlp.training.runs import open_run

    run = pretrain(config(tmp_path, "run", "trainer.max_steps=3"))
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    paths = {part: tmp_path / "export" / part for part in ("vision", "text", "tokenizer")}
    assert f"model.vision.pretrained={paths['vision']}" in capsys.readouterr().out
    opened = open_run(run)
    trained, tokenizer = opened.model, opened.tokenizer
    follow = config(tmp_path, "next", f"model.vision.pretrained={paths['vision']}",
                    f"model.text.pretrained={paths['text']}", f"data.tokenizer={paths['tokenizer']}")
    model = build_model(with_tokenizer(follow.model, tokenizer))
    for part in ("vision", "text"):
        a, b = getattr(trained, part).state_dict(), getattr(model, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(trained.fusion.text_proj.weight, model.fusion.text_proj.weight)  # only the encoders
    assert load_tokenizer(paths["tokenizer"])("a lesion")["input_ids"] == tokenizer("a lesion")["input_ids"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "already exists; export into another folder" in capsys.readouterr().err
    weights = paths["vision"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensors: caught by the checksum export wrote beside them
    weights.write_bytes(bytes(data))
    with pytest.raises(MedvlpError, match="vision/model.safetensors: does not match its checksum"):
        build_model(with_tokenizer(follow.model, tokenizer))


def test_a_conv_stem_run_reloads_with_its_stem_and_is_not_exported_as_clip(tmp_path, capsys):
    from medvlp.cli import main
    from medvlp.training.runs import open_run

    run = pretrain(config(tmp_path, "stem", "trainer.max_steps=3", "model.vision.conv_stem=true"))
    model = open_run(run).model
    saved = load_weights(resolve_checkpoint(run) / WEIGHTS)
    stem = {k: v for k, v in saved.items() if ".vision.stem." in k}
    assert stem and all(torch.equal(model.get_parameter(k.removeprefix("model.")), v)
                        for k, v in stem.items() if "running" not in k and "num_batches" not in k)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "has a convolutional stem" in capsys.readouterr().err and not (tmp_path / "export").exists()


def test_itm_breakdown_groups_every_negative_by_what_it_shares(tmp_path, monkeypatch, capsys):
    import sys

    from helpers import benchmark_script

    run = pretrain(config(tmp_path, "run", "trainer.max_steps=2"))
    monkeypatch.setattr(sys, "argv", ["itm_breakdown.py", str(run), "--split", "train", "--negatives", "3"])
    benchmark_script("itm_breakdown").main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"48 train pairs of {tmp_path / 'data' / 'pretrain'}, 3 random negatives per text")
    counts = [int(line.rsplit("(", 1)[1].rstrip(")")) for line in lines[1:]]
    assert counts[0] == 48 and sum(counts[1:]) == 48 * 3 and all(counts[1:])  # each negative in one group
    assert all(0.0 <= float(line.split()[-2]) <= 1.0 for line in lines[1:])
