"""Checkpoints: model weights as safetensors, the trainer's state beside them, written atomically.

A checkpoint is a directory ``step-000300/`` holding ``model.safetensors`` (the weights: safe to read from
anyone; their names led by the Lightning module's ``model.``), ``model.yaml`` (the model's config, so that
``MedVLP.from_pretrained`` builds the model from the checkpoint alone) and ``trainer.pt`` (optimiser, schedule
and loop state: plain tensors and numbers, read back with ``torch.load(weights_only=True)``, never unpickled),
each file of state with a ``.sha256`` checksum beside it that every read compares. It is written to a staging
directory and renamed into place, then ``latest`` (a one-line text file) is replaced to name it, so a run killed
at any moment leaves its last complete checkpoint as ``latest`` (and should ``latest`` be lost anyway, resuming
falls back to the newest complete ``step-*`` folder).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open

from medvlp.constants import LATEST, MODEL_CONFIG, TRAINER_STATE, WEIGHTS
from medvlp.errors import MedvlpError
from medvlp.integrity import cleaned_on_failure, verify_checksum, write_checksum
from medvlp.models.pretrained import load_weights, save_model_config, save_weights  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)



class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O, as directories of safetensors weights + weights-only trainer state, each with
    its checksum."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        stage = path.parent / f".{path.name}.partial"
        shutil.rmtree(stage, ignore_errors=True)
        with cleaned_on_failure(stage, what=f"checkpoint {path}"):
            stage.mkdir(parents=True)
            state = dict(checkpoint)
            weights = state.pop("state_dict")
            model_config = state.pop(MODEL_CONFIG, None)  # put there by the module's on_save_checkpoint
            if model_config is not None:
                save_model_config(model_config, stage)
            save_weights(weights, stage / WEIGHTS, {"global_step": str(state.get("global_step", 0))},
                         what=f"checkpoint {path}")
            torch.save(state, stage / TRAINER_STATE)
            write_checksum(stage / TRAINER_STATE)
            if path.exists():
                shutil.rmtree(path)
            os.replace(stage, path)
        tmp = path.parent / f".{LATEST}.tmp"
        with cleaned_on_failure(tmp, what=f"{path.parent / LATEST}"):
            tmp.write_text(path.name + "\n")
            os.replace(tmp, path.parent / LATEST)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        path = resolve_checkpoint(path)
        state = load_trainer_state(path, map_location)
        state["state_dict"] = load_weights(path / WEIGHTS)
        return state

    def remove_checkpoint(self, path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(checkpoint: Path, map_location: Any = None) -> dict[str, Any]:
    """A checkpoint's ``trainer.pt`` (optimiser, schedule, loops), checked against its checksum and read with
    ``weights_only=True`` (nothing is unpickled); a damaged file is a one-line ``MedvlpError``."""
    path = checkpoint / TRAINER_STATE
    verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: torch reports these with several error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MedvlpError(f"{path}: not a readable trainer state ({first}); resume from an earlier checkpoint "
                          f"(delete {checkpoint.name}) or start the run again") from None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimiser step a checkpoint was written at (from its weights' metadata; no tensor is read)."""
    try:
        with safe_open(str(checkpoint / WEIGHTS), "pt") as f:
            return int((f.metadata() or {}).get("global_step", 0))
    except Exception as e:
        raise MedvlpError(f"{checkpoint / WEIGHTS}: not a readable safetensors file ({e})") from None


def _complete(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / TRAINER_STATE).is_file()


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a ``--resume`` of ``run_dir`` continues from; ``None`` (and a line saying so) when the run
    was stopped before its first checkpoint, so it starts again from step 0."""
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*")):
        return resolve_checkpoint(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MedvlpError(f"{run_dir}: no run to resume here (no config.yaml, no checkpoints); check run_dir, or "
                          "start the run without --resume")
    log.warning("%s was stopped before its first checkpoint: starting it again from step 0", run_dir)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a ``checkpoints/`` folder or a run folder: the one ``latest`` names,
    or, when ``latest`` is missing, empty or names no complete checkpoint, the newest complete ``step-*``
    folder (and a line saying so)."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        steps = sorted(folder.glob("step-*")) if folder.is_dir() else []
        if not (folder / LATEST).is_file() and not steps:
            continue
        named = (folder / LATEST).read_text(errors="replace").strip() if (folder / LATEST).is_file() else ""
        if named and "/" not in named and _complete(folder / named):
            return folder / named
        complete = [step for step in steps if _complete(step)]
        if not complete:
            raise MedvlpError(f"{folder}: no complete checkpoint (step-* folders with {WEIGHTS} and "
                              f"{TRAINER_STATE}); start the run again without --resume in a new run_dir")
        problem = "is missing" if not (folder / LATEST).is_file() else "is empty" if not named else \
            f"names {named}, which is missing or incomplete"
        log.warning("%s %s; using the newest complete checkpoint, %s", folder / LATEST, problem, complete[-1].name)
        return complete[-1]
    if not _complete(path):
        raise MedvlpError(f"{path}: not a medvlp checkpoint (expected {WEIGHTS} and {TRAINER_STATE}); "
                          "give a run folder or one of its checkpoints/step-* folders")
    return path


class Checkpointer(Callback):
    """Saves ``checkpoints/step-NNNNNN`` every ``every`` optimiser steps and at the end; keeps the newest
    ``keep``."""

    def __init__(self, directory: Path, every: int, keep: int = 2):
        self.directory, self.every, self.keep = Path(directory), every, keep
        self._after_validation: int | None = None  # a step whose checkpoint waits for its validation

    def _save(self, trainer) -> None:
        step = trainer.global_step
        path = self.directory / f"step-{step:06d}"
        if path.exists() and (self.directory / LATEST).is_file() and \
                (self.directory / LATEST).read_text().strip() == path.name:
            return
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            for old in sorted(self.directory.glob("step-*"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every ``every`` steps and at the last one. When Lightning validates after this batch, the checkpoint
        waits for the validation's end, so that a resumed run neither repeats nor loses that validation."""
        step = trainer.global_step
        due = (self.every and step % self.every == 0) or (trainer.max_steps > 0 and step >= trainer.max_steps)
        if not (due and step > 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
            return
        # Lightning's own test for "validate after this batch" (private: without it, save now)
        validates = getattr(trainer.fit_loop.epoch_loop, "_should_check_val_fx", None)
        if trainer.limit_val_batches and validates and validates(getattr(trainer.fit_loop, "_data_fetcher", None)):
            self._after_validation = step
        else:
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._after_validation == trainer.global_step and not trainer.sanity_checking:
            self._after_validation = None
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
