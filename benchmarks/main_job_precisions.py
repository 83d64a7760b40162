"""The main job (``medvlp demo``) under fp32 and under bf16 autocast, its two reports side by side.

Runs the whole demo (corpus, pre-training, fine-tuning of every task with two seeds, pre-trained and from
scratch) once per precision, each in its own folder under ``--out`` (the corpus is made once and shared), and
prints, per task and headline figure, the pre-trained and scratch means, the margin, the seeds' spread and the
report's verdict for each precision beside the other, with each demo's wall time. A change that helps only one
precision shows as a margin in one column and not the other. bf16 runs only where the CPU has bf16 matrix
instructions (AVX-512 BF16 or AMX; a CUDA GPU with bf16), since emulated bf16 is many times slower than fp32;
``--force-bf16`` runs it anyway. A second call reuses every finished stage (the demo is rerunnable).

    python benchmarks/main_job_precisions.py [--out runs/precisions] [--config mpma-tiny] [--force-bf16]
                                             [KEY=VALUE ...]   # overrides for the demo, as `medvlp demo` takes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medvlp.cli import config_path
from medvlp.jobs.benchmark import HEADLINES, spread, summary, verdict
from medvlp.jobs.demo import plan_demo, run_demo

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def bf16_supported() -> bool:
    """Whether bf16 matrix work is native here: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def run_precision(out: Path, config: str, overrides: list[str], precision: str) -> tuple[dict, float]:
    """One demo in ``out`` with every stage at ``precision`` (Lightning's name); returns its report.json and
    its wall time in seconds."""
    settings = [*overrides, f"trainer.precision={precision}", f"finetune.trainer.precision={precision}"]
    demo = plan_demo(out, config_path(Path(config)), settings, label=config)
    start = time.perf_counter()
    _, report = run_demo(demo, say=lambda line: print(f"[{precision}] {line}", flush=True))
    return json.loads((report.parent / "report.json").read_text()), time.perf_counter() - start


def side_by_side(results: dict[str, tuple[dict, float]]) -> str:
    """A Markdown table: one row per task and headline figure, one column group per precision."""
    names = list(results)
    lines = ["| task | figure | " + " | ".join(f"{n}: pre-trained | {n}: scratch | {n}: margin | {n}: spread"
                                               for n in names) + " |",
             "|" + " --- |" * (2 + 4 * len(names))]
    tasks = list(next(iter(results.values()))[0]["tasks"])
    for task in tasks:
        for column in HEADLINES[task]:
            cells = []
            for name in names:
                task_results = results[name][0]["tasks"][task]
                means, spreads = summary(task_results, task), spread(task_results, task)
                pre, scratch = means["pre-trained"][column], means["scratch"][column]
                noise = max(spreads["pre-trained"][column], spreads["scratch"][column])
                cells.append(f"{pre:.2f} | {scratch:.2f} | {pre - scratch:+.2f} | {noise:.2f}")
            lines.append(f"| {task} | {column} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, (report, seconds) in results.items():
        env = report.get("environment", {})
        lines.append(f"{name} ({env.get('precision', '?')}, {seconds / 60:.1f} min on {env.get('machine', '?')}, "
                     f"commit {env.get('commit', '?')}):")
        lines += [f"- {task}: {verdict(report['tasks'][task], task)}" for task in tasks]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/precisions"))
    parser.add_argument("--config", default="mpma-tiny", help="the demo's pre-training config (default mpma-tiny)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even where it is emulated (slow)")
    args, overrides = parser.parse_known_args()

    names = ["fp32"]
    if bf16_supported() or args.force_bf16:
        names.append("bf16")
    else:
        print("bf16: this machine has no native bf16 matrix instructions (AVX-512 BF16, AMX or a bf16 GPU); "
              "running fp32 only (--force-bf16 runs it emulated)", flush=True)
    corpus = args.out / "data"  # one corpus for both: the demos read it through data.synthetic_dir
    shared = [f"data.synthetic_dir={corpus}", f"finetune.synthetic_dir={corpus}", *overrides]
    results = {name: run_precision(args.out / name, args.config, shared, PRECISIONS[name]) for name in names}
    table = side_by_side(results)
    (args.out / "precisions.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
