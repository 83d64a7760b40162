"""Model configs: typed dataclasses, the named sizes (``tiny``, ``base``) and their checks.

The defaults of every dataclass are the papers' ``base`` model (CLIP ViT-B/16, RoBERTa-base, six co-attention
layers of width 768, a 384-wide MIM decoder). Layer indices into the fusion stack follow one convention:
``states[0]`` is the fusion input (projected encoder output plus modality embedding) and ``states[i]`` the
output of layer ``i``, so "the input of layer 4 of 6" is ``states[3]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvlp.errors import ConfigError


@dataclass
class VisionConfig:
    """The ViT image encoder (Hugging Face CLIP vision tower).

    ``pretrained`` is a local directory or a hub id holding a ``CLIPVisionModel`` or a full ``CLIPModel``; when
    set, the architecture numbers below are ignored and read from the checkpoint instead.
    """

    pretrained: str | None = None
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    drop_last_layers: int = 0  # blocks of a pretrained checkpoint left out at the top (M3AE uses 11 of CLIP's 12)
    conv_stem: bool = False  # a small CNN instead of the patch convolution (from scratch only; see ConvStem)


@dataclass
class TextConfig:
    """The BERT/RoBERTa-style text encoder; from scratch it is a RoBERTa built from these numbers.

    ``vocab_size`` and ``pad_token_id`` must match the tokenizer (set them from it at build time). When
    ``pretrained`` is set the numbers are read from the checkpoint instead.
    """

    pretrained: str | None = None
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    dropout: float = 0.1


@dataclass
class FusionConfig:
    """The co-attention stack: per layer and stream self-attention, cross-attention, feed-forward."""

    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1


@dataclass
class MIMDecoderConfig:
    """The small Transformer that predicts the pixels of the dropped patches (MAE-style)."""

    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1536
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # of the blocks' feed-forward; M3AE's CLIP blocks: quick_gelu
    positions: Literal["row_first", "column_first"] = "row_first"  # which half of the sin-cos table is the row;
    # MAE's and M3AE's table encodes the column in the first half


@dataclass
class ModelConfig:
    """The whole model. Defaults are the papers' ``base``; see ``model_sizes`` and ``model_config``.

    - ``mim_layer``: index into the fusion states (0 = fusion input, i = output of layer i) that the pixel
      decoder reads; 3 is "the input of layer 4 of 6", as in M3AE.
    - ``mlm_layer``: the same kind of index for the MLM head; ``None`` means the last layer's output.
    - ``memory_slots``: MPMA's memory-augmented fusion; 0 switches it off. ``memory_per_layer`` gives every
      fusion layer its own memory matrix instead of one shared by all layers (both streams always share).
    - ``tie_mlm_weights``: tie the MLM projection to the text word embeddings (only possible when the text
      encoder and the fusion have the same width; otherwise the head has its own projection).
    - ``embed_dim``: width of MPMA's contrastive embedding space (global and local alignment), into which both
      encoders are projected. The paper does not give it; 256 is ALBEF's choice (the M3AE/ALBEF lineage).
    - ``temperature``: initial temperature of the alignment losses (CLIP's 0.07); it is learned, as
      ``logit_scale = log(1 / temperature)``, and used clamped to at least 0.01 (CLIP's rule).
    - ``num_classes``: width of the downstream classifier on the joint representation (the answer vocabulary
      for Med-VQA, the labels for classification); 0 builds none (pre-training, retrieval).
    - ``classifier_expansion``: the classifier's hidden width as a multiple of the joint width (M3AE and METER:
      1, i.e. 2 x fusion width; medvlp's default 2 gives the head twice that).
    - ``visible_rounding``: how many patches MIM keeps, ``N * (1 - ratio)`` rounded (``round``) or truncated
      (``floor``, M3AE's ``int()``); they differ only when the product is not whole.
    - ``itm_score``: the scalar a fine-tuned model ranks image-text pairs by: the ITM log-odds
      (``log_odds`` = logit[1] - logit[0]) or the "matched" logit alone (``matched``, M3AE's retrieval head,
      which is the ITM head's row 1).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    mim_decoder: MIMDecoderConfig = field(default_factory=MIMDecoderConfig)
    image_size: int = 288
    patch_size: int = 16
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.15
    mim_layer: int = 3
    mlm_layer: int | None = None
    norm_pix_loss: bool = True
    memory_slots: int = 0
    memory_per_layer: bool = False
    tie_mlm_weights: bool = True
    embed_dim: int = 256
    temperature: float = 0.07
    num_classes: int = 0
    classifier_expansion: int = 2
    visible_rounding: Literal["round", "floor"] = "round"
    itm_score: Literal["log_odds", "matched"] = "log_odds"

    @property
    def grid_size(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def mlm_layer_index(self) -> int:
        """``mlm_layer`` resolved to a non-negative index into the fusion states."""
        return self.fusion.num_layers if self.mlm_layer is None else self.mlm_layer

    def validate(self) -> ModelConfig:
        """Raise ``ConfigError`` (one line) for the first inconsistent value; return ``self`` when all is well."""
        for name in ("image_mask_ratio", "text_mask_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"model.{name} = {value} must lie strictly between 0 and 1")
        if self.patch_size <= 0 or self.image_size <= 0:
            raise ConfigError(f"model.image_size ({self.image_size}) and model.patch_size ({self.patch_size}) "
                              "must be positive")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size = {self.image_size} is not divisible by model.patch_size = "
                              f"{self.patch_size}")
        widths = {
            "vision": (self.vision.hidden_size, self.vision.num_heads),
            "text": (self.text.hidden_size, self.text.num_heads),
            "fusion": (self.fusion.hidden_size, self.fusion.num_heads),
            "mim_decoder": (self.mim_decoder.hidden_size, self.mim_decoder.num_heads),
        }
        for name, (width, heads) in widths.items():
            if width <= 0 or heads <= 0 or width % heads:
                raise ConfigError(f"model.{name}.hidden_size = {width} is not a positive multiple of "
                                  f"model.{name}.num_heads = {heads}")
        if self.mim_decoder.hidden_size % 4:
            raise ConfigError(f"model.mim_decoder.hidden_size = {self.mim_decoder.hidden_size} must be divisible "
                              "by 4 (2-D sine-cosine positions)")
        counts = {
            "vision.num_layers": self.vision.num_layers, "text.num_layers": self.text.num_layers,
            "fusion.num_layers": self.fusion.num_layers, "mim_decoder.num_layers": self.mim_decoder.num_layers,
            "text.vocab_size": self.text.vocab_size, "vision.intermediate_size": self.vision.intermediate_size,
            "text.intermediate_size": self.text.intermediate_size,
            "fusion.intermediate_size": self.fusion.intermediate_size,
            "mim_decoder.intermediate_size": self.mim_decoder.intermediate_size,
        }
        for name, value in counts.items():
            if value <= 0:
                raise ConfigError(f"model.{name} = {value} must be positive")
        layers = self.fusion.num_layers
        if not 0 <= self.mim_layer <= layers:
            raise ConfigError(f"model.mim_layer = {self.mim_layer} is out of range: use 0 (fusion input) to "
                              f"{layers} (output of the last of {layers} fusion layers)")
        if self.mlm_layer is not None and not 0 <= self.mlm_layer <= layers:
            raise ConfigError(f"model.mlm_layer = {self.mlm_layer} is out of range: use 0 to {layers}, or null "
                              "for the last layer")
        if self.classifier_expansion <= 0:
            raise ConfigError(f"model.classifier_expansion = {self.classifier_expansion} must be positive")
        if self.vision.conv_stem and self.vision.pretrained is not None:
            raise ConfigError("model.vision.conv_stem needs a vision encoder trained from scratch; a pretrained "
                              "checkpoint brings its own patch convolution: set model.vision.conv_stem=false")
        if self.vision.conv_stem and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"model.vision.conv_stem halves the image per stage: model.patch_size = "
                              f"{self.patch_size} must be a power of 2")
        if self.vision.drop_last_layers < 0:
            raise ConfigError(f"model.vision.drop_last_layers = {self.vision.drop_last_layers} must be 0 or positive")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes = {self.num_classes} must be 0 (no classifier) or positive")
        if self.memory_slots < 0:
            raise ConfigError(f"model.memory_slots = {self.memory_slots} must be 0 (off) or positive")
        if self.embed_dim <= 0:
            raise ConfigError(f"model.embed_dim = {self.embed_dim} must be positive")
        if not self.temperature > 0.0:
            raise ConfigError(f"model.temperature = {self.temperature} must be positive")
        if not 0.0 <= self.text.dropout < 1.0 or not 0.0 <= self.fusion.dropout < 1.0:
            raise ConfigError("model.text.dropout and model.fusion.dropout must lie in [0, 1)")
        if not 0 <= self.text.pad_token_id < self.text.vocab_size:
            raise ConfigError(f"model.text.pad_token_id = {self.text.pad_token_id} is outside the vocabulary "
                              f"(size {self.text.vocab_size})")
        return self


SIZES_DIR = Path(__file__).with_name("sizes")
"""The named model sizes, one YAML file each (``tiny.yaml``, ``base.yaml``): the model (overrides of the ``base``
defaults above), the pre-training optimiser's rate and warm-up, and the fine-tuning image size."""


def model_sizes() -> list[str]:
    """The names of the model sizes medvlp ships (the files in ``SIZES_DIR``)."""
    return sorted(p.stem for p in SIZES_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def size_spec(size: str) -> dict[str, Any]:
    """A named size's file, read: ``model`` (a mapping of ``ModelConfig`` fields), ``pretrain_optim`` (of
    ``OptimConfig``) and ``finetune_image_size``; a one-line ``ConfigError`` for a name medvlp does not ship."""
    path = SIZES_DIR / f"{size}.yaml"
    if not isinstance(size, str) or not path.is_file():
        raise ConfigError(f"unknown model size {size!r}; known sizes: {', '.join(model_sizes())}")
    import yaml

    return yaml.safe_load(path.read_text())


def _size_model(size: str) -> ModelConfig:
    from medvlp.config import merge  # the project's one way of applying checked overrides

    return merge(ModelConfig(), size_spec(size)["model"], f"{SIZES_DIR.name}/{size}.yaml", "model")


def model_config(size: str, **overrides: Any) -> ModelConfig:
    """The named size with ``overrides`` applied and checked, e.g. ``model_config("tiny", text={"vocab_size": 5000})``.

    Nested configs take a mapping of their fields (or a whole dataclass); unknown keys and wrong types are a
    ``ConfigError``.
    """
    from medvlp.config import merge

    return merge(_size_model(size), overrides, f"model_config({size!r})").validate()


def model_size_of(path, overrides) -> str:
    """The ``model_size`` a run config will have (read before the full load: it chooses the other defaults);
    one line naming the known sizes when medvlp ships no such size."""
    from medvlp.config import peek

    size = peek(path, overrides, "model_size", "tiny")
    size_spec(size)  # the one-line error for an unknown name
    return size
