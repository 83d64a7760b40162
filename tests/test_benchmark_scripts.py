"""The benchmark scripts under benchmarks/ still run against the code they measure, and measure the right thing
(the retrieval benchmark, which needs a fine-tuned run, is tested beside the fine-tuning tests)."""

from __future__ import annotations

import sys
from pathlib import Path

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
