"""Optimiser and schedule, as the papers train: AdamW; the fusion module and heads learn ``head_lr_mult``
times faster than the pre-trained encoders (a fine-tuning classifier ``classifier_lr_mult`` times); no weight
decay on biases, norms, embeddings and learned tokens; linear warm-up over ``warmup`` of the steps, then
linear decay to zero."""

from __future__ import annotations

from collections.abc import Callable

import torch

from medvlp.models.model import MedVLP, param_groups
from medvlp.training.config import OptimConfig

__all__ = ["OptimConfig", "build_optimizer", "build_schedule", "lightning_optimization", "warmup_linear"]


FUSED_DEVICES = ("cpu", "cuda")
"""Devices with PyTorch's fused AdamW kernel (one kernel over all parameters instead of a loop over tensors)."""


def build_optimizer(model: MedVLP, config: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over {encoders, fusion + heads} x {decay, no decay} (see ``models.param_groups``), fused where the
    parameters' device has the kernel (it computes what the per-tensor loop does) unless ``fused`` is false."""
    groups = param_groups(model, config.lr, config.weight_decay, config.head_lr_mult, config.classifier_lr_mult)
    fused = (fused and all(p.device.type in FUSED_DEVICES for g in groups for p in g["params"])) or None
    return torch.optim.AdamW(groups, betas=config.betas, eps=config.eps, fused=fused)


def warmup_linear(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: 0 -> 1 over the warm-up, then 1 -> 0."""
    warmup_steps = int(warmup if warmup >= 1 else round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, warmup))


def lightning_optimization(model: MedVLP, config: OptimConfig, total_steps: int, precision: str) -> dict:
    """What a LightningModule's ``configure_optimizers`` returns: ``build_optimizer``'s AdamW and
    ``build_schedule``'s warm-up and decay over ``total_steps``, stepped every optimiser step.

    ``precision`` is the trainer's (Lightning's name). Under mixed precision the AdamW is not fused: Lightning
    refuses to clip the gradients of an optimiser that unscales them itself, which a fused AdamW claims to do,
    so a ``bf16-mixed`` or ``16-mixed`` run with ``optim.grad_clip`` stopped at its first step."""
    mixed = precision.endswith("-mixed") and config.grad_clip > 0
    optimizer = build_optimizer(model, config, fused=not mixed)
    schedule = build_schedule(optimizer, total_steps, config.warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
