"""Pre-training throughput and hardware use, measured in one run.

For each model size: a real optimiser step (forward + backward + AdamW) of the chosen objectives on a random
batch (uint8 images at the size's resolution, 64-token texts with 15% masked), timed after warm-up. The model
FLOPs of one step are counted by PyTorch's FlopCounterMode; the machine's bf16 (and fp32) matrix-multiply peak
is measured in the same run with large square matmuls. Prints samples/s and model FLOP/s as a fraction of the
bf16 peak.

    python benchmarks/pretrain.py [--sizes tiny base] [--batch-size 8] [--steps 3] [--paired] [--precision auto]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medvlp.models.config import model_config
from medvlp.models.model import build_model
from medvlp.training.optim import OptimConfig, build_optimizer
from medvlp.training.pretrain import TasksConfig, pretrain_losses, resolve_precision


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 6) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_batch(cfg, batch_size: int, length: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.text.vocab_size, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
    labels[:, 0] = labels[:, -1] = -100
    return {"pixels": torch.randint(0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                                    generator=g),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mlm_input_ids": torch.where(labels != -100, 4, ids), "mlm_labels": labels}


def measure(size: str, batch_size: int, steps: int, tasks: TasksConfig, precision: str, device: str) -> tuple:
    cfg = model_config(size)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, OptimConfig())
    batch = {k: v.to(device) for k, v in random_batch(model.cfg, batch_size).items()}
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss, _, _ = pretrain_losses(model, batch, tasks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up
    flops = counter.get_total_flops()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    return sum(p.numel() for p in model.parameters()), seconds, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--paired", action="store_true", help="MPMA's one-pass masking instead of M3AE's three")
    parser.add_argument("--precision", default="auto", help="auto, 32-true or bf16-mixed")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(args.precision)
    tasks = TasksConfig(paired_masking=args.paired)
    bf16_peak, fp32_peak = matmul_peak(torch.bfloat16, device), matmul_peak(torch.float32, device)
    print(f"device: {device}, {torch.get_num_threads()} threads; precision {precision}; "
          f"{'MPMA paired' if args.paired else 'M3AE three-pass'} step, batch {args.batch_size}")
    print(f"matmul peak measured: bf16 {bf16_peak / 1e9:,.1f} GFLOP/s, fp32 {fp32_peak / 1e9:,.1f} GFLOP/s")
    for size in args.sizes:
        params, seconds, flops = measure(size, args.batch_size, args.steps, tasks, precision, device)
        achieved = flops / seconds
        print(f"{size:5s} {params / 1e6:7.1f}M params: {args.batch_size / seconds:8.2f} samples/s "
              f"({seconds:.3f} s/step), {flops / 1e9:,.1f} GFLOP/step, {achieved / 1e9:,.1f} GFLOP/s = "
              f"{achieved / bf16_peak:.1%} of the bf16 peak ({achieved / fp32_peak:.1%} of fp32)")


if __name__ == "__main__":
    main()
