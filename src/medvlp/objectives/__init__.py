"""Pre-training objectives: one pure function per loss, ``(outputs, batch) -> (loss, metrics)``; nothing logs."""

from medvlp.objectives.itm import itm_batch, itm_loss, itm_negatives
from medvlp.objectives.mim import mim_loss, mim_targets
from medvlp.objectives.mlm import mlm_loss

__all__ = ["itm_batch", "itm_loss", "itm_negatives", "mim_loss", "mim_targets", "mlm_loss"]
