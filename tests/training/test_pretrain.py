"""Pre-training end to end on a small synthetic corpus: a run, resume equivalence, NaN stop, bad configs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

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


# -- MPMA: one framework with M3AE, each component a switch -----------------------------------------------------
def tiny_model_and_batch(batch_size=6, **model):
    from medvlp.models.config import model_config
    from medvlp.models.model import build_model

    torch.manual_seed(0)
    net = build_model(model_config("tiny", **model)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 4096, (batch_size, 12), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    batch = {"pixels": torch.randint(0, 256, (batch_size, 1, 64, 64), dtype=torch.uint8, generator=g),
             "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "mlm_input_ids": torch.where(labels != -100, 4, ids), "mlm_labels": labels}
    return net, batch


class CountingModel(torch.nn.Module):
    """Counts forward passes and fusion-only ITM calls of a model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.passes, self.matches = model, [], 0
        self.cfg = model.cfg

    def forward(self, batch, **flags):
        self.passes.append({k for k, v in flags.items() if v})
        return self.inner(batch, **flags)

    def match(self, *args):
        self.matches += 1
        return self.inner.match(*args)


@pytest.mark.parametrize("switches, passes, matches, parts", [
    ({}, [{"mask_text"}, {"mask_image"}], 1, {"mlm", "mim", "itm"}),  # M3AE: ITM fuses the other passes' states
    ({"paired_masking": True, "itc": 1.0, "local": 1.0, "hard_negatives": True},
     [{"mask_image", "mask_text", "itm", "align"}], 1, {"mlm", "mim", "itm", "itc", "local"}),  # MPMA: one pass
    ({"paired_masking": True}, [{"mask_image", "mask_text", "itm"}], 1, {"mlm", "mim", "itm"}),
    ({"itc": 1.0}, [{"mask_text", "align"}, {"mask_image"}], 1, {"mlm", "mim", "itm", "itc"}),
    ({"mim": 0.0}, [{"mask_text"}, {"itm"}], 0, {"mlm", "itm"}),  # no whole-text pass to reuse: its own ITM pass
    ({"hard_negatives": True}, [{"mask_text", "itm", "align"}, {"mask_image"}], 1, {"mlm", "mim", "itm"}),
    ({"mlm": 0.0, "mim": 0.0, "itm": 0.0, "itc": 1.0}, [{"align"}], 0, {"itc"}),
    ({"paired_masking": True, "mlm": 0.0, "itc": 1.0}, [{"mask_image", "itm", "align"}], 1, {"mim", "itm", "itc"}),
])
def test_each_component_is_a_switch(switches, passes, matches, parts):
    from medvlp.training.pretrain import TasksConfig, pretrain_losses

    net, batch = tiny_model_and_batch()
    counting = CountingModel(net)
    loss, logs, _ = pretrain_losses(counting, batch, TasksConfig(**switches))
    assert counting.passes == passes and counting.matches == matches
    assert {k.removesuffix("_loss") for k in logs if k.endswith("_loss")} == parts
    assert torch.isfinite(loss)
    loss.backward()
    assert net.text.word_embeddings.weight.grad is not None
    assert net.vision.model.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("off", ["mlm", "mim"])
def test_pictures_of_a_paired_run_without_mlm_or_mim(tmp_path, off):
    from medvlp.data.tokenizer import train_tokenizer
    from medvlp.training.pictures import save_pretrain_picture
    from medvlp.training.pretrain import TasksConfig, pretrain_losses

    net, batch = tiny_model_and_batch()
    _, _, passes = pretrain_losses(net, batch, TasksConfig(paired_masking=True, **{off: 0.0}))
    assert off not in passes and "pair" in passes
    tokenizer = train_tokenizer(["a small round lesion in the left lung"] * 4, tmp_path / "tok", vocab_size=300)
    assert save_pretrain_picture(tmp_path / "p.png", net, batch, passes, tokenizer, 2).is_file()


def test_reused_itm_pairs_every_text_with_its_own_image_and_another():
    from medvlp.training.pretrain import reused_itm

    net, batch = tiny_model_and_batch(batch_size=5)
    pair = net(batch, itm=True, align=True)
    for hard in (False, True):
        logits, labels = reused_itm(net, pair, batch, hard)
        assert logits.shape == (10, 2) and labels.tolist() == [1] * 5 + [0] * 5
        assert torch.allclose(logits[:5], pair.itm_logits)


def test_a_batch_of_one_skips_the_reused_itm():
    from medvlp.training.pretrain import TasksConfig, pretrain_losses

    net, batch = tiny_model_and_batch(batch_size=1)
    _, logs, _ = pretrain_losses(net, batch, TasksConfig(paired_masking=True, hard_negatives=True, itc=1.0))
    assert "itm_loss" not in logs and "mlm_loss" in logs and "itc_loss" in logs


def test_whole_image_alignment_reads_every_patch_while_the_fused_pass_stays_masked():
    import dataclasses

    from medvlp.training.pretrain import TasksConfig, pretrain_losses

    net, batch = tiny_model_and_batch()
    tasks = TasksConfig(paired_masking=True, itc=1.0, local=1.0, hard_negatives=True, align_whole_image=True)
    _, logs, passes = pretrain_losses(net, batch, tasks)
    pair, whole = passes["pair"], net.align_head.embed_image(net.encode_image(batch["pixels"]).states)
    assert torch.allclose(pair.image_embed, whole[:, 0], atol=1e-5)
    assert torch.allclose(pair.patch_embeds, whole[:, 1:], atol=1e-5) and pair.patch_embeds.shape[1] == 16
    assert pair.image_features.shape[1] == 1 + 4 and {"mim_loss", "itc_loss", "local_loss"} <= logs.keys()
    _, _, passes = pretrain_losses(net, batch, dataclasses.replace(tasks, align_whole_image=False))
    assert passes["pair"].patch_embeds.shape[1] == 4  # switched off: the 4 visible patches of 16


@pytest.mark.parametrize("name", ["m3ae-tiny", "mpma-tiny", "m3ae-base", "mpma-base"])
def test_shipped_configs_load_and_say_what_the_papers_do(name):
    from pathlib import Path

    from medvlp.cli import config_path

    config = load_pretrain_config(config_path(Path(name)), [])
    mpma = name.startswith("mpma")
    assert config.model_size == name.split("-")[1]
    assert config.tasks.paired_masking == config.tasks.hard_negatives == mpma
    assert bool(config.tasks.itc) == bool(config.tasks.local) == mpma
    assert (config.model.memory_slots > 0) == mpma
    assert config.tasks.align_whole_image == (name == "mpma-tiny")
    assert not config.model.vision.conv_stem  # opt-in until it shows margins in the main job (docs/results.md)
    if name.endswith("base"):
        assert config.model.fusion.hidden_size == 768 and config.optim.lr == 1e-5 and config.data.batch_size == 256


def test_mpma_run_and_zero_shot_retrieval_from_its_checkpoint(tmp_path):
    from medvlp.training.pretrain import load_run, zero_shot

    run = pretrain(config(tmp_path, "mpma", "tasks.paired_masking=true", "tasks.itc=1", "tasks.local=1",
                          "tasks.hard_negatives=true", "model.memory_slots=4"))
    metrics = zero_shot(run)
    assert metrics["pairs"] == 4 and set(metrics) == {"pairs"} | {f"{d}_r{k}" for d in ("i2t", "t2i")
                                                                   for k in (1, 5, 10)}
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if k != "pairs")
    assert metrics["i2t_r5"] == metrics["t2i_r5"] == 100.0  # 4 candidates: all of them within 5
    final = json.loads((run / "metrics.json").read_text())  # ITM by M3AE's protocol, and the objective's own
    assert {"val/itm_acc", "val/itm_objective_acc"} <= final.keys()
    _, model, _ = load_run(run)
    saved = load_weights(resolve_checkpoint(run) / WEIGHTS)
    assert torch.equal(model.fusion.memory, saved["model.fusion.memory"])
    assert not model.training


def test_load_run_refuses_weights_of_another_model(tmp_path):
    from medvlp.training.pretrain import load_run

    run = pretrain(config(tmp_path, "run", "trainer.max_steps=3"))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("memory_slots: 0",
                                                                               "memory_slots: 8"))
    with pytest.raises(MedvlpError, match=r"does not fit the model .* 33 weights missing \(e.g. \[.fusion.memory."):
        load_run(run)


def test_exported_encoders_start_another_run_with_their_weights(tmp_path, capsys):
    from medvlp.cli import main
    from medvlp.data.tokenizer import load_tokenizer
    from medvlp.models.model import build_model
    from medvlp.training.pretrain import load_run, with_tokenizer

    run = pretrain(config(tmp_path, "run", "trainer.max_steps=3"))
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    paths = {part: tmp_path / "export" / part for part in ("vision", "text", "tokenizer")}
    assert f"model.vision.pretrained={paths['vision']}" in capsys.readouterr().out
    _, trained, tokenizer = load_run(run)
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
    from medvlp.training.pretrain import load_run

    run = pretrain(config(tmp_path, "stem", "trainer.max_steps=3", "model.vision.conv_stem=true"))
    _, model, _ = load_run(run)
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
