"""Running the main job twice: a complete corpus and finished stages are reused (and it says so), an
interrupted pre-training resumes from its checkpoint, so does an interrupted fine-tuning run, ``--fresh``
clears only what the demo wrote; the benchmark alike. Also the progress the job prints on the way."""

from __future__ import annotations

import json
import re
import time

import pytest

from medvlp.cli import main
from medvlp.errors import MedvlpError
from medvlp.jobs.demo import MARKER, claim, plan_demo

SYNTH = [f"data.synthetic.{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
         for split, n in (("train", 24), ("val", 8), ("test", 8))]
SMALL = ["trainer.max_steps=4", "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.val_batches=1",
         "trainer.pictures=0", "trainer.progress_bar=false", "data.batch_size=8", "data.num_workers=0",
         "data.vocab_size=300", "data.synthetic.workers=1", *SYNTH,
         "finetune.trainer.max_steps=2", "finetune.trainer.val_every=2", "finetune.batch_size=8",
         "finetune.num_workers=0", "finetune.trainer.progress_bar=false"]


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, cls, step: int) -> None:
    """Make ``cls.training_step`` fail once the run reaches ``step`` (a kill at that moment, as far as the
    files on disk go)."""
    original = cls.training_step

    def failing(self, batch, batch_idx):
        if self.global_step >= step:
            raise Interrupt(f"interrupted at step {self.global_step}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", failing)


def without_commit(report: str) -> str:
    """A report without the commit it states (a commit made while the test runs changes that line alone)."""
    return re.sub(r"commit: \S+", "commit: ?", report)


def test_the_demo_resumes_then_reuses_everything(tmp_path, monkeypatch, capsys):
    from medvlp.training.pretrain import PretrainModule

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), *SMALL]
    with monkeypatch.context() as patch:
        interrupt_at(patch, PretrainModule, 3)
        with pytest.raises(Interrupt):
            main(argv)
    assert (out / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert "[corpus] generating" in capsys.readouterr().out

    assert main(argv) == 0  # the second run: corpus reused, pre-training resumed, fine-tuning done
    printed = capsys.readouterr().out
    assert f"[corpus] complete in {out / 'data'}: reusing it" in printed
    assert f"pre-training: resuming the interrupted run in {out / 'pretrain'}" in printed
    assert json.loads((out / "pretrain" / "metrics.json").read_text())["step"] == 4
    assert printed.count("benchmark: fine-tuning") == 12 and "report:" in printed  # two seeds
    # what pre-training reached is said before the fine-tuning starts, not after it
    assert printed.index("held-out (synthetic val, step 4): mlm_loss") < printed.index("[2/2] fine-tuning")
    assert printed.index("zero-shot retrieval on the synthetic test pairs (8 pairs") < printed.index("[2/2]")
    report = without_commit((out / "benchmark" / "report.md").read_text())

    started = time.perf_counter()
    assert main(argv) == 0  # the third: everything reused
    printed = capsys.readouterr().out
    assert "pre-training finished earlier (step 4): reusing" in printed
    assert printed.count("finished earlier, reusing") == 12 and "benchmark: fine-tuning" not in printed
    assert without_commit((out / "benchmark" / "report.md").read_text()) == report  # the same figures
    assert time.perf_counter() - started < 60

    assert main([*argv, "trainer.max_steps=5"]) == 2  # other settings: refused, nothing touched
    error = capsys.readouterr().err
    assert "holds a demo made with other settings" in error and "--fresh" in error
    assert json.loads((out / "pretrain" / "metrics.json").read_text())["step"] == 4


def test_fresh_removes_only_what_the_demo_wrote(tmp_path, capsys):
    out = tmp_path / "demo"
    demo = plan_demo(out, None, SMALL)
    claim(demo, fresh=False)
    for part in ("data", "pretrain", "benchmark"):
        (out / part).mkdir()
        (out / part / "file").write_text("x")
    (out / "my-notes.txt").write_text("mine")
    claim(demo, fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "my-notes.txt"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    assert main(["demo", "--out", str(other), "--fresh", *SMALL]) == 2
    assert "did not write (no medvlp-demo.json); nothing was deleted" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "mine"


def test_the_benchmark_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path, monkeypatch, capsys):
    from medvlp.jobs.benchmark import MARKER as BENCH_MARKER
    from medvlp.jobs.benchmark import benchmark
    from medvlp.training.finetune import FinetuneModule

    data = tmp_path / "data"
    settings = [f"synthetic_dir={data}", *[s.removeprefix("data.") for s in SYNTH], "synthetic.workers=1",
                "trainer.max_steps=4", "trainer.val_every=2", "batch_size=8", "num_workers=0", "vocab_size=300"]
    out = tmp_path / "bench"
    lines: list[str] = []
    with monkeypatch.context() as patch:
        interrupt_at(patch, FinetuneModule, 3)  # after the validation at step 2 wrote its weights
        with pytest.raises(Interrupt):
            benchmark(None, out, tasks=["classification"], seeds=[0, 1], overrides=settings, progress=False,
                      say=lines.append)
    interrupted = out / "classification" / "scratch-seed0"
    assert (interrupted / "model.safetensors").is_file() and not (interrupted / "metrics.json").exists()

    lines.clear()
    report = benchmark(None, out, tasks=["classification"], seeds=[0, 1], overrides=settings, progress=False,
                       say=lines.append)
    assert lines == ["benchmark: classification, scratch, seed 0: interrupted earlier, resuming it from its last "
                     "checkpoint", "benchmark: fine-tuning classification, scratch, seed 1"]
    assert json.loads((interrupted / "metrics.json").read_text())["val_history"][-1]["step"] == 4

    lines.clear()
    assert main(["benchmark", "--out", str(out), "--tasks", "classification", "--seeds", "0,1", *settings,
                 "trainer.progress_bar=false"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reusing") == 2
    assert main(["benchmark", "--out", str(out), "--tasks", "classification", *settings,
                 "trainer.max_steps=6"]) == 2
    assert "was fine-tuned with trainer.max_steps=4, this benchmark asks for 6" in capsys.readouterr().err

    (out / "classification" / "scratch-seed1" / "mine.txt").write_text("x")
    (out / "classification" / "scratch-seed1" / "metrics.json").unlink()
    with pytest.raises(MedvlpError, match="holds files a fine-tuning run does not write .mine.txt."):
        benchmark(None, out, tasks=["classification"], seeds=[0, 1], overrides=settings, progress=False)

    (out / "keep.txt").write_text("mine")
    report.with_name("curves.png").write_bytes(b"png")
    assert main(["benchmark", "--out", str(out), "--tasks", "classification", "--fresh", *settings,
                 "trainer.max_steps=1", "trainer.val_every=1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([BENCH_MARKER, "classification", "keep.txt",
                                                            "report.md", "report.json", "curves.png"])
    assert not (out / "classification" / "scratch-seed1").exists()
    assert main(["benchmark", "--out", str(tmp_path / "data"), "--fresh", *settings]) == 2
    assert "was not written by `medvlp benchmark`; nothing was deleted" in capsys.readouterr().err


def test_corpus_generation_reports_progress(tmp_path):
    from medvlp.data.synth_config import SynthConfig
    from medvlp.data.synthetic import generate

    lines: list[str] = []
    counts = {s.removeprefix("data.synthetic.").split("=")[0]: 8 for s in SYNTH}
    generate(tmp_path, SynthConfig(workers=1, **counts), report=lines.append, report_every=0)
    assert lines[0] == f"synthetic corpus: drawing 96 images into {tmp_path} with 1 worker(s)"
    progress = [line for line in lines if " of 96 images (" in line]
    assert len(progress) >= 4 and progress[-1].startswith("synthetic corpus: 96 of 96 images (100%)")


def test_step_based_runs_show_steps_with_time_left(tmp_path, capfd):
    from medvlp.training.config import load_finetune_config
    from medvlp.training.finetune import finetune

    finetune(load_finetune_config(None, [
        "task=classification", f"run_dir={tmp_path / 'run'}", f"synthetic_dir={tmp_path / 'data'}",
        *[s.removeprefix("data.") for s in SYNTH], "synthetic.workers=1", "trainer.max_steps=3",
        "trainer.val_every=3", "batch_size=8", "num_workers=0", "vocab_size=300"]))
    bar = capfd.readouterr().out.replace("\r", "\n")
    assert "step 3/3 |" in bar and "step/s" in bar and "<00:00" in bar and "Epoch" not in bar


def test_a_demo_folder_of_an_earlier_version_is_cleared_only_with_fresh(tmp_path):
    out = tmp_path / "demo"
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "config.yaml").write_text("run_dir: x\n")
    (out / "data").mkdir()
    demo = plan_demo(out, None, SMALL)
    with pytest.raises(MedvlpError, match="a demo of an earlier medvlp .no medvlp-demo.json.; add --fresh"):
        claim(demo, fresh=False)
    claim(demo, fresh=True)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_the_demo_validates_often_enough_for_curves_with_a_shape(tmp_path):
    from medvlp.jobs.benchmark import plan

    demo = plan_demo(tmp_path / "demo", None, [])
    for run in plan(None, tmp_path / "demo" / "benchmark", overrides=demo.finetune):
        assert run.config.trainer.max_steps // run.config.trainer.val_every >= 3, run.name
