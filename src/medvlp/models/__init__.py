"""The model: encoders, co-attention fusion (with MPMA's memory), heads, and the named sizes."""

from medvlp.models.config import (MODEL_SIZES, FusionConfig, MIMDecoderConfig, ModelConfig, TextConfig,
                                  VisionConfig, model_config)
from medvlp.models.encoders import ImageEncoding, Masking, TextEncoder, VisionEncoder, random_masking
from medvlp.models.fusion import CoAttentionFusion, FusionOutput, MemoryBlock
from medvlp.models.heads import AlignmentHead, ITMHead, MIMDecoder, MLMHead, Pooler, sincos_2d
from medvlp.models.model import (CLIP_MEAN, CLIP_STD, MedVLP, MedVLPOutput, build_model, normalize_pixels,
                                 param_groups, patchify, unpatchify)

__all__ = [
    "AlignmentHead", "CLIP_MEAN", "CLIP_STD", "MODEL_SIZES", "CoAttentionFusion", "FusionConfig", "FusionOutput",
    "ITMHead", "ImageEncoding", "MIMDecoder", "MIMDecoderConfig", "MLMHead", "Masking", "MedVLP", "MedVLPOutput",
    "MemoryBlock", "ModelConfig", "Pooler", "TextConfig", "TextEncoder", "VisionConfig", "VisionEncoder",
    "build_model", "model_config", "normalize_pixels", "param_groups", "patchify", "random_masking",
    "sincos_2d", "unpatchify",
]
