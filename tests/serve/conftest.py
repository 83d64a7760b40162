"""Fixtures of the serving and explanation tests: small models in memory (random weights: fast, and enough to
check that the server returns what the model computes) and one tiny fine-tuned run on disk."""

from __future__ import annotations

import pytest

from medvlp.data.tokenizer import train_tokenizer
from medvlp.models.config import model_config
from medvlp.models.model import build_model
from medvlp.predict import Predictor
from medvlp.training.finetune import FinetuneConfig, finetune, load_finetune_config

TEXTS = ["is there a lesion in the left lung", "a small round mass in the liver", "what modality is this",
         "58-year-old, staging", "how many lesions are there", "an oval nodule in the right lung"]
SMALL = [f"synthetic.{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
         for split, n in (("train", 16), ("val", 4), ("test", 4))]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS * 10, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


def make_predictor(tokenizer, task: str, classes: list[str], seed: int = 0) -> Predictor:
    import torch

    torch.manual_seed(seed)
    model = build_model(model_config("tiny", num_classes=len(classes), text={"vocab_size": len(tokenizer)}))
    config = FinetuneConfig(task=task, classes=classes, max_text_len=32)
    return Predictor(model, tokenizer, kind="fine-tuned", max_text_len=32, task=task, classes=classes, config=config)


@pytest.fixture(scope="session")
def vqa_predictor(tokenizer) -> Predictor:
    return make_predictor(tokenizer, "vqa", ["yes", "no", "left", "right", "ct", "mri", "x-ray"])


@pytest.fixture(scope="session")
def classification_predictor(tokenizer) -> Predictor:
    return make_predictor(tokenizer, "classification", ["normal", "single lesion", "bilateral lesions"], seed=1)


@pytest.fixture(scope="session")
def vqa_run(tmp_path_factory):
    """A VQA run fine-tuned for 2 steps on a tiny synthetic corpus (a real run folder for the CLI and the
    browser test)."""
    root = tmp_path_factory.mktemp("serve-run")
    config = load_finetune_config(None, [
        "task=vqa", f"run_dir={root / 'vqa'}", f"synthetic_dir={root / 'data'}", "batch_size=4", "num_workers=0",
        "trainer.max_steps=2", "trainer.val_every=2", "trainer.progress_bar=false", "vocab_size=400",
        "synthetic.workers=1", *SMALL])
    return finetune(config)
