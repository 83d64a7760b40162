"""Weights on disk: the one way medvlp saves and loads a model, for every kind of run (pre-training
checkpoints, fine-tuned runs, converted checkpoints).

A saved model is a folder holding ``model.safetensors`` (the weights) and ``model.yaml`` (the ``ModelConfig``
that builds the model they fit). Weights are safetensors (nothing is ever unpickled), written atomically with a
``NAME.sha256`` checksum beside them that every read compares, so a damaged or foreign file is a one-line error
instead of silently wrong weights. ``MedVLP.save_pretrained`` / ``MedVLP.from_pretrained`` are the model's side
of it; ``training.runs.open_run`` opens a whole run folder (its tokenizer, task and classes too) through them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medvlp.config import load_config, save_config
from medvlp.constants import MODEL_CONFIG, WEIGHTS
from medvlp.errors import MedvlpError
from medvlp.integrity import checksum_path, cleaned_on_failure, verify_checksum, write_checksum
from medvlp.models.config import ModelConfig


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None, *,
                 what: str | None = None) -> None:
    """Write a state dict as safetensors, atomically, with its checksum beside it (``NAME.sha256``); tensors
    that share storage (tied weights) are stored once and the other names recorded as aliases in the metadata.
    A failed write (a full disk) leaves nothing behind and is a one-line ``MedvlpError`` naming ``what`` (by
    default ``path``)."""
    path = Path(path)
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
    tmp = path.with_name(f".{path.name}.tmp")
    with cleaned_on_failure(tmp, checksum_path(tmp), what=what or str(path)):
        save_file(unique, str(tmp), metadata=meta)
        write_checksum(tmp, name=path.name)
        os.replace(tmp, path)
        os.replace(checksum_path(tmp), checksum_path(path))


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Read weights written by ``save_weights`` (aliases restored), after comparing them with their checksum;
    a clear error for a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise MedvlpError(f"{path}: no weights file; expected {WEIGHTS} from a medvlp checkpoint")
    verify_checksum(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:  # safetensors reports a damaged file with several error types
        raise MedvlpError(f"{path}: not a readable safetensors file ({e})") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def load_into(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str, config: str) -> nn.Module:
    """Load ``weights`` into ``model`` strictly. Weights that do not fit are a one-line ``MedvlpError`` naming
    the first of another shape, or the first missing and unexpected names (``source``: the weights file,
    ``config``: what built the model)."""
    own = model.state_dict()
    wrong = [(name, tuple(value.shape), tuple(own[name].shape)) for name, value in weights.items()
             if name in own and own[name].shape != value.shape]
    if wrong:
        name, there, here = wrong[0]
        raise MedvlpError(f"{source} does not fit the model of {config}: {len(wrong)} weights of another shape "
                          f"(e.g. {name}: {list(there)} in the file, {list(here)} in the model)")
    missing, unexpected = model.load_state_dict(dict(weights), strict=False)
    if missing or unexpected:
        raise MedvlpError(f"{source} does not fit the model of {config}: {len(missing)} weights missing (e.g. "
                          f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    return model


def save_model_config(cfg: ModelConfig, folder: Path) -> Path:
    """Write ``cfg`` as ``folder/model.yaml`` (atomically: a reader never sees half a file); returns its path."""
    path = Path(folder) / MODEL_CONFIG
    with cleaned_on_failure(what=str(path)):  # save_config removes its own staging file
        save_config(cfg, path)
    return path


def load_model_config(folder: Path) -> ModelConfig | None:
    """The ``ModelConfig`` of ``folder/model.yaml``, checked; ``None`` when the folder has none (a run written
    before model.yaml existed). A file that does not read as a model config is a one-line ``ConfigError``."""
    path = Path(folder) / MODEL_CONFIG
    return load_config(ModelConfig, path) if path.is_file() else None
