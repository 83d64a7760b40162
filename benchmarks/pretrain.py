"""Pre-training throughput and hardware use, measured in one run, with ratios between configurations.

For each configuration (a method and a model size, optionally a precision and a checkout of medvlp): a real
optimiser step (forward + backward + AdamW) on a random batch (uint8 images at the size's resolution, 64-token
texts with 15% masked), timed after one warm-up step. M3AE's step is three passes (MLM, MIM, ITM on a swapped
batch); ``mpma-base``'s is one paired-masking pass with global and local alignment and hard-negative ITM from the
same encoder states, with its memory in the fusion; ``mpma-tiny``'s has the same parts but M3AE's separate MLM
and MIM passes (its MLM reads the whole image). Each as its shipped config says. The model FLOPs
of one step are counted by PyTorch's FlopCounterMode (on the warm-up step); the machine's bf16 and fp32
matrix-multiply peaks are measured in the same run. Every configuration runs in a fresh process of its own, so
that its peak memory (RSS on a CPU, ``max_memory_allocated`` on CUDA) is its own and another checkout's code can
be measured beside this one.

Prints, per configuration: samples/s, s/step, GFLOP/step, achieved FLOP/s and its fraction of the peak of the
precision used (and of fp32), peak memory, which precision ``auto`` picked and why; then the ratios asked for.

    python benchmarks/pretrain.py [--sizes tiny base] [--methods m3ae mpma] [--batch-size 8] [--steps 3]
                                  [--precision auto]
    # before/after in one run: name another checkout's src/ and the configurations to measure
    python benchmarks/pretrain.py --code before=/path/to/old/src --configs before:m3ae-base m3ae-base \\
        m3ae-base:bf16-mixed mpma-base --compare before:m3ae-base,m3ae-base --batch-size 4 --steps 2

A configuration is ``[CODE:]METHOD-SIZE[:PRECISION]``; CODE is a name given with ``--code NAME=SRC`` (default:
this checkout); PRECISION defaults to ``--precision``. ``--compare A,B`` prints B's samples/s over A's; without
it, MPMA over M3AE for every size and code measured. ``--repeat N`` measures every configuration N times,
round-robin (on a shared machine a busy spell then slows every configuration). ``--compile`` also measures each
configuration with its encoders, fusion and decoder compiled (``torch.compile``; the compile time is the warm-up
step's extra time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

THIS = "this"  # the code name of this checkout


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


# -- one configuration, in its own process --------------------------------------------------------------------------
class Config(NamedTuple):
    code: str
    method: str
    size: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.code + ':' if self.code != THIS else ''}{self.method}-{self.size}"

    @property
    def label(self) -> str:
        return f"{self.name}:{self.precision}"


def parse_config(text: str, precision: str, codes: dict[str, str]) -> Config:
    """``[CODE:]METHOD-SIZE[:PRECISION]`` -> Config."""
    parts = text.split(":")
    code = parts.pop(0) if parts[0] in codes or parts[0] == THIS else THIS
    if not parts or "-" not in parts[0] or len(parts) > 2:
        raise SystemExit(f"--configs {text}: expected [CODE:]METHOD-SIZE[:PRECISION], e.g. before:m3ae-base:32-true")
    method, size = parts[0].split("-", 1)
    return Config(code, method, size, parts[1] if len(parts) == 2 else precision)


def pick_precision(precision: str, params: int, accelerator: str) -> tuple[str, str]:
    """The measured code's own rule for ``auto`` (older checkouts have ``resolve_precision`` only)."""
    from medvlp.training import trainer

    if hasattr(trainer, "choose_precision"):
        return trainer.choose_precision(precision, params, accelerator)
    return trainer.resolve_precision(precision), "this checkout's rule (no reason given)"


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def paging() -> tuple[int, float]:
    """This process's minor page faults and system CPU seconds so far (zeros where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def measure(method: str, size: str, batch_size: int, steps: int, precision: str, device: str,
            compile_model: bool = False) -> dict:
    """Time ``steps`` optimiser steps after one warm-up step (whose FLOPs are counted); returns the figures."""
    from torch.utils.flop_counter import FlopCounterMode

    from medvlp.cli import config_path
    from medvlp.models.model import build_model
    from medvlp.training.optim import build_optimizer

    try:
        from medvlp.objectives.recipes import pretrain_losses
        from medvlp.training.config import load_pretrain_config
    except ImportError:  # a checkout from before the recipes moved to objectives (--code)
        from medvlp.training.pretrain import load_pretrain_config, pretrain_losses

    # the shipped config's model, tasks and optimiser, with randomly initialised encoders (no downloads)
    config = load_pretrain_config(config_path(Path(f"{method}-{size}")),
                                  ["model.vision.pretrained=null", "model.text.pretrained=null"])
    model = build_model(config.model).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    precision, why = pick_precision(precision, params, "cuda" if device == "cuda" else "cpu")
    if compile_model:  # trainer.compile (this checkout only)
        from medvlp.training.pretrain import compile_parts

        compile_parts(model)
    try:  # what `medvlp pretrain` does to the allocator, where the measured checkout does it
        from medvlp.training.trainer import keep_freed_memory
    except ImportError:
        def keep_freed_memory() -> bool:
            return False
    kept = keep_freed_memory()
    allocator = ("freed memory kept (medvlp)" if kept else
                 "MALLOC_* environment" if any(k.startswith("MALLOC_") for k in os.environ) else "glibc default")
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

    start = time.perf_counter()
    if compile_model:  # FlopCounterMode does not see into compiled code: count on a second, plain model
        step()
        first = time.perf_counter() - start
        flops = None
    else:
        counter = FlopCounterMode(display=False)
        with counter:
            step()  # also the warm-up
        first = time.perf_counter() - start
        flops = counter.get_total_flops()
    sync(device)
    times = []
    faults_before, system_before = paging()  # page faults and system time: what the allocator costs
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    faults_after, system_after = paging()
    return {"params": params, "times": times, "seconds": sum(times) / len(times), "min_seconds": min(times),
            "first": first,
            "flops": flops, "memory": peak_memory(device), "precision": precision, "why": why,
            "allocator": allocator, "faults": (faults_after - faults_before) / steps,
            "system": (system_after - system_before) / steps,
            "medvlp": str(Path(sys.modules["medvlp"].__file__).parent)}


def merged(before: dict, again: dict) -> dict:
    """The figures of two measurements of one configuration: all their timed steps together."""
    times = before["times"] + again["times"]
    return {**before, "times": times, "seconds": sum(times) / len(times), "min_seconds": min(times),
            "memory": max(before["memory"], again["memory"]),
            "faults": (before["faults"] + again["faults"]) / 2, "system": (before["system"] + again["system"]) / 2}


def run_config(config: Config, src: str | None, args) -> dict:
    """``measure`` in a fresh process whose ``medvlp`` comes from ``src`` (this checkout's when None)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, __file__, "--worker", json.dumps({**config._asdict(), "batch_size": args.batch_size,
                                                                 "steps": args.steps, "compile": args.compile})]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{config.label} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def worker(spec: str) -> None:
    job = json.loads(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(measure(job["method"], job["size"], job["batch_size"], job["steps"], job["precision"], device,
                             job["compile"])), flush=True)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# -- the run --------------------------------------------------------------------------------------------------------
def report(config: Config, result: dict, batch_size: int, peaks: dict[str, float]) -> str:
    seconds = result["seconds"]
    line = (f"{config.name:22s} {result['params'] / 1e6:6.1f}M params, {result['precision']}: "
            f"{batch_size / seconds:8.2f} samples/s ({seconds:.3f} s/step over {len(result['times'])} steps, "
            f"fastest {result['min_seconds']:.3f})")
    if result["flops"]:
        achieved = result["flops"] / seconds
        kind = "bf16" if result["precision"].startswith("bf16") else "fp32"
        line += (f", {result['flops'] / 1e9:,.1f} GFLOP/step, {achieved / 1e9:,.1f} GFLOP/s = "
                 f"{achieved / peaks[kind]:.1%} of the {kind} peak")
        if kind != "fp32":
            line += f" ({achieved / peaks['fp32']:.1%} of fp32)"
    else:
        line += f", first (compiling) step {result['first']:.1f} s"
    return (line + f", peak memory {result['memory'] / 2**30:.2f} GiB; precision: {result['why']}; allocator: "
            f"{result.get('allocator', '?')} ({result['faults']:,.0f} page faults, {result['system']:.2f} s system "
            f"time per step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--methods", nargs="+", default=["m3ae", "mpma"])
    parser.add_argument("--configs", nargs="+", help="[CODE:]METHOD-SIZE[:PRECISION] (default: methods x sizes)")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=SRC",
                        help="another checkout's src/ folder to measure under NAME (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="A,B",
                        help="print B's samples/s over A's (repeatable); configurations as in --configs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="auto, 32-true or bf16-mixed")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every configuration this many times, round-robin, in fresh processes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders, fusion and decoder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    codes = dict(item.split("=", 1) for item in args.code)
    texts = args.configs or [f"{m}-{s}" for s in args.sizes for m in args.methods]
    configs = [parse_config(text, args.precision, codes) for text in texts]
    known = {c.name for c in configs} | {c.label for c in configs}
    for pair in args.compare:  # before anything is measured
        if len(pair.split(",")) != 2 or not set(pair.split(",")) <= known:
            raise SystemExit(f"--compare {pair}: give A,B and measure both (--configs); configured: "
                             f"{', '.join(sorted(known))}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {"bf16": matmul_peak(torch.bfloat16, device), "fp32": matmul_peak(torch.float32, device)}
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"device: {device} ({name}), {torch.get_num_threads()} threads; batch {args.batch_size}, "
          f"{args.steps} timed steps after 1 warm-up{', compiled' if args.compile else ''}", flush=True)
    print(f"matmul peak measured: bf16 {peaks['bf16'] / 1e9:,.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:,.1f} GFLOP/s",
          flush=True)
    results: dict[str, dict] = {}  # by name:precision, and by name for the first precision measured
    owner: dict[str, str] = {}  # name -> the label it stands for
    for repeat in range(args.repeat):  # round-robin, so that a busy spell of the machine hits every configuration
        if args.repeat > 1:
            print(f"round {repeat + 1} of {args.repeat}:", flush=True)
        for config in configs:
            result = run_config(config, codes.get(config.code), args)
            if config.code != THIS and not repeat:
                print(f"{config.name}: medvlp from {result['medvlp']}", flush=True)
            print(report(config, result, args.batch_size, peaks), flush=True)
            results[config.label] = merged(results[config.label], result) if repeat else result
            if owner.setdefault(config.name, config.label) == config.label:  # a name means its first precision
                results[config.name] = results[config.label]
    if args.repeat > 1:
        print(f"all {args.repeat} rounds:", flush=True)
        for config in configs:
            print(report(config, results[config.label], args.batch_size, peaks), flush=True)
    if not args.compare:  # MPMA over M3AE, for every size and code measured
        for c in configs:
            m3ae = results.get(f"{c.code + ':' if c.code != THIS else ''}m3ae-{c.size}:{c.precision}")
            if c.method == "mpma" and m3ae:
                print(f"{c.size}: MPMA paired step / M3AE three-pass step = "
                      f"{m3ae['seconds'] / results[c.label]['seconds']:.2f}x samples/s", flush=True)
    for pair in args.compare:
        a, b = pair.split(",")
        print(f"{b} / {a}: {results[a]['seconds'] / results[b]['seconds']:.2f}x samples/s (fastest steps: "
              f"{results[a]['min_seconds'] / results[b]['min_seconds']:.2f}x)", flush=True)

if __name__ == "__main__":
    main()
