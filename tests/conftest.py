"""Shared fixtures: the real data folder, and a small raw VQA-RAD folder built from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA, png_bytes


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def raw_vqa_rad(tmp_path: Path):
    """A small VQA-RAD folder in the M3AE layout; returns a function ``(train_records, test_records) -> Path``
    that writes the JSON files (records may be edited by the test) beside six good images."""
    root = tmp_path / "vqa_rad"
    images = root / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    for i in range(6):
        (images / f"synpic{i}.jpg").write_bytes(png_bytes(seed=i))

    def record(qid: int, image: int, answer_type: str = "CLOSED", answer: object = "Yes") -> dict:
        return {"qid": qid, "image_name": f"synpic{image}.jpg", "image_organ": "CHEST", "answer": answer,
                "answer_type": answer_type, "question_type": "PRES", "question": f"Is there a finding {qid}?",
                "phrase_type": "freeform"}

    def build(train: list[dict] | None = None, test: list[dict] | None = None) -> Path:
        train = train if train is not None else [record(i, i % 6) for i in range(20)]
        test = test if test is not None else [record(100 + i, i % 6, "OPEN", "left lung") for i in range(5)]
        (root / "trainset.json").write_text(json.dumps(train))
        (root / "testset.json").write_text(json.dumps(test))
        return root

    build.record = record
    build.images = images
    return build
