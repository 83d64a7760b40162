"""MPMA's global and local alignment (GLA), and the negatives of hard-negative image-text matching.

- ``itc_loss``: global alignment, CLIP's symmetric InfoNCE between the unit-length class-token embeddings of
  the two encoders, with the model's learned ``logit_scale``; negatives come from every rank.
- ``local_alignment_loss``: fine-grained alignment, FILIP's token-wise late interaction between words and
  patches, trained with the same symmetric InfoNCE; computed on the local batch only.
- ``hard_negatives`` / ``random_negatives``: for each text, the index of another sample in the batch whose image
  becomes its ITM negative (ALBEF's rule: harder negatives, i.e. more similar ones, are drawn more often).

Everything is a pure function of tensors (``MedVLPOutput`` fields from ``model(batch, align=True)``); nothing logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # annotations only: this module needs nothing but torch at run time (the 2-process test)
    from medvlp.models.model import MedVLPOutput

PADDED_WORD_OFFSET = -4.0
"""Added to the cosine similarity of every excluded word (see ``local_similarity``): below any real one (>= -1)."""


# ----------------------------------------------------------------------------------------------------------------
# Gathering across ranks
# ----------------------------------------------------------------------------------------------------------------


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different numbers of rows); the backward sums every rank's
    gradient of the gathered tensor and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:  # type: ignore[override]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_with_offset(x: Tensor) -> tuple[Tensor, int]:
    """``gather_with_grad(x)`` and the row at which this rank's ``x`` starts in it."""
    rank, world = _rank_and_world()
    if world == 1:
        return x, 0
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = tuple(int(c.item()) for c in counts)
    return _GatherWithGrad.apply(x.contiguous(), sizes, rank), sum(sizes[:rank])


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B_r, ...] of every rank, in rank order, keeping the autograd graph.

    Without ``torch.distributed`` initialised (or with one process) this is ``x`` itself. Otherwise ranks may
    hold different numbers of rows (a short last batch). The gradient of this rank's rows is the *sum* over
    ranks of each rank's gradient with respect to them, so that after DDP averages parameter gradients the
    result is the exact gradient of the mean of the ranks' losses. Every rank must call it, and run backward
    through it, the same number of times.
    """
    return gather_with_offset(x)[0]


# ----------------------------------------------------------------------------------------------------------------
# Global alignment
# ----------------------------------------------------------------------------------------------------------------


def _needs(outputs: MedVLPOutput, loss: str, *names: str) -> list[Tensor]:
    values = [getattr(outputs, name) for name in names]
    if any(value is None for value in values):
        raise ValueError(f"{loss} needs the alignment embeddings: run the model with align=True")
    return values


def _symmetric_infonce(i2t: Tensor, t2i: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean of the two directions' cross-entropies, and each direction's top-1 accuracy."""
    loss = (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2
    metrics = {"i2t_acc": (i2t.argmax(dim=1) == targets).float().mean().detach(),
               "t2i_acc": (t2i.argmax(dim=1) == targets).float().mean().detach()}
    return loss, metrics


def itc_loss(outputs: MedVLPOutput,
             batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Image-text contrastive loss (CLIP's InfoNCE, both directions) on ``image_embed`` / ``text_embed``.

    Logits are ``logit_scale * cosine similarity``. Each local image is classified among the texts of *all*
    ranks (and each local text among all images); its own pair sits at row ``offset + i`` of the gathered batch.
    Returns the mean of the image-to-text and text-to-image cross-entropies (in float32) and the metrics
    ``i2t_acc`` / ``t2i_acc``, top-1 accuracy of the local rows among the gathered candidates. ``batch`` is
    not read (the signature matches the other objectives).
    """
    image, text, scale = _needs(outputs, "itc_loss", "image_embed", "text_embed", "logit_scale")
    image, text, scale = image.float(), text.float(), scale.float()
    everyone, offset = gather_with_offset(torch.cat([image, text], dim=1))  # one collective for both
    all_image, all_text = everyone.split(image.shape[1], dim=1)
    targets = torch.arange(image.shape[0], device=image.device) + offset
    return _symmetric_infonce(scale * image @ all_text.T, scale * text @ all_image.T, targets)


# ----------------------------------------------------------------------------------------------------------------
# Local alignment
# ----------------------------------------------------------------------------------------------------------------


def alignment_words(attention_mask: Tensor, skip_special: bool = True) -> Tensor:
    """Which text positions take part in local alignment: boolean [B, L].

    Padding never does. With ``skip_special`` the first and the last real token of each text are left out too:
    the tokenizer always writes ``<s> ... </s>`` (truncation keeps ``</s>``), and these two carry no word of
    the report (``<s>``'s state is the global text feature, aligned by ``itc_loss`` already). A text left with
    no word (an empty caption) keeps all its real tokens, so its scores stay defined.
    """
    real = attention_mask.bool()
    if not skip_special:
        return real
    rows = torch.arange(real.shape[0], device=real.device)
    first = real.int().argmax(dim=1)  # left or right padding alike
    last = real.shape[1] - 1 - real.flip(1).int().argmax(dim=1)
    words = real.clone()
    words[rows, first] = False
    words[rows, last] = False
    return torch.where(words.any(dim=1, keepdim=True), words, real)


def local_similarity(word_embeds: Tensor, patch_embeds: Tensor, words: Tensor) -> tuple[Tensor, Tensor]:
    """FILIP's token-wise scores of every text (rows) with every image (columns), both [B_text, B_image].

    ``word_embeds`` [Bt, L, E] and ``patch_embeds`` [Bi, K, E] are unit-length; ``words`` [Bt, L] says which
    text positions count (``alignment_words``). With ``s[t, i, l, k]`` the cosine similarity of word ``l`` of text
    ``t`` and patch ``k`` of image ``i``:

    - word-to-patch ``w2p[t, i]``: the mean over the counted words of text ``t`` of their best patch in image ``i``;
    - patch-to-word ``p2w[t, i]``: the mean over the patches of image ``i`` of their best counted word of text ``t``.

    One einsum builds ``s`` as a [Bt, Bi, L, K] tensor: memory grows as ``Bt * Bi * L * K`` (float32, and
    autograd keeps it for backward), so keep this to the local batch. Excluded words get an extra embedding
    component that lowers their similarity by 4 (below any real cosine), so that the max over words skips them
    without a second [Bt, Bi, L, K] tensor; the mean over words leaves them out by its weights.
    """
    words = words.to(word_embeds.device)
    word_side = torch.cat([word_embeds.float(), (~words).float().unsqueeze(-1) * PADDED_WORD_OFFSET], dim=-1)
    patch_side = F.pad(patch_embeds.float(), (0, 1), value=1.0)
    sim = torch.einsum("tle,ike->tilk", word_side, patch_side)
    weights = words.float() / words.sum(dim=1, keepdim=True).clamp(min=1)
    w2p = torch.einsum("til,tl->ti", sim.amax(dim=3), weights)
    p2w = sim.amax(dim=2).mean(dim=2)
    return w2p, p2w


def local_alignment_loss(outputs: MedVLPOutput, batch: Mapping[str, Tensor], *,
                         skip_special: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Local (word-patch) alignment: FILIP's late interaction, trained with symmetric InfoNCE.

    Scores come from ``local_similarity`` on ``word_embeds`` and ``patch_embeds`` (the visible patches of this
    pass), with the words chosen by ``alignment_words(batch["attention_mask"], skip_special)``: padding changes
    nothing. As in FILIP, each direction uses the score whose mean runs over its own tokens: image-to-text
    classifies each image among the texts with patch-to-word scores, text-to-image each text among the images
    with word-to-patch scores; both are multiplied by ``logit_scale`` (shared with ``itc_loss``). Returns the
    mean of the two cross-entropies and ``i2t_acc`` / ``t2i_acc``.

    Local batch only (no gathering): the similarity tensor is [B, B, L, K], see ``local_similarity``.
    """
    words, patches, scale = _needs(outputs, "local_alignment_loss", "word_embeds", "patch_embeds", "logit_scale")
    mask = batch["attention_mask"].to(words.device)
    if mask.shape != words.shape[:2]:
        raise ValueError(f"attention_mask {tuple(mask.shape)} does not fit word embeddings {tuple(words.shape)}")
    w2p, p2w = local_similarity(words, patches, alignment_words(mask, skip_special))
    scale = scale.float()
    targets = torch.arange(words.shape[0], device=words.device)
    return _symmetric_infonce(scale * p2w.T, scale * w2p, targets)


# ----------------------------------------------------------------------------------------------------------------
# Negatives for image-text matching
# ----------------------------------------------------------------------------------------------------------------


def _at_least_two(batch_size: int) -> None:
    if batch_size < 2:
        raise ValueError(f"a batch of {batch_size} has no other sample to draw a negative from; ITM negatives need "
                         "at least 2 samples")


def hard_negatives(similarity: Tensor, generator: torch.Generator | None = None, k: int | None = None) -> Tensor:
    """For each row (a text), draw one *other* column (an image) to pair it with: donors [B], long; with ``k``,
    ``k`` distinct other columns per row: donors [B, k] (retrieval fine-tuning ranks each positive against them).

    ``similarity`` [B, B] holds the logits of text ``t`` against image ``i`` (e.g. ``logit_scale * text_embed @
    image_embed.T``, detached or not: no gradient flows). Row ``t`` draws ``i != t`` with probability
    ``softmax`` over the row with the diagonal left out, so more similar (harder) negatives come more often
    (ALBEF's rule); the temperature of the logits sets how much more. For each image's negative text pass
    ``similarity.T``. One ``torch.multinomial`` over the masked weight matrix, no loop; deterministic for a
    seeded ``generator`` (the draw runs on the generator's device). A batch of one has no negative, and a row
    cannot draw more than ``B - 1`` distinct ones: ValueError.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"hard_negatives needs a square [B, B] similarity, got {tuple(similarity.shape)}")
    size = similarity.shape[0]
    _at_least_two(size)
    if k is not None and not 1 <= k < size:
        raise ValueError(f"cannot draw {k} distinct negatives per sample from a batch of {size}")
    device = generator.device if generator is not None else similarity.device
    logits = similarity.detach().float().to(device)
    own = torch.eye(size, dtype=torch.bool, device=device)
    # floored so that a row can always give k distinct others, however peaked its softmax
    weights = logits.masked_fill(own, float("-inf")).softmax(dim=1).clamp_min(1e-12).masked_fill(own, 0.0)
    donors = torch.multinomial(weights, k or 1, generator=generator).to(similarity.device)
    return donors.squeeze(1) if k is None else donors


def random_negatives(batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """For each sample, a uniformly drawn *other* index: donors [B], long, never ``donors[i] == i``.

    ``(i + s_i) mod B`` with ``s_i`` uniform in ``1 .. B-1``, independently per sample (so two samples may share
    a donor). The choice when hard negatives are switched off. A batch of one has no negative: ValueError.
    """
    _at_least_two(batch_size)
    draw_device = generator.device if generator is not None else device
    shift = torch.randint(1, batch_size, (batch_size,), generator=generator, device=draw_device)
    donors = (torch.arange(batch_size, device=shift.device) + shift) % batch_size
    return donors.to(device) if device is not None else donors
