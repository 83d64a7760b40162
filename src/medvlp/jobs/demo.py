"""The main job, ``medvlp demo``: synthesise the corpus, pre-train, fine-tune every task (pre-trained and from
scratch), report. Rerunnable: a second run in the same folder reuses the complete corpus and the finished
stages and says so, resumes an interrupted pre-training from its last checkpoint, and starts an interrupted
fine-tuning run again; ``fresh`` clears what an earlier demo wrote (checked by its marker file) first.

Everything the job will run is configured and checked before anything heavy is imported.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medvlp.config import to_dict
from medvlp.errors import MedvlpError
from medvlp.jobs.benchmark import plan
from medvlp.training.config import PretrainConfig, load_pretrain_config

MARKER = "medvlp-demo.json"  # written first: which settings made this folder; marks it as a demo's for ``fresh``
PARTS = ("data", "pretrain", "benchmark")  # what the demo writes beside its marker

# Fine-tuning seeds: every task is fine-tuned twice from each start, so that the report can say whether
# pre-training's margin is larger than the seeds' spread.
DEMO_SEEDS = (0, 1)

# Fine-tuning in the demo, short enough for the twelve runs to fit the demo's 15 minutes on 2 CPU cores: retrieval
# fuses every negative pair, so it runs fewer steps, one hard negative each way and re-ranks 8 candidates;
# classification, whose label needs the lesions counted and sided, gets 200 steps (at 120 one seed of the
# pre-trained model had not yet read them out: docs/results.md). Validation every 40 steps (50 for
# classification, 20 for retrieval) gives each curve of curves.png three or four points; after the steps
# themselves, evaluation is what a fine-tuning run spends its time on.
DEMO_FINETUNE = ["trainer.max_steps=120", "trainer.val_every=40", "classification:trainer.max_steps=200",
                 "classification:trainer.val_every=50", "retrieval:trainer.max_steps=60",
                 "retrieval:trainer.val_every=20", "retrieval:retrieval.negatives=1",
                 "retrieval:retrieval.rerank_k=8"]


@dataclass
class DemoPlan:
    """The demo's settings, read and checked: the pre-training config and the fine-tuning overrides."""

    out: Path
    settings: dict  # what the marker records: the config name and the overrides as given
    pretrain: PretrainConfig
    finetune: list[str]


def plan_demo(out: Path | str, config: Path | str | None, overrides: Sequence[str],
              label: str | None = None) -> DemoPlan:
    """Read and check every config of the job (pre-training, and each fine-tuning run) without importing torch.
    ``overrides`` apply to pre-training; those prefixed ``finetune.`` to every fine-tuning run. ``label`` is
    the config as the user named it (recorded in the marker; default: ``config``)."""
    out = Path(out)
    pretrain_overrides = [o for o in overrides if not o.startswith("finetune.")]
    finetune_overrides = [o.removeprefix("finetune.") for o in overrides if o.startswith("finetune.")]
    pretrain = load_pretrain_config(config, [f"run_dir={out / 'pretrain'}", f"data.synthetic_dir={out / 'data'}",
                                             *pretrain_overrides])
    corpus = json.dumps(to_dict(pretrain.data.synthetic))  # fine-tuning reads the corpus pre-training made
    finetune = [f"synthetic_dir={out / 'data'}", f"synthetic={corpus}", *DEMO_FINETUNE, *finetune_overrides]
    # checks every run's config (the init exists later)
    plan(None, out / "benchmark", seeds=DEMO_SEEDS, overrides=finetune)
    settings = {"config": label or (str(config) if config else None), "overrides": list(overrides)}
    return DemoPlan(out, settings, pretrain, finetune)


def claim(demo: DemoPlan, fresh: bool) -> None:
    """Make ``demo.out`` this demo's folder: new, or written by a demo with the same settings (else a one-line
    error), or with ``fresh`` cleared of what an earlier demo wrote there."""
    out, marker = demo.out, demo.out / MARKER
    if out.exists() and not out.is_dir():
        raise MedvlpError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file() and not earlier_demo(out):
            raise MedvlpError(f"{out} holds files that `medvlp demo` did not write (no {MARKER}); nothing was "
                              "deleted: give another --out")
        if not marker.is_file() and not fresh:
            raise MedvlpError(f"{out} holds a demo of an earlier medvlp (no {MARKER}); add --fresh to start over "
                              "there, or give another --out")
        if fresh:
            for part in PARTS:
                if (out / part).is_dir():
                    shutil.rmtree(out / part)
            marker.unlink(missing_ok=True)
        else:
            before = json.loads(marker.read_text())
            if before != demo.settings:
                raise MedvlpError(f"{out} holds a demo made with other settings ({describe(before)}; now "
                                  f"{describe(demo.settings)}); run it with the same ones, add --fresh to start "
                                  "over, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(demo.settings, indent=1) + "\n")


def earlier_demo(out: Path) -> bool:
    """Whether ``out`` is the folder of a demo from before the marker file: only the demo's parts, and its
    pre-training run's config among them."""
    return {p.name for p in out.iterdir()} <= set(PARTS) and (out / "pretrain" / "config.yaml").is_file()


def describe(settings: dict) -> str:
    return f"--config {settings['config'] or 'mpma-tiny'} {' '.join(settings['overrides'])}".strip()


def pretrain_state(run_dir: Path) -> str:
    """``finished`` (metrics written), ``interrupted`` (a checkpoint to resume from) or ``new``."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    if (run_dir / "checkpoints").exists():
        return "interrupted"
    return "new"


def run_demo(demo: DemoPlan, *, fresh: bool = False, say: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Run (or continue) the job; returns the pre-training run folder and the report's path."""
    from medvlp.data.synthetic import corpus_ready, ensure_corpus
    from medvlp.jobs.benchmark import benchmark
    from medvlp.training.pretrain import pretrain

    claim(demo, fresh)
    config = demo.pretrain
    corpus = Path(config.data.synthetic_dir)
    if corpus_ready(corpus, config.data.synthetic):
        say(f"[corpus] complete in {corpus}: reusing it")
    else:
        say(f"[corpus] generating the synthetic corpus in {corpus}")
        ensure_corpus(corpus, config.data.synthetic)
    run_dir = Path(config.run_dir)
    state = pretrain_state(run_dir)
    if state == "finished":
        step = json.loads((run_dir / "metrics.json").read_text()).get("step")
        say(f"[1/2] pre-training finished earlier (step {step}): reusing {run_dir}")
    else:
        say("[1/2] pre-training" + (f": resuming the interrupted run in {run_dir}" if state == "interrupted" else ""))
        pretrain(config, resume=state == "interrupted")
    for line in pretraining_summary(run_dir, config):
        say(line)
    say("[2/2] fine-tuning vqa, classification and retrieval, pre-trained and from scratch")
    report = benchmark(str(run_dir), demo.out / "benchmark", seeds=DEMO_SEEDS, overrides=demo.finetune, say=say)
    return run_dir, report


def pretraining_summary(run_dir: Path, config: PretrainConfig) -> list[str]:
    """What pre-training reached, said before the fine-tuning starts: its last held-out figures and, for a
    config that aligns the two modalities, zero-shot retrieval on the synthetic test pairs."""
    from medvlp.jobs.zero_shot import describe, zero_shot

    metrics = json.loads((run_dir / "metrics.json").read_text())
    held_out = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in metrics.items()
                         if k.startswith("val/") and k.endswith(("_acc", "_loss")))
    lines = [f"held-out (synthetic val, step {metrics.get('step')}): {held_out}"]
    if config.tasks.itc:
        lines += describe(zero_shot(run_dir), "zero-shot retrieval on the synthetic test pairs")
    return lines
