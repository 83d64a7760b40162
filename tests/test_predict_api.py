"""The Python API (``medvlp.load``) and ``medvlp predict``: every kind of run, one item or a list, batching,
unreadable images skipped in a ranking, the meaning of the scores, compressed DICOM, and the documented
example (docs/python-api.md) run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, png_bytes

import medvlp
from medvlp.cli import main
from medvlp.errors import DataError, MedvlpError


@pytest.fixture(scope="module")
def runs(tiny_pretrain_run, tiny_finetuned_run, tmp_path_factory):
    """The shared tiny MPMA pre-training run, the VQA run fine-tuned from it, its export, and a folder of images."""
    from medvlp.jobs.export import export_encoders

    root = tmp_path_factory.mktemp("api")
    export_encoders(tiny_pretrain_run, root / "export")
    images = root / "images"
    images.mkdir()
    for i in range(5):
        (images / f"scan{i}.png").write_bytes(png_bytes(size=64, seed=i))
    return {"pretrain": tiny_pretrain_run, "vqa": tiny_finetuned_run, "export": root / "export", "images": images}


def test_import_medvlp_is_light():
    code = "import sys, medvlp; assert callable(medvlp.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_one_item_or_a_list_batched_like_one_at_a_time(runs):
    model = medvlp.load(runs["vqa"])
    images = sorted(runs["images"].iterdir())
    one = model.answer(images[0], "Is there a lesion?", k=3)
    assert len(one) == 3 and all(answer in model.classes for answer, _ in one)
    many = model.answer(images, "Is there a lesion?", k=3, batch_size=2)  # three batches
    assert len(many) == len(images) and [a for a, _ in many[0]] == [a for a, _ in one]
    assert many[0][0][1] == pytest.approx(one[0][1], abs=1e-5)
    pairs = model.answer(images[:2], ["Is there a lesion?", "What modality is this?"])
    assert len(pairs) == 2
    with pytest.raises(MedvlpError, match="one image per text: got 3 images and 2 texts"):
        model.answer(images[:3], ["a?", "b?"])
    with pytest.raises(MedvlpError, match="fine-tuned for vqa; it cannot classify"):
        model.classify(images[0], "a note")
    single, batch = model.embed_image(images[0]), model.embed_image(images, batch_size=2)
    assert single.shape == (model.model.cfg.embed_dim,) and batch.shape == (5, model.model.cfg.embed_dim)
    assert torch.allclose(batch[0], single, atol=1e-5) and torch.allclose(batch.norm(dim=1), torch.ones(5))
    texts = model.embed_text(["a round lesion", "normal chest"])
    assert texts.shape == (2, model.model.cfg.embed_dim) and torch.allclose(model.embed_text("normal chest"),
                                                                            texts[1], atol=1e-5)


def test_ranking_skips_an_unreadable_image_and_says_what_scores_mean(runs, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in sorted(runs["images"].iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    ranking = medvlp.load(runs["vqa"]).rank(sorted(folder.iterdir()), "a round lesion")
    assert len(ranking) == 3 and [s for _, s in ranking] == sorted((s for _, s in ranking), reverse=True)
    assert all(0 <= s <= 1 for _, s in ranking) and ranking.score.startswith("ITM match probability in [0, 1]")
    assert [p.name for p, _ in ranking.skipped] == ["broken.png"] and "cannot read" in ranking.skipped[0][1]
    assert main(["predict", str(runs["vqa"]), "--images", str(folder), "--query", "a round lesion"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("scores: ITM match probability in [0, 1]") and len(lines) == 4
    assert "skipped" in captured.err and "broken.png" in captured.err


def test_a_pretrained_run_ranks_by_embeddings_and_reranks_with_itm(runs, capsys):
    model = medvlp.load(runs["pretrain"])
    assert model.kind == "pre-trained" and model.task is None
    images = sorted(runs["images"].iterdir())
    by_embedding = model.rank(images, "a round lesion")
    assert by_embedding.score.startswith("cosine similarity") and len(by_embedding) == 5
    assert all(-1 <= s <= 1 for _, s in by_embedding)
    expected = (model.embed_image(images) @ model.embed_text("a round lesion")).max().item()
    assert by_embedding[0][1] == pytest.approx(expected, abs=1e-5)
    reranked = model.rank(images, "a round lesion", rerank=2)
    assert len(reranked) == 2 and {p for p, _ in reranked} == {p for p, _ in by_embedding[:2]}
    assert "re-ranked" in reranked.score
    both = model.rank(images, ["a round lesion", "normal"])
    assert len(both) == 2 and both[0] == by_embedding
    with pytest.raises(MedvlpError, match="pre-trained run; it cannot answer questions"):
        model.answer(images[0], "Is there a lesion?")
    assert main(["predict", str(runs["pretrain"]), "--images", str(runs["images"]), "--query", "lesion",
                 "--rerank", "3", "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("scores: ITM match probability") and len(lines) == 3


def test_an_exported_run_embeds(runs):
    model = medvlp.load(runs["export"])
    image = sorted(runs["images"].iterdir())[0]
    assert model.kind == "exported" and model.embed_image(image).norm().item() == pytest.approx(1.0, abs=1e-5)
    assert model.embed_text(["a", "b c"]).shape[0] == 2
    with pytest.raises(MedvlpError, match="exported run holds the two encoders only"):
        model.rank([image], "a lesion")


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "SC_rgb_rle.dcm", "JPEG2000.dcm"])
def test_predict_answers_on_compressed_dicom(runs, name, capsys):
    """pydicom's own compressed files (shipped in its wheel): JPEG extended 12-bit, JPEG baseline, JPEG-LS, RLE,
    JPEG 2000."""
    pydicom = pytest.importorskip("pydicom")
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    assert main(["predict", str(runs["vqa"]), "--image", str(path), "--question", "What modality is this?",
                 "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[1] in medvlp.load(runs["vqa"]).classes


def test_a_missing_decoder_names_the_extra_to_install(runs, monkeypatch, capsys):
    pydicom = pytest.importorskip("pydicom")
    from medvlp.data import dicom

    # JPEG-lossy.dcm is a JPEG extended file that only GDCM reads (pydicom's own tests say so): it fails here
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "JPEG-lossy.dcm"
    monkeypatch.setattr(dicom, "DECODER_MODULES", ("medvlp_no_such_decoder",))
    assert main(["predict", str(runs["vqa"]), "--image", str(path), "--question", "Is it?"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and 'pip install "medvlp[dicom]"' in error and "JPEG Extended" in error
    with pytest.raises(DataError, match="give a PNG, JPEG or DICOM file"):  # the decoders are there: no hint
        monkeypatch.setattr(dicom, "DECODER_MODULES", ())
        medvlp.load(runs["vqa"]).answer(path, "Is it?")


@pytest.mark.parametrize("argv, message", [
    (["--question", "Is it?"], "--question needs the image: give it with --image FILE"),
    (["--image", "nowhere.png", "--question", "Is it?"], "--image nowhere.png: no such file"),
    (["--query", "lesion"], "--query ranks the images of a folder"),
    (["--image", "x.png"], "say what to predict"),
    (["--image", "x.png", "--question", "a", "--text", "b"], "give one of --question, --text and --query"),
    (["--images", ".", "--query", "a", "--window", "lungs"], "window='lungs': known presets are"),
])
def test_predict_checks_its_arguments_before_loading_the_model(runs, argv, message, capsys):
    assert main(["predict", str(runs["vqa"]), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error
    assert main(["predict", "no/such/run", "--image", "x.png", "--question", "Is it?"]) == 2
    assert "no/such/run: no such run folder" in capsys.readouterr().err


def test_the_documented_example_runs(runs, tmp_path, monkeypatch):
    """The first python block of docs/python-api.md, run as written against a run of the fixture."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    Path("runs/vqa").parent.mkdir(parents=True)
    Path("runs/vqa").symlink_to(runs["vqa"])
    Path("scan.png").write_bytes(png_bytes(size=64))
    Path("scans").symlink_to(runs["images"])
    exec(compile(code, "docs/python-api.md", "exec"), {})
