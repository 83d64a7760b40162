"""One rank of the two-process gloo check of ``gather_with_grad`` (run as a script by test_align.py).

Usage: ``python dist_worker.py RANK WORLD INIT_FILE OUT_FILE``. Rank ``r`` holds ``r + 2`` rows (the ranks
differ on purpose) filled with ``r + 1``; rank ``r``'s loss is ``(r + 1) * sum(gathered)``, so every row's
gradient is ``1 + 2 + ... + world``. Then ``itc_loss`` on rank ``r``'s two rows of a 4-pair batch that every rank
draws alike (seed 0). It saves what it saw to ``OUT_FILE``. ``objectives/align.py`` is loaded
from its file, without the ``medvlp`` package, which keeps the start of each process to the import of torch.
"""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

ALIGN = Path(__file__).resolve().parents[2] / "src" / "medvlp" / "objectives" / "align.py"


def _align():
    spec = importlib.util.spec_from_file_location("medvlp_align_under_test", ALIGN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    align = _align()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.full((rank + 2, 3), float(rank + 1), requires_grad=True)
        gathered, offset = align.gather_with_offset(x)
        (gathered.sum() * (rank + 1)).backward()
        plain = align.gather_with_grad(x.detach() * 2)

        full = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
        local = full[2 * rank:2 * rank + 2].clone().requires_grad_(True)
        outputs = SimpleNamespace(image_embed=local[:, 0], text_embed=local[:, 1], logit_scale=torch.tensor(5.0))
        loss, metrics = align.itc_loss(outputs)
        loss.backward()
        torch.save({"gathered": gathered.detach(), "offset": offset, "grad": x.grad, "plain": plain,
                    "itc_loss": loss.detach(), "itc_grad": local.grad, "itc_metrics": metrics}, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
