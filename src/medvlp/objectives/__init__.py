"""Pre-training objectives: one pure function per loss, ``(outputs, batch) -> (loss, metrics)``; nothing logs."""

from medvlp.objectives.align import (alignment_words, gather_with_grad, gather_with_offset, hard_negatives,
                                     itc_loss, local_alignment_loss, local_similarity, random_negatives)
from medvlp.objectives.itm import itm_batch, itm_loss, itm_negatives
from medvlp.objectives.mim import mim_loss, mim_targets
from medvlp.objectives.mlm import mlm_loss

__all__ = ["alignment_words", "gather_with_grad", "gather_with_offset", "hard_negatives", "itc_loss", "itm_batch",
           "itm_loss", "itm_negatives", "local_alignment_loss", "local_similarity", "mim_loss", "mim_targets",
           "mlm_loss", "random_negatives"]
