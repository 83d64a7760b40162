"""Heads: poolers, the MLM head, the MIM pixel decoder, the ITM head (on the fusion module) and MPMA's alignment
head (on the unimodal encoders)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.models.config import MIMDecoderConfig


def bert_init_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation, which M3AE uses for the modules it adds: weights ~ N(0, std), zero biases,
    LayerNorm at identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Pooler(nn.Module):
    """First token -> dense -> tanh (BERT's pooler); one per fusion stream."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        bert_init_(self)

    def forward(self, states: Tensor) -> Tensor:
        return torch.tanh(self.dense(states[:, 0]))


class MLMHead(nn.Module):
    """Dense, GELU, LayerNorm, then a projection to the vocabulary (with its own bias).

    ``tied_weight`` (the text encoder's word-embedding matrix [V, width]) becomes the projection weight when
    given; the caller passes it only when the text encoder and the fusion have the same width. Otherwise the
    head learns its own projection.
    """

    def __init__(self, width: int, vocab_size: int, tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, vocab_size)
        bert_init_(self)
        self.tied = tied_weight is not None
        if tied_weight is not None:
            if tied_weight.shape != self.decoder.weight.shape:
                raise ValueError(f"cannot tie a {tuple(tied_weight.shape)} embedding to a {width}-wide MLM head")
            self.decoder.weight = tied_weight

    def forward(self, states: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(states))))


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``, which its blocks (and M3AE's MIM decoder) use."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


def sincos_2d(grid_h: int, grid_w: int, dim: int, column_first: bool = False) -> Tensor:
    """Fixed 2-D sine-cosine positions [grid_h * grid_w, dim] in raster order.

    Half of the channels encode the row, half the column (the row first, or the column first with
    ``column_first``, as MAE's and M3AE's table does); each half is ``sin`` then ``cos`` of the coordinate times
    frequencies ``10000 ** (-k / (dim / 4))``, k = 0 .. dim/4 - 1. Computed in float64, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(coords: Tensor) -> Tensor:
        angles = coords.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    halves = [encode(cols), encode(rows)] if column_first else [encode(rows), encode(cols)]
    return torch.cat(halves, dim=1).float()


class MIMDecoder(nn.Module):
    """MAE-style pixel decoder: the visible tokens plus a learned mask token at every dropped position.

    Linear from the fusion width to the decoder width; un-shuffle with ``ids_restore`` (one gather); add fixed
    2-D sine-cosine positions (the class token gets position zero); pre-LN Transformer blocks (PyTorch's
    ``TransformerEncoderLayer`` with ``norm_first``, which attends through SDPA; ``cfg.activation`` in the
    feed-forward: GELU, or CLIP's QuickGELU as in M3AE's CLIP-style decoder blocks); LayerNorm; linear to
    ``patch_size**2 * 3`` pixel values per patch. The class token is dropped from the output.
    """

    def __init__(self, in_width: int, cfg: MIMDecoderConfig, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        width = cfg.hidden_size
        self.width = width
        self.column_first = cfg.positions == "column_first"
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, cfg.num_heads, cfg.intermediate_size, dropout=0.0,
                                       activation=ACTIVATIONS[cfg.activation],
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, patch_size * patch_size * channels)
        for m in self.modules():  # MAE's choice for its decoder: Xavier-uniform linear weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, states: Tensor, ids_restore: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """``states`` [B, 1 + K, in_width] (class token, then the visible patches in encoder order);
        ``ids_restore`` [B, N] or None when nothing was dropped. Returns pixels [B, N, patch_size**2 * 3]."""
        x = self.embed(states)
        cls, visible = x[:, :1], x[:, 1:]
        batch, num_visible, width = visible.shape
        num_patches = grid[0] * grid[1]
        if ids_restore is not None:
            dropped = self.mask_token.to(visible.dtype).expand(batch, num_patches - num_visible, width)
            shuffled = torch.cat([visible, dropped], dim=1)
            visible = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, width))
        elif num_visible != num_patches:
            raise ValueError(f"{num_visible} patch tokens for a {grid[0]}x{grid[1]} grid and no ids_restore")
        positions = sincos_2d(grid[0], grid[1], width, self.column_first).to(device=x.device, dtype=x.dtype)
        x = torch.cat([cls, visible + positions], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))[:, 1:]


class ITMHead(nn.Module):
    """Linear on the joint representation -> 2 logits (index 1 = matched)."""

    def __init__(self, joint_width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(joint_width, 2)
        bert_init_(self)

    def forward(self, joint: Tensor) -> Tensor:
        return self.fc(joint)


def match_score(itm_logits: Tensor, rule: str = "log_odds") -> Tensor:
    """ITM logits [..., 2] -> the score of a match [...] (index 1 = matched): its log-odds (``"log_odds"``), or
    the "matched" logit alone (``"matched"``: M3AE's retrieval head is the ITM head's row 1)."""
    if rule == "matched":
        return itm_logits[..., 1]
    if rule != "log_odds":
        raise ValueError(f"unknown ITM score rule {rule!r}; use 'log_odds' or 'matched'")
    return itm_logits[..., 1] - itm_logits[..., 0]


MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP's rule: the learned log-scale is used clamped to at most log(100), i.e. a temperature of at least 0.01."""


class AlignmentHead(nn.Module):
    """MPMA's global and local alignment: project both encoders into one ``embed_dim``-wide space, L2-normalise.

    One bias-free linear per modality (CLIP's projections, initialised like CLIP's: N(0, width**-0.5)) maps any
    number of tokens at once, so the class token (global alignment) and the patch / word tokens (local
    alignment) share the projection. ``logit_scale`` is the learned log of the inverse temperature, starting at
    ``log(1 / temperature)``; ``scale()`` returns ``exp`` of it clamped to at most 100.
    """

    def __init__(self, image_width: int, text_width: int, embed_dim: int, temperature: float = 0.07) -> None:
        super().__init__()
        if embed_dim <= 0 or temperature <= 0:
            raise ValueError(f"embed_dim ({embed_dim}) and temperature ({temperature}) must be positive")
        self.embed_dim = embed_dim
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        nn.init.normal_(self.image_proj.weight, std=image_width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width ** -0.5)

    def embed_image(self, states: Tensor) -> Tensor:
        """Vision states [..., Dv] -> unit-length embeddings [..., E] (every token; the caller slices)."""
        return F.normalize(self.image_proj(states), dim=-1)

    def embed_text(self, states: Tensor) -> Tensor:
        """Text states [..., Dt] -> unit-length embeddings [..., E]."""
        return F.normalize(self.text_proj(states), dim=-1)

    def scale(self) -> Tensor:
        """The multiplier of cosine similarities: ``exp(min(logit_scale, log 100))``, a scalar tensor."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


class ClassifierHead(nn.Module):
    """The downstream head on the joint representation: dense to ``expansion`` times its width, LayerNorm (eps
    1e-5), GELU, dense to the classes (answers for Med-VQA, labels for classification). METER's and M3AE's head
    keeps the width (``expansion=1``)."""

    def __init__(self, joint_width: int, num_classes: int, expansion: int = 2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a classifier head needs at least one class, got {num_classes}")
        self.num_classes = num_classes
        hidden = expansion * joint_width
        self.net = nn.Sequential(nn.Linear(joint_width, hidden), nn.LayerNorm(hidden, eps=1e-5), nn.GELU(),
                                 nn.Linear(hidden, num_classes))
        bert_init_(self)

    def forward(self, joint: Tensor) -> Tensor:
        return self.net(joint)
