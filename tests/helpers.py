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
