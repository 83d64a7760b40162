"""Co-attention fusion (M3AE) with MPMA's optional memory-augmented block.

Two streams, text and image. In every layer each stream does self-attention, cross-attention to the *other*
stream's input to that layer, and a feed-forward block. All attention goes through
``torch.nn.functional.scaled_dot_product_attention``, except when training with attention dropout on the CPU,
where PyTorch's fused kernel does not apply dropout and its fallback draws the mask slowly: there the attention
is computed directly with ``models.dropout``'s mask (the same distribution). Padded text tokens are masked out
as keys everywhere, so they change nothing at real positions.

When a caller reads only the pooled outputs (first tokens) of the last layer, that layer computes its first
token alone: keys and values still come from every token, so the result is the same as the whole layer's first
row, at a fraction of the cost (``CoAttentionFusion.forward``'s ``first_only``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp.models.config import FusionConfig
from medvlp.models.dropout import Dropout, dropout
from medvlp.models.heads import Pooler, bert_init_

LAYER_NORM_EPS = 1e-12  # BERT's value, as in M3AE's BERT-style fusion layers


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """[B, L] with 1 for real tokens -> boolean [B, 1, 1, L] for SDPA (True = may be attended to)."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``query`` over ``context`` (self-attention when they are the same tensor)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def attention_probs(self, query: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The attention weights [B, heads, Lq, Lk] that ``forward`` uses (for inspection; SDPA does not return
        them): softmax of the scaled query-key products, masked keys at zero."""
        q, k = self._split(self.query(query)), self._split(self.key(context))
        if k.shape[0] != q.shape[0]:
            k = k.expand(q.shape[0], -1, -1, -1)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, query: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``key_mask``: boolean, broadcastable to [B, heads, Lq, Lk], True where a key may be attended to."""
        q, k, v = self._split(self.query(query)), self._split(self.key(context)), self._split(self.value(context))
        if k.shape[0] != q.shape[0]:  # a context shared by the whole batch (the memory)
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        p = self.dropout if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu":
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            out = dropout(scores.softmax(dim=-1), p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        return self.out(out.transpose(1, 2).flatten(2))


class CoAttentionLayer(nn.Module):
    """One stream of one fusion layer: self-attention, cross-attention to the other stream, feed-forward.

    Post-LN (``x = LayerNorm(x + sublayer(x))``), like the BERT-style cross layers of M3AE's reference
    implementation: the fusion starts from scratch on top of two pre-trained encoders and we keep its layer
    shape so that results stay comparable to the paper.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        width = cfg.hidden_size
        self.self_attn = MultiHeadAttention(width, cfg.num_heads, cfg.dropout)
        self.self_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.cross_attn = MultiHeadAttention(width, cfg.num_heads, cfg.dropout)
        self.cross_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.ffn = nn.Sequential(nn.Linear(width, cfg.intermediate_size), nn.GELU(),
                                 nn.Linear(cfg.intermediate_size, width))
        self.ffn_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, x_mask: Tensor | None, other: Tensor, other_mask: Tensor | None,
                first_only: bool = False) -> Tensor:
        """``first_only``: the output of the first token alone, [B, 1, W] (it still attends to every token)."""
        query = x[:, :1] if first_only else x
        h = self.self_norm(query + self.drop(self.self_attn(query, x, x_mask)))
        h = self.cross_norm(h + self.drop(self.cross_attn(h, other, other_mask)))
        return self.ffn_norm(h + self.drop(self.ffn(h)))


class MemoryBlock(nn.Module):
    """MPMA's memory read-out for one stream of one layer: ``x + out(attention(x -> memory slots))``.

    The memory matrix itself lives in ``CoAttentionFusion`` (shared by both streams). The output projection
    starts at exactly zero, so at initialisation the block returns its input unchanged and the pre-trained
    fusion behaves as without memory; the block then learns how much to read.
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(width, num_heads, dropout)
        self.zero_output_()

    def zero_output_(self) -> None:
        nn.init.zeros_(self.attn.out.weight)
        nn.init.zeros_(self.attn.out.bias)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """``x`` [B, L, W], ``memory`` [S, W]."""
        return x + self.attn(x, memory.unsqueeze(0))


@dataclass
class FusionOutput:
    """Per-layer states of both streams (index 0 = fusion input, i = output of layer i) and the pooled outputs.

    ``joint`` = ``cat(text_pooled, image_pooled)`` [B, 2W] is the joint representation the task heads read (None,
    as the pooled outputs, when the fusion stopped early: see ``CoAttentionFusion.forward``'s ``upto``).
    """

    text_states: list[Tensor]
    image_states: list[Tensor]
    text_pooled: Tensor | None
    image_pooled: Tensor | None
    joint: Tensor | None


class CoAttentionFusion(nn.Module):
    """Project both encoders to the fusion width, add modality embeddings (0 text, 1 image), run the layers.

    With ``memory_slots > 0`` every layer ends with a ``MemoryBlock`` per stream reading a learned memory of
    ``memory_slots x width``: one matrix for all layers, or one per layer with ``memory_per_layer``; either
    way both streams read the same matrix.
    """

    def __init__(self, cfg: FusionConfig, text_width: int, image_width: int, memory_slots: int = 0,
                 memory_per_layer: bool = False) -> None:
        super().__init__()
        width = cfg.hidden_size
        self.text_proj = nn.Linear(text_width, width)
        self.image_proj = nn.Linear(image_width, width)
        self.modality = nn.Embedding(2, width)
        self.text_layers = nn.ModuleList(CoAttentionLayer(cfg) for _ in range(cfg.num_layers))
        self.image_layers = nn.ModuleList(CoAttentionLayer(cfg) for _ in range(cfg.num_layers))
        self.memory: nn.Parameter | None = None
        if memory_slots > 0:
            num_memories = cfg.num_layers if memory_per_layer else 1
            self.memory = nn.Parameter(torch.randn(num_memories, memory_slots, width) * 0.02)
            self.text_memory = nn.ModuleList(MemoryBlock(width, cfg.num_heads, cfg.dropout)
                                             for _ in range(cfg.num_layers))
            self.image_memory = nn.ModuleList(MemoryBlock(width, cfg.num_heads, cfg.dropout)
                                              for _ in range(cfg.num_layers))
        self.text_pooler = Pooler(width)
        self.image_pooler = Pooler(width)
        bert_init_(self)
        for block in self.modules():
            if isinstance(block, MemoryBlock):
                block.zero_output_()

    def forward(self, text: Tensor, attention_mask: Tensor, image: Tensor,
                upto: tuple[int, int] | None = None, first_only: tuple[bool, bool] = (False, False)) -> FusionOutput:
        """``text`` [B, L, Dt] with ``attention_mask`` [B, L] (1 = real); ``image`` [B, 1 + K, Dv].

        ``upto`` = (text index, image index) computes only the states a caller reads, up to these indices into
        ``text_states`` / ``image_states``, and what they depend on (stream layer ``i`` reads the other stream's
        state ``i - 1``); those states are the ones the whole fusion computes, the later ones are left out, and
        the pooled outputs and ``joint`` are None unless both streams ran to the end. None runs everything.

        ``first_only`` = (text, image): that stream's last layer computes its first token alone, for a caller
        that reads only the pooled outputs; its last state is then [B, 1, W].
        """
        layers = len(self.text_layers)
        text_upto, image_upto = upto if upto is not None else (layers, layers)
        text_upto, image_upto = max(text_upto, image_upto - 1), max(image_upto, text_upto - 1)
        text_first, image_first = (first_only[0] and text_upto == layers), (first_only[1] and image_upto == layers)
        text_mask = key_padding_mask(attention_mask)
        t = self.text_proj(text) + self.modality.weight[0]
        v = self.image_proj(image) + self.modality.weight[1]
        text_states, image_states = [t], [v]
        for i in range(max(text_upto, image_upto)):
            last = i == layers - 1
            new_t = self.text_layers[i](t, text_mask, v, None, last and text_first) if i < text_upto else None
            new_v = self.image_layers[i](v, None, t, text_mask, last and image_first) if i < image_upto else None
            if self.memory is not None:
                memory = self.memory[i if self.memory.shape[0] > 1 else 0]
                new_t = None if new_t is None else self.text_memory[i](new_t, memory)
                new_v = None if new_v is None else self.image_memory[i](new_v, memory)
            if new_t is not None:
                text_states.append(new_t)
                t = new_t
            if new_v is not None:
                image_states.append(new_v)
                v = new_v
        if text_upto < layers or image_upto < layers:
            return FusionOutput(text_states=text_states, image_states=image_states, text_pooled=None,
                                image_pooled=None, joint=None)
        text_pooled, image_pooled = self.text_pooler(t), self.image_pooler(v)
        return FusionOutput(text_states=text_states, image_states=image_states, text_pooled=text_pooled,
                            image_pooled=image_pooled, joint=torch.cat([text_pooled, image_pooled], dim=-1))
