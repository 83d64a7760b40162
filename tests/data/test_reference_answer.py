"""The reference M3AE's answer normalisation (SPEC §10), by hand, and on the real VQA-RAD files."""

import json

import pytest

from medvlp.data.text import reference_answer


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("the left lung", "left lung"), ("Two", "2"), ("none", "0"), ("x-ray", "x ray"),
    ("t2 - weighted", "t2 weighted"), ("1,000", "1000"), ("2.5 cm.", "2.5 cm"), ("dont", "don't"),
    ("(ct)", "ct"), ("left, right", "left right"), ("an MRI", "mri"),
])
def test_reference_answer_by_hand(raw, expected):
    assert reference_answer(raw) == expected


def test_vqa_rad_answers_give_the_published_heads_498_labels(shared_data):
    labels = {reference_answer(str(r["answer"]).lower())
              for name in ("trainset.json", "testset.json")
              for r in json.loads((shared_data / "vqa_rad" / name).read_text())}
    assert len(labels) == 498  # M3AE's vqa_label_size for VQA-RAD (SPEC §1)
