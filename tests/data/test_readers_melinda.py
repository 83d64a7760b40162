"""MELINDA from a raw folder built here in the published layout: the label column chosen by config, quoted
captions, and bad inputs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from helpers import png_bytes, prepare_reported

from medvlp.data.records import Records
from medvlp.errors import ConfigError, DataError

HEADER = ["figure_file", "caption", "i_meth", "p_meth", "i_meth_label", "p_meth_label"]
METHODS = [("x-ray crystallography", "tag", "Experimental", "Biophysical"),
           ("two hybrid", "his tag", "Genetic", "Molecular biology")]
COUNTS = {"train.csv": 6, "dev.csv": 2, "test.csv": 3}


def rows(name: str) -> list[list[str]]:
    return [[f"{name[:-4]}-PMC{i}_fig{i}.jpg", f"Figure {i}. Binding assay, panel A\nshows \"complex\" formation.",
             *METHODS[i % 2]] for i in range(COUNTS[name])]


def build(root: Path, edit=None, header: list[str] = HEADER, delimiter: str = ",") -> Path:
    (root / "melinda_images").mkdir(parents=True)
    for name in COUNTS:
        table = rows(name)
        if edit:
            edit(name, table)
        for r in table:
            (root / "melinda_images" / r[0]).write_bytes(png_bytes(size=16, seed=len(r[0])))
        out = io.StringIO()
        csv.writer(out, delimiter=delimiter).writerows([header, *table])
        (root / name).write_text(out.getvalue(), encoding="utf-8")
    return root


def run(raw: Path, out: Path, **config):
    return prepare_reported("melinda", raw, out, **config)


def test_prepares_with_i_meth_by_default(tmp_path):
    manifest, lines = run(build(tmp_path / "raw"), tmp_path / "out")
    assert lines == [] and manifest["family"] == "classification" and manifest["source"]["label"] == "i_meth"
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 3}
    assert manifest["labels"] == ["two hybrid", "x-ray crystallography"]
    first = Records(tmp_path / "out", "train")[0]
    assert first["text"] == 'Figure 0. Binding assay, panel A shows "complex" formation.'  # quoted line break
    assert first["label"] == "x-ray crystallography" and first["p_meth_label"] == "Biophysical"
    assert first["id"] == first["figure_file"] == "train-PMC0_fig0.jpg"


@pytest.mark.parametrize("label, labels", [("p_meth", ["his tag", "tag"]),
                                           ("i_meth_label", ["Experimental", "Genetic"]),
                                           ("p_meth_label", ["Biophysical", "Molecular biology"])])
def test_label_column_chosen_by_config(tmp_path, label, labels):
    manifest, _ = run(build(tmp_path / "raw"), tmp_path / "out", options={"label": label})
    assert manifest["labels"] == labels and manifest["source"]["label"] == label


def test_unknown_label_column(tmp_path):
    with pytest.raises(ConfigError, match="options.label='method': MELINDA's label columns are i_meth, p_meth"):
        run(build(tmp_path / "raw"), tmp_path / "out", options={"label": "method"})


def test_missing_column_names_file_and_header(tmp_path):
    raw = build(tmp_path / "raw", header=[h if h != "caption" else "text" for h in HEADER])
    with pytest.raises(DataError, match=r"train.csv line 1: missing column 'caption' \(the header has 'figure_file', "
                                        r"'text', .*\); use the published file, separated by commas$"):
        run(raw, tmp_path / "out")


def test_wrong_separator_is_named(tmp_path):
    with pytest.raises(DataError, match=r"train.csv line 1: missing column 'figure_file' .*separated by commas "
                                        r"\(this line splits into 6 on semicolons\)"):
        run(build(tmp_path / "raw", delimiter=";"), tmp_path / "out")


def _edit(kind: str):
    def edit(name: str, table: list[list[str]]) -> None:
        if name == "train.csv":
            if kind == "missing field":
                table[2] = table[2][:4]
            elif kind == "duplicate id":
                table[2][0] = table[1][0]
    return edit


@pytest.mark.parametrize("kind, expected", [
    ("missing field", "train.csv line 6: 4 field(s) where 6 separated by commas were expected (figure_file, caption, "
                      "i_meth, p_meth, i_meth_label, p_meth_label); separate the fields with commas"),
    ("duplicate id", "train.csv line 6: duplicate id 'train-PMC1_fig1.jpg' in split 'train'; give every record its "
                     "own id"),
])
def test_bad_rows_name_file_and_line(tmp_path, kind, expected):
    manifest, lines = run(build(tmp_path / "raw", _edit(kind)), tmp_path / "out", max_bad_fraction=0.1)
    assert manifest["skipped"]["count"] == 1 and lines == ["skipped " + expected]


def test_missing_image_and_non_utf8_row(tmp_path):
    raw = build(tmp_path / "raw")
    (raw / "melinda_images" / "test-PMC1_fig1.jpg").unlink()
    path = raw / "dev.csv"
    path.write_bytes(path.read_bytes().replace(b"Figure 1. Binding", b"Figure 1. B\xefnding"))
    manifest, lines = run(raw, tmp_path / "out", max_bad_fraction=0.2)
    assert manifest["skipped"]["count"] == 2 and len(lines) == 2
    assert lines[0] == "skipped dev.csv line 4: not UTF-8 text (byte 30 of the line); save the file as UTF-8"
    assert lines[1].startswith("skipped test.csv line 4: image ") and "test-PMC1_fig1.jpg does not exist" in lines[1]


def test_missing_split_file(tmp_path):
    raw = build(tmp_path / "raw")
    (raw / "dev.csv").unlink()
    with pytest.raises(DataError, match="dev.csv: file not found; it is part of the published layout"):
        run(raw, tmp_path / "out")
