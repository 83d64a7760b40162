"""The downstream tasks, one registry entry each: which data family it reads, its training step (a recipe of
``objectives.recipes``), how a split is evaluated, and which validation metric picks the best checkpoint.

=================  ==============  ===========================================  ============================
task               family          loss                                         metrics (selection first)
=================  ==============  ===========================================  ============================
``vqa``            vqa             BCE over the answer vocabulary (soft scores)  overall, open, closed acc.
``classification`` classification  cross-entropy over the labels                 accuracy, macro F1
``retrieval``      retrieval       ITC + ITM ranking against hard negatives      mean recall; R@1/5/10 both ways
=================  ==============  ===========================================  ============================

Med-VQA and classification put ``MedVLP.classifier`` on the joint representation. Retrieval fine-tunes the ITM
score: each true pair is ranked against ``negatives`` images (for its text) and ``negatives`` texts (for its
image) drawn from the batch by global similarity (hard negatives), fused from the encoder states of the one
pass; the global contrastive loss trains alongside, because two-stage evaluation lets the global embeddings
choose the candidates that the ITM score then re-ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from medvlp.errors import MedvlpError
from medvlp.evaluation.metrics import classification_metrics, vqa_accuracy
from medvlp.evaluation.retrieval import encode_pairs, retrieval_metrics
from medvlp.models.model import MedVLP
from medvlp.objectives.recipes import classification_step, retrieval_step, vqa_step
from medvlp.training.config import RetrievalConfig

Loss = Callable[[MedVLP, Mapping[str, Any], RetrievalConfig], tuple[Tensor, dict[str, Tensor]]]
Evaluate = Callable[[MedVLP, Any, Any, RetrievalConfig], dict[str, float]]


@dataclass(frozen=True)
class DownstreamTask:
    name: str
    family: str  # the prepared datasets it reads (records.FAMILIES)
    classes: str | None  # the manifest entry naming the classifier's classes ("answer_vocab", "labels") or None
    selection: str  # validation metric that picks the best checkpoint; higher is better
    loss: Loss
    evaluate: Evaluate  # (model, loader, dataset, retrieval config) -> metrics of the whole split


# -- Med-VQA -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_vqa(model: MedVLP, loader, dataset, _: RetrievalConfig) -> dict[str, float]:
    correct, closed = [], []
    for batch in _good_batches(loader):
        predicted = model(batch, classify=True).class_logits.argmax(dim=1).cpu()
        correct.append(predicted == batch["answer"])
        closed.append(batch["closed"])
    return vqa_accuracy(torch.cat(correct), torch.cat(closed))


# -- classification ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_classification(model: MedVLP, loader, dataset, _: RetrievalConfig) -> dict[str, float]:
    predicted, target = [], []
    for batch in _good_batches(loader):
        predicted.append(model(batch, classify=True).class_logits.argmax(dim=1).cpu())
        target.append(batch["label"])
    return classification_metrics(torch.cat(predicted), torch.cat(target))


# -- retrieval ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_retrieval(model: MedVLP, loader, dataset, cfg: RetrievalConfig) -> dict[str, float]:
    encoded = encode_pairs(model, loader, dataset.image_ids(), states=cfg.eval_mode != "zero-shot")
    metrics = retrieval_metrics(model, encoded, cfg.eval_mode, cfg.rerank_k, cfg.eval_batch_size)
    return {"mean_recall": sum(metrics.values()) / len(metrics), **metrics}


def _good_batches(loader):
    for batch in loader:
        if batch["n_bad"]:
            raise MedvlpError(f"{batch['n_bad']} images of the evaluation split could not be read (the lines above "
                              "name them); prepare the dataset again")
        yield batch


TASKS: dict[str, DownstreamTask] = {
    task.name: task for task in [
        DownstreamTask("vqa", "vqa", "answer_vocab", "overall_acc", vqa_step, evaluate_vqa),
        DownstreamTask("classification", "classification", "labels", "accuracy", classification_step,
                       evaluate_classification),
        DownstreamTask("retrieval", "retrieval", None, "mean_recall", retrieval_step, evaluate_retrieval),
    ]
}


def downstream_task(name: str) -> DownstreamTask:
    if name not in TASKS:
        raise MedvlpError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
