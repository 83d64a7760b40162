"""Hugging Face hub copies read from a local folder of parquet files (written here with pyarrow, with the
image struct ``datasets`` writes), for VQA-RAD, SLAKE and ROCO; the online path's messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import png_bytes
from helpers import prepare_reported as run

from medvlp.data.records import Records
from medvlp.errors import ConfigError, DataError

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write(path: Path, columns: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: pa.array(v, IMAGE) if k == "image" else pa.array(v) for k, v in columns.items()}
    pq.write_table(pa.table(arrays), path)


def images(n: int, start: int = 0) -> list[dict]:
    return [{"bytes": png_bytes(size=16, seed=start + i), "path": None} for i in range(n)]


def vqa_rad_copy(root: Path, train_answers: list[str] | None = None) -> Path:
    """flaxwu/vqa-rad style: image, question, answer; 3 images, several questions each."""
    answers = train_answers or ["yes", "No", "left lung", "yes", "axial", "no"]
    write(root / "data" / "train-00000-of-00001.parquet", {
        "image": [images(3)[i % 3] for i in range(len(answers))],
        "question": [f"question {i}?" for i in range(len(answers))], "answer": answers})
    write(root / "data" / "test-00000-of-00001.parquet", {
        "image": [images(1)[0], images(1, start=7)[0]], "question": ["is it normal?", "which organ?"],
        "answer": ["Yes", "liver"]})
    return root


def test_vqa_rad_copy_infers_answer_types(tmp_path):
    manifest, lines = run("vqa_rad", vqa_rad_copy(tmp_path / "raw"), tmp_path / "out")
    assert lines == [] and manifest["source"]["layout"] == "parquet"
    assert "closed for yes/no answers, open for the rest" in manifest["source"]["answer_type"]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 6, "test": 2}
    assert manifest["splits"]["train"]["stats"] == {"closed": 4, "open": 2}
    assert manifest["images"]["rows"] == 3 + 1  # one image per picture, whatever the number of questions or splits
    train = Records(tmp_path / "out", "train")
    assert train[1]["answer"] == "no" and train[1]["answer_type"] == "closed" and train[1]["id"] == "train-2"
    assert train[1]["image_bytes"] == png_bytes(size=16, seed=1)


def test_slake_copy_keeps_english_and_its_answer_types(tmp_path):
    raw = tmp_path / "raw"
    for split, n in (("train", 4), ("validation", 2), ("test", 2)):
        write(raw / f"{split}-00000-of-00001.parquet", {
            "image": images(n), "question": [f"q{i}" for i in range(n)], "answer": ["Yes"] * n,
            "answer_type": ["OPEN"] * n, "q_lang": ["en", "zh"] * (n // 2), "qid": list(range(n))})
    manifest, lines = run("slake", raw, tmp_path / "out")
    assert lines == [] and manifest["source"]["questions_not_english"] == 4 and "answer_type" not in manifest["source"]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert manifest["splits"]["train"]["stats"] == {"closed": 0, "open": 2}  # the copy's own types, kept
    assert Records(tmp_path / "out", "train").column("id") == ["0", "2"]


def test_roco_copy_for_pretraining_and_retrieval(tmp_path):
    raw = tmp_path / "raw"
    for split, n in (("train", 5), ("validation", 2), ("test", 4)):
        write(raw / f"{split}-00000-of-00001.parquet", {
            "image": images(n), "image_id": [f"ROCO_{split}_{i}" for i in range(n)],
            "caption": ["CT scan"] + [f"Axial CT of the abdomen, case {i}." for i in range(1, n)]})
    pretrain, _ = run("roco", raw, tmp_path / "pretrain")
    assert {s: e["rows"] for s, e in pretrain["splits"].items()} == {"train": 4, "val": 1, "test": 3}
    assert pretrain["source"]["short_captions_dropped"] == {"train": 1, "val": 1, "test": 1}
    assert Records(tmp_path / "pretrain", "train")[0]["captions"] == ["Axial CT of the abdomen, case 1."]
    retrieval, _ = run("roco_retrieval", raw, tmp_path / "retrieval", options={"test_pairs": 2})
    assert retrieval["splits"]["test"]["rows"] == 2 and retrieval["family"] == "retrieval"
    assert Records(tmp_path / "retrieval", "val")[0]["id"] == "ROCO_validation_1"


def test_missing_column_names_the_file(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "train-00000-of-00001.parquet", {"image": images(2), "question": ["a?", "b?"], "text": ["x", "y"]})
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: missing column 'answer' \(it has image, "
                                        r"question, text\)"):
        run("vqa_rad", raw, tmp_path / "out", layout="parquet")


def test_rows_without_image_and_duplicate_ids_are_skipped(tmp_path):
    raw = tmp_path / "raw"
    pictures = images(6)
    pictures[2] = {"bytes": None, "path": None}
    write(raw / "train-00000-of-00001.parquet", {"image": pictures, "question": [f"q{i}?" for i in range(6)],
                                                 "answer": ["yes"] * 6, "qid": [0, 1, 2, 3, 3, 5]})
    manifest, lines = run("vqa_rad", raw, tmp_path / "out", max_bad_fraction=0.5)
    assert lines == ["skipped train-00000-of-00001.parquet row 2: no image bytes in column 'image'; use a copy whose "
                     "rows hold the images",
                     "skipped train-00000-of-00001.parquet row 4: duplicate id '3' in split 'train'; give every "
                     "record its own id"]
    assert manifest["splits"]["train"]["rows"] == 4


def test_file_name_without_a_split(tmp_path):
    write(tmp_path / "raw" / "part-0.parquet", {"image": images(1), "caption": ["a b c"]})
    with pytest.raises(DataError, match="part-0.parquet: cannot tell the split from the file name"):
        run("roco", tmp_path / "raw", tmp_path / "out")


def test_online_layout_needs_a_repo_and_the_datasets_package(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"layout=hub needs options.repo_id=OWNER/NAME"):
        run("vqa_rad", tmp_path / "cache", tmp_path / "out", layout="hub")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as when it is not installed
    with pytest.raises(DataError, match=r"^layout=hub reads through the `datasets` package, which is not installed: "
                                        r"pip install 'medvlp\[hub\]'"):
        run("slake", tmp_path / "cache", tmp_path / "out", layout="hub", options={"repo_id": "someone/slake"})
