"""Objectives: one pure function per loss, ``(outputs, batch) -> (loss, metrics)``; nothing logs.

Pre-training: MLM, MIM, ITM, ITC, local alignment. Fine-tuning: Med-VQA, classification, retrieval ranking."""

from medvlp.objectives.align import (
                                     alignment_words,
                                     gather_with_grad,
                                     gather_with_offset,
                                     hard_negatives,
                                     itc_loss,
                                     local_alignment_loss,
                                     local_similarity,
                                     random_negatives,
)
from medvlp.objectives.classification import classification_loss
from medvlp.objectives.itm import itm_batch, itm_loss, itm_negatives, itm_swap
from medvlp.objectives.mim import mim_loss, mim_targets
from medvlp.objectives.mlm import mlm_loss
from medvlp.objectives.retrieval import match_score, ranking_loss
from medvlp.objectives.vqa import vqa_loss, vqa_targets

__all__ = ["alignment_words", "classification_loss", "gather_with_grad", "gather_with_offset", "hard_negatives",
           "itc_loss", "itm_batch", "itm_loss", "itm_negatives", "itm_swap", "local_alignment_loss", "local_similarity",
           "match_score", "mim_loss", "mim_targets", "mlm_loss", "random_negatives", "ranking_loss", "vqa_loss",
           "vqa_targets"]
