"""What a masked autoencoder is judged by: pictures of held-out samples at each validation.

Each row: the original image, the masked input (dropped patches grey), the reconstruction (the model's
pixels in the dropped patches, the visible ones pasted back), then the caption as the model saw it with each
masked word replaced by ``[prediction]`` and the true caption beneath.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medvlp.models.model import MedVLP

IGNORE = -100


@torch.no_grad()
def reconstruct(model: MedVLP, pixels: torch.Tensor, mim_pred: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(original, masked input, reconstruction) as float images in [0, 1], shaped [B, H, W, 3]."""
    p = model.cfg.patch_size
    grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
    images = model.normalize(pixels)
    patches = model.patchify(images)
    pred = mim_pred.float()
    if model.cfg.norm_pix_loss:  # predictions are per-patch standardised: undo with the true patch statistics
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    dropped = mask.unsqueeze(-1).to(patches.dtype)
    mixed = model.unpatchify(patches * (1 - dropped) + pred * dropped, grid)
    masked = model.unpatchify(patches * (1 - dropped), grid)

    def to_unit(x: torch.Tensor, blank: torch.Tensor | None = None) -> torch.Tensor:
        x = x * model.pixel_std + model.pixel_mean
        if blank is not None:
            x = torch.where(blank, torch.full_like(x, 0.5), x)
        return x.clamp(0, 1).permute(0, 2, 3, 1).cpu()

    blank = model.unpatchify(dropped.expand_as(patches), grid) > 0.5
    return to_unit(images), to_unit(masked, blank), to_unit(mixed)


def masked_caption(tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor) -> str:
    """The caption with every masked token shown as ``[prediction]``."""
    pieces: list[str] = []
    run: list[int] = []
    special = set(tokenizer.all_special_ids)
    for token, label, guess in zip(input_ids.tolist(), labels.tolist(), predicted.tolist()):
        if label == IGNORE:
            if token not in special:
                run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        pieces.append(f" [{tokenizer.decode([guess]).strip()}]")
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces).strip()


def save_pretrain_picture(path: Path, model: MedVLP, batch: dict[str, Any], outputs: dict[str, Any],
                          tokenizer: Any, count: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mim, mlm = outputs.get("mim"), outputs.get("mlm")
    n = min(count, batch["pixels"].shape[0])
    if n == 0 or (mim is None and mlm is None):
        return None
    columns = 3 if mim is not None else 1
    fig, axes = plt.subplots(n, columns + 1, figsize=(3 * columns + 6, 2.6 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * columns + [2.2]})
    if mlm is not None:  # the MLM logits cover only the masked positions, row by row
        labels = batch["mlm_labels"].cpu()
        guesses = torch.full_like(labels, IGNORE)
        guesses[labels != IGNORE] = mlm.mlm_logits.argmax(-1).cpu()
    if mim is not None:
        images = reconstruct(model, batch["pixels"][:n], mim.mim_pred[:n], mim.image_mask[:n])
    for row in range(n):
        if mim is not None:
            for col, (title, image) in enumerate(zip(("original", "masked input", "reconstruction"), images)):
                axes[row, col].imshow(image[row].numpy())
                axes[row, col].set_title(title, fontsize=9)
        else:
            axes[row, 0].imshow(batch["pixels"][row].expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())
        text = axes[row, columns]
        text.axis("off")
        if mlm is not None:
            shown = masked_caption(tokenizer, batch["mlm_input_ids"][row].cpu(), labels[row], guesses[row])
            truth = tokenizer.decode(batch["input_ids"][row], skip_special_tokens=True).strip()
            text.text(0, 0.6, "model: " + shown, wrap=True, fontsize=9, va="center")
            text.text(0, 0.2, "truth: " + truth, wrap=True, fontsize=9, va="center", color="dimgray")
        for ax in axes[row, :columns]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
