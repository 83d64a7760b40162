"""Data that medvlp must not destroy, trust blindly or choke on: what ``prepare --out`` may replace, a synthetic
corpus of other sizes, shards that changed after they were prepared, a full disk, huge images and runaway texts.
Every refusal is one line."""

from __future__ import annotations

import errno
import io
import json
import struct
import zlib

import pyarrow as pa
import pytest
from helpers import png_bytes, prepare_reported
from PIL import Image

from medvlp.cli import main
from medvlp.data import records
from medvlp.data.images import ImageError, open_image
from medvlp.data.records import MANIFEST, Records
from medvlp.data.registry import prepare
from medvlp.data.synthetic import SynthConfig, ensure_corpus
from medvlp.errors import DataError


def prepared(raw_vqa_rad, out, **config):
    return prepare_reported("vqa_rad", raw_vqa_rad(), out, **config)


# -- finding 4: prepare --out ----------------------------------------------------------------------------------
def test_prepare_refuses_a_folder_of_other_files_unless_forced(raw_vqa_rad, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work")
    with pytest.raises(DataError, match=r"--out .*thesis holds other files \(chapter1.tex, ...\), not a prepared "
                                        r"dataset; .* add --force"):
        prepared(raw_vqa_rad, out)
    assert (out / "chapter1.tex").read_text() == "months of work"
    prepare("vqa_rad", raw_vqa_rad.images.parent, out, force=True)
    assert (out / MANIFEST).is_file() and not (out / "chapter1.tex").exists()


def test_prepare_replaces_a_prepared_dataset(raw_vqa_rad, tmp_path):
    prepared(raw_vqa_rad, tmp_path / "out")
    manifest, _ = prepare_reported("vqa_rad", raw_vqa_rad([raw_vqa_rad.record(i, i % 6) for i in range(10)]),
                                   tmp_path / "out")
    assert manifest["splits"]["train"]["rows"] == 10


def test_prepare_out_dot_is_one_line(raw_vqa_rad, tmp_path, monkeypatch, capsys):
    raw = raw_vqa_rad()
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "vqa_rad", "--raw", str(raw), "--out", "."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the current folder (or one holding it) cannot be replaced" in err


# -- finding 5: a synthetic corpus of other sizes --------------------------------------------------------------
def test_a_corpus_of_other_sizes_is_never_regenerated_over(tmp_path):
    small = {f"{family}_{split}": 2 for family in ("pretrain", "vqa", "classification", "retrieval")
             for split in ("train", "val", "test")}
    ensure_corpus(tmp_path / "corpus", SynthConfig(workers=1, image_size=32, **small))
    before = (tmp_path / "corpus" / "pretrain" / MANIFEST).read_text()
    with pytest.raises(DataError, match=r"corpus holds a synthetic corpus made with other settings \(pretrain_train=2 "
                                        r"there, 3 asked\); point the synthetic_dir setting at another folder"):
        ensure_corpus(tmp_path / "corpus", SynthConfig(workers=1, image_size=32, **{**small, "pretrain_train": 3}))
    assert (tmp_path / "corpus" / "pretrain" / MANIFEST).read_text() == before
    ensure_corpus(tmp_path / "corpus", SynthConfig(workers=1, image_size=32, **small))  # the same: reused


# -- findings 8 and 9: shards checked against the manifest -----------------------------------------------------
def shard(out, split="train"):
    return out / json.loads((out / MANIFEST).read_text())["splits"][split]["shards"][0]["file"]


def test_a_changed_shard_is_refused_by_its_manifest_hash(raw_vqa_rad, tmp_path):
    out = tmp_path / "out"
    prepared(raw_vqa_rad, out)
    data = bytearray(shard(out).read_bytes())
    at = data.index(b"Is there a finding 3?")
    data[at:at + 2] = b"\xff\xfe"  # a caption's bytes flipped: no longer even UTF-8
    shard(out).write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00000.arrow: does not match the sha256 in .*manifest.json .*prepare "
                                        "the dataset again"):
        Records(out, "train")


def test_hashing_is_skipped_for_unchanged_shards(raw_vqa_rad, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepared(raw_vqa_rad, out)
    hashed = []
    monkeypatch.setattr(records, "_sha256", lambda path: hashed.append(path) or "")
    monkeypatch.setattr(records, "_verified_here", set())  # as in a new process: only the cache file helps
    Records(out, "train")
    assert hashed == []  # sizes and times as recorded when prepare hashed them
    shard(out).touch()
    with pytest.raises(DataError, match="does not match the sha256"):
        Records(out, "train")
    assert hashed == [shard(out)]


@pytest.mark.parametrize("damage, message", [
    ("deleted", r"train-00000.arrow: shard missing from the prepared dataset; prepare the dataset again"),
    ("truncated", r"train-00000.arrow: does not match the sha256"),
])
def test_a_deleted_or_truncated_shard_is_one_line(raw_vqa_rad, tmp_path, damage, message, capsys):
    out = tmp_path / "out"
    prepared(raw_vqa_rad, out)
    if damage == "deleted":
        shard(out).unlink()
    else:
        shard(out).write_bytes(shard(out).read_bytes()[:300])
    with pytest.raises(DataError, match=message):
        Records(out, "train")
    assert main(["finetune", "--task", "vqa", "--data", str(out), f"run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_shard_with_a_caption_that_is_not_utf8_is_one_line(tmp_path):
    """A shard whose hash matches (written by another tool, say) but whose text is not UTF-8."""
    out = tmp_path / "out"
    out.mkdir()
    schema = records.record_schema("retrieval")
    table = pa.table({"id": ["a"], "image": [0], "caption": pa.array([b"\xff\xfe caption"], pa.binary())})
    with pa.ipc.new_file(str(out / "train-00000.arrow"), schema) as writer:
        writer.write_table(table.cast(schema, safe=False))
    with pa.ipc.new_file(str(out / "images-00000.arrow"), records._IMAGE_SCHEMA) as writer:
        writer.write_table(pa.table({"key": ["k"], "data": [png_bytes()], "format": ["png"], "width": [48],
                                     "height": [48]}, schema=records._IMAGE_SCHEMA))
    (out / MANIFEST).write_text(json.dumps({
        "schema_version": records.SCHEMA_VERSION, "family": "retrieval",
        "images": {"rows": 1, "shards": [{"file": "images-00000.arrow", "rows": 1}]},
        "splits": {"train": {"rows": 1, "shards": [{"file": "train-00000.arrow", "rows": 1}]}}}))
    data = Records(out, "train")
    with pytest.raises(DataError, match=r"field 'caption' cannot be read .*prepare the dataset again"):
        data.column("caption")
    with pytest.raises(DataError, match=r"split train row 0: cannot be read"):
        data[0]


def test_a_full_disk_during_prepare_leaves_nothing_and_says_so(raw_vqa_rad, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records._ShardedFile, "write", full)
    with pytest.raises(DataError, match=r"out: the dataset could not be written \(no space left on the disk\); "
                                        "nothing partial was left behind"):
        prepared(raw_vqa_rad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqa_rad"]


# -- finding 10: pixels and texts ------------------------------------------------------------------------------
def huge_png(width: int = 19000, height: int = 19000) -> bytes:
    """A small PNG file whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(png_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_huge_image_is_refused_from_its_header(raw_vqa_rad, tmp_path):
    assert Image.open(io.BytesIO(huge_png())).size == (19000, 19000)
    with pytest.raises(ImageError, match=r"19000x19000 pixels \(361 Mpx\), more than max_pixels=67108864"):
        open_image(huge_png())
    raw = raw_vqa_rad()
    (raw_vqa_rad.images / "synpic2.jpg").write_bytes(huge_png())
    manifest, lines = prepare_reported("vqa_rad", raw, tmp_path / "out", max_bad_fraction=0.5)
    assert manifest["skipped"]["count"] > 0 and "more than max_pixels" in lines[0]
    with pytest.raises(ImageError, match=r"48x48 pixels \(0 Mpx\), more than max_pixels=100"):
        open_image(png_bytes(), max_pixels=100)


def test_a_huge_dicom_is_refused_from_its_header():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 20000  # the pixel data is not even that long: it is never decoded
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(ImageError, match=r"20000x20000 pixels \(400 Mpx\), more than max_pixels"):
        open_image(out.getvalue())


def test_control_characters_and_runaway_texts_are_cleaned_counted_and_reported(raw_vqa_rad, tmp_path):
    train = [raw_vqa_rad.record(i, i % 6) for i in range(20)]
    train[0]["question"] = "Is there\x00 a nodule\x1b[31m?"
    train[1]["question"] = "Is it " + "very " * 200_000 + "large?"
    manifest, lines = prepare_reported("vqa_rad", raw_vqa_rad(train), tmp_path / "out")
    questions = Records(tmp_path / "out", "train").column("question")
    assert "Is there a nodule [31m?" in questions
    assert 4090 < max(len(q) for q in questions) <= 4096
    assert manifest["altered_texts"] == {"control characters removed": 1, "cut to 4096 characters": 1}
    assert "vqa_rad: texts altered: 1 control characters removed, 1 cut to 4096 characters" in lines
