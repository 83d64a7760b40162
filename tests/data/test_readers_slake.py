"""SLAKE: the real question files in ../shared/data/slake (read in place) with stand-in images made here, the
published English counts, and bad inputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import png_bytes, prepare_reported

from medvlp.data.prepare import Example, PrepareConfig
from medvlp.data.readers import slake
from medvlp.data.records import Records
from medvlp.data.registry import prepare
from medvlp.errors import DataError

FILES = ("train.json", "validate.json", "test.json")


def with_images(raw: Path, question_files: Path) -> Path:
    """A SLAKE folder: the question files linked from ``question_files``, a small image for each name."""
    raw.mkdir()
    names = set()
    for name in FILES:
        (raw / name).symlink_to((question_files / name).resolve())
        names.update(r["img_name"] for r in json.loads((raw / name).read_text(encoding="utf-8")))
    for i, name in enumerate(sorted(names)):
        (raw / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / "imgs" / name).write_bytes(png_bytes(size=16, seed=i))
    return raw


@pytest.fixture(scope="module")
def real(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("slake")
    raw = with_images(root / "raw", shared_data / "slake")
    return raw, prepare("slake", raw, root / "out"), root / "out"


def test_real_files_give_the_published_english_counts(real):
    raw, manifest, out = real
    read = Counter(item.split for item in slake.read(raw, PrepareConfig()) if isinstance(item, Example))
    assert read == {"train": 4919, "val": 1053, "test": 1061}
    # one English question of the release has an empty answer (train qid 1622): skipped, and said so
    assert manifest["skipped"] == {"count": 1, "first": [
        "train.json record 1622: empty answer; give the answer or remove the record"]}
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 4918, "val": 1053, "test": 1061}
    assert manifest["splits"]["train"]["stats"] == {"closed": 1943, "open": 2975}
    assert manifest["source"]["questions_not_english"] == 9835 + 2099 + 2094 - 4919 - 1053 - 1061
    assert manifest["images"]["rows"] == 450 + 96 + 96


def test_real_records_read_back(real):
    _, manifest, out = real
    first = Records(out, "train")[0]
    assert first["question"] == "What modality is used to take this image?" and first["answer"] == "mri"
    assert first["answer_type"] == "open" and first["image_name"] == "xmlab1/source.jpg"
    assert first["location"] == "Abdomen" and first["modality"] == "MRI" and first["content_type"] == "Modality"
    assert "yes" in manifest["answer_vocab"]


def test_question_files_without_images_say_what_is_missing(shared_data, tmp_path):
    with pytest.raises(DataError, match=r"no SLAKE image folder \(looked for 'imgs'\); the question files name "
                                        r"images as imgs/xmlabN/source.jpg: unpack the release's imgs.zip"):
        prepare("slake", shared_data / "slake", tmp_path / "out")


def record(qid: int, lang: str = "en", **change) -> dict:
    r = {"img_id": qid % 3, "img_name": f"xmlab{qid % 3}/source.jpg", "question": f"Is there a lesion {qid}?",
         "answer": "Yes", "q_lang": lang, "location": "Chest", "modality": "CT", "answer_type": "CLOSED",
         "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": qid}
    return {**r, **change}


def build(raw: Path, train: list[dict]) -> Path:
    for i in range(3):
        (raw / "imgs" / f"xmlab{i}").mkdir(parents=True)
        (raw / "imgs" / f"xmlab{i}" / "source.jpg").write_bytes(png_bytes(size=16, seed=i))
    (raw / "train.json").write_text(json.dumps(train))
    (raw / "validate.json").write_text(json.dumps([record(100), record(101, "zh")]))
    (raw / "test.json").write_text(json.dumps([record(200, answer_type="OPEN", answer="Left Lung")]))
    return raw


def test_built_folder_prepares(tmp_path):
    manifest = prepare("slake", build(tmp_path / "raw", [record(i) for i in range(12)] + [record(50, "zh")]),
                       tmp_path / "out")
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 12, "val": 1, "test": 1}
    assert manifest["source"]["questions_not_english"] == 2 and manifest["images"]["rows"] == 3
    assert Records(tmp_path / "out", "test")[0]["answer"] == "left lung"


@pytest.mark.parametrize("change, expected", [
    ({"img_name": "xmlab7/source.jpg"}, "train.json record 3: image "),
    ({"img_name": "../../etc/passwd"},
     "train.json record 3: field 'img_name': image name '../../etc/passwd' leads outside"),
    ({"qid": 2}, "train.json record 3: duplicate id '2' in split 'train'"),
    ({"answer_type": "yes/no"}, "train.json record 3: unknown answer type 'yes/no'; use OPEN or CLOSED"),
    ({"q_lang": None}, "train.json record 3: missing field 'q_lang'; restore the field from the SLAKE release"),
])
def test_bad_record_names_file_and_record(tmp_path, change, expected):
    train = [record(i) for i in range(12)]
    train[3] = {k: v for k, v in {**train[3], **change}.items() if v is not None}
    manifest, lines = prepare_reported("slake", build(tmp_path / "raw", train), tmp_path / "out",
                                       max_bad_fraction=0.1)
    assert manifest["skipped"]["count"] == 1 and len(lines) == 1 and lines[0].startswith("skipped " + expected)


def test_non_utf8_question_file_names_the_line(tmp_path):
    raw = build(tmp_path / "raw", [record(i) for i in range(12)])
    text = json.dumps([record(i) for i in range(4)], indent=1).encode()
    (raw / "train.json").write_bytes(text.replace(b"lesion 2", b"l\xe9sion 2"))
    line = text[:text.index(b"lesion 2")].count(b"\n") + 1
    expected = rf"train.json line {line}: not UTF-8 text \(byte \d+\); save the file as UTF-8"
    with pytest.raises(DataError, match=expected):
        prepare("slake", raw, tmp_path / "out")
