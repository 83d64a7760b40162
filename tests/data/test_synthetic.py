"""The synthetic corpus: layout and counts, determinism, images, caption variety, fair questions, labels that
need the image, and facts that are really in the pixels."""

from __future__ import annotations

import collections
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvlp.config import load_config
from medvlp.data import synthetic as S
from medvlp.data.records import VERIFIED, Records
from medvlp.errors import ConfigError

SMALL = dict(image_size=64, pretrain_train=90, pretrain_val=10, pretrain_test=12, vqa_train=40, vqa_val=6,
             vqa_test=8, questions_per_image=5, classification_train=40, classification_val=6,
             classification_test=8, retrieval_train=30, retrieval_val=6, retrieval_test=40, workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, S.generate(out, S.SynthConfig(**SMALL), report=lambda line: None)


def rows(out: Path, family: str, split: str = "train") -> list[dict]:
    records = Records(out / family, split)
    return [records[i] for i in range(len(records))]


def facts_pool(n: int, count: int | None = None, seed: int = 7) -> list[S.Facts]:
    facts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        facts.append(S.sample_facts(rng, int(rng.integers(4)) if count is None else count))
    return facts


def test_four_datasets_with_three_splits_and_the_configured_counts(corpus):
    out, manifests = corpus
    assert set(manifests) == set(S.FAMILIES)
    for family in S.FAMILIES:
        manifest = manifests[family]
        assert manifest["family"] == family and (out / family / "manifest.json").is_file()
        assert list(manifest["splits"]) == ["train", "val", "test"]
        images = sum(SMALL[f"{family}_{split}"] for split in S.SPLITS)
        assert manifest["images"]["rows"] == images
        for split in S.SPLITS:
            per_image = SMALL["questions_per_image"] if family == "vqa" else 1
            assert manifest["splits"][split]["rows"] == SMALL[f"{family}_{split}"] * per_image
        assert manifest["skipped"]["count"] == 0
        assert set(S.FACT_FIELDS) <= set(manifest["extra_fields"])
    assert manifests["classification"]["labels"] == sorted(S.LABELS)
    assert {"yes", "no", "x-ray", "ct", "mri", "0", "3", "left", "both"} <= set(manifests["vqa"]["answer_vocab"])


def test_downstream_images_differ_from_pretraining_images(corpus):
    out, _ = corpus
    pretrain = {r["image_bytes"] for r in rows(out, "pretrain")}
    for family in ("vqa", "classification", "retrieval"):
        assert not pretrain & {r["image_bytes"] for r in rows(out, family, "test")}


def test_same_seed_same_bytes_whatever_the_workers_and_another_seed_differs(corpus, tmp_path):
    out, manifests = corpus
    again = S.generate(tmp_path / "again", S.SynthConfig(**{**SMALL, "workers": 2}), report=lambda line: None)
    for family in S.FAMILIES:
        assert again[family]["content_hash"] == manifests[family]["content_hash"]
        files = sorted(p.name for p in (out / family).iterdir() if p.name != VERIFIED)  # hashing times differ
        assert files == sorted(p.name for p in (tmp_path / "again" / family).iterdir() if p.name != VERIFIED)
        for name in files:
            assert (out / family / name).read_bytes() == (tmp_path / "again" / family / name).read_bytes(), name
    other = S.generate(tmp_path / "other", S.SynthConfig(**{**SMALL, "seed": 1}), report=lambda line: None)
    for family in S.FAMILIES:
        assert other[family]["content_hash"] != manifests[family]["content_hash"]
    assert rows(tmp_path / "other", "pretrain")[0]["image_bytes"] != rows(out, "pretrain")[0]["image_bytes"]


def test_images_are_grey_pngs_of_the_configured_size(corpus):
    out, _ = corpus
    for family in S.FAMILIES:
        for record in rows(out, family, "val")[:5]:
            image = Image.open(io.BytesIO(record["image_bytes"]))
            assert (image.format, image.mode, image.size) == ("PNG", "L", (64, 64))
            pixels = np.asarray(image)
            assert pixels.std() > 10  # a picture, not a blank
    big = S.sample("pretrain", "train", 0, seed=0, size=128)[0].image
    assert Image.open(io.BytesIO(big)).size == (128, 128)


def test_three_modalities_and_three_regions_with_their_own_look(corpus):
    out, _ = corpus
    records = rows(out, "pretrain")
    assert {r["modality"] for r in records} == set(S.MODALITIES)
    assert {r["region"] for r in records} == set(S.REGIONS)
    # the same scene under each modality: the pictures differ (bone white on CT, black on MRI, ...)
    facts = facts_pool(1, count=0)[0]
    scene = S.sample_scene(np.random.default_rng(1), facts)
    looks = {m: S.render(replace(scene, facts=replace(facts, modality=m)), 64).astype(float) for m in S.MODALITIES}
    for a, b in [("xray", "ct"), ("ct", "mri"), ("xray", "mri")]:
        assert np.abs(looks[a] - looks[b]).mean() > 10
    regions = {r: S.render(replace(scene, facts=replace(facts, region=r)), 64).astype(float) for r in S.REGIONS}
    assert np.abs(regions["head"] - regions["chest"]).mean() > 10
    assert np.abs(regions["chest"] - regions["abdomen"]).mean() > 10


def test_captions_vary_in_wording(corpus):
    out, _ = corpus
    captions = [c for r in rows(out, "pretrain") for c in r["captions"]]
    assert len(set(captions)) > 0.9 * len(captions)
    openings = {" ".join(c.split()[:2]) for c in captions}
    assert len(openings) > 20  # many sentence patterns, not one template
    by_facts = collections.defaultdict(set)
    for r in rows(out, "pretrain"):
        by_facts[tuple(r[k] for k in S.FACT_FIELDS)].update(r["captions"])
    assert any(len(c) > 1 for c in by_facts.values())  # same facts, different captions
    facts = facts_pool(1, count=2)[0]
    same = {S.caption(facts, np.random.default_rng(i)) for i in range(60)}
    assert len(same) > 40
    words = " ".join(same).lower()
    assert {"lesions", "masses", "nodules", "foci"} & set(re.findall(r"[a-z]+", words))


def test_complete_captions_state_every_fact(corpus):
    out, _ = corpus
    records = rows(out, "retrieval", "test")
    assert len({r["caption"] for r in records}) == len(records)
    for r in records:
        text = r["caption"].lower()
        assert int(r["count"]) >= 1
        assert any(w.lower() in text for w in S.SIZE_WORDS[r["size"]] + S.SIZE_PREDICATES[r["size"]])
        assert any(w in text for w in S.SHAPE_WORDS[r["shape"]])
        assert any(w in text for w in S.MARGIN_WORDS[r["margin"]] + S.MARGIN_PREDICATES[r["margin"]])
        assert any(w.lower() in text for w in S.BRIGHTNESS_WORDS[(r["modality"], r["brightness"])] + (r["brightness"],))
        sides = {"left", "right"} if r["side"] == "both" else {r["side"]}
        assert all(side in text for side in sides)
        assert any(w.lower() in text for w in S.MODALITY_NAMES[r["modality"]])


def test_vqa_closed_and_open_balanced_and_never_giving_the_answer_away(corpus):
    out, _ = corpus
    records = rows(out, "vqa")
    assert {r["answer_type"] for r in records} == {"open", "closed"}
    for r in records:
        assert (r["answer"] in ("yes", "no")) == (r["answer_type"] == "closed")
        if r["question_kind"] == "count":
            assert r["answer"] == r["count"]
        if r["question_kind"] == "modality":
            assert r["answer"] == r["modality"].replace("xray", "x-ray")
        if r["answer_type"] == "open":
            assert not re.search(rf"\b{re.escape(r['answer'])}\b", r["question"].lower())
    asked = [q for i, f in enumerate(facts_pool(3000)) for q in S.questions(f, np.random.default_rng(i), 5)]
    closed = [q for q in asked if q.answer_type == "closed"]
    assert 0.3 < len(closed) / len(asked) < 0.7
    assert 0.45 < sum(q.answer == "yes" for q in closed) / len(closed) < 0.55
    for kind in S.CLOSED_KINDS:  # no kind of question can be answered by always saying the same
        answers = [q.answer for q in closed if q.kind == kind]
        assert len(answers) > 100 and 0.4 < answers.count("yes") / len(answers) < 0.6, kind
    for q in asked:
        if q.answer_type == "open":
            assert not re.search(rf"\b{re.escape(q.answer)}\b", q.text.lower()), (q.text, q.answer)
    for f in facts_pool(200, count=0):  # questions about a lesion are not asked of normal images
        assert all(q.kind not in S.NEEDS_LESION for q in S.questions(f, np.random.default_rng(0), 7))


def test_classification_label_comes_from_the_image_not_the_note(corpus):
    out, _ = corpus
    records = rows(out, "classification")
    assert {r["label"] for r in records} <= set(S.LABELS) and len({r["label"] for r in records}) == 4
    for r in records:
        count = int(r["count"])
        expected = ("normal" if count == 0 else "single lesion" if count == 1 else
                    "bilateral lesions" if r["side"] == "both" else "multiple unilateral lesions")
        assert r["label"] == expected
        words = set(re.findall(r"[a-z]+", r["text"].lower()))
        assert not words & {"normal", "single", "multiple", "bilateral", "unilateral", "lesion", "lesions"}
        assert r["text"].strip()


def lesion_difference(facts: S.Facts, size: int, seed: int = 3) -> tuple[S.Scene, np.ndarray]:
    """A scene of the facts, and its pixels minus those of the same scene without its lesions."""
    scene = S.sample_scene(np.random.default_rng(seed), facts)
    bare = replace(scene, facts=replace(facts, count=0, lesions=()))
    return scene, S.render(scene, size).astype(float) - S.render(bare, size).astype(float)


def distance_to_lesions(facts: S.Facts, scene: S.Scene, size: int) -> np.ndarray:
    """For each pixel, its distance to the nearest lesion centre, in that lesion's radii."""
    canvas = S.frame(scene, size)
    rows_, cols = np.mgrid[0:size, 0:size]
    pixels_per_unit = canvas.scale * (size - 1) / 2
    distances = [np.hypot(cols - col, rows_ - row) / (lesion.radius * pixels_per_unit)
                 for lesion in facts.lesions for col, row in [canvas.to_pixel(lesion.x, lesion.y)]]
    return np.min(distances, axis=0)


@pytest.mark.parametrize("brightness", ["brighter", "darker"])
def test_the_facts_are_in_the_pixels(brightness):
    size, sign = 96, 1 if brightness == "brighter" else -1
    pool = [f for f in facts_pool(600, count=1) if f.brightness == brightness and f.margin == "well-defined"]
    areas = {}
    for name in ("large", "small"):
        for facts in [f for f in pool if f.size == name][:3]:
            scene, difference = lesion_difference(facts, size)
            distance = distance_to_lesions(facts, scene, size)
            assert sign * difference[distance < 0.4].mean() > 30  # grey levels: the lesion stands out there...
            assert np.abs(difference[distance > 2.5]).max() <= 1  # ... and nowhere else
            changed = np.argwhere(np.abs(difference) > 20)
            assert (changed[:, 1].mean() > size / 2) == (facts.side == "left")  # patient's left: image right
            areas.setdefault(name, []).append(len(changed))
    assert max(areas["small"]) < min(areas["large"]) / 2  # sizes differ visibly


def blob_count(mask: np.ndarray) -> int:
    """Connected components of a boolean image (4-neighbour flood fill)."""
    labels, blobs = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        blobs += 1
        labels[start], stack = blobs, [start]
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = blobs
                    stack.append((nr, nc))
    return blobs


@pytest.mark.parametrize(("count", "share"), [(2, 0.85), (3, 0.75)])
def test_lesions_are_separate_blobs_as_many_as_counted(count, share):
    """Lesions large enough for the tiny model crowd a small organ now and then: where no placement keeps them
    apart they touch (the draw keeping them farthest apart is taken), and a lesion over bone or air can be
    clipped in two. Most scans still show as many separate blobs as the caption counts, and few merge into one."""
    pool = [f for f in facts_pool(300, count=count) if f.margin == "well-defined"][:100]
    blobs = [blob_count(np.abs(lesion_difference(facts, 128, seed=5)[1]) > 25) for facts in pool]
    assert blobs.count(count) >= share * len(pool), {b: blobs.count(b) for b in set(blobs)}
    assert blobs.count(1) <= 0.05 * len(pool)


def test_one_sample_is_deterministic_and_seed_dependent():
    first = S.sample("vqa", "train", 3, seed=0, size=64)
    assert first == S.sample("vqa", "train", 3, seed=0, size=64)
    assert first[0].image != S.sample("vqa", "train", 3, seed=1, size=64)[0].image
    assert first[0].image != S.sample("vqa", "train", 4, seed=0, size=64)[0].image


@pytest.mark.parametrize("override", ["pretrain_train=-1", "vqa_test=0", "image_size=16", "seed=-3", "workers=0",
                                      "questions_per_image=0", "questions_per_image=99"])
def test_nonsense_config_is_a_config_error(override, tmp_path):
    with pytest.raises(ConfigError):
        load_config(S.SynthConfig, overrides=[override])
    key, value = override.split("=")
    with pytest.raises(ConfigError):
        S.generate(tmp_path / "out", S.SynthConfig(**{key: int(value)}))
    assert not (tmp_path / "out").exists()
