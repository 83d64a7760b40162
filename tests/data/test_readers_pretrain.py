"""The pre-training corpora, ROCO (also as retrieval pairs) and MedICaT, from raw folders built here in their
published layouts; their bad inputs; and both read together for pre-training with one config line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import png_bytes
from helpers import prepare_reported as run

from medvlp.data.records import Records
from medvlp.data.registry import prepare
from medvlp.errors import ConfigError, DataError

ROCO_SPLITS = {"train": 8, "validation": 3, "test": 6}


def roco_id(split: str, i: int) -> str:
    return f"ROCO_{list(ROCO_SPLITS).index(split) * 1000 + i:05d}"


def build_roco(root: Path, *, fetched_names: bool = False, edit=None) -> Path:
    """ROCO as released: per split a radiology folder (read) and a non-radiology one (ignored). Line 3 of
    each radiology captions.txt has a two-word caption (dropped). ``fetched_names`` names the images as
    fetch.py does (PMCID_name.jpg, from dlinks.txt); ``edit(split, lines)`` may change the caption lines."""
    for split, count in ROCO_SPLITS.items():
        for subset in ("radiology", "non-radiology"):
            folder = root / split / subset
            (folder / "images").mkdir(parents=True)
            captions, dlinks, keywords = [], [], []
            for i in range(count):
                rid = roco_id(split, i) if subset == "radiology" else f"ROCO_9{i:04d}"
                text = "CT scan" if i == 2 else f"Axial CT of the chest, case {rid}, showing a nodule."
                captions.append(f"{rid}\t {text}")
                name = f"figure-{i}.jpg"
                pmc = f"PMC{list(ROCO_SPLITS).index(split)}{i:04d}"
                dlinks.append(f"{rid}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/aa/bb/{pmc}.tar.gz "
                              f"-P /path/to/Dir\t{name}")
                keywords.append(f"{rid}\t chest nodule")
                image = f"{pmc}_{name}" if fetched_names else f"{rid}.jpg"
                (folder / "images" / image).write_bytes(png_bytes(size=24, seed=i))
            if edit and subset == "radiology":
                edit(split, captions)
            (folder / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
            (folder / "dlinks.txt").write_text("\n".join(dlinks) + "\n")
            (folder / "keywords.txt").write_text("\n".join(keywords) + "\n")
    return root


@pytest.mark.parametrize("fetched_names", [False, True])
def test_roco_prepares_for_pretraining(tmp_path, fetched_names):
    manifest, lines = run("roco", build_roco(tmp_path / "raw", fetched_names=fetched_names), tmp_path / "out")
    assert lines == [] and manifest["family"] == "pretrain" and manifest["source"]["layout"] == "folders"
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 7, "val": 2, "test": 5}
    assert manifest["source"]["short_captions_dropped"] == {"train": 1, "val": 1, "test": 1}
    train = Records(tmp_path / "out", "train")
    ids = train.column("id")
    assert ids[0] == "ROCO_00000" and not any(i.startswith("ROCO_9") for i in ids)  # non-radiology ignored
    assert train[0]["captions"] == ["Axial CT of the chest, case ROCO_00000, showing a nodule."]
    assert train[0]["image_bytes"] == png_bytes(size=24, seed=0)


def test_roco_retrieval_samples_the_test_split_with_a_seed(tmp_path):
    raw = build_roco(tmp_path / "raw")
    full, _ = run("roco_retrieval", raw, tmp_path / "all")  # 2,000 by default: more than there are
    assert full["family"] == "retrieval" and full["splits"]["test"]["rows"] == 5
    assert full["source"]["test_pairs"] == {"sampled": 5, "from": 5, "seed": 0}
    picks = {}
    for seed in (0, 0, 1, 2):
        out = tmp_path / f"seed{seed}"
        manifest, _ = run("roco_retrieval", raw, out, options={"test_pairs": 3, "test_seed": seed})
        assert manifest["splits"]["test"]["rows"] == 3 and manifest["splits"]["train"]["rows"] == 7
        picks.setdefault(seed, []).append(tuple(Records(out, "test").column("id")))
    assert picks[0][0] == picks[0][1] and len({picks[0][0], picks[1][0], picks[2][0]}) > 1
    assert Records(tmp_path / "seed0", "test")[0]["caption"].startswith("Axial CT of the chest")
    with pytest.raises(ConfigError, match="options.test_pairs=-1"):
        run("roco_retrieval", raw, tmp_path / "bad", options={"test_pairs": -1})


def _damage_roco(kind: str):
    def edit(split: str, lines: list[str]) -> None:
        if split != "train":
            return
        if kind == "missing tab":
            lines[3] = lines[3].replace("\t", " ")
        elif kind == "duplicate id":
            lines[4] = lines[4].replace(roco_id("train", 4), roco_id("train", 3))
        elif kind == "missing image":
            lines[5] = lines[5].replace(roco_id("train", 5), "ROCO_05555")
    return edit


@pytest.mark.parametrize("kind, expected", [
    ("missing tab", "skipped train/radiology/captions.txt line 4: 1 field(s) where 2 separated by tabs were "
                    "expected (id, caption); separate the fields with tabs"),
    ("duplicate id", "skipped train/radiology/captions.txt line 5: duplicate id 'ROCO_00003' in split 'train'"),
    ("missing image", "skipped train/radiology/captions.txt line 6: image "),
])
def test_roco_bad_lines_name_file_and_line(tmp_path, kind, expected):
    raw = build_roco(tmp_path / "raw", edit=_damage_roco(kind))
    manifest, lines = run("roco", raw, tmp_path / "out", max_bad_fraction=0.2)
    assert manifest["skipped"]["count"] == 1 and len(lines) == 1 and lines[0].startswith(expected)
    if kind == "missing image":
        assert "ROCO_05555.jpg does not exist" in lines[0]


def test_roco_non_utf8_line(tmp_path):
    raw = build_roco(tmp_path / "raw")
    path = raw / "train" / "radiology" / "captions.txt"
    data = path.read_bytes().split(b"\n")
    data[1] = data[1].replace(b"nodule", b"n\xe9dule")  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join(data))
    manifest, lines = run("roco", raw, tmp_path / "out", max_bad_fraction=0.2)
    assert lines == [f"skipped train/radiology/captions.txt line 2: not UTF-8 text (byte {data[1].index(0xe9)} of "
                     "the line); save the file as UTF-8"]
    assert manifest["splits"]["train"]["rows"] == 6


def test_roco_folder_without_train(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="found neither train/radiology/ nor parquet files"):
        prepare("roco", tmp_path / "raw", tmp_path / "out")


# -- MedICaT ------------------------------------------------------------------------------------------------
def medicat_record(i: int, radiology: bool = True, references: list | None = None) -> dict:
    return {"pdf_hash": f"{i:040x}", "fig_uri": f"{i}-Figure1-1.png", "s2_caption": f"CT of patient {i} shows a mass.",
            "s2orc_references": references, "radiology": radiology}


def build_medicat(root: Path, records: list[dict] | None = None, lines: list[bytes] | None = None) -> Path:
    """MedICaT as released: 14 radiology figures (every third with two reference sentences) and 4 others."""
    release = root / "release"
    (release / "figures").mkdir(parents=True)
    if records is None:
        records = [medicat_record(i, references=[f"As Figure {i} shows, the mass grew.", "It was resected."]
                                  if i % 3 == 0 else None) for i in range(14)]
        records += [medicat_record(100 + i, radiology=False) for i in range(4)]
    for r in records:
        figure = release / "figures" / f"{r['pdf_hash']}_{r['fig_uri']}"
        figure.write_bytes(png_bytes(size=24, seed=len(r["fig_uri"])))
    body = lines if lines is not None else [json.dumps(r).encode() for r in records]
    (release / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl").write_bytes(b"\n".join(body) + b"\n")
    return root


def test_medicat_prepares_radiology_figures_with_held_out_splits(tmp_path):
    raw = build_medicat(tmp_path / "raw")
    options = {"val_size": 2, "test_size": 3}
    manifest, lines = run("medicat", raw, tmp_path / "out", options=options)
    assert lines == [] and manifest["family"] == "pretrain"
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 9, "val": 2, "test": 3}
    assert manifest["source"]["not_radiology"] == 4
    assert manifest["source"]["held_out"] == {"val": 2, "test": 3, "seed": 0}
    records = {s: Records(tmp_path / "out", s) for s in ("train", "val", "test")}
    by_id = {rec["id"]: rec for split in records.values() for rec in (split[i] for i in range(len(split)))}
    first = by_id[f"{0:040x}_0-Figure1-1.png"]
    assert first["captions"] == ["CT of patient 0 shows a mass.", "As Figure 0 shows, the mass grew.",
                                 "It was resected."]
    assert by_id[f"{1:040x}_1-Figure1-1.png"]["captions"] == ["CT of patient 1 shows a mass."]  # null references
    again, _ = run("medicat", raw, tmp_path / "again", options=options)
    assert Records(tmp_path / "again", "test").column("id") == records["test"].column("id")
    other, _ = run("medicat", raw, tmp_path / "other", options={**options, "holdout_seed": 5})
    assert Records(tmp_path / "other", "test").column("id") != records["test"].column("id")


def test_medicat_default_holdout_needs_enough_figures(tmp_path):
    with pytest.raises(DataError, match="14 radiology figures, not more than the 2000 to hold out"):
        prepare("medicat", build_medicat(tmp_path / "raw"), tmp_path / "out")


@pytest.mark.parametrize("damage, expected", [
    ("missing field", "line 3: missing field 's2_caption'; restore the field from the MedICaT release"),
    ("invalid json", "line 3: not valid JSON (Expecting ',' delimiter at column"),
    ("not utf-8", "line 3: not UTF-8 text (byte"),
    ("duplicate", f"line 3: duplicate id '{1:040x}_1-Figure1-1.png' (first at "
                  "release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl line 2)"),
    ("missing image", "line 3: image "),
])
def test_medicat_bad_lines_name_file_and_line(tmp_path, damage, expected):
    records = [medicat_record(i) for i in range(12)]
    lines = [json.dumps(r).encode() for r in records]
    if damage == "missing field":
        del records[2]["s2_caption"]
        lines[2] = json.dumps(records[2]).encode()
    elif damage == "invalid json":
        lines[2] = lines[2].replace(b", ", b" ", 1)
    elif damage == "not utf-8":
        lines[2] = lines[2].replace(b"mass", b"m\xe4ss")
    elif damage == "duplicate":
        lines[2] = json.dumps(records[1]).encode()
    raw = build_medicat(tmp_path / "raw", records, lines)
    if damage == "missing image":
        (raw / "release" / "figures" / f"{2:040x}_2-Figure1-1.png").unlink()
    manifest, reported = run("medicat", raw, tmp_path / "out", max_bad_fraction=0.1,
                             options={"val_size": 1, "test_size": 1})
    assert manifest["skipped"]["count"] == 1 and len(reported) == 1
    assert reported[0].startswith("skipped release/s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl "
                                  + expected)


def test_medicat_without_figures_folder(tmp_path):
    raw = build_medicat(tmp_path / "raw")
    for f in (raw / "release" / "figures").iterdir():
        f.unlink()
    (raw / "release" / "figures").rmdir()
    with pytest.raises(DataError, match=r"no MedICaT figure folder \(release/figures/\)"):
        prepare("medicat", raw, tmp_path / "out")


# -- ROCO + MedICaT together --------------------------------------------------------------------------------
def test_roco_and_medicat_pretrain_together_from_one_config_line(tmp_path):
    from medvlp.data.loader import Concat, FamilyDataset
    from medvlp.training.pretrain import load_pretrain_config, training_data

    run("roco", build_roco(tmp_path / "roco"), tmp_path / "prepared" / "roco")
    run("medicat", build_medicat(tmp_path / "medicat"), tmp_path / "prepared" / "medicat",
        options={"val_size": 2, "test_size": 2})
    roots = [tmp_path / "prepared" / "roco", tmp_path / "prepared" / "medicat"]
    config = load_pretrain_config(overrides=[f"data.train=[{roots[0]}, {roots[1]}]"])
    found, corpus = training_data(config)
    assert found == roots and corpus is None
    both = Concat([FamilyDataset(r, "train", 32, train=True) for r in found])
    assert len(both) == 7 + 10
    first, last = both[0], both[len(both) - 1]
    assert first["text"].startswith("Axial CT of the chest") and last["text"].startswith("CT of patient")
    assert tuple(first["pixels"].shape[-2:]) == (32, 32)
