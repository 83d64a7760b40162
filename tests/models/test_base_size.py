"""The ``base`` model has exactly the parameter count worked out by hand from the papers' architecture."""

import torch

from medvlp.models import build_model, model_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


def test_base_parameter_count_matches_the_arithmetic():
    """Hand count, with W = 768 and linear(a, b) = a*b + b, layer norm = 2*768 = 1,536.

    Attention block (q, k, v, out): 4 * linear(768, 768) = 4 * 590,592 = 2,362,368.
    MLP 768 -> 3072 -> 768: linear(768, 3072) + linear(3072, 768) = 2,362,368 + 2,360,064 = 4,722,432.
    A Transformer encoder layer (attention, MLP, two layer norms): 2,362,368 + 4,722,432 + 3,072 = 7,087,872.

    Vision, CLIP ViT-B/16 at 288 px (18 x 18 = 324 patches):
      patch conv 3*16*16*768 (no bias) 589,824 + class token 768 + positions 325*768 = 249,600
      + pre-LN 1,536 + 12 layers 85,054,464 + post-LN 1,536                        = 85,897,728
    Text, RoBERTa-base without pooler:
      words 50265*768 = 38,603,520 + positions 514*768 = 394,752 + token type 1*768 = 768
      + embedding LN 1,536 + 12 layers 85,054,464                                  = 124,055,040
    Fusion, 6 co-attention layers, two streams:
      projections 2 * 590,592 = 1,181,184 + modality embeddings 2*768 = 1,536
      + per stream and layer: self-attention 2,362,368 + cross-attention 2,362,368 + MLP 4,722,432
        + 3 layer norms 4,608 = 9,451,776; times 12                               = 113,421,312
      + 2 poolers 2 * 590,592 = 1,181,184                                          = 115,785,216
    Heads:
      MLM: dense 590,592 + LN 1,536 + bias 50,265 (projection tied to the word table) = 642,393
      MIM decoder (D = 384, MLP 1536): embed linear(768, 384) 295,296 + mask token 384
        + 4 blocks of [in-proj 3*384*384 + 3*384 = 443,520, out-proj 147,840, linear(384, 1536) 591,360,
          linear(1536, 384) 590,208, 2 LN 1,536] = 4 * 1,774,464 = 7,097,856
        + LN 768 + predict linear(384, 16*16*3) 295,680                           = 7,689,984
      ITM: linear(1536, 2) = 3,074
      alignment (MPMA, E = 256): image and text projections without bias 2 * 768*256 = 393,216
        + logit scale 1                                                           = 393,217
      heads total                                                                 = 8,728,668
    Total: 85,897,728 + 124,055,040 + 115,785,216 + 8,728,668                    = 334,466,652
    (M3AE's model, without the alignment head: 334,073,435.)
    """
    linear = lambda a, b: a * b + b  # noqa: E731
    w, ln = 768, 2 * 768
    attention, mlp = 4 * linear(w, w), linear(w, 3072) + linear(3072, w)
    layer = attention + mlp + 2 * ln
    vision = 3 * 16 * 16 * w + w + (18 * 18 + 1) * w + ln + 12 * layer + ln
    text = 50265 * w + 514 * w + 1 * w + ln + 12 * layer
    fusion = 2 * linear(w, w) + 2 * w + 12 * (2 * attention + mlp + 3 * ln) + 2 * linear(w, w)
    d = 384
    block = (3 * d * d + 3 * d) + linear(d, d) + linear(d, 1536) + linear(1536, d) + 2 * 2 * d
    mim = linear(w, d) + d + 4 * block + 2 * d + linear(d, 16 * 16 * 3)
    mlm = linear(w, w) + ln + 50265
    itm = linear(2 * w, 2)
    align = 2 * w * 256 + 1
    assert (vision, text, fusion, mlm + mim + itm + align) == (85_897_728, 124_055_040, 115_785_216, 8_728_668)

    with torch.device("meta"):  # shapes only: no memory, no random numbers
        model = build_model(model_config("base"))
    assert model.mlm_head.tied and model.mlm_head.decoder.weight is model.text.word_embeddings.weight
    assert _count(model.vision) == vision
    assert _count(model.text) == text
    assert _count(model.fusion) == fusion
    assert _count(model.mlm_head) - 50265 * w == mlm  # its count includes the (shared) word table
    assert _count(model.mim_decoder) == mim and _count(model.itm_head) == itm and _count(model.align_head) == align
    assert _count(model) == 334_466_652 == 334_073_435 + align
