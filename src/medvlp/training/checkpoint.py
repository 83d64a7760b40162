"""Checkpoints: model weights as safetensors, the trainer's state beside them, written atomically.

A checkpoint is a directory ``step-000300/`` holding ``model.safetensors`` (the weights: safe to read from
anyone) and ``trainer.pt`` (optimiser, schedule and loop state: plain tensors and numbers, read back with
``torch.load(weights_only=True)``, never unpickled). It is written to a staging directory and renamed into
place, then ``latest`` (a one-line text file) is replaced to name it, so a run killed at any moment leaves its
last complete checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medvlp.errors import MedvlpError

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
LATEST = "latest"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors; tensors that share storage (tied weights) are stored once and the
    other names recorded as aliases in the metadata."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().contiguous().cpu()
    meta = {**(metadata or {}), "aliases": json.dumps(aliases)}
    save_file(unique, str(path), metadata=meta)


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Read weights written by ``save_weights`` (aliases restored); a clear error for a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise MedvlpError(f"{path}: no weights file; expected {WEIGHTS} from a medvlp checkpoint")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:  # safetensors reports a damaged file with several error types
        raise MedvlpError(f"{path}: not a readable safetensors file ({e})") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O, as directories of safetensors weights + weights-only trainer state."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        stage = path.parent / f".{path.name}.partial"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        state = dict(checkpoint)
        weights = state.pop("state_dict")
        save_weights(weights, stage / WEIGHTS, {"global_step": str(state.get("global_step", 0))})
        torch.save(state, stage / TRAINER_STATE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(stage, path)
        tmp = path.parent / f".{LATEST}.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, path.parent / LATEST)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        path = resolve_checkpoint(path)
        state = torch.load(path / TRAINER_STATE, map_location=map_location or "cpu", weights_only=True)
        state["state_dict"] = load_weights(path / WEIGHTS)
        return state

    def remove_checkpoint(self, path: str | Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a ``checkpoints/`` folder or a run folder (their ``latest``)."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if (folder / LATEST).is_file():
            path = folder / (folder / LATEST).read_text().strip()
            break
    if not (path / WEIGHTS).is_file() or not (path / TRAINER_STATE).is_file():
        raise MedvlpError(f"{path}: not a medvlp checkpoint (expected {WEIGHTS} and {TRAINER_STATE}); "
                          "give a run folder or one of its checkpoints/step-* folders")
    return path


class Checkpointer(Callback):
    """Saves ``checkpoints/step-NNNNNN`` every ``every`` optimiser steps and at the end; keeps the newest
    ``keep``."""

    def __init__(self, directory: Path, every: int, keep: int = 2):
        self.directory, self.every, self.keep = Path(directory), every, keep

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
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0 and \
                (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
