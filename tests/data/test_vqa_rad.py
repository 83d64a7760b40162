"""VQA-RAD on the real files in ../shared/data: both layouts, the published counts, one answer vocabulary."""

from __future__ import annotations

import pytest

from medvlp.data.prepare import PrepareConfig
from medvlp.data.records import Records
from medvlp.data.registry import prepare
from medvlp.data.text import normalize_answer, normalize_answer_type


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_data):
    raw = shared_data / "vqa_rad"
    out = tmp_path_factory.mktemp("vqa_rad")
    m3ae = prepare("vqa_rad", raw, out / "m3ae")
    original = prepare("vqa_rad", raw, out / "original", PrepareConfig(layout="original"))
    return out, m3ae, original


def test_m3ae_split_counts(prepared):
    out, m3ae, _ = prepared
    assert m3ae["source"]["layout"] == "m3ae"
    assert m3ae["splits"]["train"]["rows"] == 3064 and m3ae["splits"]["test"]["rows"] == 451
    assert m3ae["splits"]["test"]["stats"] == {"closed": 272, "open": 179}
    assert m3ae["source"]["images_in_folder"] == 315
    assert m3ae["images"]["rows"] == 314 and m3ae["source"]["images_unreferenced"] == ["synpic35356.jpg"]
    assert m3ae["skipped"]["count"] == 0


def test_original_release_split_by_phrase_type(prepared):
    out, _, original = prepared
    assert original["source"]["layout"] == "original"
    assert original["splits"]["train"]["rows"] == 1797 and original["splits"]["test"]["rows"] == 451
    assert original["splits"]["test"]["stats"] == {"closed": 272, "open": 179}


def test_same_answer_vocabulary_from_both_layouts(prepared):
    _, m3ae, original = prepared
    assert m3ae["answer_vocab"] == original["answer_vocab"]
    assert len(m3ae["answer_vocab"]) == 514
    assert "yes" in m3ae["answer_vocab"] and "Yes" not in m3ae["answer_vocab"]


def test_records_read_back(prepared):
    out, _, _ = prepared
    test = Records(out / "m3ae", "test")
    first = test[0]
    assert first["question"] == "Is there evidence of an aortic aneurysm?"
    assert first["answer"] == "yes" and first["answer_type"] == "closed" and first["organ"] == "CHEST"
    assert first["image_bytes"][:2] == b"\xff\xd8"  # JPEG
    test_ids = set(test.column("id"))
    assert len(test_ids) == 451


def test_validation_carved_from_train_by_seeded_fraction(tmp_path, shared_data):
    a = prepare("vqa_rad", shared_data / "vqa_rad", tmp_path / "a", PrepareConfig(val_fraction=0.1, seed=3))
    prepare("vqa_rad", shared_data / "vqa_rad", tmp_path / "b", PrepareConfig(val_fraction=0.1, seed=4))
    assert a["splits"]["val"]["rows"] == 306 and a["splits"]["train"]["rows"] == 3064 - 306
    assert a["splits"]["test"]["rows"] == 451
    val_a = set(Records(tmp_path / "a", "val").column("id"))
    assert not val_a & set(Records(tmp_path / "a", "train").column("id"))
    assert val_a != set(Records(tmp_path / "b", "val").column("id"))


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("yes ", "yes"), (" Left  lung.", "left lung"), (12, "12"), ("2.5cm", "2.5cm"),
    ("Air?", "air"), ("\"Right\"", "right"), ("a , b", "a, b"),
])
def test_answer_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [("CLOSED ", "closed"), ("open", "open"), ("Closed", "closed"),
                                           ("yes/no", None), (None, None)])
def test_answer_type_normalisation(raw, expected):
    assert normalize_answer_type(raw) == expected
