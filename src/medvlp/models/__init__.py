"""The model: encoders, co-attention fusion (with MPMA's memory), heads, and the named sizes.

The names below are imported on first use, so that ``medvlp.models.config`` (the typed configs) can be read
without importing torch and transformers."""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "config": ("FusionConfig", "MIMDecoderConfig", "ModelConfig", "TextConfig", "VisionConfig", "model_config",
               "model_sizes", "size_spec"),
    "encoders": ("ImageEncoding", "Masking", "TextEncoder", "VisionEncoder", "random_masking"),
    "fusion": ("CoAttentionFusion", "FusionOutput", "MemoryBlock"),
    "heads": ("AlignmentHead", "ITMHead", "MIMDecoder", "MLMHead", "Pooler", "sincos_2d"),
    "model": ("CLIP_MEAN", "CLIP_STD", "MedVLP", "MedVLPOutput", "build_model", "normalize_pixels", "param_groups",
              "patchify", "unpatchify"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'medvlp.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medvlp.models.{_MODULE_OF[name]}"), name)
