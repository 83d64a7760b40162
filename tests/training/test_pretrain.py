"""Pre-training end to end on a small synthetic corpus: a run, resume equivalence, NaN stop, bad configs."""

from __future__ import annotations

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
])
def test_bad_config_values_give_one_line(tmp_path, override, message):
    with pytest.raises((ConfigError, MedvlpError), match=message) as error:
        pretrain(config(tmp_path, "bad", override))
    assert "\n" not in str(error.value)
