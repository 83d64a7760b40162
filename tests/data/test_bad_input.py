"""Bad raw data: every case gets one clear line naming file and record; records are converted or skipped and
counted; too many bad records stop the run cleanly; never a traceback."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import prepare_reported
from PIL import Image

from medvlp.cli import main
from medvlp.data.records import Records
from medvlp.data.registry import prepare
from medvlp.errors import DataError


def run(raw, out, **config):
    return prepare_reported("vqa_rad", raw, out, **config)


def test_clean_folder_prepares(raw_vqa_rad, tmp_path):
    manifest, lines = run(raw_vqa_rad(), tmp_path / "out")
    assert manifest["splits"]["train"]["rows"] == 20 and manifest["skipped"]["count"] == 0 and lines == []


@pytest.mark.parametrize("damage, message", [
    ("truncated", "synpic2.jpg: corrupt or truncated image"),
    ("garbage", "synpic2.jpg: not a readable image"),
    ("missing", "synpic2.jpg does not exist"),
])
def test_unusable_image_skips_its_records(raw_vqa_rad, tmp_path, damage, message):
    raw = raw_vqa_rad()
    path = raw_vqa_rad.images / "synpic2.jpg"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    else:
        path.unlink()
    manifest, lines = run(raw, tmp_path / "out", max_bad_fraction=0.5)
    skipped = [r for r in range(20) if r % 6 == 2] + [102]  # every record that uses image 2
    assert manifest["skipped"]["count"] == len(skipped)
    assert manifest["splits"]["train"]["rows"] == 20 - len(skipped) + 1
    assert len(lines) == len(skipped) and all("\n" not in line for line in lines)
    assert lines[0].startswith("skipped trainset.json record 2: image ") and message in lines[0]
    assert "fix or replace the image file" in lines[0]


@pytest.mark.parametrize("change, expected", [
    ({"image_name": "../secret.jpg"},
     "trainset.json record 3: field 'image_name': image name '../secret.jpg' leads outside"),
    ({"image_name": "/etc/passwd"}, "leads outside"),
    ({"question": "   "}, "trainset.json record 3: empty question; give the question text"),
    ({"answer_type": "MAYBE"}, "trainset.json record 3: unknown answer type 'MAYBE'; use OPEN or CLOSED"),
    ({"answer": ""}, "trainset.json record 3: empty answer"),
    ({"qid": 4}, "trainset.json record 4: duplicate id '4' in split 'train'"),
])
def test_bad_record_is_skipped_with_one_line(raw_vqa_rad, tmp_path, change, expected):
    train = [raw_vqa_rad.record(i, i % 6) for i in range(20)]
    train[3].update(change)
    (tmp_path / "secret.jpg").write_bytes(b"not for you")
    manifest, lines = run(raw_vqa_rad(train=train), tmp_path / "out")
    assert manifest["skipped"]["count"] == 1 and manifest["splits"]["train"]["rows"] == 19
    assert len(lines) == 1 and expected in lines[0]


def test_missing_field_names_the_field(raw_vqa_rad, tmp_path):
    train = [raw_vqa_rad.record(i, i % 6) for i in range(20)]
    del train[5]["answer"]
    manifest, lines = run(raw_vqa_rad(train=train), tmp_path / "out")
    assert lines == ["skipped trainset.json record 5: missing field 'answer'; restore the field from the original "
                     "release"]


def _save(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_16bit_cmyk_and_palette_images_are_converted(raw_vqa_rad, tmp_path):
    raw = raw_vqa_rad()
    ramp = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20 + 1000)
    (raw_vqa_rad.images / "synpic0.jpg").write_bytes(_save(Image.fromarray(ramp), "PNG"))
    (raw_vqa_rad.images / "synpic1.jpg").write_bytes(_save(Image.new("CMYK", (40, 30), (10, 200, 30, 0)), "JPEG"))
    (raw_vqa_rad.images / "synpic3.jpg").write_bytes(_save(Image.new("P", (40, 30), 3), "PNG"))  # grey palette
    (raw_vqa_rad.images / "synpic4.jpg").write_bytes(_save(Image.new("RGB", (40, 30), (90, 90, 90)), "JPEG"))
    manifest, lines = run(raw, tmp_path / "out")
    assert manifest["skipped"]["count"] == 0 and lines == []
    assert manifest["converted_images"] == {"converted I;16 to L": 1, "converted CMYK to RGB": 1,
                                            "converted P with grey content to L": 1,
                                            "converted RGB with grey content to L": 1}
    records = Records(tmp_path / "out", "train")
    grey = Image.open(io.BytesIO(records[0]["image_bytes"]))
    assert grey.mode == "L" and np.asarray(grey).min() == 0 and np.asarray(grey).max() == 255  # full range kept
    assert Image.open(io.BytesIO(records[1]["image_bytes"])).mode == "RGB"
    assert Image.open(io.BytesIO(records[4]["image_bytes"])).mode == "L"


def test_large_images_are_bounded(raw_vqa_rad, tmp_path):
    raw = raw_vqa_rad()
    (raw_vqa_rad.images / "synpic0.jpg").write_bytes(_save(Image.new("L", (1200, 900), 80), "JPEG"))
    manifest, _ = run(raw, tmp_path / "out", max_short_side=300)
    image = Image.open(io.BytesIO(Records(tmp_path / "out", "train")[0]["image_bytes"]))
    assert image.size == (400, 300) and image.format == "JPEG"


def test_too_many_bad_records_fail_cleanly(raw_vqa_rad, tmp_path):
    train = [raw_vqa_rad.record(i, i % 6) for i in range(20)]
    for r in train[:5]:
        r["answer_type"] = "?"
    with pytest.raises(DataError, match=r"5 of 25 records are bad \(20.0%\), more than max_bad_fraction=0.1"):
        run(raw_vqa_rad(train=train), tmp_path / "out", max_bad_fraction=0.1)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.partial-*")) == []


def test_invalid_json_names_line_and_column(raw_vqa_rad, tmp_path):
    raw = raw_vqa_rad()
    (raw / "trainset.json").write_text('[\n  {"qid": 1,\n  "question": oops}\n]')
    with pytest.raises(DataError, match=r"trainset.json line 3 column 15: not valid JSON"):
        prepare("vqa_rad", raw, tmp_path / "out")


def test_json_that_is_not_a_list(raw_vqa_rad, tmp_path):
    raw = raw_vqa_rad()
    (raw / "testset.json").write_text('{"qid": 1}')
    with pytest.raises(DataError, match="testset.json: expected a JSON list of records, found dict"):
        prepare("vqa_rad", raw, tmp_path / "out")


def test_command_line_prints_one_line_and_exits_2(raw_vqa_rad, tmp_path, capsys):
    raw = raw_vqa_rad()
    (raw / "trainset.json").write_text("[{]")
    code = main(["prepare", "vqa_rad", "--raw", str(raw), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("medvlp prepare: error: ") and "trainset.json line 1 column 3: not valid JSON" in err[0]


def test_command_line_reports_skips_and_succeeds(raw_vqa_rad, tmp_path, capsys):
    train = [raw_vqa_rad.record(i, i % 6) for i in range(20)]
    train[7]["question"] = ""
    code = main(["prepare", "vqa_rad", "--raw", str(raw_vqa_rad(train=train)), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped trainset.json record 7: empty question" in captured.err
    assert "train 19, test 5; 6 images; 1 records skipped" in captured.out


def test_unknown_layout_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="found neither trainset.json"):
        prepare("vqa_rad", tmp_path / "raw", tmp_path / "out")
