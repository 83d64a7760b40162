"""One rank of the two-node torchrun check in ``test_distributed.py`` (started by ``torchrun``, not by pytest).

Usage: ``torchrun ... torchrun_worker.py OUT_DIR OVERRIDE...``: pre-trains with the given config overrides and
writes ``OUT_DIR/rank-R.json`` with the sample keys this rank read, the world size and a digest of its final
weights.
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning as L

from medvlp.training.pretrain import load_pretrain_config, pretrain


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.keys += batch["key"].tolist()

    def on_train_end(self, trainer, module) -> None:
        digest = hashlib.sha256()
        for name, value in sorted(module.model.state_dict().items()):
            digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "keys": self.keys,
                  "weights": digest.hexdigest(), "steps": trainer.global_step}
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    pretrain(load_pretrain_config(None, sys.argv[2:]), callbacks=[Record(out)])
