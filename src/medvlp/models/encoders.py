"""The unimodal encoders: a CLIP ViT that can run on the visible patches only, and a BERT/RoBERTa text encoder.

Both wrap Hugging Face models so that published checkpoints load through Hugging Face's own code
(``CLIPVisionModel.from_pretrained``, ``AutoModel.from_pretrained``); the vision forward is our own so that MAE
masking can drop patches *before* the Transformer runs.
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging as hf_logging

from medvlp.errors import ConfigError
from medvlp.integrity import verify_checksum
from medvlp.models.config import TextConfig, VisionConfig
from medvlp.models.dropout import use_fast_dropout

VISION_MODEL_TYPES = ("clip", "clip_vision_model")
"""Checkpoints the vision encoder accepts: a full CLIP model (its vision tower is used) or a CLIP vision tower."""

TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "ernie", "megatron-bert",
                    "roberta-prelayernorm", "deberta", "deberta-v2")
"""Bidirectional BERT-style encoders the text encoder accepts (PubMedBERT, BioClinicalBERT, RoBERTa, ...)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Masking:
    """Which patches an image kept. ``N`` patches in raster order, ``K`` of them visible.

    - ``ids_keep`` [B, K]: indices of the visible patches, in the order the encoder sees them.
    - ``ids_restore`` [B, N]: where each patch sits in the shuffled order (visible first, then dropped);
      gathering ``cat(visible, dropped)`` with it puts the sequence back in raster order.
    - ``mask`` [B, N] bool: True where the patch was dropped.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def num_visible(num_patches: int, mask_ratio: float, rounding: str = "round") -> int:
    """Patches kept at ``mask_ratio``: ``N * (1 - ratio)`` rounded (``"round"``) or truncated (``"floor"``, M3AE's
    ``int()``), at least one."""
    kept = num_patches * (1.0 - mask_ratio)
    return min(num_patches, max(1, round(kept) if rounding == "round" else int(kept)))


def random_masking(x: Tensor, mask_ratio: float, generator: torch.Generator | None = None, *,
                   noise: Tensor | None = None, rounding: str = "round") -> tuple[Tensor, Masking]:
    """Keep a random subset of the tokens of ``x`` [B, N, D], different for each sample (MAE-style).

    Each sample ranks its tokens by uniform noise (drawn from ``generator``, or the given ``noise`` [B, N]); the
    lowest ``num_visible`` are kept, in the order of their noise (not re-sorted by position). Vectorised: one
    argsort for the shuffle, a second one inverts it.
    """
    batch, length, dim = x.shape
    keep = num_visible(length, mask_ratio, rounding)
    if noise is None:
        noise_device = generator.device if generator is not None else x.device
        noise = torch.rand(batch, length, generator=generator, device=noise_device)
    elif noise.shape != (batch, length):
        raise ValueError(f"masking noise of shape {tuple(noise.shape)} for {batch} images of {length} patches")
    ids_shuffle = noise.to(x.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, dtype=torch.bool, device=x.device).scatter_(1, ids_keep, False)
    return visible, Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _resolve_source(source: str, field: str, expected: str) -> str:
    """A local checkpoint directory (checked here) or a hub id (left to ``from_pretrained``)."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}: {source} has no config.json; expected a {expected} checkpoint directory "
                              "written by save_pretrained")
        for weights in path.glob("*.safetensors"):
            verify_checksum(weights)  # where a checksum was written beside them (medvlp export)
        return str(path)
    if _HUB_ID.match(source):
        return source
    raise ConfigError(f"{field}: {source} does not exist; expected a {expected} checkpoint directory or a hub id")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_hf_config(source: str, field: str, expected: str, allowed: tuple[str, ...]) -> PreTrainedConfig:
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{field}: cannot read the config of {source} ({_first_line(error)})") from None
    if config.model_type not in allowed:
        raise ConfigError(f"{field}: {source} holds a {config.model_type!r} model; expected a {expected} "
                          f"(model_type one of {', '.join(allowed)})")
    return config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide Hugging Face's load report and progress bar (we check missing weights ourselves; unused ones, such
    as the text tower of a full CLIP checkpoint, are expected)."""
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: type, source: str, field: str, **kwargs) -> PreTrainedModel:
    with _quiet_transformers(), warnings.catch_warnings():
        # torch's safe unpickler notes the protocol of every pickled .bin; the refusal below says what matters
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            model, info = cls.from_pretrained(source, dtype=torch.float32, output_loading_info=True, **kwargs)
        except pickle.UnpicklingError:
            raise ConfigError(f"{field}: {source} holds pickled weights (pytorch_model.bin) that hold more than "
                              "tensors; medvlp never runs pickled code: save them as model.safetensors with a "
                              "tool you trust") from None
        except (OSError, ValueError, RuntimeError, EOFError) as error:
            raise ConfigError(f"{field}: cannot load weights from {source} ({_first_line(error)})") from None
    missing = info.get("missing_keys") or []
    if missing:
        missing = sorted(missing)
        raise ConfigError(f"{field}: {source} lacks {len(missing)} weights of the model (e.g. {missing[0]}); "
                          "is it the right checkpoint?")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Vision
# ----------------------------------------------------------------------------------------------------------------


class ConvStem(nn.Sequential):
    """A small convolutional network that turns an image into the ViT's patch grid, instead of one
    ``patch x patch`` convolution: a 3x3 convolution at full resolution, then ``log2(patch_size)`` 3x3
    convolutions of stride 2 (each with BatchNorm and GELU, channels doubling up to ``width``), then a 1x1
    convolution to ``width``. Its output grid is the patch convolution's, ``image_size / patch_size`` per side, so
    masking, MIM and everything after the embedding are unchanged; it sees the whole image (masking drops tokens
    after it). Small structures (a lesion a few pixels wide) reach the tokens through several overlapping
    receptive fields rather than one linear map of a 16 x 16 patch. The full-resolution convolution is what
    makes it see them (benchmarks/lesion_probe.py: 91.7% "lesion or none" with it, 76.0% without, majority
    73.0%) and most of its cost.

    Args:
        patch_size: pixels per token side, a power of 2.
        width: the ViT's hidden size (channels of the output).
        channels: channels of the full-resolution convolution (doubled at every stride-2 stage, up to ``width``).
    """

    def __init__(self, patch_size: int, width: int, channels: int = 16) -> None:
        stages = patch_size.bit_length() - 1
        if 1 << stages != patch_size:
            raise ValueError(f"a convolutional stem needs a power-of-2 patch size, not {patch_size}")
        sizes = [min(width, channels << i) for i in range(stages + 1)]
        layers: list[nn.Module] = []
        for i, (inputs, outputs) in enumerate(zip([3, *sizes[:-1]], sizes)):
            layers += [nn.Conv2d(inputs, outputs, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(outputs),
                       nn.GELU()]
        super().__init__(*layers, nn.Conv2d(sizes[-1], width, 1))


@dataclass
class ImageEncoding:
    """Vision encoder output: ``states`` [B, 1 + K, D] (class token first) and the masking (None if unmasked)."""

    states: Tensor
    masking: Masking | None

    @property
    def cls(self) -> Tensor:
        return self.states[:, 0]


class VisionEncoder(nn.Module):
    """A CLIP ViT whose forward drops patches before the Transformer and adapts to any image size.

    The Hugging Face ``CLIPVisionModel`` is kept whole (``self.model``) so that its weights keep their names;
    only its pieces are called: patch convolution, class token, position table, pre-LayerNorm, encoder layers,
    post-LayerNorm. The post-LayerNorm is applied to every token (as in CLIP's own visual tower used by METER
    and M3AE), not only to the class token as Hugging Face's pooler does.
    """

    def __init__(self, model: CLIPVisionModel, conv_stem: bool = False) -> None:
        super().__init__()
        self.model = model
        self.hidden_size: int = model.config.hidden_size
        self.patch_size: int = model.config.patch_size
        self.native_grid: int = model.config.image_size // model.config.patch_size
        # with a stem, the CLIP patch convolution is left out of the model (stem.* replaces its weights)
        self.stem = ConvStem(self.patch_size, self.hidden_size) if conv_stem else None
        if conv_stem:
            model.embeddings.patch_embedding = None

    def position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """The position table [1 + grid_h * grid_w, D] for a patch grid, class position first.

        At the checkpoint's own grid this is the table itself; otherwise the patch part is resized on its 2-D
        grid (bicubic) and the class position is kept. Computed on every call, so any image size works.
        """
        table = self.model.embeddings.position_embedding.weight
        if (grid_h, grid_w) == (self.native_grid, self.native_grid):
            return table
        cls_pos, patch_pos = table[:1], table[1:]
        grid = patch_pos.reshape(1, self.native_grid, self.native_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(table.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    @torch.no_grad()
    def resize_positions(self, grid: int) -> None:
        """Replace the position table by its interpolation to a ``grid x grid`` patch grid (fine-tuning at a
        larger image size), so that the new table is what is learned and saved from now on."""
        if grid == self.native_grid:
            return
        table = self.position_embeddings(grid, grid).detach().clone()
        old = self.model.embeddings.position_embedding
        self.model.embeddings.position_embedding = nn.Embedding(table.shape[0], table.shape[1]).to(old.weight.device)
        self.model.embeddings.position_embedding.weight.copy_(table)
        self.model.embeddings.register_buffer("position_ids", torch.arange(table.shape[0]).unsqueeze(0),
                                              persistent=False)
        self.model.embeddings.num_patches, self.model.embeddings.num_positions = grid * grid, grid * grid + 1
        self.model.config.image_size = grid * self.patch_size
        self.native_grid = grid

    def forward(self, pixels: Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None, *,
                noise: Tensor | None = None, rounding: str = "round") -> ImageEncoding:
        """``pixels``: normalised float [B, 3, H, W]; with ``mask_ratio > 0`` only the kept patches are encoded
        (which ones: see ``random_masking``; ``noise`` [B, N] replaces the random draw)."""
        embeddings = self.model.embeddings
        _, _, height, width = pixels.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {self.patch_size}")
        embed = self.stem if self.stem is not None else embeddings.patch_embedding
        patches = embed(pixels.to(next(embed.parameters()).dtype))
        grid_h, grid_w = patches.shape[-2:]
        positions = self.position_embeddings(grid_h, grid_w)
        x = patches.flatten(2).transpose(1, 2) + positions[1:]
        masking = None
        if mask_ratio > 0:
            x, masking = random_masking(x, mask_ratio, generator, noise=noise, rounding=rounding)
        cls = (embeddings.class_embedding + positions[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.model.pre_layrnorm(torch.cat([cls, x], dim=1))
        for layer in self.model.encoder.layers:
            x = layer(x, None)
        return ImageEncoding(states=self.model.post_layernorm(x), masking=masking)


def build_vision_encoder(cfg: VisionConfig, image_size: int, patch_size: int) -> VisionEncoder:
    """From scratch (our numbers, ``image_size`` as the native size) or from ``cfg.pretrained``."""
    field = "model.vision.pretrained"
    if cfg.pretrained is None:
        hf_config = CLIPVisionConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size, image_size=image_size, patch_size=patch_size,
            attn_implementation="sdpa",
        )
        return VisionEncoder(CLIPVisionModel(hf_config), conv_stem=cfg.conv_stem)
    expected = "CLIP vision model"
    source = _resolve_source(cfg.pretrained, field, expected)
    _load_hf_config(source, field, expected, VISION_MODEL_TYPES)
    model = _from_pretrained(CLIPVisionModel, source, field, attn_implementation="sdpa")
    if cfg.drop_last_layers:
        layers = model.encoder.layers
        if cfg.drop_last_layers >= len(layers):
            raise ConfigError(f"model.vision.drop_last_layers = {cfg.drop_last_layers} leaves none of the "
                              f"{len(layers)} blocks of {source}")
        model.encoder.layers = layers[:len(layers) - cfg.drop_last_layers]
        model.config.num_hidden_layers = len(model.encoder.layers)
    if model.config.patch_size != patch_size:
        raise ConfigError(f"{field}: {source} uses {model.config.patch_size}-pixel patches but model.patch_size is "
                          f"{patch_size}; set model.patch_size={model.config.patch_size}")
    return VisionEncoder(model)


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """A BERT/RoBERTa-style encoder without its pooler; returns the last hidden states [B, L, D].

    Ids at padded positions are replaced by the pad id before the model sees them, so that what the data
    layer leaves there cannot matter (RoBERTa derives its position ids from the pad id). The model's dropout
    layers are swapped for ``models.dropout.Dropout`` (same rates, a cheaper mask on the CPU).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        use_fast_dropout(model)
        self.hidden_size: int = model.config.hidden_size
        self.vocab_size: int = model.config.vocab_size
        self.pad_token_id: int | None = model.config.pad_token_id

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.pad_token_id is not None:
            input_ids = input_ids.masked_fill(attention_mask == 0, self.pad_token_id)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _text_model_kwargs(config: PreTrainedConfig) -> dict:
    """Ask for no pooler and SDPA attention where the model class supports them."""
    cls = MODEL_MAPPING[type(config)]
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    if getattr(cls, "_supports_sdpa", False):
        kwargs["attn_implementation"] = "sdpa"
    return kwargs


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """From scratch (a RoBERTa of our numbers) or from ``cfg.pretrained`` through ``AutoModel``."""
    field = "model.text.pretrained"
    if cfg.pretrained is None:
        hf_config = RobertaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
            pad_token_id=cfg.pad_token_id, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            layer_norm_eps=1e-5, attn_implementation="sdpa",
        )
        return TextEncoder(RobertaModel(hf_config, add_pooling_layer=False))
    expected = "BERT/RoBERTa-style text encoder"
    source = _resolve_source(cfg.pretrained, field, expected)
    hf_config = _load_hf_config(source, field, expected, TEXT_MODEL_TYPES)
    return TextEncoder(_from_pretrained(AutoModel, source, field, **_text_model_kwargs(hf_config)))
