"""The training progress bar in optimiser steps: ``step 120/500 |████      | [00:40<02:07, 3.00step/s, loss=…]``.

Every run is step-based (``trainer.max_steps``, one pass over a sample stream), so Lightning's epoch bar says
"Epoch 0" and counts batches; this one counts steps against ``max_steps``, and after a resume starts at the
step it resumed from, so that the rate and the time left count only the steps of this launch.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """A ``TQDMProgressBar`` whose training bar reads ``step N/M`` with the rate and the time left."""

    TRAIN_FORMAT = "step {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(total=self.trainer.max_steps, initial=self.trainer.global_step, unit="step",
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.TRAIN_FORMAT)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # a resumed run: rate and time left count from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number, not a figure of the run
        return metrics
