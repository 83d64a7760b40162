"""Pre-training throughput and hardware use, measured in one run.

For each model size and each method: a real optimiser step (forward + backward + AdamW) on a random batch
(uint8 images at the size's resolution, 64-token texts with 15% masked), timed after warm-up. M3AE's step is
three passes (MLM, MIM, ITM on a swapped batch); MPMA's is one paired-masking pass with global and local
alignment and hard-negative ITM from the same encoder states, with its memory in the fusion (the shipped
``m3ae-*`` / ``mpma-*`` configs). The model FLOPs of one step are counted by PyTorch's FlopCounterMode; the
machine's bf16 and fp32 matrix-multiply peaks are measured in the same run. Prints samples/s, model FLOP/s as
a fraction of the bf16 peak (and of fp32), and the MPMA / M3AE speed ratio.

    python benchmarks/pretrain.py [--sizes tiny base] [--methods m3ae mpma] [--batch-size 8] [--steps 3]
                                  [--precision auto]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medvlp.cli import config_path
from medvlp.models.model import build_model
from medvlp.training.optim import build_optimizer
from medvlp.training.pretrain import load_pretrain_config, pretrain_losses
from medvlp.training.trainer import resolve_precision


def matmul_peak(dtype: torch.dtype, device: str, seconds: float = 1.0, largest: int = 4096) -> float:
    """FLOP/s of square matmuls in ``dtype``: the size doubles (from 256) while one product takes under 50 ms,
    then products are repeated for about ``seconds``. Adaptive because bf16 on a CPU without AMX or AVX-512
    BF16 is emulated at well under 1 GFLOP/s, where a fixed 2048-wide product would take a minute."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        once = time.perf_counter() - start
        if once > 0.05 or n >= largest:
            break
        n *= 2
    repeats = max(1, round(seconds / max(once, 1e-6)))
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


def measure(method: str, size: str, batch_size: int, steps: int, precision: str, device: str) -> tuple:
    # the shipped config's model, tasks and optimiser, with randomly initialised encoders (no downloads)
    config = load_pretrain_config(config_path(Path(f"{method}-{size}")),
                                  ["model.vision.pretrained=null", "model.text.pretrained=null"])
    model = build_model(config.model).to(device).train()
    tasks = config.tasks
    optimizer = build_optimizer(model, config.optim)
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
    parser.add_argument("--methods", nargs="+", default=["m3ae", "mpma"])
    parser.add_argument("--precision", default="auto", help="auto, 32-true or bf16-mixed")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(args.precision)
    bf16_peak, fp32_peak = matmul_peak(torch.bfloat16, device), matmul_peak(torch.float32, device)
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}), "
          f"{torch.get_num_threads()} threads; precision {precision}; batch {args.batch_size}", flush=True)
    print(f"matmul peak measured: bf16 {bf16_peak / 1e9:,.1f} GFLOP/s, fp32 {fp32_peak / 1e9:,.1f} GFLOP/s", flush=True)
    for size in args.sizes:
        speed = {}
        for method in args.methods:
            params, seconds, flops = measure(method, size, args.batch_size, args.steps, precision, device)
            achieved = flops / seconds
            speed[method] = args.batch_size / seconds
            print(f"{method:4s} {size:4s} {params / 1e6:6.1f}M params: {speed[method]:8.2f} samples/s "
                  f"({seconds:.3f} s/step), {flops / 1e9:,.1f} GFLOP/step, {achieved / 1e9:,.1f} GFLOP/s = "
                  f"{achieved / bf16_peak:.1%} of the bf16 peak ({achieved / fp32_peak:.1%} of fp32)", flush=True)
        if {"m3ae", "mpma"} <= speed.keys():
            print(f"{size}: MPMA paired step / M3AE three-pass step = {speed['mpma'] / speed['m3ae']:.2f}x "
                  "samples/s", flush=True)

if __name__ == "__main__":
    main()
