"""The command line as a newcomer meets it: a config mistake reported in a fraction of a second, before torch is
imported; every example of every ``--help`` and of the README's command table accepted; one-line errors for an
export into a file, a linked image folder and a failed fine-tuning (which leaves no folder behind)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from medvlp.cli import build_parser, main

PYTHON = [sys.executable, "-c"]


@pytest.mark.parametrize("argv", [
    ["pretrain", "trainer.max_step=5"],
    ["demo", "trainer.max_step=5"],
    ["demo", "finetune.trainer.max_step=5"],
    ["finetune", "--task", "vqa", "trainer.max_step=5"],
    ["benchmark", "trainer.max_step=5"],
])
def test_a_config_typo_is_one_line_in_well_under_a_second_without_torch(argv):
    code = ("import sys, time; from medvlp.cli import main; t = time.perf_counter(); rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'lightning' in sys.modules, round(time.perf_counter() - t, 3))")
    start = time.perf_counter()
    done = subprocess.run([*PYTHON, code, *argv], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start  # the whole process: interpreter start, imports, the check
    rc, torch_loaded, lightning_loaded, _ = done.stdout.split()
    assert (rc, torch_loaded, lightning_loaded) == ("2", "False", "False"), done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "unknown config key 'max_step'; did you mean 'max_steps'?" in done.stderr
    assert elapsed < 1.5, f"{elapsed:.2f} s"  # ~0.2 s alone; generous for a busy 2-core machine


def test_the_demo_checks_every_fine_tuning_config_before_starting(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "finetune.retrieval.negatives=0"]) == 2
    assert "retrieval.negatives and retrieval.rerank_k must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing written


class Stop(Exception):
    """Raised where a command would start its work: everything before it (parsing, config) passed."""


@pytest.fixture
def dry(monkeypatch, tmp_path):
    """Run a command up to where its work starts (every heavy entry point replaced by ``Stop``)."""
    def stop(*args, **kwargs):
        raise Stop

    for target in ("medvlp.training.pretrain.pretrain", "medvlp.jobs.export.export_encoders",
                   "medvlp.jobs.zero_shot.zero_shot", "medvlp.training.finetune.finetune",
                   "medvlp.training.finetune.evaluate_run", "medvlp.jobs.demo.run_demo",
                   "medvlp.data.registry.prepare", "medvlp.data.synthetic.generate", "medvlp.predict.load",
                   "medvlp.convert.convert_m3ae", "medvlp.serve.serve"):
        monkeypatch.setattr(target, stop)
    (tmp_path / "run").mkdir()
    (tmp_path / "scan.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    def run(argv: list[str]) -> None:
        with pytest.raises(Stop):
            rc = main(argv)
            pytest.fail(f"medvlp {' '.join(argv)} ended with status {rc} before starting")

    return run


def subcommands() -> dict:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices


# What each command needs before its key=value examples, to get as far as its work.
REQUIRED = {"prepare": ["vqa_rad", "--raw", "raw", "--out", "out"], "synth": ["--out", "out"],
            "evaluate": ["run"], "benchmark": ["--out", "bench"], "demo": ["--out", "demo"],
            "finetune": ["--task", "vqa"]}


def help_examples() -> list[tuple[str, str]]:
    examples = []
    for name, parser in subcommands().items():
        text = parser.format_help()
        examples += [(name, token.rstrip(".,;)")) for token in re.findall(r"\b[\w.:]+=\S+", text)
                     if not token.startswith("TASK=") and "key=value" not in token]
    return examples


@pytest.mark.parametrize("command, example", help_examples())
def test_every_help_example_is_accepted(dry, command, example):
    dry([command, *REQUIRED.get(command, []), example])


def test_the_help_texts_show_examples():
    assert {command for command, _ in help_examples()} >= {"prepare", "synth", "pretrain", "finetune", "evaluate",
                                                            "benchmark", "demo"}


PLACEHOLDERS = {"NAME": "vqa_rad", "DIR": "run", "RUN": "run", "TEXT": "a question", "N": "3", "K": "3",
                "TASK=DIR": "vqa=run", "CHECKPOINT": "scan.png", "PNG": "heat.png"}


def readme_commands() -> list[str]:
    """The commands of the README's command table, as written there."""
    return re.findall(r"^\| `(medvlp [^`]*)`", (ROOT / "README.md").read_text(), re.M)


def as_argv(command: str) -> list[str]:
    """A table command as arguments: optional parts taken, the first of alternatives, placeholders filled."""
    command = command.replace("\\|", "|")
    argv = []
    for token in re.sub(r"[\[\]]", " ", command).split()[1:]:
        if token in ("...", "key=value", "--fresh"):  # --fresh needs a folder medvlp wrote (tests/jobs)
            continue
        if token == "FILE":
            token = "mpma-tiny" if argv[-1] == "--config" else "scan.png"
        token = PLACEHOLDERS.get(token, token.split("|")[0])
        argv.append(token)
    return argv


def test_the_readme_has_a_command_table():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_table_command_is_accepted(dry, command):
    argv = as_argv(command)
    if argv[0] == "datasets":
        assert main(argv) == 0
    else:
        dry(argv)


def test_export_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "taken")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"medvlp export: error: --out {tmp_path / 'taken'} is a file; give a new folder for vision/, " \
                    "text/ and tokenizer/"
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_failed_finetune_leaves_no_run_folder(tmp_path, capsys):
    run = tmp_path / "ft"
    assert main(["finetune", "--task", "vqa", "--init", str(tmp_path / "missing"), f"run_dir={run}"]) == 2
    assert "--init" in capsys.readouterr().err and not run.exists()
    from medvlp.errors import MedvlpError
    from medvlp.training.config import load_finetune_config
    from medvlp.training.finetune import finetune

    (tmp_path / "not-a-run").mkdir()  # exists, so the command line lets it through; finetune refuses it
    small = [f"synthetic_dir={tmp_path / 'data'}", "synthetic.workers=1",
             *[f"synthetic.{f}_{s}=4" for f in ("pretrain", "vqa", "classification", "retrieval")
               for s in ("train", "val", "test")]]
    with pytest.raises(MedvlpError, match="not a medvlp checkpoint"):
        finetune(load_finetune_config(None, ["task=vqa", f"run_dir={run}", f"init={tmp_path / 'not-a-run'}", *small]))
    assert not run.exists()
    kept = tmp_path / "kept"  # a folder the user made is never removed
    kept.mkdir()
    with pytest.raises(MedvlpError):
        finetune(load_finetune_config(None, ["task=vqa", f"run_dir={kept}", f"init={tmp_path / 'not-a-run'}", *small]))
    assert kept.is_dir()


def test_a_linked_image_folder_is_named_as_the_user_gave_it(raw_vqa_rad, tmp_path, capsys):
    raw = raw_vqa_rad()
    outside = tmp_path / "elsewhere"
    raw_vqa_rad.images.rename(outside)
    (raw / "VQA_RAD Image Folder").symlink_to(outside)
    assert main(["prepare", "vqa_rad", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "options.image_dir" not in error
    assert f"{raw / 'VQA_RAD Image Folder'}: the VQA-RAD image folder is a link to a folder outside" in error
    assert str(outside) in error


def test_prepare_default_output_is_ignored_by_git():
    assert "/data/" in (ROOT / ".gitignore").read_text().split()
