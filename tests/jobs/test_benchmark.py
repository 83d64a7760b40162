"""The benchmark report: tables, margins, baselines and published figures from run results."""

import pytest

from medvlp.errors import MedvlpError
from medvlp.jobs.benchmark import COLUMNS, environment, for_task, markdown_report, spread, summary, verdict


def run(start, seed, overall):
    return {"start": start, "seed": seed, "split": "test", "rows": 451, "best_step": 100,
            "test": {"overall_acc": overall, "open_acc": overall - 10, "closed_acc": overall + 10}}


RESULTS = {"init": "runs/pre", "tasks": {"vqa": {
    "dataset": "vqa_rad", "baseline": {"overall_acc": 40.0, "open_acc": 5.0, "closed_acc": 60.0},
    "runs": [run("pre-trained", 0, 60.0), run("pre-trained", 1, 62.0), run("scratch", 0, 50.0),
             run("scratch", 1, 51.0)]}}}


def test_summary_averages_the_seeds_per_starting_point():
    means = summary(RESULTS["tasks"]["vqa"], "vqa")
    assert means["pre-trained"]["overall_acc"] == 61.0 and means["scratch"]["overall_acc"] == 50.5


def test_report_has_margin_baseline_and_the_papers_figures():
    text = markdown_report(RESULTS)
    assert "| pre-trained | 0, 1 | 61.00 | 51.00 | 71.00 |" in text
    assert "| pre-trained − scratch | | +10.50 | +10.50 | +10.50 |" in text
    assert "| majority answer per type | | 40.00 | 5.00 | 60.00 |" in text
    assert "| M3AE (paper) | | 77.01 | 67.23 | 83.46 |" in text


def test_report_says_when_no_published_figure_is_recorded():
    results = {"init": None, "tasks": {"vqa": {**RESULTS["tasks"]["vqa"], "dataset": "synthetic-vqa"}}}
    text = markdown_report(results)
    assert "(paper)" not in text and "No published figure is recorded for synthetic-vqa" in text


def test_task_prefixed_overrides_reach_only_their_task():
    overrides = ["trainer.max_steps=10", "retrieval:retrieval.negatives=1", "vqa:image_size=96"]
    assert for_task(overrides, "retrieval") == ["trainer.max_steps=10", "retrieval.negatives=1"]
    assert for_task(overrides, "vqa") == ["trainer.max_steps=10", "image_size=96"]
    with pytest.raises(MedvlpError, match="'caption' is not a task"):
        for_task(["caption:x=1"], "vqa")


def test_seeds_are_comma_separated_so_overrides_can_follow():
    from medvlp.cli import build_parser

    args, extra = build_parser().parse_known_args(["benchmark", "--seeds", "0,1", "trainer.max_steps=5"])
    assert args.seeds == [0, 1] and extra == ["trainer.max_steps=5"]


def test_report_gives_each_starts_seed_spread_and_says_whether_the_margin_beats_it():
    assert spread(RESULTS["tasks"]["vqa"], "vqa")["pre-trained"]["overall_acc"] == 2.0
    text = markdown_report(RESULTS)
    assert "| pre-trained, seed spread | | 2.00 | 2.00 | 2.00 |" in text
    assert "| scratch, seed spread | | 1.00 | 1.00 | 1.00 |" in text
    assert "helped beyond the seed spread: **yes** — overall_acc +10.50 (spread 2.00)." in text
    close = {**RESULTS["tasks"]["vqa"], "runs": [run("pre-trained", 0, 50.0), run("pre-trained", 1, 56.0),
                                                 run("scratch", 0, 50.0), run("scratch", 1, 51.0)]}
    assert verdict(close, "vqa") == ("Pre-training helped beyond the seed spread: **no** — overall_acc +2.50 "
                                     "(spread 6.00).")
    one_seed = {**close, "runs": close["runs"][::2]}
    assert "one seed, so no spread to judge it by" in verdict(one_seed, "vqa")


def test_classification_and_retrieval_verdicts_read_both_headline_figures():
    def runs(task, pre, scratch):
        columns = ("accuracy", "macro_f1") if task == "classification" else ("i2t_r10", "t2i_r10")
        figures = {c: 0.0 for c in COLUMNS[task]}
        return {"runs": [{"start": start, "seed": seed, "split": "test",
                          "test": {**figures, **dict(zip(columns, values[seed]))}}
                         for start, values in (("pre-trained", pre), ("scratch", scratch)) for seed in (0, 1)]}

    half = verdict(runs("classification", [(40, 30), (42, 20)], [(25, 10), (25, 20)]), "classification")
    assert half.startswith("Pre-training helped beyond the seed spread: **partly** — accuracy +16.00 (spread 2.00)")
    assert verdict(runs("retrieval", [(8, 8), (7, 9)], [(1, 1), (2, 1)]), "retrieval").endswith(
        "**yes** — i2t_r10 +6.00 (spread 1.00), t2i_r10 +7.50 (spread 1.00).")


def test_report_states_machine_precision_and_commit():
    from medvlp.training.config import TrainerConfig

    env = environment(TrainerConfig(precision="32-true"))
    assert env["precision"] == "32-true" and "cores" in env["machine"] and env["commit"]
    text = markdown_report({**RESULTS, "environment": env})
    assert f"Machine: {env['machine']} · precision: 32-true · commit: {env['commit']}" in text
