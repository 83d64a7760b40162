"""Masked image modelling: MSE between predicted and true pixels of the dropped patches."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from medvlp.models.model import MedVLPOutput, normalize_pixels, patchify

VARIANCE_EPS = 1e-6


def mim_targets(pixels: Tensor, patch_size: int, norm_pix_loss: bool = True) -> Tensor:
    """The pixels the decoder must predict: [B, N, patch_size**2 * 3] from uint8 [B, 3, H, W].

    Patches of the CLIP-normalised input (what the encoder saw); with ``norm_pix_loss`` each patch is further
    standardised by its own mean and variance (variance with Bessel's correction, as in MAE, plus 1e-6).
    """
    target = patchify(normalize_pixels(pixels), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + VARIANCE_EPS).sqrt()
    return target


def mim_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor], *,
             norm_pix_loss: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over dropped patches of the per-patch mean squared error; visible patches do not count.

    ``norm_pix_loss`` should be the model's ``cfg.norm_pix_loss``. The patch size is read from the prediction's
    width (``patch_size**2 * 3``). Without any dropped patch the loss is an exact, differentiable zero.
    No metrics.
    """
    pred = outputs.mim_pred
    if pred is None:
        raise ValueError("mim_loss needs MIM predictions: run the model with mask_image=True")
    patch_size = math.isqrt(pred.shape[-1] // 3)
    target = mim_targets(batch["pixels"].to(pred.device), patch_size, norm_pix_loss)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = outputs.image_mask
    dropped = torch.zeros_like(per_patch) if mask is None else mask.to(per_patch.dtype)
    loss = (per_patch * dropped).sum() / dropped.sum().clamp(min=1.0)
    return loss, {}
