"""Convert a published M3AE checkpoint (github.com/zhjohnchan/M3AE) into a medvlp run folder.

``convert_m3ae(checkpoint, out, task=...)`` reads the reference's state dict (a Lightning ``.ckpt``, a plain
state-dict file or safetensors; nothing is unpickled), derives every size from the tensors themselves (CLIP
width, patch, grid and block count; RoBERTa vocabulary, width, depth and positions; fusion width and depth; MIM
decoder width and depth; head sizes) and the few that tensors cannot tell (attention heads, MIM layer and
ratio, text length) from the reference's own config (a ``.ckpt``'s ``hyper_parameters``, or ``reference_config``;
defaults are the published run scripts' values), renames every tensor into ``MedVLP``'s layout and writes:

- a pre-training checkpoint (``task="pretrain"``): a pre-training run folder (``config.yaml``,
  ``checkpoints/step-000000/model.safetensors``), usable as ``init`` for ``finetune`` and ``benchmark`` and
  by ``zeroshot``/``export``;
- a fine-tuned one (``vqa``, ``classification``, ``retrieval``): a fine-tuned run folder (``config.yaml``,
  ``model.safetensors``) that ``medvlp evaluate``, ``medvlp predict`` and ``medvlp.predict.load`` read like a run
  ``medvlp finetune`` wrote. The classifier's classes come from a prepared dataset: for VQA the answers in the
  reference's label order (``reference_answer_order``; the dataset's answers are matched to them through the
  reference's normalisation), for classification the sorted label set (MELINDA's rule).

Both refer to the tokenizer (RoBERTa-base's for the published models): a local folder is copied into the run; a
hub id that cannot be loaded here is recorded and reported in one line. ``converted.json`` records the source.

The model config is the ``m3ae-base`` choices (see docs/methods-m3ae-parity.md): QuickGELU MIM decoder blocks
with MAE's column-first sine-cosine table, an untied MLM decoder, the 1x classifier head, ``int()`` patch
keeping and the ITM "matched" logit as the retrieval score.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medvlp.errors import ConfigError, MedvlpError
from medvlp.models.config import FusionConfig, MIMDecoderConfig, ModelConfig, TextConfig, VisionConfig
from medvlp.models.heads import sincos_2d
from medvlp.models.model import MedVLP, build_model

TASKS = ("pretrain", "vqa", "classification", "retrieval")
DEFAULT_TOKENIZER = "FacebookAI/roberta-base"

REFERENCE_DEFAULTS: dict[str, Any] = {
    # the published run scripts' values (SPEC §1); a checkpoint's hyper_parameters or --reference-config win
    "num_heads": 12, "mim_decoder_num_heads": 6, "mim_layer": 3, "mim_prob": 0.75, "mlm_prob": 0.15,
    "drop_rate": 0.1, "norm_pix_loss": True, "max_text_len": None, "image_size": None, "label_column_name": "",
}
MAX_TEXT_LEN = {"pretrain": 64, "vqa": 32, "classification": 128, "retrieval": 40}

V = "vision_encoder.visual."
DROPPED_PREFIXES = ("vision_encoder.token_embedding.", "vision_encoder.ln_final.", "language_encoder.pooler.")
DROPPED_KEYS = ("vision_encoder.positional_embedding", "language_encoder.embeddings.position_ids",
                "language_encoder.embeddings.token_type_ids", "mim_head.decoder_pos_embed")
"""The CLIP text tower's leftovers, RoBERTa's pooler and position-id buffers, and the fixed sin-cos table (medvlp
computes it; ``convert_state_dict`` checks that it is the table medvlp computes)."""

_FUSION_PARTS = {  # reference name inside a fusion layer -> medvlp name inside a CoAttentionLayer
    "attention.self.query": "self_attn.query", "attention.self.key": "self_attn.key",
    "attention.self.value": "self_attn.value", "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_norm", "crossattention.self.query": "cross_attn.query",
    "crossattention.self.key": "cross_attn.key", "crossattention.self.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.out", "crossattention.output.LayerNorm": "cross_norm",
    "intermediate.dense": "ffn.0", "output.dense": "ffn.2", "output.LayerNorm": "ffn_norm",
}
_CLIP_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # the packed in_proj is split apart
_DECODER_BLOCK = {"attn.in_proj_weight": "self_attn.in_proj_weight", "attn.in_proj_bias": "self_attn.in_proj_bias",
                  "attn.out_proj": "self_attn.out_proj", "ln_1": "norm1", "ln_2": "norm2", "mlp.c_fc": "linear1",
                  "mlp.c_proj": "linear2"}
_RENAMES = [  # (reference prefix, medvlp prefix), first match wins
    (V + "class_embedding", "vision.model.embeddings.class_embedding"),
    (V + "positional_embedding", "vision.model.embeddings.position_embedding.weight"),
    (V + "conv1.", "vision.model.embeddings.patch_embedding."),
    (V + "ln_pre.", "vision.model.pre_layrnorm."), (V + "ln_post.", "vision.model.post_layernorm."),
    ("language_encoder.", "text.model."),
    ("multi_modal_language_proj.", "fusion.text_proj."), ("multi_modal_vision_proj.", "fusion.image_proj."),
    ("modality_type_embeddings.", "fusion.modality."),
    ("multi_modal_language_pooler.", "fusion.text_pooler."), ("multi_modal_vision_pooler.", "fusion.image_pooler."),
    ("mlm_head.transform.dense.", "mlm_head.dense."), ("mlm_head.transform.LayerNorm.", "mlm_head.norm."),
    ("mlm_head.decoder.weight", "mlm_head.decoder.weight"), ("mlm_head.bias", "mlm_head.decoder.bias"),
    ("mim_head.mask_token", "mim_decoder.mask_token"), ("mim_head.decoder_embed.", "mim_decoder.embed."),
    ("mim_head.decoder_norm.", "mim_decoder.norm."), ("mim_head.decoder_pred.", "mim_decoder.predict."),
    ("itm_head.fc.", "itm_head.fc."),
]
_HEAD = {"vqa": "vqa_head", "classification": "cls_head"}
PLAIN_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning.fabric.utilities.data.AttributeDict",
               "lightning_fabric.utilities.data.AttributeDict")
"""Lightning's dict subclass for ``hyper_parameters``: read back as a plain dict (the only non-plain type allowed)."""


# -- reading ------------------------------------------------------------------------------------------------------
def read_checkpoint(path: Path | str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, reference config from the file or {}) of a ``.safetensors`` file, a Lightning ``.ckpt`` (a
    dict holding ``state_dict``, and ``hyper_parameters`` with the run's ``config``) or a plain state-dict file.

    ``.ckpt``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: tensors and plain
    containers only (Lightning's ``AttributeDict`` is read as a plain dict); a file that carries any other
    pickled object (a callable, a class) is refused in one line, without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise MedvlpError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}
        except Exception as e:  # safetensors reports damage with several error types
            raise MedvlpError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([(dict, name) for name in PLAIN_DICTS]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = " ".join(str(e).split()).split(" Check the documentation")[0][:200]
        raise MedvlpError(f"{path}: refused: the file holds pickled objects other than tensors and plain "
                          f"containers, which medvlp does not run ({reason}); convert it from a trusted copy or "
                          "save its state_dict as safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise MedvlpError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
    hparams: dict[str, Any] = {}
    if isinstance(data, Mapping) and "state_dict" in data:
        hp = data.get("hyper_parameters")
        if isinstance(hp, Mapping):
            hparams = dict(hp.get("config", hp)) if isinstance(hp.get("config", hp), Mapping) else {}
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data:
        raise MedvlpError(f"{path}: holds no state dict (expected a mapping of tensor names to tensors, or a "
                          "Lightning checkpoint with one under 'state_dict')")
    bad = next((k for k, v in data.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise MedvlpError(f"{path}: entry {bad!r} of the state dict is a {type(data[bad]).__name__}, not a tensor")
    return dict(data), hparams


def read_reference_config(path: Path | str | None) -> dict[str, Any]:
    """A JSON or YAML mapping of reference config values (``num_heads``, ``mim_decoder_num_heads``, ...)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the reference config ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the reference config must be a mapping of the reference's config keys")
    return values


# -- sizes --------------------------------------------------------------------------------------------------------
def _shape(sd: Mapping[str, Tensor], key: str, source: str, rank: int) -> tuple[int, ...]:
    if key not in sd:
        raise MedvlpError(f"{source}: missing key {key} (the M3AE model needs it); is this an M3AE checkpoint?")
    shape = tuple(sd[key].shape)
    if len(shape) != rank:
        raise MedvlpError(f"{source}: key {key} has shape {list(shape)}, expected a {rank}-d tensor")
    return shape


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_task(sd: Mapping[str, Tensor]) -> str:
    """The task a reference state dict was trained for, from its heads."""
    if any(k.startswith("vqa_head.") for k in sd):
        return "vqa"
    if any(k.startswith("cls_head.") for k in sd):
        return "classification"
    if any(k.startswith("irtr_head.") for k in sd):
        return "retrieval"
    return "pretrain"


def model_config_from(sd: Mapping[str, Tensor], task: str, reference: Mapping[str, Any] | None = None,
                      text_config: Mapping[str, Any] | None = None, source: str = "checkpoint") -> ModelConfig:
    """The ``MedVLP`` config of a reference state dict: sizes from the tensors (SPEC §3-§8 rules), attention heads
    and MIM settings from ``reference`` (the reference's config keys), the text encoder's heads and LayerNorm from
    ``text_config`` (a RoBERTa ``config.json``; default: heads = width // 64, RoBERTa-base's rule)."""
    ref = {**REFERENCE_DEFAULTS, **(reference or {})}
    width, _, patch, _ = _shape(sd, V + "conv1.weight", source, 4)
    rows, _ = _shape(sd, V + "positional_embedding", source, 2)
    grid = round((rows - 1) ** 0.5)
    if grid * grid != rows - 1:
        raise MedvlpError(f"{source}: {V}positional_embedding has {rows} rows, not 1 + a square grid")
    blocks = _count(sd, re.escape(V) + r"transformer\.resblocks\.(\d+)\.")
    vision_ffn = _shape(sd, V + "transformer.resblocks.0.mlp.c_fc.weight", source, 2)[0]
    vision = VisionConfig(hidden_size=width, num_layers=blocks, num_heads=max(1, width // 64),
                          intermediate_size=vision_ffn)

    vocab, text_width = _shape(sd, "language_encoder.embeddings.word_embeddings.weight", source, 2)
    positions = _shape(sd, "language_encoder.embeddings.position_embeddings.weight", source, 2)[0]
    types = _shape(sd, "language_encoder.embeddings.token_type_embeddings.weight", source, 2)[0]
    tc = dict(text_config or {})
    text = TextConfig(
        hidden_size=text_width, num_layers=_count(sd, r"language_encoder\.encoder\.layer\.(\d+)\."),
        num_heads=int(tc.get("num_attention_heads", max(1, text_width // 64))),
        intermediate_size=_shape(sd, "language_encoder.encoder.layer.0.intermediate.dense.weight", source, 2)[0],
        vocab_size=vocab, max_position_embeddings=positions, type_vocab_size=types,
        pad_token_id=int(tc.get("pad_token_id", 1)), dropout=float(tc.get("hidden_dropout_prob", 0.1)))

    hidden = _shape(sd, "multi_modal_language_proj.weight", source, 2)[0]
    layers = _count(sd, r"multi_modal_language_layers\.(\d+)\.")
    fusion = FusionConfig(
        hidden_size=hidden, num_layers=layers, num_heads=int(ref["num_heads"]), dropout=float(ref["drop_rate"]),
        intermediate_size=_shape(sd, "multi_modal_language_layers.0.intermediate.dense.weight", source, 2)[0])

    decoder = MIMDecoderConfig(activation="quick_gelu", positions="column_first",
                               num_heads=int(ref["mim_decoder_num_heads"]))
    if "mim_head.decoder_embed.weight" in sd:
        dwidth = _shape(sd, "mim_head.decoder_embed.weight", source, 2)[0]
        decoder.hidden_size, decoder.num_layers = dwidth, _count(sd, r"mim_head\.decoder\.resblocks\.(\d+)\.")
        decoder.intermediate_size = _shape(sd, "mim_head.decoder.resblocks.0.mlp.c_fc.weight", source, 2)[0]
    else:  # no MIM head in a fine-tuned model: a small placeholder decoder of the right head count
        decoder.hidden_size, decoder.num_layers = 16 * decoder.num_heads, 1
        decoder.intermediate_size = 4 * decoder.hidden_size
    mim_layer = int(ref["mim_layer"])
    num_classes = 0
    if task in _HEAD:
        num_classes = _shape(sd, f"{_HEAD[task]}.3.weight", source, 2)[0]
    cfg = ModelConfig(
        vision=vision, text=text, fusion=fusion, mim_decoder=decoder, image_size=grid * patch, patch_size=patch,
        image_mask_ratio=float(ref["mim_prob"]), text_mask_ratio=float(ref["mlm_prob"]),
        mim_layer=layers if mim_layer < 0 else min(mim_layer, layers), norm_pix_loss=bool(ref["norm_pix_loss"]),
        memory_slots=0, tie_mlm_weights=False, num_classes=num_classes, classifier_expansion=1,
        visible_rounding="floor", itm_score="matched")
    return cfg.validate()


# -- renaming -----------------------------------------------------------------------------------------------------
def _rename(key: str) -> str | None:
    """The medvlp name of one reference tensor (None for the packed CLIP in-projections, split by the caller)."""
    m = re.match(re.escape(V) + r"transformer\.resblocks\.(\d+)\.(.+)$", key)
    if m:
        i, rest = m.groups()
        for ref, ours in _CLIP_BLOCK.items():
            if rest.startswith(ref + "."):
                return f"vision.model.encoder.layers.{i}.{ours}{rest[len(ref):]}"
        return None
    m = re.match(r"multi_modal_(language|vision)_layers\.(\d+)\.(.+)$", key)
    if m:
        stream, i, rest = m.groups()
        for ref, ours in _FUSION_PARTS.items():
            if rest.startswith(ref + "."):
                side = "text" if stream == "language" else "image"
                return f"fusion.{side}_layers.{i}.{ours}{rest[len(ref):]}"
        return None
    m = re.match(r"mim_head\.decoder\.resblocks\.(\d+)\.(.+)$", key)
    if m:
        i, rest = m.groups()
        for ref, ours in _DECODER_BLOCK.items():
            if rest == ref or rest.startswith(ref + "."):
                return f"mim_decoder.blocks.{i}.{ours}{rest[len(ref):]}"
        return None
    m = re.match(r"(vqa_head|cls_head)\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"classifier.net.{m.group(2)}.{m.group(3)}"
    for ref, ours in _RENAMES:
        if key == ref or (ref.endswith(".") and key.startswith(ref)):
            return ours + key[len(ref):]
    return None


def convert_state_dict(sd: Mapping[str, Tensor], model: MedVLP, task: str,
                       source: str = "checkpoint") -> dict[str, Tensor]:
    """The reference tensors under medvlp's names, checked against ``model``: the first missing key, unexpected
    key or wrong shape is a one-line ``MedvlpError`` naming it and its shape. Heads the task's reference model
    does not have (the MLM/MIM heads of a fine-tuned model, the alignment head) keep ``model``'s own values."""
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    irtr: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
            continue
        if key.startswith("irtr_head."):
            irtr[key.removeprefix("irtr_head.")] = value
            continue
        m = re.match(re.escape(V) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if m:
            i, kind = m.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"vision.model.encoder.layers.{i}.self_attn.{name}.{kind}"] = part
            continue
        name = _rename(key)
        if name is None or name not in ours:
            raise MedvlpError(f"{source}: unexpected key {key} {list(value.shape)}: not part of an M3AE {task} "
                              "model of the sizes its other tensors give")
        out[name] = value
    if irtr:  # M3AE's retrieval head is a view of the ITM head's "matched" row: write it there
        for kind in ("weight", "bias"):
            if kind not in irtr:
                raise MedvlpError(f"{source}: missing key irtr_head.{kind} (the retrieval head is incomplete)")
            itm = out.get(f"itm_head.fc.{kind}")
            if itm is None:
                raise MedvlpError(f"{source}: missing key itm_head.fc.{kind} {list(ours[f'itm_head.fc.{kind}'].shape)}"
                                  " (an M3AE retrieval model keeps the ITM head)")
            if tuple(irtr[kind].shape) != (1, *itm.shape[1:]):
                raise MedvlpError(f"{source}: key irtr_head.{kind} has shape {list(irtr[kind].shape)}, expected "
                                  f"{[1, *itm.shape[1:]]}")
            itm = itm.clone()
            itm[1] = irtr[kind][0]
            out[f"itm_head.fc.{kind}"] = itm
    _check_positions(sd, model, source)
    for name, tensor in ours.items():
        if name not in out:
            if _required(name, task):
                raise MedvlpError(f"{source}: missing key {_reference_name(name, task)} {list(tensor.shape)} (the M3AE "
                                  f"{task} model needs it)")
            out[name] = tensor
        elif tuple(out[name].shape) != tuple(tensor.shape):
            raise MedvlpError(f"{source}: key {_reference_name(name, task)} has shape {list(out[name].shape)}, "
                              f"expected {list(tensor.shape)} from the sizes its other tensors give")
    return {name: out[name].to(ours[name].dtype) for name in ours}


def _required(name: str, task: str) -> bool:
    if name.startswith(("align_head.",)):
        return False
    if name.startswith(("mlm_head.", "mim_decoder.")):
        return task == "pretrain"
    if name.startswith("itm_head."):
        return task in ("pretrain", "retrieval")
    return True


def _reference_name(name: str, task: str) -> str:
    """The reference's name of a medvlp tensor, for messages (the packed in-projection for a split one)."""
    m = re.match(r"vision\.model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", name)
    if m:
        return f"{V}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(2)}"
    blocks = [(r"vision\.model\.encoder\.layers\.(\d+)\.", V + "transformer.resblocks.{}.", _CLIP_BLOCK),
              (r"fusion\.text_layers\.(\d+)\.", "multi_modal_language_layers.{}.", _FUSION_PARTS),
              (r"fusion\.image_layers\.(\d+)\.", "multi_modal_vision_layers.{}.", _FUSION_PARTS),
              (r"mim_decoder\.blocks\.(\d+)\.", "mim_head.decoder.resblocks.{}.", _DECODER_BLOCK)]
    for pattern, prefix, parts in blocks:
        m = re.match(pattern + "(.+)$", name)
        if m:
            for ref, ours in parts.items():
                if m.group(2) == ours or m.group(2).startswith(ours + "."):
                    return prefix.format(m.group(1)) + ref + m.group(2)[len(ours):]
    if name.startswith("classifier.net.") and task in _HEAD:
        return _HEAD[task] + name.removeprefix("classifier.net")
    for ref, ours in _RENAMES:
        if name == ours or (ours.endswith(".") and name.startswith(ours)):
            return ref + name[len(ours):]
    return name


def _check_positions(sd: Mapping[str, Tensor], model: MedVLP, source: str) -> None:
    table = sd.get("mim_head.decoder_pos_embed")
    if table is None:
        return
    grid = round((table.shape[1] - 1) ** 0.5)
    mine = sincos_2d(grid, grid, table.shape[-1], column_first=model.mim_decoder.column_first)
    if table.shape[1] != grid * grid + 1 or (table[0, 1:] - mine).abs().max() > 1e-5 or table[0, 0].abs().max() > 0:
        raise MedvlpError(f"{source}: mim_head.decoder_pos_embed {list(table.shape)} is not the fixed sine-cosine "
                          "table of M3AE (class row zero, column first)")


# -- classes ------------------------------------------------------------------------------------------------------
def reference_answer_order(root: Path) -> list[str]:
    """The answer labels of a prepared VQA dataset in the reference's order (SPEC §10): each stored answer
    normalised as the reference does (``data.text.reference_answer``), numbered by first appearance walking
    train, val and test in file order. (VQA-RAD as medvlp prepares it: 514 stored answers, 498 labels, the
    published head's size.)"""
    from medvlp.data.records import Records, read_manifest
    from medvlp.data.text import reference_answer

    splits = read_manifest(root)["splits"]
    order = [s for s in ("train", "val", "validation", "test") if s in splits]
    order += sorted(s for s in splits if s not in order)
    labels: dict[str, None] = {}
    for split in order:
        for answer in Records(root, split).column("answer"):
            labels.setdefault(reference_answer(answer))
    return list(labels)


# -- writing ------------------------------------------------------------------------------------------------------
def _tokenizer(name: str | None, out: Path) -> tuple[str | None, str]:
    """Copy a loadable tokenizer into ``out/tokenizer``; (reference to record or None, one-line note)."""
    from medvlp.data.tokenizer import load_tokenizer

    name = name or DEFAULT_TOKENIZER
    try:
        tokenizer = load_tokenizer(name)
    except MedvlpError:
        if Path(name).expanduser().exists():
            raise
        return name, (f"tokenizer {name} is not available here: the run refers to it by name and loads it on first "
                      "use (or convert again with --tokenizer DIR, a local copy)")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return None, f"tokenizer {name} copied into {out / 'tokenizer'}"


def convert_m3ae(checkpoint: Path | str, out: Path | str, *, task: str | None = None, data: Path | str | None = None,
                 tokenizer: str | None = None, reference_config: Path | str | Mapping[str, Any] | None = None,
                 text_config: Path | str | Mapping[str, Any] | None = None, image_size: int | None = None,
                 label_field: str | None = None, report=print) -> Path:
    """Convert an M3AE checkpoint into a medvlp run folder ``out`` (which must not exist yet); returns it.

    Args:
        checkpoint: ``.ckpt`` (Lightning), ``.pt``/``.bin`` (state dict) or ``.safetensors``.
        task: ``pretrain``, ``vqa``, ``classification`` or ``retrieval``; default: read from the heads.
        data: a prepared dataset of the task (needed for ``vqa`` and ``classification``: the classes).
        tokenizer: a tokenizer folder or hub id (default RoBERTa-base's, ``FacebookAI/roberta-base``).
        reference_config: the reference's config values (mapping, or a JSON/YAML file); default: the
            checkpoint's ``hyper_parameters``, else the published run scripts' values.
        text_config: the RoBERTa ``config.json`` (mapping or file) for its head count; default width // 64.
        image_size: the size to run at (the position table is interpolated bicubically, class row kept, as the
            reference does when it loads a checkpoint); default: the reference config's, else the table's own.
        label_field: the classification field (MELINDA: ``p_meth_label``...); default the config's
            ``label_column_name`` or ``label``.
        report: called with each line to show the user.
    """
    from medvlp.config import save_config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedvlpError(f"{out} already exists and is not empty; convert into a new folder")
    sd, hparams = read_checkpoint(checkpoint)
    source = str(checkpoint)
    found = infer_task(sd)
    task = task or found
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task != found and not (task == "retrieval" and found == "pretrain"):
        raise MedvlpError(f"{source} is an M3AE {found} checkpoint, not {task}; convert it with --task {found}")
    reference = dict(hparams)
    if isinstance(reference_config, Mapping):
        reference.update(reference_config)
    else:
        reference.update(read_reference_config(reference_config))
    text_cfg = dict(text_config) if isinstance(text_config, Mapping) else (
        read_reference_config(Path(text_config) / "config.json" if Path(text_config).is_dir() else text_config)
        if text_config else {})
    cfg = model_config_from(sd, task, reference, text_cfg, source)
    with torch.random.fork_rng(devices=[]):  # heads the checkpoint lacks: a reproducible initialisation
        torch.manual_seed(0)
        model = build_model(cfg)
    model.load_state_dict(convert_state_dict(sd, model, task, source))
    size = image_size or reference.get("image_size") or cfg.image_size
    if size != cfg.image_size:
        if size % cfg.patch_size:
            raise ConfigError(f"image_size={size} is not a multiple of the patch size {cfg.patch_size}")
        model.resize_image(int(size))

    classes: list[str] = []
    label = label_field or reference.get("label_column_name") or "label"
    notes = []
    if task in _HEAD:
        what = "answers" if task == "vqa" else "labels"
        if data is None:
            classes = [f"{what[:-1]} {i}" for i in range(cfg.num_classes)]
            notes.append(f"no --data: the {cfg.num_classes} {what} are numbered; convert with --data PREPARED "
                         f"(the dataset it was fine-tuned on) to name them for evaluate and predict")
        else:
            classes = _classes(Path(data), task, label)
            if len(classes) != cfg.num_classes:
                raise MedvlpError(f"{data} gives {len(classes)} {what} by the reference's rule but {source} has a "
                                  f"head of {cfg.num_classes}; is it the dataset the checkpoint was fine-tuned on "
                                  "(all its splits)?")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_ref, note = _tokenizer(tokenizer, out)
    max_len = int(reference.get("max_text_len") or MAX_TEXT_LEN[task])
    if task == "pretrain":
        _write_pretrain(out, model, tokenizer_ref, max_len, save_config)
    else:
        from medvlp.training.downstream import RetrievalConfig
        from medvlp.training.finetune import FinetuneConfig

        config = FinetuneConfig(task=task, data=str(data) if data else None, init=None, run_dir=str(out),
                                model_size="base", model=model.cfg, image_size=model.cfg.image_size,
                                tokenizer=tokenizer_ref, label_field=label, max_text_len=max_len, classes=classes,
                                answer_normalization="m3ae" if task == "vqa" and data else "medvlp",
                                retrieval=RetrievalConfig(eval_mode="exhaustive"))
        save_config(config, out / "config.yaml")
        model.save_pretrained(out)
    (out / "converted.json").write_text(json.dumps(
        {"from": "M3AE (github.com/zhjohnchan/M3AE)", "checkpoint": source, "task": task,
         "reference_config": {k: v for k, v in reference.items() if isinstance(v, (int, float, str, bool))},
         "image_size": model.cfg.image_size, "classes": len(classes)}, indent=1) + "\n")
    for line in (*notes, note):
        report(line)
    return out


def _classes(root: Path, task: str, label_field: str) -> list[str]:
    from medvlp.data.records import read_manifest
    from medvlp.training.downstream import downstream_task
    from medvlp.training.finetune import data_classes

    family = read_manifest(root)["family"]
    if family != downstream_task(task).family:
        raise MedvlpError(f"{root} holds {family} data; a {task} checkpoint needs a prepared {task} dataset")
    if task == "vqa":
        return reference_answer_order(root)
    return data_classes(root, downstream_task(task), label_field)  # sorted label set: MELINDA's rule


def _write_pretrain(out: Path, model: MedVLP, tokenizer_ref: str | None, max_len: int, save_config) -> None:
    from medvlp.constants import LATEST, TRAINER_STATE
    from medvlp.training.pretrain import load_pretrain_config

    config = load_pretrain_config(Path(__file__).parent / "configs" / "m3ae-base.yaml", [f"run_dir={out}"])
    config.model = model.cfg
    config.data.train = []
    config.data.tokenizer = tokenizer_ref
    config.data.max_text_len = max_len
    save_config(config, out / "config.yaml")
    step = out / "checkpoints" / "step-000000"
    step.mkdir(parents=True)
    model.save_pretrained(step, {"global_step": "0"}, prefix="model.")  # as a pre-training checkpoint
    torch.save({"global_step": 0, "epoch": 0, "converted": "m3ae"}, step / TRAINER_STATE)
    (out / "checkpoints" / LATEST).write_text(step.name + "\n")
