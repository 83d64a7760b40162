"""Resume is exact: a run killed at any step (inside a checkpoint write too) and resumed ends with the weights,
optimiser state and reported figures of an uninterrupted run; finished runs, lost ``latest`` files, busy run
folders and damaged checkpoints are handled in one line.

The kills are real: each run segment trains in a forked child process that ends itself with ``os._exit`` (no
exception handler, ``finally`` or atexit runs: what is on disk is what a SIGKILL would leave) at a chosen step,
or in the middle of writing a checkpoint's ``trainer.pt``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import random
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from medvlp.errors import ConfigError, MedvlpError
from medvlp.integrity import RunLock
from medvlp.models import pretrained as weights_io
from medvlp.training import checkpoint as checkpoint_io
from medvlp.training.checkpoint import (
    LATEST,
    TRAINER_STATE,
    WEIGHTS,
    load_trainer_state,
    load_weights,
    resolve_checkpoint,
)
from medvlp.training.finetune import finetune, load_finetune_config
from medvlp.training.pretrain import load_pretrain_config, pretrain

FAMILIES = ("pretrain", "vqa", "classification", "retrieval")
CORPUS = [f"{family}_{split}={n}" for family in FAMILIES for split, n in (("train", 24), ("val", 8), ("test", 8))]
KILLED = 137


def pretrain_config(root: Path, name: str, *extra: str):
    return load_pretrain_config(None, [
        f"run_dir={root / name}", f"data.synthetic_dir={root / 'data'}", "data.batch_size=4", "data.num_workers=0",
        "trainer.max_steps=12", "trainer.val_every=4", "trainer.val_batches=1", "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=10", "trainer.pictures=0", "trainer.progress_bar=false", "data.vocab_size=300",
        "data.synthetic.workers=1", "data.max_text_len=24", "data.synthetic.image_size=64",
        *[f"data.synthetic.{c}" for c in CORPUS], *extra])


def finetune_config(root: Path, name: str, *extra: str):
    return load_finetune_config(None, [
        "task=vqa", f"run_dir={root / name}", f"synthetic_dir={root / 'data'}", "batch_size=4", "num_workers=0",
        "trainer.max_steps=12", "trainer.val_every=4", "trainer.checkpoint_every=3", "trainer.progress_bar=false",
        "vocab_size=300", "image_size=32", "max_text_len=24", "synthetic.image_size=64",
        "synthetic.workers=1", *[f"synthetic.{c}" for c in CORPUS], *extra])


class KillAt(L.Callback):
    """End the process abruptly once ``step`` is done (after any checkpoint the step writes at its batch end)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            os._exit(KILLED)


class DumpFinal(L.Callback):
    """Write the final weights and optimiser state to ``path`` (fine-tuning keeps no checkpoint once done)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, module):
        torch.save({"model": module.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                    "schedule": trainer.lr_scheduler_configs[0].scheduler.state_dict()}, self.path)


def kill_in_checkpoint_write() -> None:
    """From now on, the next ``trainer.pt`` is written half and the process dies (a kill during a checkpoint)."""
    def half_and_die(state, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        os._exit(KILLED)

    checkpoint_io.torch.save = half_and_die


def in_child(job, *args) -> int:
    """Run ``job(*args)`` in a forked process; its exit status (0: it returned)."""
    process = multiprocessing.get_context("fork").Process(target=_child, args=(job, *args))
    process.start()
    process.join(300)
    return process.exitcode


def _child(job, *args) -> None:
    torch.set_num_threads(1)
    job(*args)
    os._exit(0)


def same(a, b) -> bool:
    """Bit-identical nested state (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_checkpoint(a: Path, b: Path) -> None:
    assert same(load_weights(a / WEIGHTS), load_weights(b / WEIGHTS))
    sa, sb = load_trainer_state(a), load_trainer_state(b)
    assert sa["global_step"] == sb["global_step"]
    assert same(sa["optimizer_states"], sb["optimizer_states"])
    assert same(sa["lr_schedulers"], sb["lr_schedulers"])
    assert same(sa["medvlp"], sb["medvlp"])


def kill_plan(seed: int, steps: int, kills: int = 5) -> list[int | None]:
    """``kills - 1`` increasing kill steps drawn with ``seed``, at least one in each third of the run (early,
    middle, late), and ``None``, third, for a kill inside a checkpoint write."""
    rng = random.Random(seed)
    while True:
        plan: list[int | None] = sorted(rng.sample(range(1, steps), kills - 1))
        if {3 * step // steps for step in plan} == {0, 1, 2}:
            plan.insert(2, None)
            return plan


def killed_and_resumed(run, plan: list[int | None]) -> None:
    """Run ``run(resume, callbacks)`` segment by segment, each killed as ``plan`` says, then to the end."""
    for i, step in enumerate(plan):
        def segment(resume=i > 0, step=step):
            if step is None:
                kill_in_checkpoint_write()
            run(resume, [] if step is None else [KillAt(step)])
        assert in_child(segment) == KILLED, f"segment {i} (kill at {step}) did not die as planned"
    assert in_child(lambda: run(True, [])) == 0


@pytest.fixture(autouse=True)
def medvlp_lines_reach_caplog(monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("medvlp"), "propagate", True)  # the CLI's setup() turns it off
    caplog.set_level(logging.INFO, logger="medvlp")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def whole_pretrain(root):
    assert in_child(lambda: pretrain(pretrain_config(root, "whole"))) == 0
    return root / "whole"


# -- finding 1 + fault injection -------------------------------------------------------------------------------
def test_pretraining_killed_five_times_ends_as_the_uninterrupted_run(root, whole_pretrain):
    """Before the fix, a run resumed from step s < 6 ended at step 12 - s and called itself finished; the
    third kill leaves a half-written checkpoint (a .partial stage) behind."""
    plan = kill_plan(17, 12)  # resumes from steps 2, 4, 4, 8 (a validation step) and 10
    killed_and_resumed(lambda resume, cbs: pretrain(pretrain_config(root, "killed"), resume=resume, callbacks=cbs),
                       plan)
    run = root / "killed"
    assert not list((run / "checkpoints").glob(".*partial*"))  # the half-written stage is gone after resuming
    assert_same_checkpoint(resolve_checkpoint(whole_pretrain), resolve_checkpoint(run))
    assert json.loads((run / "metrics.json").read_text()) == json.loads((whole_pretrain / "metrics.json").read_text())


def test_finetuning_killed_five_times_ends_as_the_uninterrupted_run(root, whole_pretrain):
    init = f"init={whole_pretrain}"
    assert in_child(lambda: finetune(finetune_config(root, "ft-whole", init),
                                     [DumpFinal(root / "ft-whole.pt")])) == 0
    plan = kill_plan(7, 12)
    killed_and_resumed(lambda resume, cbs: finetune(finetune_config(root, "ft-killed", init),
                                                    [*cbs, DumpFinal(root / "ft-killed.pt")], resume=resume), plan)
    whole, killed = root / "ft-whole", root / "ft-killed"
    assert same(torch.load(root / "ft-whole.pt", weights_only=True),
                torch.load(root / "ft-killed.pt", weights_only=True))
    assert same(load_weights(whole / WEIGHTS), load_weights(killed / WEIGHTS))  # the best validation step's
    assert json.loads((whole / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())
    assert not (killed / "checkpoints").exists()  # a finished fine-tuning run keeps its best weights only
    metrics = (killed / "metrics.json").read_text()
    finetune(finetune_config(root, "ft-killed", init), resume=True)  # finished: says so, changes nothing
    assert (killed / "metrics.json").read_text() == metrics


# -- finding 2: a finished run ---------------------------------------------------------------------------------
def test_resuming_a_finished_run_keeps_its_metrics_and_a_longer_run_continues(root, whole_pretrain, caplog):
    run = root / "finished"
    pretrain(pretrain_config(root, run.name, "trainer.max_steps=8"))
    metrics = (run / "metrics.json").read_text()
    assert "val/loss" in metrics
    pretrain(pretrain_config(root, run.name, "trainer.max_steps=8"), resume=True)
    assert (run / "metrics.json").read_text() == metrics
    assert "finished at step 8" in caplog.text
    pretrain(pretrain_config(root, run.name, "trainer.max_steps=12"), resume=True)
    assert json.loads((run / "metrics.json").read_text())["step"] == 12
    assert resolve_checkpoint(run).name == "step-000012"


# -- finding 3: latest missing, empty or dangling --------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "empty", "dangling"])
def test_a_lost_latest_falls_back_to_the_newest_complete_checkpoint(root, whole_pretrain, tmp_path, damage, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in ("step-000003", "step-000006"):
        (run / "checkpoints" / step).symlink_to(whole_pretrain / "checkpoints" / step)
    (run / "checkpoints" / "step-000009").mkdir()  # incomplete: no weights
    latest = run / "checkpoints" / LATEST
    if damage == "empty":
        latest.write_text("\n")
    elif damage == "dangling":
        latest.write_text("step-000042\n")
    assert resolve_checkpoint(run).name == "step-000006"
    assert "using the newest complete checkpoint, step-000006" in caplog.text


# -- finding 7: one process per run folder ---------------------------------------------------------------------
def test_a_second_run_on_a_busy_run_folder_is_refused_in_one_line(root, tmp_path):
    with RunLock(tmp_path / "busy"):
        with pytest.raises(MedvlpError, match=r"busy is in use by another medvlp process \(pid \d+\)"):
            pretrain(pretrain_config(root, "x", f"run_dir={tmp_path / 'busy'}"))
        assert in_child(lambda: pretrain(pretrain_config(root, "x", f"run_dir={tmp_path / 'busy'}"))) != 0
    with RunLock(tmp_path / "busy"):  # released: taken again
        pass


def test_the_other_ranks_of_a_distributed_run_share_rank_0s_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path / "run"):  # rank 0, the launching process
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker of the same run
        with RunLock(tmp_path / "run"):
            pass
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(MedvlpError, match="in use by another medvlp process"):
            RunLock(tmp_path / "run").__enter__()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    def hold_and_die():
        RunLock(tmp_path / "run").__enter__()
        os._exit(KILLED)

    assert in_child(hold_and_die) == KILLED
    with RunLock(tmp_path / "run"):
        pass


# -- findings 8 and 9: damaged checkpoints ---------------------------------------------------------------------
def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_a_flipped_weight_byte_is_refused_by_its_checksum(whole_pretrain, tmp_path):
    step = copy_checkpoint(resolve_checkpoint(whole_pretrain), tmp_path / "step-000012")
    data = bytearray((step / WEIGHTS).read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: safetensors alone would load it
    (step / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(MedvlpError, match=r"model.safetensors: does not match its checksum .*content changed"):
        load_weights(step / WEIGHTS)


def test_a_truncated_trainer_state_is_one_line(whole_pretrain, tmp_path):
    step = copy_checkpoint(resolve_checkpoint(whole_pretrain), tmp_path / "step-000012")
    (step / TRAINER_STATE).write_bytes((step / TRAINER_STATE).read_bytes()[:500])
    with pytest.raises(MedvlpError, match=r"trainer.pt: does not match its checksum trainer.pt.sha256 \(500 bytes "):
        load_trainer_state(step)
    (step / (TRAINER_STATE + ".sha256")).unlink()  # without its checksum: torch's own error, in one line
    with pytest.raises(MedvlpError, match=r"trainer.pt: not a readable trainer state .*earlier checkpoint") as e:
        load_trainer_state(step)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("writer, error", [  # how torch.save and safetensors report a full disk
    ("torch", RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1792 vs 1686")),
    ("safetensors", Exception("Error while serializing: I/O error: No space left on device (os error 28)")),
])
def test_a_full_disk_during_a_checkpoint_leaves_no_partial_and_says_so(root, monkeypatch, writer, error):
    def full(state, path, *args, **kwargs):
        Path(path).write_bytes(b"some bytes")
        raise error

    if writer == "torch":
        monkeypatch.setattr(checkpoint_io.torch, "save", full)
    else:
        monkeypatch.setattr(weights_io, "save_file", full)
    with pytest.raises(MedvlpError, match=r"checkpoint .*step-000002: could not be written \(no space left"):
        pretrain(pretrain_config(root, f"full-{writer}"))
    assert not [p for p in (root / f"full-{writer}" / "checkpoints").iterdir() if p.name.startswith(".")]


# -- finding 6: values checked as the config is read -----------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints = -1 must be at least 1"),  # deleted every checkpoint
    ("trainer.checkpoint_every=-5", "trainer.checkpoint_every = -5 must be at least 0"),
    ("run_dir=", "run_dir = '' must not be empty"),
    ("data.synthetic_dir=", "data.synthetic_dir = '' must not be empty"),
    ("trainer.seed=-1", "trainer.seed = -1 must be at least 0"),
    ("trainer.val_every=0", "trainer.val_every = 0 must be at least 1"),
    ("trainer.precision=banana", "trainer.precision = 'banana' must be one of auto, 32-true"),
    ("data.num_workers=-1", "data.num_workers = -1 must be at least 0"),
    ("trainer.devices=0", "trainer.devices = '0' must be auto, a device count of at least 1"),
    ("data.max_bad_fraction=-3", "data.max_bad_fraction = -3.0 must be between 0 and 1"),
    ("optim.lr=1e9", "optim.lr = 1000000000.0 must be above 0 and below 1"),
])
def test_bad_values_are_refused_as_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=re.escape(f"override {override!r}: {message}")) as error:
        load_pretrain_config(None, [override])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"trainer.keep_checkpoints = 0 must be at least 1"):
        load_finetune_config(None, ["trainer.keep_checkpoints=0"])
    for fine in ("trainer.devices=2", "trainer.devices=0,1", "trainer.devices=-1", "trainer.checkpoint_every=0"):
        load_pretrain_config(None, [fine])


def test_a_pickle_given_as_pytorch_model_bin_is_refused_unrun(tmp_path):
    from transformers import CLIPVisionConfig

    from medvlp.models.model import build_model

    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                     patch_size=16).save_pretrained(tmp_path / "vision")
    ran = tmp_path / "ran"
    (tmp_path / "vision" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(ran)))
    config = load_pretrain_config(None, [f"model.vision.pretrained={tmp_path / 'vision'}"])
    with pytest.raises(ConfigError, match=r"holds pickled weights \(pytorch_model.bin\) .* never runs pickled code"):
        build_model(config.model)
    assert not ran.exists()


class Payload:
    """Pickles as a call that would create ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))
