"""The Lightning ``Trainer`` every run uses, built in one place from ``TrainerConfig``: precision, devices and
strategy, loggers (CSV + TensorBoard under ``run_dir/logs``), safetensors checkpoint I/O, quiet banners."""

from __future__ import annotations

import ctypes
import logging
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from medvlp.log import quiet_lightning
from medvlp.training.checkpoint import SafeCheckpointIO
from medvlp.training.config import TrainerConfig
from medvlp.training.progress import StepProgressBar

log = logging.getLogger(__name__)

__all__ = ["TrainerConfig", "build_trainer", "choose_precision", "keep_freed_memory", "resolve_precision"]


def build_trainer(run_dir: Path, t: TrainerConfig, *, grad_clip: float, callbacks: Sequence[L.Callback],
                  validate: bool, params: int | None = None) -> L.Trainer:
    """A ``Trainer`` for ``t.max_steps`` optimiser steps; with ``validate`` Lightning's validation loop runs every
    ``t.val_every`` steps (fine-tuning validates in its own callback instead). ``params`` (the model's parameter
    count) informs ``trainer.precision=auto``."""
    # logs/version_N per launch: a resumed run adds a version instead of overwriting the first one's logs
    csv = L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    loggers = [csv, L.pytorch.loggers.TensorBoardLogger(run_dir, name="logs", version=csv.version,
                                                        default_hp_metric=False)]
    quiet_lightning()
    keep_freed_memory()
    # Lightning warns that a loader without state_dict() cannot resume mid-epoch; ours can: its StreamSampler
    # starts at the batch the checkpoint's module recorded (see data/sampler.py)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    precision, why = choose_precision(t.precision, params, t.accelerator)
    log.info("precision %s (%s)", precision, why)
    return L.Trainer(
        default_root_dir=run_dir, max_steps=t.max_steps, max_epochs=-1,  # max_steps ends a run, also one resumed
        # from its last step with a larger max_steps (its first pass over the stream is then already complete)
        accelerator=t.accelerator,
        devices=t.devices, strategy=_strategy(t.strategy), num_nodes=t.num_nodes,
        precision=precision, accumulate_grad_batches=t.accumulate,
        gradient_clip_val=grad_clip or None,
        val_check_interval=t.val_every * t.accumulate if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=None if validate else 0, num_sanity_val_steps=0,
        log_every_n_steps=min(t.log_every, t.max_steps), logger=loggers, enable_checkpointing=False,
        callbacks=[*callbacks, *([StepProgressBar()] if t.progress_bar else [])], plugins=[SafeCheckpointIO()],
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
    )


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on a 64-bit machine


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep the memory a training step frees, for the next step to reuse.

    A CPU step allocates and frees the same activations and gradients every time. By default glibc serves each
    block above its mmap threshold (128 KiB, rising up to 32 MiB as such blocks are freed) with a fresh ``mmap``
    and returns the free top of its heap to the system, so every step faults its memory in again and the kernel
    zeroes it page by page: at ``base`` size a large part of the step is system time (docs/performance.md).
    With blocks up to 32 MiB taken from the heap and the heap never trimmed, a step's memory stays mapped from
    one step to the next. Affects the whole process; a no-op returning False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _strategy(name: str) -> str:
    """Plain DDP would stop at the first step: a config that switches objectives off leaves their heads (and,
    e.g., the image stream's last fusion layer without ITM) without gradients. Those are found per step."""
    return "ddp_find_unused_parameters_true" if name == "ddp" else name


LARGE_MODEL_PARAMS = 100_000_000
"""From this many parameters on, ``auto`` uses bf16 on a CPU with AVX-512 BF16 but no AMX (see ``choose_precision``)."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def choose_precision(precision: str, params: int | None = None, accelerator: str = "auto") -> tuple[str, str]:
    """``precision`` resolved for this machine, and why. ``auto`` picks bf16 autocast wherever it pays:

    - a CUDA GPU: ``bf16-mixed`` when it has bf16, else ``16-mixed``;
    - a CPU with AMX (``amx_bf16``): ``bf16-mixed``;
    - a CPU with AVX-512 BF16 (``avx512_bf16``) but no AMX: ``bf16-mixed`` for a model of at least
      ``LARGE_MODEL_PARAMS`` parameters (on an AMD EPYC at ``base`` size bf16 made the M3AE step 1.7x and the MPMA
      step 2.1x faster), ``32-true`` for a smaller one or when ``params`` is not given (at ``tiny`` widths the
      casts cost about what the faster products save);
    - any other CPU (AVX2 only): ``32-true``, since bf16 products are emulated there (a tiny step ran 10x slower).

    Args:
        precision: ``auto`` or a Lightning precision (returned as it is).
        params: the number of parameters of the model to train.
        accelerator: the trainer's accelerator; ``cpu`` looks at the CPU even where a GPU is present.

    Returns:
        (Lightning precision, a short reason).
    """
    if precision != "auto":
        return precision, "as configured"
    if accelerator != "cpu" and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: CUDA GPU with bf16"
        return "16-mixed", "auto: CUDA GPU without bf16"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "bf16-mixed", "auto: CPU with AMX"
    if "avx512_bf16" in flags:
        if params is not None and params >= LARGE_MODEL_PARAMS:
            return "bf16-mixed", (f"auto: CPU with AVX-512 BF16 and a model of {params / 1e6:.0f}M parameters "
                                  f"(>= {LARGE_MODEL_PARAMS / 1e6:.0f}M)")
        size = "model size not given" if params is None else f"{params / 1e6:.1f}M parameters"
        return "32-true", (f"auto: CPU with AVX-512 BF16 but a small model ({size}, < "
                           f"{LARGE_MODEL_PARAMS / 1e6:.0f}M): bf16 casts would cost what they save")
    return "32-true", "auto: CPU without AMX or AVX-512 BF16 (bf16 would be emulated)"


def resolve_precision(precision: str, params: int | None = None, accelerator: str = "auto") -> str:
    """The Lightning precision ``choose_precision`` picks (without its reason)."""
    return choose_precision(precision, params, accelerator)[0]
