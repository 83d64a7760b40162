"""Shared fixtures: the real data folder, a small raw VQA-RAD folder built from scratch, and the tiny model and
runs that many tests start from (a tiny model config and model; a 2-step MPMA pre-training run and a 2-step VQA
run fine-tuned from it, each made once per test session: tests read them and never change them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA, TINY_CORPUS, png_bytes


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


# -- the tiny model and runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_config():
    """The ``tiny`` model config with a 300-word vocabulary (a ``ModelConfig``; frozen use: replace, not edit)."""
    from medvlp.models.config import model_config

    return model_config("tiny", text={"vocab_size": 300})


@pytest.fixture
def tiny_model(tiny_config):
    """A fresh tiny model (seed 1, eval mode), the test's own to change."""
    import torch

    from medvlp.models.model import build_model

    torch.manual_seed(1)
    return build_model(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_pretrain_run(tmp_path_factory) -> Path:
    """A 2-step MPMA pre-training run (``mpma-tiny``) on a small synthetic corpus (in ``../data``)."""
    from helpers import ROOT

    from medvlp.training.config import load_pretrain_config
    from medvlp.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("tiny-runs")
    return pretrain(load_pretrain_config(ROOT / "src/medvlp/configs/mpma-tiny.yaml", [
        f"run_dir={root / 'pretrain'}", f"data.synthetic_dir={root / 'data'}", "data.batch_size=8",
        "data.num_workers=0", "trainer.max_steps=2", "trainer.val_every=2", "trainer.val_batches=1",
        "trainer.pictures=0", "trainer.progress_bar=false", "data.vocab_size=300", "data.synthetic.workers=1",
        *[f"data.synthetic.{s}" for s in TINY_CORPUS]]))


@pytest.fixture(scope="session")
def tiny_finetuned_run(tiny_pretrain_run) -> Path:
    """A 2-step VQA run fine-tuned from ``tiny_pretrain_run`` on the same corpus."""
    from medvlp.training.config import load_finetune_config
    from medvlp.training.finetune import finetune

    root = tiny_pretrain_run.parent
    return finetune(load_finetune_config(None, [
        "task=vqa", f"run_dir={root / 'vqa'}", f"synthetic_dir={root / 'data'}", "batch_size=8", "num_workers=0",
        "trainer.max_steps=2", "trainer.val_every=2", "trainer.progress_bar=false", f"init={tiny_pretrain_run}",
        *[f"synthetic.{s}" for s in TINY_CORPUS]]))
