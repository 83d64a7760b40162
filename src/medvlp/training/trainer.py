"""The Lightning ``Trainer`` every run uses, built in one place from ``TrainerConfig``: precision, devices and
strategy, loggers (CSV + TensorBoard under ``run_dir/logs``), safetensors checkpoint I/O, quiet banners."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from medvlp.log import quiet_lightning
from medvlp.training.checkpoint import SafeCheckpointIO
from medvlp.training.config import TrainerConfig
from medvlp.training.progress import StepProgressBar

__all__ = ["TrainerConfig", "build_trainer", "resolve_precision"]


def build_trainer(run_dir: Path, t: TrainerConfig, *, grad_clip: float, callbacks: Sequence[L.Callback],
                  validate: bool) -> L.Trainer:
    """A ``Trainer`` for ``t.max_steps`` optimiser steps; with ``validate`` Lightning's validation loop runs every
    ``t.val_every`` steps (fine-tuning validates in its own callback instead)."""
    # logs/version_N per launch: a resumed run adds a version instead of overwriting the first one's logs
    csv = L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    loggers = [csv, L.pytorch.loggers.TensorBoardLogger(run_dir, name="logs", version=csv.version,
                                                        default_hp_metric=False)]
    quiet_lightning()
    # Lightning warns that a loader without state_dict() cannot resume mid-epoch; ours can: its StreamSampler
    # starts at the batch the checkpoint's module recorded (see data/sampler.py)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    return L.Trainer(
        default_root_dir=run_dir, max_steps=t.max_steps, max_epochs=-1,  # max_steps ends a run, also one resumed
        # from its last step with a larger max_steps (its first pass over the stream is then already complete)
        accelerator=t.accelerator,
        devices=t.devices, strategy=_strategy(t.strategy), num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision), accumulate_grad_batches=t.accumulate,
        gradient_clip_val=grad_clip or None,
        val_check_interval=t.val_every * t.accumulate if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=None if validate else 0, num_sanity_val_steps=0,
        log_every_n_steps=min(t.log_every, t.max_steps), logger=loggers, enable_checkpointing=False,
        callbacks=[*callbacks, *([StepProgressBar()] if t.progress_bar else [])], plugins=[SafeCheckpointIO()],
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
    )


def _strategy(name: str) -> str:
    """Plain DDP would stop at the first step: a config that switches objectives off leaves their heads (and,
    e.g., the image stream's last fusion layer without ITM) without gradients. Those are found per step."""
    return "ddp_find_unused_parameters_true" if name == "ddp" else name


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 autocast where bf16 matrix work is fast (a CUDA GPU with bf16, a CPU with AMX), else fp32.
    On a CPU without AMX (AVX2 only) bf16 matmuls are emulated and a tiny step ran 10x slower than in fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16-mixed" if "amx_bf16" in flags else "32-true"
