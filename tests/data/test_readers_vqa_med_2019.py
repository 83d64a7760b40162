"""VQA-Med-2019 from a raw folder built here in the published layout, and its bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import png_bytes, prepare_reported

from medvlp.data.records import Records
from medvlp.errors import ConfigError, DataError

ANSWERS = {"Modality": "ct w/contrast (iv)", "Organ": "Skull and Contents", "Plane": "axial",
           "Abnormality": "glioblastoma multiforme"}
QUESTIONS = {"Modality": "what modality was used to take this image?", "Organ": "what organ system is shown?",
             "Plane": "in what plane is this image oriented?", "Abnormality": "what is abnormal in the ct scan?"}
COUNTS = {"train": 6, "val": 3, "test": 2}


def build(root: Path, edit=None) -> Path:
    """Per split: images synpicN.jpg and one question per image in each category file (Abnormality too,
    which is read only when asked for). ``edit(split, category, lines)`` may change the lines."""
    for split, count in COUNTS.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "QA").mkdir()
        for i in range(count):
            (root / split / "images" / f"synpic{i}.jpg").write_bytes(png_bytes(size=16, seed=i))
        for category, answer in ANSWERS.items():
            lines = [f"synpic{i}|{QUESTIONS[category]}|{answer}" for i in range(count)]
            if edit:
                edit(split, category, lines)
            (root / split / "QA" / f"{category}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run(raw: Path, out: Path, **config):
    return prepare_reported("vqa_med_2019", raw, out, **config)


def test_prepares_three_categories_all_open(tmp_path):
    manifest, lines = run(build(tmp_path / "raw"), tmp_path / "out")
    assert lines == [] and manifest["source"]["categories_ignored"] == ["Abnormality"]
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 18, "val": 9, "test": 6}
    assert manifest["splits"]["train"]["stats"] == {"closed": 0, "open": 18}
    assert manifest["images"]["rows"] == 6 + 3 + 2  # each split's images stored once
    assert manifest["answer_vocab"] == ["axial", "ct w/contrast (iv)", "skull and contents"]
    test = Records(tmp_path / "out", "test")
    row = test[0]
    assert row["id"] == "Modality/synpic0" and row["category"] == "Modality" and row["image_name"] == "synpic0.jpg"
    assert row["question"] == "what modality was used to take this image?" and row["answer_type"] == "open"


def test_categories_option(tmp_path):
    raw = build(tmp_path / "raw")
    every, _ = run(raw, tmp_path / "all", options={"categories": "all"})
    assert every["splits"]["train"]["rows"] == 24 and every["source"]["categories_ignored"] == []
    two, _ = run(raw, tmp_path / "two", options={"categories": "Organ,Plane"})
    assert two["splits"]["train"]["rows"] == 12
    expected = r"train/QA/Nope.csv: file not found; each split needs a file for every category in "
    with pytest.raises(DataError, match=expected):
        run(raw, tmp_path / "nope", options={"categories": ["Nope"]})
    with pytest.raises(ConfigError, match="options.categories=5"):
        run(raw, tmp_path / "five", options={"categories": 5})


def _edit(kind: str):
    def edit(split: str, category: str, lines: list[str]) -> None:
        if split == "train" and category == "Organ":
            if kind == "comma separated":
                lines[2] = lines[2].replace("|", ",")
            elif kind == "four fields":
                lines[2] += "|extra"
            elif kind == "duplicate id":
                lines[2] = lines[2].replace("synpic2", "synpic1")
            elif kind == "missing image":
                lines[2] = lines[2].replace("synpic2", "synpic99")
    return edit


@pytest.mark.parametrize("kind, expected", [
    ("comma separated", "train/QA/Organ.csv line 3: 1 field(s) where 3 separated by '|' were expected (image_id, "
                        "question, answer); separate the fields with '|'"),
    ("four fields", "train/QA/Organ.csv line 3: 4 field(s) where 3 separated by '|' were expected"),
    ("duplicate id", "train/QA/Organ.csv line 3: duplicate id 'Organ/synpic1' in split 'train'"),
    ("missing image", "train/QA/Organ.csv line 3: image "),
])
def test_bad_lines_name_file_and_line(tmp_path, kind, expected):
    manifest, lines = run(build(tmp_path / "raw", _edit(kind)), tmp_path / "out", max_bad_fraction=0.1)
    assert manifest["skipped"]["count"] == 1 and len(lines) == 1 and lines[0].startswith("skipped " + expected)
    if kind == "missing image":
        assert "synpic99.jpg does not exist" in lines[0]


def test_separator_hint_when_the_whole_line_uses_another(tmp_path):
    def edit(split, category, lines):
        if split == "train" and category == "Plane":
            lines[0] = "synpic0\tin what plane is this image oriented?\taxial"

    _, lines = run(build(tmp_path / "raw", edit), tmp_path / "out", max_bad_fraction=0.1)
    assert lines == ["skipped train/QA/Plane.csv line 1: 1 field(s) where 3 separated by '|' were expected "
                     "(image_id, question, answer); separate the fields with '|' (this line splits into 3 on tabs)"]


def test_non_utf8_line(tmp_path):
    raw = build(tmp_path / "raw")
    path = raw / "val" / "QA" / "Plane.csv"
    path.write_bytes(path.read_bytes().replace(b"synpic1|in what plane", b"synpic1|in what pl\xe2ne"))
    _, lines = run(raw, tmp_path / "out", max_bad_fraction=0.1)
    assert lines == ["skipped val/QA/Plane.csv line 2: not UTF-8 text (byte 18 of the line); save the file as UTF-8"]


def test_folder_without_train(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="no train/QA/ folder"):
        run(tmp_path / "raw", tmp_path / "out")
