"""Dropout with a cheaper random mask on the CPU.

On the CPU, ``torch.nn.functional.dropout`` draws one Bernoulli variable per element from the Mersenne
Twister, then divides and multiplies in float; at ``base`` size with the papers' dropout of 0.1 that was about a
seventh of an M3AE pre-training step (docs/performance.md). Here the mask is made from 64-bit random integers
read as two 32-bit ones (half as many draws), compared with a threshold: each element is kept with probability
``1 - p`` to within 2^-32 (the float-uniform draw of ``torch.rand`` resolves 2^-24), independently, and kept
elements are scaled by ``1 / (1 - p)``: the same distribution as ``F.dropout``, only another random stream.
Masks come from the default CPU generator, so ``torch.manual_seed`` and a saved RNG state replay them exactly.
Other devices use ``F.dropout`` (their kernels generate masks in the same pass).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """A boolean CPU tensor of ``shape``, each element True (kept) with probability ``1 - p``."""
    count = math.prod(shape)
    bits = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-2**63, None)
    threshold = round(p * 2**32) - 2**31  # int32 values below it (a fraction p of all 2^32) are dropped
    return bits.view(torch.int32)[:count].view(shape) >= threshold


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale`` that keeps only the boolean mask for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.where(mask, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` in distribution; on the CPU with the cheaper mask of ``keep_mask``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` (same argument, no parameters: swaps in for it, state dicts unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` inside ``module`` (a Hugging Face encoder's, say) for ``Dropout``, in place.
    Returns how many were swapped."""
    swapped = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
                swapped += 1
    return swapped
