"""The benchmark scripts under benchmarks/ still run against the code they measure, and measure the right thing
(the retrieval benchmark, which needs a fine-tuned run, is tested beside the fine-tuning tests)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, benchmark_script

from medvlp.data import synthetic as S
from medvlp.data.records import Records


@pytest.fixture(scope="module")
def classification(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    sizes = {f"{family}_{split}": 1 for family in S.FAMILIES for split in S.SPLITS}
    S.generate(out, S.SynthConfig(**{**sizes, "classification_train": 24, "classification_val": 8,
                                     "image_size": 64, "workers": 1}), report=lambda line: None)
    return out / "classification"


def test_lesion_probe_binary_label_is_lesion_or_none(classification):
    probe = benchmark_script("lesion_probe")
    _, binary = probe.load(classification, "train", 64, binary=True)
    records = Records(classification, "train")
    labels = [records[i]["label"] for i in range(len(records))]
    assert binary.tolist() == [label != "normal" for label in labels]
    assert "normal" in labels and len(set(labels)) > 2  # "normal" is not the first label index: the check bites
    _, patterns = probe.load(classification, "train", 64, binary=False)
    assert patterns.tolist() == [sorted(S.LABELS).index(label) for label in labels]


@pytest.mark.parametrize("encoder", [["--encoder", "vit"], ["--encoder", "vit", "--patch-size", "8", "--layers", "1"],
                                     ["--encoder", "cnn"]])
def test_lesion_probe_trains_and_reports_held_out_accuracy(classification, encoder, monkeypatch, capsys):
    probe = benchmark_script("lesion_probe")
    monkeypatch.setattr(sys, "argv", ["lesion_probe.py", "--data", str(classification), "--binary", *encoder,
                                      "--steps", "2", "--every", "1"])
    probe.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("24 training images, 8 held out; majority class")
    assert [line.split()[1] for line in lines[1:]] == ["1", "2"]
    assert all("held-out accuracy" in line for line in lines[1:])


def test_pretrain_throughput_prints_both_methods_their_ratio_and_another_checkout(monkeypatch, capsys):
    src = str(ROOT / "src")  # this checkout again, under another name
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--code", f"again={src}", "--configs", "m3ae-tiny", "mpma-tiny",
                                      "again:m3ae-tiny:32-true", "--steps", "1", "--batch-size", "2"])
    benchmark_script("pretrain").main()
    out = capsys.readouterr().out
    assert "matmul peak measured" in out
    lines = {line.split()[0]: line for line in out.splitlines() if "params" in line}
    assert lines.keys() == {"m3ae-tiny", "mpma-tiny", "again:m3ae-tiny"}
    for line in lines.values():
        assert "samples/s" in line and "GFLOP/step" in line and "of the fp32 peak" in line and "peak memory" in line
        assert re.search(r"\(\d[\d,]* page faults, \d+\.\d\d s system time per step\)", line)
    assert "precision: auto: " in lines["m3ae-tiny"] and "precision: as configured" in lines["again:m3ae-tiny"]
    assert f"again:m3ae-tiny: medvlp from {src}" in out
    assert "tiny: MPMA paired step / M3AE three-pass step = " in out

    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--configs", "m3ae-tiny", "--compare", "m3ae-tiny,mpma-tiny"])
    with pytest.raises(SystemExit, match="measure both"):
        benchmark_script("pretrain").main()


def test_loader_throughput_reads_a_prepared_dataset(classification, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["loader.py", "--data", str(classification), "--image-size", "64",
                                      "--batch-size", "4", "--workers", "0", "--batches", "3", "--warmup", "1"])
    benchmark_script("loader").main()
    out = capsys.readouterr().out
    assert "(classification, split train, 24 records)" in out
    assert "loader throughput:" in out and "samples/s over 2 batches" in out


def test_main_job_precisions_runs_the_demo_and_prints_the_reports_side_by_side(tmp_path, monkeypatch, capsys):
    from jobs.test_demo import SMALL

    script = benchmark_script("main_job_precisions")
    monkeypatch.setattr(script, "bf16_supported", lambda: False)  # fp32 alone and one seed keep the test short
    monkeypatch.setattr("medvlp.jobs.demo.DEMO_SEEDS", (0,))
    monkeypatch.setattr(sys, "argv", ["main_job_precisions.py", "--out", str(tmp_path), *SMALL])
    script.main()
    out = capsys.readouterr().out
    assert "running fp32 only" in out and (tmp_path / "data" / "pretrain").is_dir()
    assert not (tmp_path / "fp32" / "data").exists()  # the corpus is shared, not made per precision
    table = (tmp_path / "precisions.md").read_text()
    assert table in out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "figure" not in line and "---" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [["| vqa", "overall_acc"], ["| classification", "accuracy"],
                                                       ["| classification", "macro_f1"], ["| retrieval", "i2t_r10"],
                                                       ["| retrieval", "t2i_r10"]]
    assert "fp32 (32-true, " in table and table.count("one seed, so no spread to judge it by") == 3
    report = json.loads((tmp_path / "fp32" / "benchmark" / "report.json").read_text())
    both = script.side_by_side({"fp32": (report, 60.0), "bf16": (report, 30.0)})
    assert both.splitlines()[0].count("margin") == 2 and "bf16 (32-true, 0.5 min" in both


def test_zero_shot_itm_writes_every_pattern_for_the_images_modality_and_region():
    script = benchmark_script("zero_shot_itm")
    record = {"modality": "ct", "region": "chest", "size": "none", "brightness": "none", "shape": "none",
              "margin": "none"}
    texts, labels = script.candidates(record, np.random.default_rng(0))
    assert len(texts) == len(labels) == len(script.PATTERNS) * script.WORDINGS
    assert set(labels) == set(S.LABELS)
    assert all("CT" in t or "computed tomography" in t.lower() for t in texts)
    assert all(any(w in t.lower() for w in ("chest", "thorax", "thoracic")) for t in texts)
    both = [t for t, label in zip(texts, labels) if label == "bilateral lesions"]
    assert all("right" in t and "left" in t for t in both)  # complete captions place every lesion


def test_zero_shot_itm_predicts_the_label_of_the_best_scoring_caption(tiny_pretrain_run, monkeypatch, capsys):
    import torch

    from medvlp.models.model import MedVLP

    script = benchmark_script("zero_shot_itm")
    data = tiny_pretrain_run.parent / "data" / "classification"
    records = Records(data, "test")
    labels = [records[i]["label"] for i in range(len(records))]
    # an ITM head that prefers the first caption of every image, which is the "normal" pattern's
    per_image = len(script.PATTERNS) * script.WORDINGS
    monkeypatch.setattr(MedVLP, "match_score",
                        lambda self, logits: -(torch.arange(len(logits), dtype=torch.float) % per_image))
    monkeypatch.setattr(sys, "argv", ["zero_shot_itm.py", str(tiny_pretrain_run), "--data", str(data)])
    script.main()
    out = capsys.readouterr().out
    share = 100 * labels.count("normal") / len(labels)
    assert f"zero-shot ITM accuracy {share:.1f}% on {len(labels)} test images" in out
    normal = S.LABELS.index("normal")
    rows = [line for line in out.splitlines() if line.strip().split(":")[0] in S.LABELS]
    assert [int(row.split()[-len(S.LABELS) + normal]) for row in rows] == [labels.count(label) for label in S.LABELS]
