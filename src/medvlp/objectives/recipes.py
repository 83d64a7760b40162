"""Recipes: which passes one training step runs and which losses it reads from them, for pre-training and for
each downstream task. Each recipe is a function ``(model, batch, switches) -> (loss, metrics, ...)``; nothing
here logs, steps an optimiser or reads a file (that is ``training``).

Pre-training (``pretrain_losses``) runs the objectives the switches turn on, each a pure loss of this package:

- M3AE (``paired_masking: false``): three passes, as the reference code does: masked text + whole image
  (MLM), masked image + whole text (MIM), and the ITM pass on a batch with half its images swapped at random,
  which fuses the whole images and whole texts the first two passes encoded (``swapped_itm``).
- MPMA (``paired_masking: true``): masked image (75%) and masked text (15%) in ONE pass; MLM, MIM, the global
  and local alignment and the ITM positives are all read from it, and the ITM negatives fuse its text states
  with other samples' image states (no second encoding, ``reused_itm``). With ``hard_negatives`` those images
  are drawn in proportion to the softmax of the global similarity (harder negatives more often), else uniformly.

Which features the alignment losses read: those of the *pair pass*, the pass in which every image meets its
own text. Under paired masking that is the masked pass: the global loss compares the class tokens of an image
of which 25% of the patches were seen and of a text with 15% of its words masked, and the local loss matches
words to the visible patches only. This is FLIP's recipe (Li et al., CVPR 2023): contrastive learning on
masked images works about as well and costs a quarter of the vision encoder; it is what makes the paired step
one encoder pass instead of three. FLIP measured that at scale and over long schedules; over the few hundred
steps of a tiny model from scratch it halves the alignment (``mpma-tiny``, 500 steps: zero-shot R@1 0.4% /
0.5% against 1.2% / 1.1%). So ``align_whole_image`` encodes the whole image once more, vision encoder only, and
the alignment losses and the hard-negative similarities read that (``whole_image_alignment``; the fused passes
still see the masked image). Both shipped MPMA configs leave it off: ``mpma-base`` keeps FLIP's one pass,
where a whole-image pass of ViT-B/16 would cost more than the rest of the vision work of the step, and
``mpma-tiny`` does not pair its masking (its MLM needs the whole image to count the lesions; see its config).
In the three-pass step the pair pass is the MLM pass (whole image, masked text). Zero-shot retrieval embeds
whole images and whole texts (``MedVLP.embed_image``/``embed_text``).

Downstream (``vqa_step``, ``classification_step``, ``retrieval_step``): one pass each, the loss of its task.

The switches are read through two small protocols (``PretrainSwitches``, ``RetrievalSwitches``): the run
configs that satisfy them (``training.config.TasksConfig``, ``RetrievalConfig``) sit in a torch-free module
above this package, so that a command checks its config before it imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import Tensor

from medvlp.models.model import MedVLP
from medvlp.objectives.align import hard_negatives, itc_loss, local_alignment_loss, random_negatives
from medvlp.objectives.classification import classification_loss
from medvlp.objectives.itm import itm_batch, itm_loss, itm_swap
from medvlp.objectives.mim import mim_loss
from medvlp.objectives.mlm import mlm_loss
from medvlp.objectives.retrieval import ranking_loss
from medvlp.objectives.vqa import vqa_loss


class PretrainSwitches(Protocol):
    """What the pre-training recipe reads of its config (``training.config.TasksConfig``)."""

    mlm: float
    mim: float
    itm: float
    itc: float
    local: float
    paired_masking: bool
    hard_negatives: bool
    align_whole_image: bool

    @property
    def align(self) -> bool: ...

    @property
    def reuse_itm(self) -> bool: ...

    def weights(self) -> dict[str, float]: ...


class RetrievalSwitches(Protocol):
    """What the retrieval step reads of its config (``training.config.RetrievalConfig``)."""

    negatives: int
    itc: float


# -- pre-training ------------------------------------------------------------------------------------------------
def pretrain_losses(model: MedVLP, batch: dict[str, Any], tasks: PretrainSwitches) -> tuple[Tensor, dict, dict]:
    """One pre-training step's losses (see the module docstring for the passes).

    Args:
        model: the model, in train or eval mode.
        batch: a collated batch with ``mlm_input_ids``/``mlm_labels`` (a ``Collator`` with MLM masking).
        tasks: the objectives' weights and switches.

    Returns:
        ``(total, logs, passes)``: the weighted loss; each loss (``mlm_loss``, ...) detached and each metric
        (``mlm_acc``, ``itm_acc``, ``itc_*``, ``local_*``); the passes' outputs by name (``pair``, ``mlm``,
        ``mim``, ``itm``), for pictures.
    """
    passes: dict[str, Any] = {}
    align, reuse = tasks.align, tasks.reuse_itm
    if tasks.paired_masking:
        passes["pair"] = model(batch, mask_image=bool(tasks.mim), mask_text=bool(tasks.mlm), itm=reuse, align=align)
        passes.update({name: passes["pair"] for name in ("mlm", "mim") if getattr(tasks, name)})
    else:
        if tasks.mlm:
            passes["mlm"] = passes["pair"] = model(batch, mask_text=True, itm=reuse, align=align)
        if tasks.mim:
            passes["mim"] = model(batch, mask_image=True)
        if (align or reuse) and "pair" not in passes:
            passes["pair"] = model(batch, itm=reuse, align=align)
    if align and tasks.align_whole_image and passes["pair"].masking is not None:
        passes["pair"] = whole_image_alignment(model, passes["pair"], batch)
    parts: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    if tasks.mlm:
        parts["mlm"], m = mlm_loss(passes["mlm"], batch)
        metrics["mlm_acc"] = m["accuracy"]
    if tasks.mim:
        parts["mim"], _ = mim_loss(passes["mim"], batch, norm_pix_loss=model.cfg.norm_pix_loss)
    if tasks.itc:
        parts["itc"], m = itc_loss(passes["pair"], batch)
        metrics.update({f"itc_{k}": v for k, v in m.items()})
    if tasks.local:
        parts["local"], m = local_alignment_loss(passes["pair"], batch)
        metrics.update({f"local_{k}": v for k, v in m.items()})
    if tasks.itm and not (reuse and batch["input_ids"].shape[0] < 2):  # one sample has no negative to reuse
        if reuse:
            logits, labels = reused_itm(model, passes["pair"], batch, tasks.hard_negatives)
            itm_out, itm_targets = dataclasses.replace(passes["pair"], itm_logits=logits), {"itm_labels": labels}
        else:
            itm_out, itm_targets = swapped_itm(model, passes, batch)
        parts["itm"], m = itm_loss(itm_out, itm_targets)
        metrics["itm_acc"] = m["accuracy"]
    weights = tasks.weights()
    total = sum(weights[name] * loss for name, loss in parts.items())
    return total, {**{f"{k}_loss": v.detach() for k, v in parts.items()}, **metrics}, passes


def swapped_itm(model: MedVLP, passes: dict[str, Any], batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """M3AE's ITM pass: half of the batch with another sample's image (``objectives.itm_swap``), every pair fused
    and scored. Returns an output with ``itm_logits`` and the targets (``itm_labels``) for ``itm_loss``.

    The step encodes each distinct input once: when another pass of the step has already encoded the whole
    images (the MLM pass) and the whole texts (the MIM pass), the ITM pass fuses those states, the images indexed
    by the swap, instead of encoding them again. The encoders see every sample on its own, so this computes the
    same logits as the pass on the swapped batch (``itm_batch``) up to float rounding, and backward sums the two
    uses' gradients into one encoder pass. With dropout on, the ITM pass shares the other pass's encoder dropout
    masks instead of drawing its own. Without both states (``mlm`` or ``mim`` switched off) it runs its own pass
    (added to ``passes`` as ``itm``).
    """
    whole_image = next((p.image_features for p in passes.values() if p.masking is None), None)
    whole_text = next((p.text_features for p in passes.values() if p.mlm_positions is None), None)
    source, labels = itm_swap(batch["input_ids"].shape[0])
    if whole_image is None or whole_text is None:
        targets = {**batch, "pixels": batch["pixels"][source.to(batch["pixels"].device)], "itm_labels": labels}
        out = passes["itm"] = model(targets, itm=True)
        return out, targets
    logits = model.match(whole_text, batch["attention_mask"], whole_image[source.to(whole_image.device)])
    return SimpleNamespace(itm_logits=logits), {"itm_labels": labels}


def whole_image_alignment(model: MedVLP, pair: Any, batch: dict[str, Any]) -> Any:
    """The pair pass ``pair`` (a ``MedVLPOutput``) with its image-side alignment embeddings (class token and
    patches) taken from the whole, unmasked image of ``batch``, encoded once more by the vision encoder alone.
    Returns a copy; ``pair`` is unchanged."""
    tokens = model.align_head.embed_image(model.encode_image(batch["pixels"]).states)
    return dataclasses.replace(pair, image_embed=tokens[:, 0], patch_embeds=tokens[:, 1:])


def reused_itm(model: MedVLP, pair: Any, batch: dict[str, Any], hard: bool) -> tuple[Tensor, Tensor]:
    """ITM on the pair pass's encoder states: its own pairs as positives, and every text again with another
    sample's image (drawn by similarity with ``hard``, else uniformly) as negatives.

    Returns ``(logits [2B, 2], labels [2B])``: the B positives (label 1), then the B negatives (label 0)."""
    size = pair.text_features.shape[0]
    if hard:
        donors = hard_negatives(pair.text_embed @ pair.image_embed.T)
    else:
        donors = random_negatives(size, device=pair.text_features.device)
    negatives = model.match(pair.text_features, batch["attention_mask"], pair.image_features[donors])
    logits = torch.cat([pair.itm_logits, negatives])
    matched = torch.ones(size, dtype=torch.long, device=logits.device)
    return logits, torch.cat([matched, torch.zeros_like(matched)])


def matching_accuracy(model: MedVLP, batch: dict[str, Any]) -> Tensor:
    """ITM accuracy (a 0-dim tensor in [0, 1]) by M3AE's protocol, whatever the training objective: whole images
    and whole texts, half of the batch with another sample's image drawn at random. Validation reports it as
    ``itm_acc`` for every config; with paired masking or hard negatives the objective's own accuracy (masked
    pair pass, negatives drawn by similarity) is ``itm_objective_acc``."""
    targets = itm_batch(batch)
    return itm_loss(model(targets, itm=True), targets)[1]["accuracy"]


# -- downstream --------------------------------------------------------------------------------------------------
def vqa_step(model: MedVLP, batch: Mapping[str, Any], _: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Med-VQA: BCE of the classifier's answer logits against the batch's soft answer scores.
    Returns ``(loss, metrics)`` (``objectives.vqa_loss``)."""
    return vqa_loss(model(batch, classify=True), batch)


def classification_step(model: MedVLP, batch: Mapping[str, Any], _: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Classification: cross-entropy of the classifier's logits against the batch's ``label``.
    Returns ``(loss, metrics)`` (``objectives.classification_loss``)."""
    return classification_loss(model(batch, classify=True), batch)


def retrieval_step(model: MedVLP, batch: Mapping[str, Any], cfg: RetrievalSwitches) -> tuple[Tensor, dict[str, Tensor]]:
    """Retrieval fine-tuning: ITC on the pass's global embeddings (weight ``cfg.itc``), plus the ITM ranking loss
    of every true pair against ``cfg.negatives`` hard negatives per direction, fused from the same encoder states
    (no second encoding). Returns ``(loss, metrics)`` (``itc_*``, ``rank_t2i_acc``, ``rank_i2t_acc``)."""
    out = model(batch, itm=True, align=True)
    size = out.text_features.shape[0]
    loss, metrics = torch.zeros((), device=out.itm_logits.device), {}
    if cfg.itc:
        itc, m = itc_loss(out)
        loss = loss + cfg.itc * itc
        metrics.update({f"itc_{k}": v for k, v in m.items()})
    k = min(cfg.negatives, size - 1)
    if k < 1:  # a batch of one has nothing to rank against
        return loss, metrics
    similarity = out.logit_scale * out.text_embed @ out.image_embed.T  # [text, image]
    mask = batch["attention_mask"].to(out.text_features.device)
    positive = model.match_score(out.itm_logits)[:, None]  # [B, 1]
    image_donors = hard_negatives(similarity, k=k)  # [B, k]: other images for each text
    text_donors = hard_negatives(similarity.T, k=k)  # [B, k]: other texts for each image
    text_rows = torch.arange(size, device=image_donors.device).repeat_interleave(k)
    wrong_image = model.match(out.text_features[text_rows], mask[text_rows],
                              out.image_features[image_donors.flatten()])
    other_texts = text_donors.flatten()
    wrong_text = model.match(out.text_features[other_texts], mask[other_texts], out.image_features[text_rows])
    for name, negatives in (("t2i", wrong_image), ("i2t", wrong_text)):
        rank, m = ranking_loss(torch.cat([positive, model.match_score(negatives).view(size, k)], dim=1))
        loss = loss + rank / 2
        metrics[f"rank_{name}_acc"] = m["accuracy"]
    return loss, metrics
