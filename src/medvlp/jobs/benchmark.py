"""The benchmark runner: fine-tune and evaluate every task from a pre-trained run and from scratch, then write
one report (``report.md``, ``report.json`` and ``curves.png``) to the output folder.

A benchmark folder can be run again: runs that finished are read, not repeated (after checking they were made
with the same settings), a run that was interrupted resumes from its last checkpoint (``finetune(...,
resume=True)``: it ends as an uninterrupted run would), and
``fresh=True`` clears what an earlier benchmark wrote there (and nothing else) first. Every run's config is
read and checked before the first one starts, without importing torch.

Every run gets the same fine-tuning config (the defaults plus the caller's overrides) and the scratch runs use
the pre-trained run's architecture and tokenizer, so the only difference between the rows of a table is the
starting weights. Where a dataset is one a paper reports on, the paper's figures stand beside ours
(``PUBLISHED``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlp.config import load_config, to_dict
from medvlp.errors import MedvlpError
from medvlp.training.config import TASK_NAMES as TASKS
from medvlp.training.config import FinetuneConfig, load_finetune_config

log = logging.getLogger(__name__)

# What the report shows per task, in order (the first is the task's headline figure).
COLUMNS = {
    "vqa": ("overall_acc", "open_acc", "closed_acc"),
    "classification": ("accuracy", "macro_f1"),
    "retrieval": ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"),
}

# The figures the one-line verdict of each task reads: did pre-training beat scratch by more than the seeds' spread?
HEADLINES = {"vqa": ("overall_acc",), "classification": ("accuracy", "macro_f1"), "retrieval": ("i2t_r10", "t2i_r10")}

# Published test figures (%) of the full-size models, by prepared dataset name. M3AE: Chen et al., MICCAI 2022,
# Table 1 (VQA). Each row agrees with its test split: VQA-RAD's 179 open / 272 closed questions give
# (179 * 67.23 + 272 * 83.46) / 451 = 77.01 overall, SLAKE's 645 / 416 English ones (645 * 80.31 + 416 * 87.82)
# / 1,061 = 83.25. Other datasets' figures are not recorded here: add them once checked against the paper.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "vqa_rad": {"M3AE (paper)": {"overall_acc": 77.01, "open_acc": 67.23, "closed_acc": 83.46}},
    "slake": {"M3AE (paper)": {"overall_acc": 83.25, "open_acc": 80.31, "closed_acc": 87.82}},
}


MARKER = "medvlp-benchmark.json"  # written first: marks the folder as a benchmark's, for ``fresh``
OUTPUTS = ("report.md", "report.json", "curves.png")
RUN_FILES = {"config.yaml", "tokenizer", "model.safetensors", "model.safetensors.sha256", "model.yaml",
             "metrics.json", "logs", "checkpoints"}  # what finetune writes


@dataclass
class Run:
    """One fine-tuning run of a benchmark: where it goes and its checked config."""

    task: str
    start: str  # "pre-trained" | "scratch"
    seed: int
    run_dir: Path
    settings: list[str]  # the overrides it is built from (scratch runs get the init's model at launch)
    config: FinetuneConfig

    @property
    def name(self) -> str:
        return f"{self.task}, {self.start}, seed {self.seed}"


def plan(init: str | None, out: Path | str, *, tasks: Sequence[str] = TASKS, data: dict[str, str] | None = None,
         seeds: Sequence[int] = (0,), scratch: bool = True, overrides: Sequence[str] = (),
         progress: bool = True) -> list[Run]:
    """Every run of a benchmark with its config read and checked (no torch, nothing written): a mistyped key
    or a bad value is reported before the first run starts."""
    out, data = Path(out), dict(data or {})
    unknown = [t for t in (*tasks, *data) if t not in TASKS]
    if unknown:
        raise MedvlpError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    starts = ([("pre-trained", init)] if init else []) + ([("scratch", None)] if scratch else [])
    if not starts:
        raise MedvlpError("nothing to benchmark: give a pre-trained run (--init) or keep the scratch baseline")
    for path in ([init] if init else []) + list(data.values()):
        if not Path(path).exists():
            raise MedvlpError(f"{path}: no such folder")
    runs = []
    for task in tasks:
        for start, source in starts:
            for seed in seeds:
                run_dir = out / task / f"{start}-seed{seed}"
                settings = [f"task={task}", f"run_dir={run_dir}", f"trainer.seed={seed}",
                            f"trainer.progress_bar={str(progress).lower()}", *for_task(overrides, task)]
                if task in data:
                    settings.append(f"data={data[task]}")
                if source:
                    settings.append(f"init={source}")
                runs.append(Run(task, start, seed, run_dir, settings, load_finetune_config(None, settings)))
    return runs


def benchmark(init: str | None, out: Path | str, *, tasks: Sequence[str] = TASKS,
              data: dict[str, str] | None = None, seeds: Sequence[int] = (0,), scratch: bool = True,
              overrides: Sequence[str] = (), progress: bool = True, fresh: bool = False,
              say: Callable[[str], None] | None = None) -> Path:
    """Fine-tune ``init`` (and, with ``scratch``, a fresh model) on every task and seed; write the report and
    return the path of ``report.md``. ``data`` maps a task to a prepared dataset (default: the synthetic
    corpus's). ``overrides`` apply to every run, or with a ``TASK:`` prefix to one task's runs
    (``retrieval:trainer.max_steps=100``). Runs already finished in ``out`` are read, not repeated; an
    interrupted one resumes; ``fresh`` first removes what an earlier benchmark wrote to ``out``. ``say``
    (default: the log) receives one line per run saying which it is."""
    say = say or log.info
    out = Path(out)
    runs = plan(init, out, tasks=tasks, data=data, seeds=seeds, scratch=scratch, overrides=overrides,
                progress=progress)
    from medvlp.training.finetune import finetune  # once every config is checked: imports torch

    if fresh:
        clear(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"init": init, "tasks": list(tasks), "data": data or {},
                                          "seeds": list(seeds), "scratch": scratch,
                                          "overrides": list(overrides)}, indent=1) + "\n")
    results: dict[str, Any] = {"init": init, "environment": environment(runs[0].config.trainer), "tasks": {}}
    for run in runs:
        state = run_state(run)
        if state == "finished":
            say(f"benchmark: {run.name}: finished earlier, reusing {run.run_dir}")
        else:
            if state == "interrupted":
                say(f"benchmark: {run.name}: interrupted earlier, resuming it from its last checkpoint")
            else:
                say(f"benchmark: fine-tuning {run.name}")
            settings = run.settings if run.start != "scratch" or not init else [*run.settings, *scratch_like(init)]
            finetune(load_finetune_config(None, settings), resume=state == "interrupted")
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        task = results["tasks"].setdefault(run.task, {"runs": []})
        task["runs"].append({"start": run.start, "seed": run.seed, "run_dir": str(run.run_dir), **metrics})
    from medvlp.data.records import read_manifest

    for name, task in results["tasks"].items():
        root = Path(task["runs"][0]["data"])
        results["tasks"][name] = {"dataset": read_manifest(root)["dataset"], **task}
        if name == "vqa":
            results["tasks"][name]["baseline"] = majority_baseline(root, task["runs"][0]["split"])
    (out / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_curves(results, out / "curves.png")
    report = out / "report.md"
    report.write_text(markdown_report(results))
    return report


def run_state(run: Run) -> str:
    """``new`` (no folder yet), ``finished`` (its metrics are written; made with the same settings, else a
    ``MedvlpError``) or ``interrupted`` (a folder fine-tuning wrote, without metrics: resumed)."""
    folder = run.run_dir
    if not folder.exists():
        return "new"
    if (folder / "metrics.json").is_file():
        check_same_settings(run)
        return "finished"
    others = [p.name for p in folder.iterdir() if p.name not in RUN_FILES and not p.name.startswith(".")] \
        if folder.is_dir() else [folder.name]
    if others:
        raise MedvlpError(f"{folder} holds files a fine-tuning run does not write ({', '.join(others[:3])}); "
                          "nothing was deleted: move them, or give the benchmark another --out")
    return "interrupted"


# Filled in by fine-tuning from the data and the starting point, so not comparable with a request; and
# settings that do not change what a run learns.
FILLED = ("data", "classes", "model", "model_size", "image_size", "tokenizer", "run_dir")
UNCHANGING = ("num_workers", "trainer.progress_bar", "trainer.log_every", "retrieval.eval_batch_size")


def check_same_settings(run: Run) -> None:
    """Refuse to reuse a finished run that was made with other settings than ``run`` asks for."""
    done = to_dict(load_config(FinetuneConfig, run.run_dir / "config.yaml"))
    want = to_dict(run.config)
    if run.config.data is not None and str(Path(run.config.data)) != done["data"]:
        raise MedvlpError(f"{run.run_dir} was fine-tuned on {done['data']}, not {run.config.data}; give another "
                          "--out, or --fresh to start over")
    for key, value in flatten(want).items():
        if key.split(".")[0] not in FILLED and key not in UNCHANGING and flatten(done).get(key) != value:
            raise MedvlpError(f"{run.run_dir} was fine-tuned with {key}={flatten(done).get(key)!r}, this benchmark "
                              f"asks for {value!r}; give another --out, or --fresh to start over")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def clear(out: Path) -> None:
    """Remove what a benchmark wrote to ``out`` (its task folders, report and marker), after checking by the
    marker that one did; anything else in ``out`` stays."""
    if not out.exists():
        return
    if not (out / MARKER).is_file():
        raise MedvlpError(f"--fresh: {out} has no {MARKER}, so it was not written by `medvlp benchmark`; nothing "
                          "was deleted: give another --out")
    for task in TASKS:
        if (out / task).is_dir():
            shutil.rmtree(out / task)
    for name in (*OUTPUTS, MARKER):
        (out / name).unlink(missing_ok=True)


def majority_baseline(root: Path, split: str) -> dict[str, float]:
    """The majority-answer baseline of a prepared VQA dataset on ``split`` (answers counted on train)."""
    from medvlp.data.records import Records
    from medvlp.evaluation.metrics import majority_answer_accuracy

    train, test = Records(root, "train"), Records(root, split)
    return majority_answer_accuracy(train.column("answer"), train.column("answer_type"), test.column("answer"),
                                    test.column("answer_type"))


def for_task(overrides: Sequence[str], task: str) -> list[str]:
    """The overrides for ``task``: those without a ``TASK:`` prefix, and those with its own (prefix removed)."""
    chosen = []
    for override in overrides:
        prefix, colon, rest = override.partition(":")
        if not colon or "=" in prefix:
            chosen.append(override)
        elif prefix not in TASKS:
            raise MedvlpError(f"{override}: {prefix!r} is not a task; write TASK:key=value with TASK one of "
                              f"{', '.join(TASKS)}")
        elif prefix == task:
            chosen.append(rest)
    return chosen


def scratch_like(init: str) -> list[str]:
    """Overrides that give a from-scratch run the model architecture and tokenizer of the pre-training run."""
    from medvlp.config import load_config, to_dict
    from medvlp.training.checkpoint import resolve_checkpoint
    from medvlp.training.pretrain import PretrainConfig

    run = resolve_checkpoint(init).parent.parent
    config = load_config(PretrainConfig, run / "config.yaml")
    tokenizer = config.data.tokenizer or run / "tokenizer"
    return [f"model_size={config.model_size}", f"model={json.dumps(to_dict(config.model))}", f"tokenizer={tokenizer}"]


def environment(trainer: Any) -> dict[str, str]:
    """Where a benchmark ran, for its report: ``machine`` (CPU model and cores, and the GPU when fine-tuning runs
    on one), ``precision`` (the trainer's, resolved as fine-tuning resolves it) and ``commit`` (``git describe``
    of the medvlp source, or ``unknown`` outside a git checkout).

    Args:
        trainer: the fine-tuning runs' ``TrainerConfig`` (``precision`` and ``accelerator`` are read).

    Returns:
        ``{"machine": ..., "precision": ..., "commit": ...}``, all strings.
    """
    import os
    import platform
    import subprocess

    import torch

    from medvlp.training.trainer import resolve_precision

    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    machine = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if torch.cuda.is_available() and trainer.accelerator in ("auto", "gpu", "cuda"):
        machine += f"; GPU {torch.cuda.get_device_name(0)}"
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True,
                                   text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        commit = described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"machine": machine, "precision": resolve_precision(trainer.precision), "commit": commit}


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def summary(task_results: dict[str, Any], task: str) -> dict[str, dict[str, float]]:
    """Mean test figures per starting point: ``{"pre-trained": {...}, "scratch": {...}}``."""
    return {start: {c: _mean([m[c] for m in metrics]) for c in COLUMNS[task]}
            for start, metrics in _by_start(task_results).items()}


def _by_start(task_results: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Each starting point's test figures, one dict per seed."""
    by_start: dict[str, list[dict[str, float]]] = {}
    for run in task_results["runs"]:
        by_start.setdefault(run["start"], []).append(run[run["split"]])
    return by_start


def spread(task_results: dict[str, Any], task: str) -> dict[str, dict[str, float]]:
    """How far the seeds of each starting point lie apart (largest minus smallest test figure; 0 with one seed):
    ``{"pre-trained": {...}, "scratch": {...}}``."""
    return {start: {c: _range([m[c] for m in metrics]) for c in COLUMNS[task]}
            for start, metrics in _by_start(task_results).items()}


def _range(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return max(values) - min(values) if values else float("nan")


def verdict(task_results: dict[str, Any], task: str) -> str:
    """One line: whether pre-training beat scratch on each of the task's headline figures (``HEADLINES``) by more
    than the seeds' spread (the larger of the two starting points' spreads), or why it cannot be said."""
    means, spreads = summary(task_results, task), spread(task_results, task)
    if not {"pre-trained", "scratch"} <= means.keys():
        return "Pre-training's effect: not measured (a benchmark without both a pre-trained and a scratch run)."
    seeds = min(sum(r["start"] == start for r in task_results["runs"]) for start in ("pre-trained", "scratch"))
    parts, beyond = [], []
    for column in HEADLINES[task]:
        margin = means["pre-trained"][column] - means["scratch"][column]
        noise = max(spreads["pre-trained"][column], spreads["scratch"][column])
        beyond.append(margin > noise)
        parts.append(f"{column} {margin:+.2f} (spread {noise:.2f})")
    if seeds < 2:
        return f"Pre-training's effect: {', '.join(parts)}; one seed, so no spread to judge it by (use two seeds)."
    answer = "yes" if all(beyond) else "partly" if any(beyond) else "no"
    return f"Pre-training helped beyond the seed spread: **{answer}** — {', '.join(parts)}."


def markdown_report(results: dict[str, Any]) -> str:
    """The benchmark's report in Markdown: where it ran, then per task the mean test figures per starting point,
    the seeds' spread, the margin, a one-line verdict, baselines and published figures, and every run's figure."""
    lines = ["# medvlp benchmark", "", f"Pre-trained run: `{results['init'] or 'none (scratch only)'}`. "
             "Test-split figures in %, each the best-validation checkpoint of its run; means over the seeds, "
             "spread = largest minus smallest seed.", ""]
    env = results.get("environment")
    if env:
        lines += [f"Machine: {env['machine']} · precision: {env['precision']} · commit: {env['commit']}", ""]
    for task, task_results in results["tasks"].items():
        columns = COLUMNS[task]
        runs = task_results["runs"]
        split = runs[0]["split"]
        lines += [f"## {task} on {task_results['dataset']} ({split}, {runs[0]['rows']:,} rows)", "",
                  "| model | seeds | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
        means = summary(task_results, task)
        for start, figures in means.items():
            seeds = ", ".join(str(r["seed"]) for r in runs if r["start"] == start)
            lines.append(f"| {start} | {seeds} | " + " | ".join(f"{figures[c]:.2f}" for c in columns) + " |")
        for start, figures in spread(task_results, task).items():
            if sum(r["start"] == start for r in runs) > 1:
                lines.append(f"| {start}, seed spread | | " + " | ".join(f"{figures[c]:.2f}" for c in columns) + " |")
        if {"pre-trained", "scratch"} <= means.keys():
            margin = {c: means["pre-trained"][c] - means["scratch"][c] for c in columns}
            lines.append("| pre-trained − scratch | | " + " | ".join(f"{margin[c]:+.2f}" for c in columns) + " |")
        if "baseline" in task_results:
            figures = task_results["baseline"]
            lines.append("| majority answer per type | | " + " | ".join(f"{figures[c]:.2f}" for c in columns) + " |")
        published = PUBLISHED.get(task_results["dataset"], {})
        for name, figures in published.items():
            lines.append(f"| {name} | | " + " | ".join(f"{figures[c]:.2f}" if c in figures else "" for c in columns)
                         + " |")
        if not published:
            lines += ["", f"No published figure is recorded for {task_results['dataset']} (papers report on "
                          f"{', '.join(sorted(PUBLISHED))} here)."]
        lines += ["", verdict(task_results, task)]
        lines += ["", "Per run: " + "; ".join(
            f"{r['start']} seed {r['seed']}: {columns[0]} {r[split][columns[0]]:.2f} (best step {r['best_step']})"
            for r in runs), ""]
    lines += ["Training curves: `curves.png`; every run's folder holds its config, weights and logs.", ""]
    return "\n".join(lines)


def read_curve(run_dir: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric from a run's CSV log."""
    steps, values = [], []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(name) not in (None, ""):
                    steps.append(int(row["step"]))
                    values.append(float(row[name]))
    return steps, values


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """One column per task: training loss (top) and the validation selection metric (bottom), every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvlp.training.downstream import TASKS as TASK_SPECS

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 6), squeeze=False)
    for column, task in enumerate(tasks):
        selection = TASK_SPECS[task].selection
        for run in results["tasks"][task]["runs"]:
            label = f"{run['start']} s{run['seed']}"
            style = "-" if run["start"] == "pre-trained" else "--"
            axes[0][column].plot(*read_curve(Path(run["run_dir"]), "train/loss"), style, label=label, lw=1)
            history = run.get("val_history", [])
            axes[1][column].plot([h["step"] for h in history], [h[selection] for h in history], style + "o",
                                 label=label, ms=3)
        axes[0][column].set_title(f"{task}: training loss")
        axes[1][column].set_title(f"{task}: validation {selection}")
        axes[1][column].set_xlabel("step")
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
