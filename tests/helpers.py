"""Small helpers the tests share (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from medvlp.data.prepare import PrepareConfig
from medvlp.data.registry import prepare

ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCHMARKS = ROOT / "benchmarks"
# the synthetic corpus of the shared tiny runs (conftest.py): ``synthetic.`` settings of a fine-tuning config
TINY_CORPUS = [f"{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
               for split, n in (("train", 32), ("val", 8), ("test", 8))]


def png_bytes(size: int = 48, seed: int = 0, mode: str = "L") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    image = Image.fromarray(pixels, "L").convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG" if mode != "CMYK" else "JPEG")
    return out.getvalue()


def png_of(width: int, height: int, seed: int = 0) -> bytes:
    """A grey PNG of random pixels, ``width`` x ``height``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


def prepare_reported(name: str, raw: Path, out: Path, **config) -> tuple[dict, list[str]]:
    """``prepare`` a raw dataset with ``PrepareConfig(**config)``; returns the manifest and the lines it reported."""
    lines: list[str] = []
    return prepare(name, raw, out, PrepareConfig(**config), report=lines.append), lines


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model_and_batch(batch_size: int = 6, **model):
    """A tiny model (seed 0, eval mode) and a batch of ``batch_size`` random 64-pixel images and 12-token texts with
    one masked word each (``model``: overrides of the tiny model config)."""
    import torch

    from medvlp.models.config import model_config
    from medvlp.models.model import build_model

    torch.manual_seed(0)
    net = build_model(model_config("tiny", **model)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 4096, (batch_size, 12), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    batch = {"pixels": torch.randint(0, 256, (batch_size, 1, 64, 64), dtype=torch.uint8, generator=g),
             "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "mlm_input_ids": torch.where(labels != -100, 4, ids), "mlm_labels": labels}
    return net, batch
