"""``MedVLP``: encoders, co-attention fusion and the pre-training heads, tied together (M3AE and MPMA).

Reads top to bottom: pixel normalisation, patchify/unpatchify, masking, ``encode_image``, ``encode_text``,
``fuse``, ``match``, ``embed_image`` / ``embed_text``, ``forward``. The model computes no losses;
``medvlp.objectives`` turns its outputs into losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medvlp.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, MODEL_CONFIG, WEIGHTS
from medvlp.errors import MedvlpError
from medvlp.models.config import ModelConfig
from medvlp.models.encoders import ImageEncoding, Masking, build_text_encoder, build_vision_encoder, random_masking
from medvlp.models.fusion import CoAttentionFusion, FusionOutput
from medvlp.models.heads import AlignmentHead, ClassifierHead, ITMHead, MIMDecoder, MLMHead, match_score
from medvlp.models.pretrained import load_into, load_model_config, load_weights, save_model_config, save_weights

__all__ = ["CLIP_MEAN", "CLIP_STD", "MedVLP", "MedVLPOutput", "build_model", "normalize_pixels", "param_groups",
           "patchify", "random_masking", "unpatchify"]




# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------


def normalize_pixels(pixels: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] and standardised with CLIP's channel mean and std."""
    if mean is None or std is None:
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch_size**2 * C]; patches in raster order, values ordered (row, column, channel)."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """The inverse of ``patchify``: [B, N, patch_size**2 * C] -> [B, C, H, W] for a (rows, columns) grid."""
    batch, p = patches.shape[0], patch_size
    x = patches.reshape(batch, grid[0], grid[1], p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid[0] * p, grid[1] * p)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MedVLPOutput:
    """What one forward pass produced. Heads that were not asked for are None.

    - ``text_features`` [B, L, Dt], ``image_features`` [B, 1 + K, Dv]: the unimodal encoders' outputs;
      ``text_cls`` / ``image_cls`` their first tokens (for MPMA's contrastive and local alignment losses).
    - ``fusion``: per-layer states of both streams and the pooled/joint representation.
    - ``masking``: which patches were dropped (None without image masking).
    - ``mlm_logits`` [M, V]: only at the M positions to predict (``mlm_positions`` = ``mlm_labels != -100``,
      row-major order), because the vocabulary projection of every token would dominate the step's cost.
    - ``mim_pred`` [B, N, patch_size**2 * 3] for every patch (the loss keeps the dropped ones); ``itm_logits`` [B, 2].
    - ``class_logits`` [B, num_classes]: the downstream classifier on the joint representation (``classify=True``).
    - Alignment (``align=True``), all unit-length projections of *this pass's* unimodal encoder outputs (so of
      the visible patches and of the masked text when the pass masks): ``image_embed`` [B, E] (class token),
      ``text_embed`` [B, E] (first text token), ``patch_embeds`` [B, K, E] (every visible patch),
      ``word_embeds`` [B, L, E] (every text position, padding included: losses mask it with the batch's
      ``attention_mask``), and ``logit_scale``, the clamped multiplier of cosine similarities (a scalar).
    """

    text_features: Tensor
    image_features: Tensor
    fusion: FusionOutput
    masking: Masking | None = None
    mlm_positions: Tensor | None = None
    mlm_logits: Tensor | None = None
    mim_pred: Tensor | None = None
    itm_logits: Tensor | None = None
    class_logits: Tensor | None = None
    image_embed: Tensor | None = None
    text_embed: Tensor | None = None
    patch_embeds: Tensor | None = None
    word_embeds: Tensor | None = None
    logit_scale: Tensor | None = None

    @property
    def text_cls(self) -> Tensor:
        return self.text_features[:, 0]

    @property
    def image_cls(self) -> Tensor:
        return self.image_features[:, 0]

    @property
    def text_states(self) -> list[Tensor]:
        return self.fusion.text_states

    @property
    def image_states(self) -> list[Tensor]:
        return self.fusion.image_states

    @property
    def joint(self) -> Tensor:
        return self.fusion.joint

    @property
    def image_mask(self) -> Tensor | None:
        return None if self.masking is None else self.masking.mask

    @property
    def ids_restore(self) -> Tensor | None:
        return None if self.masking is None else self.masking.ids_restore


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class MedVLP(nn.Module):
    """Vision encoder, text encoder, co-attention fusion, the MLM / MIM / ITM heads, the alignment head and, for
    fine-tuning on Med-VQA or classification, a classifier (``cfg.num_classes > 0``).

    ``self.cfg`` is the config with the encoders' architecture numbers read back from what was actually built
    (a pretrained checkpoint decides its own sizes).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vision = build_vision_encoder(cfg.vision, cfg.image_size, cfg.patch_size)
        self.text = build_text_encoder(cfg.text)
        self.cfg = _resolved(cfg, self.vision, self.text)
        width = cfg.fusion.hidden_size
        self.fusion = CoAttentionFusion(cfg.fusion, self.text.hidden_size, self.vision.hidden_size,
                                        cfg.memory_slots, cfg.memory_per_layer)
        tie = cfg.tie_mlm_weights and self.text.hidden_size == width
        self.mlm_head = MLMHead(width, self.text.vocab_size, self.text.word_embeddings.weight if tie else None)
        self.mim_decoder = MIMDecoder(width, cfg.mim_decoder, cfg.patch_size)
        self.itm_head = ITMHead(2 * width)
        self.align_head = AlignmentHead(self.vision.hidden_size, self.text.hidden_size, cfg.embed_dim,
                                        cfg.temperature)
        self.classifier = (ClassifierHead(2 * width, cfg.num_classes, cfg.classifier_expansion) if cfg.num_classes
                           else None)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # -- pixels ---------------------------------------------------------------------------------------------------

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] (any device) -> normalised float32 on the model's device."""
        return normalize_pixels(pixels.to(self.pixel_mean.device, non_blocking=True), self.pixel_mean,
                                self.pixel_std)

    def patchify(self, images: Tensor) -> Tensor:
        return patchify(images, self.cfg.patch_size)

    def unpatchify(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        return unpatchify(patches, self.cfg.patch_size, grid)

    # -- encoders and fusion --------------------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None,
                     noise: Tensor | None = None) -> ImageEncoding:
        """uint8 pixels -> vision states [B, 1 + K, Dv]; with ``mask_ratio > 0`` only the kept patches are encoded
        (chosen by ``noise`` [B, N] when given, else drawn from ``generator``)."""
        return self.vision(self.normalize(pixels), mask_ratio, generator, noise=noise,
                           rounding=self.cfg.visible_rounding)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [B, L] -> text states [B, L, Dt]."""
        device = self.pixel_mean.device
        return self.text(input_ids.to(device), attention_mask.to(device))

    def fuse(self, text_states: Tensor, attention_mask: Tensor, image_states: Tensor,
             first_only: tuple[bool, bool] = (False, False)) -> FusionOutput:
        return self.fusion(text_states, attention_mask.to(text_states.device), image_states, first_only=first_only)

    def match_score(self, itm_logits: Tensor) -> Tensor:
        """The scalar pairs are ranked by, from ITM logits [..., 2] (see ``ModelConfig.itm_score``)."""
        return match_score(itm_logits, self.cfg.itm_score)

    def match(self, text_features: Tensor, attention_mask: Tensor, image_features: Tensor) -> Tensor:
        """ITM logits [B, 2] for given encoder states, without encoding again: fuse, then the ITM head.

        For negatives that reuse the paired pass, index its states: ``match(out.text_features, mask,
        out.image_features[donors])`` pairs every text with the image of ``donors`` (see
        ``objectives.hard_negatives``).
        """
        return self.itm_head(self.fuse(text_features, attention_mask, image_features, first_only=(True, True)).joint)

    # -- embeddings for zero-shot retrieval -----------------------------------------------------------------------

    def embed_image(self, pixels: Tensor) -> Tensor:
        """uint8 pixels -> unit-length global image embeddings [B, E] (unmasked vision encoder, no fusion)."""
        return self.align_head.embed_image(self.encode_image(pixels).cls)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [B, L] -> unit-length global text embeddings [B, E] (text encoder only, no fusion)."""
        return self.align_head.embed_text(self.encode_text(input_ids, attention_mask)[:, 0])

    # -- one pass -------------------------------------------------------------------------------------------------

    # -- weights on disk: the one save/load path (models/pretrained.py) ----------------------------------------

    def save_pretrained(self, folder: Path | str, metadata: dict[str, str] | None = None, *,
                        prefix: str = "") -> Path:
        """Save the model into ``folder`` (created if missing): its weights as ``model.safetensors`` (atomically,
        a ``.sha256`` checksum beside them) and its config as ``model.yaml``, which is all ``from_pretrained``
        needs to build it again.

        Args:
            folder: where to write; files of these names already there are replaced.
            metadata: strings stored in the weights file (``{"step": "300"}``).
            prefix: put before every weight name (``model.``: a Lightning module's checkpoint).

        Returns:
            The weights file's path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model_config(self.cfg, folder)
        save_weights({f"{prefix}{k}": v for k, v in self.state_dict().items()}, folder / WEIGHTS, metadata)
        return folder / WEIGHTS

    @classmethod
    def from_pretrained(cls, folder: Path | str, *, prefix: str = "", default_config: ModelConfig | None = None,
                        default_source: str = "its run config") -> MedVLP:
        """The model saved in ``folder`` (by ``save_pretrained``, or a checkpoint of a run), in eval mode.

        Args:
            folder: holds ``model.safetensors`` and ``model.yaml``.
            prefix: removed from the front of every weight name (``model.`` in a pre-training checkpoint).
            default_config: the config to build when ``folder`` has no ``model.yaml`` (a run written before
                medvlp saved it: its run config's ``model`` section); without one that is an error.
            default_source: what ``default_config`` came from, for the error messages.

        Returns:
            The model with the weights loaded. Weights that do not fit the config are a one-line ``MedvlpError``
            naming both files; a damaged weights file fails its checksum.
        """
        folder = Path(folder)
        cfg, source = load_model_config(folder), str(folder / MODEL_CONFIG)
        if cfg is None:
            if default_config is None:
                raise MedvlpError(f"{folder}: no {MODEL_CONFIG} beside the weights; give a folder written by "
                                  "MedVLP.save_pretrained, or open a run folder with medvlp.load")
            cfg, source = default_config, default_source
        weights = {k.removeprefix(prefix): v for k, v in load_weights(folder / WEIGHTS).items()}
        return load_into(build_model(cfg), weights, str(folder / WEIGHTS), source).eval()

    def resize_image(self, image_size: int) -> None:
        """Make ``image_size`` the model's native size (fine-tuning uses larger images than pre-training): the
        position table is interpolated once to the new patch grid and becomes the table the model learns."""
        self.vision.resize_positions(image_size // self.cfg.patch_size)
        self.cfg = dataclasses.replace(self.cfg, image_size=image_size)

    def forward(self, batch: Mapping[str, Tensor], *, mask_image: bool = False, mask_text: bool = False,
                itm: bool = False, align: bool = False, classify: bool = False,
                generator: torch.Generator | None = None, image_noise: Tensor | None = None,
                whole_fusion: bool = False) -> MedVLPOutput:
        """One pass over a batch; each head runs only when its task asks for it.

        - ``mask_image``: drop ``image_mask_ratio`` of the patches and predict their pixels (MIM).
        - ``mask_text``: read ``mlm_input_ids`` instead of ``input_ids`` and predict the words where
          ``mlm_labels != -100`` (MLM).
        - ``itm``: score the pairs with the ITM head (swap images beforehand with ``objectives.itm_batch``).
        - ``classify``: the downstream classifier on the joint representation (Med-VQA answers, class labels).
        - ``align``: project the unimodal encoder outputs of this pass into the alignment space (global and
          token-level embeddings and the logit scale; see ``MedVLPOutput``) for ``objectives.itc_loss`` and
          ``objectives.local_alignment_loss``. One linear per modality over the whole sequence.

        A pass for MLM and/or MIM alone computes only the fusion layers their heads read (MIM reads an inner
        layer's image states, MLM the text states; the later layers would change no output); ``fusion.joint``
        is None then, unless ``whole_fusion`` asks for every layer (to inspect them). Any other pass runs the
        whole fusion, its last layer for the pooled first tokens only where no head reads that stream's last
        states (``whole_fusion``: every token of every layer).

        M3AE runs three passes per step (``mask_text``; ``mask_image``; ``itm`` on a swapped batch); MPMA's
        paired masking is one pass with ``mask_image`` and ``mask_text`` together. ``image_noise`` [B, N] chooses
        the kept patches instead of a random draw (to replay a given mask).
        """
        pixels = batch["pixels"]
        image = self.encode_image(pixels, self.cfg.image_mask_ratio if mask_image else 0.0, generator, image_noise)
        input_ids = batch["mlm_input_ids"] if mask_text else batch["input_ids"]
        text = self.encode_text(input_ids, batch["attention_mask"])
        upto = None  # the fusion states the heads read: up to MLM's and MIM's when only they are asked for
        if (mask_text or mask_image) and not (itm or classify or whole_fusion):
            upto = (self.cfg.mlm_layer_index if mask_text else 0, self.cfg.mim_layer if mask_image else 0)
        last = self.cfg.fusion.num_layers  # a stream whose last states no head reads needs only its pooled token
        first_only = (False, False) if whole_fusion else (not (mask_text and self.cfg.mlm_layer_index == last),
                                                          not (mask_image and self.cfg.mim_layer == last))
        fused = self.fusion(text, batch["attention_mask"].to(text.device), image.states, upto, first_only)
        out = MedVLPOutput(text_features=text, image_features=image.states, fusion=fused, masking=image.masking)
        if mask_text:
            out.mlm_positions = batch["mlm_labels"].to(text.device) != IGNORE_INDEX
            out.mlm_logits = self.mlm_head(fused.text_states[self.cfg.mlm_layer_index][out.mlm_positions])
        if mask_image:
            grid = (pixels.shape[-2] // self.cfg.patch_size, pixels.shape[-1] // self.cfg.patch_size)
            out.mim_pred = self.mim_decoder(fused.image_states[self.cfg.mim_layer], image.masking.ids_restore, grid)
        if itm:
            out.itm_logits = self.itm_head(fused.joint)
        if classify:
            if self.classifier is None:
                raise ValueError("classify=True needs a classifier: build the model with num_classes > 0")
            out.class_logits = self.classifier(fused.joint)
        if align:
            image_tokens = self.align_head.embed_image(image.states)
            text_tokens = self.align_head.embed_text(text)
            out.image_embed, out.patch_embeds = image_tokens[:, 0], image_tokens[:, 1:]
            out.text_embed, out.word_embeds = text_tokens[:, 0], text_tokens
            out.logit_scale = self.align_head.scale()
        return out


def _resolved(cfg: ModelConfig, vision: nn.Module, text: nn.Module) -> ModelConfig:
    """``cfg`` with the encoder numbers of the modules actually built (they differ when loaded from a checkpoint)."""
    v, t = vision.model.config, text.model.config
    vision_cfg = dataclasses.replace(cfg.vision, hidden_size=v.hidden_size, num_layers=v.num_hidden_layers,
                                     num_heads=v.num_attention_heads, intermediate_size=v.intermediate_size)
    text_cfg = dataclasses.replace(
        cfg.text, hidden_size=t.hidden_size, num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        intermediate_size=getattr(t, "intermediate_size", cfg.text.intermediate_size), vocab_size=t.vocab_size,
        max_position_embeddings=getattr(t, "max_position_embeddings", cfg.text.max_position_embeddings),
        type_vocab_size=getattr(t, "type_vocab_size", cfg.text.type_vocab_size),
        pad_token_id=t.pad_token_id if t.pad_token_id is not None else cfg.text.pad_token_id,
    )
    return dataclasses.replace(cfg, vision=vision_cfg, text=text_cfg)


def build_model(cfg: ModelConfig) -> MedVLP:
    """Check ``cfg`` and build the model (pretrained encoders where ``pretrained`` is set, otherwise random)."""
    return MedVLP(cfg.validate())


# ----------------------------------------------------------------------------------------------------------------
# Optimiser parameter groups
# ----------------------------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("vision.", "text.")
_NO_DECAY_NAMES = {"class_embedding", "mask_token", "memory", "logit_scale"}


def _no_decay(model: nn.Module, name: str) -> bool:
    """Biases, norms, embedding tables, class/mask tokens, the memory matrix and the alignment's learned
    temperature (``logit_scale``) get no weight decay."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return (param_name.endswith("bias") or param_name in _NO_DECAY_NAMES
            or isinstance(module, (nn.LayerNorm, nn.Embedding)))


def param_groups(model: MedVLP, lr: float, weight_decay: float = 0.01, head_lr_multiplier: float = 5.0,
                 classifier_lr_multiplier: float | None = None) -> list[dict]:
    """AdamW parameter groups: encoders at ``lr``, fusion and heads at ``lr * head_lr_multiplier`` (M3AE uses
    5x), the downstream classifier (new when fine-tuning) at ``lr * classifier_lr_multiplier`` (default: as the
    heads); each split into decayed and not-decayed parameters. Each group carries a ``name``; empty groups are
    left out. A tied MLM projection counts once, as the text encoder's embedding table."""
    multipliers = {"encoder": 1.0, "head": head_lr_multiplier,
                   "classifier": head_lr_multiplier if classifier_lr_multiplier is None else classifier_lr_multiplier}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():  # named_parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        part = ("encoder" if name.startswith(ENCODER_PREFIXES) else
                "classifier" if name.startswith("classifier.") else "head")
        no_decay = _no_decay(model, name)
        key = f"{part}_no_decay" if no_decay else part
        group = groups.setdefault(key, {
            "name": key, "params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * multipliers[part],
        })
        group["params"].append(param)
    return [groups[f"{part}{suffix}"] for part in multipliers for suffix in ("", "_no_decay")
            if f"{part}{suffix}" in groups]
