"""M3AE reference parity: every output of every golden fixture in ../shared/reference/m3ae/ (made by running the
official M3AE code; see its README.md and SPEC.md), reproduced by medvlp in fp32 through the public convert path
(``convert_m3ae`` -> run folder -> ``open_run``).

Each fixture folder has A's file layout and its own ``config.json``; nothing here assumes set A's sizes. The
fixture's MIM noise and ITM images are fed in instead of drawing them. Intermediates are read with forward hooks
on medvlp's modules and compared with the reference's tensor of the same meaning (README "outputs").
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file, save_file

from medvlp.convert import convert_m3ae
from medvlp.objectives import classification_loss, itm_loss, mim_loss, mim_targets, mlm_loss, ranking_loss, vqa_loss
from medvlp.training.runs import open_run

FIXTURES = ROOT.parent / "shared" / "reference" / "m3ae"
SETS = sorted(p for p in FIXTURES.glob("*") if (p / "config.json").is_file()) if FIXTURES.is_dir() else []
TOLERANCE = 1e-5  # max abs error per output; the reference's own 1- vs 2-thread spread is 4.2e-7
TASKS = {"pretrain": "pretrain", "vqa": "vqa", "cls": "classification", "irtr": "retrieval"}

pytestmark = pytest.mark.skipif(not SETS, reason=f"no M3AE fixtures in {FIXTURES}")


# -- converting a fixture -----------------------------------------------------------------------------------------
def composed_state_dict(folder: Path, keys_file: str) -> dict[str, torch.Tensor]:
    """A CLS/IRTR model's full state dict, each tensor from the file its keys file names (README "Files")."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for line in (folder / keys_file).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        name, source = fields[0], fields[4]
        if source not in files:
            files[source] = load_file(str(folder / source))
        out[name] = files[source][name]
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from medvlp.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["is there a lesion in the left lung", "no abnormality seen"] * 4, out, vocab_size=300)
    return out


def convert(folder: Path, task: str, work: Path, tokenizer: Path):
    """Convert the fixture's ``task`` model through ``convert_m3ae``; return the model ``open_run`` reads back."""
    config = json.loads((folder / "config.json").read_text())
    checkpoint = {"pretrain": folder / "state_dict_pretrain.safetensors",
                  "vqa": folder / "state_dict_vqa.safetensors"}.get(task)
    if checkpoint is None:  # CLS / IRTR: the full model composed from its keys file
        checkpoint = work / f"{task}.safetensors"
        save_file(composed_state_dict(folder, f"keys_{task}.txt"), str(checkpoint))
    reference = work / f"{task}-config.json"
    reference.write_text(json.dumps(config["tasks"][task]["resolved"]))
    text = work / "text-config.json"
    text.write_text(json.dumps(next(v for k, v in config.items() if k.startswith("tiny_roberta"))))
    run = convert_m3ae(checkpoint, work / f"run-{task}", task=TASKS[task], tokenizer=str(tokenizer),
                       reference_config=reference, text_config=text, report=lambda line: None)
    return open_run(run).model


# -- reading intermediates ----------------------------------------------------------------------------------------
@contextmanager
def captured(model):
    """Forward hooks that record medvlp's intermediates under the fixture's names (last call wins)."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name, what="out"):
        def hook(module, args, output):
            value = args[0] if what == "in" else output
            got[name] = value[0] if isinstance(value, tuple) else value
        return hook

    def probs(name):
        def hook(module, args, output):
            got[name] = module.attention_probs(*args)
        return hook

    vision, text, fusion, decoder = model.vision.model, model.text.model, model.fusion, model.mim_decoder
    handles.append(text.embeddings.register_forward_hook(keep("text_embeddings")))
    for i, layer in enumerate(text.encoder.layer):
        handles.append(layer.register_forward_hook(keep(f"text_layer_{i}")))
    handles.append(vision.pre_layrnorm.register_forward_hook(keep("image_tokens_in", "in")))
    handles.append(vision.pre_layrnorm.register_forward_hook(keep("image_ln_pre")))
    for i, layer in enumerate(vision.encoder.layers):
        handles.append(layer.register_forward_hook(keep(f"image_block_{i}")))
    handles.append(vision.post_layernorm.register_forward_hook(keep("image_feats")))
    handles.append(fusion.text_proj.register_forward_hook(keep("text_proj")))
    handles.append(fusion.image_proj.register_forward_hook(keep("image_proj")))
    for stream, layers in (("text", fusion.text_layers), ("image", fusion.image_layers)):
        for i, layer in enumerate(layers):
            for kind in ("self", "cross"):
                attention = getattr(layer, f"{kind}_attn")
                handles.append(attention.register_forward_hook(probs(f"fusion_{stream}_{i}_{kind}_attn_probs")))
    handles.append(decoder.embed.register_forward_hook(keep("mim_decoder_embed")))
    if len(decoder.blocks):
        handles.append(decoder.blocks[0].register_forward_hook(keep("mim_decoder_tokens_in", "in")))
    for i, block in enumerate(decoder.blocks):
        handles.append(block.register_forward_hook(keep(f"mim_decoder_block_{i}")))
    handles.append(decoder.norm.register_forward_hook(keep("mim_decoder_norm")))
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


def fused_outputs(got: dict, out, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pass's fusion states, masks, pooled features and encoder output under the fixture's names."""
    fusion = out.fusion
    result = dict(got)
    result.update(text_feats=out.text_features, fusion_text_in=fusion.text_states[0],
                  fusion_image_in=fusion.image_states[0], text_pooled=fusion.text_pooled,
                  image_pooled=fusion.image_pooled, cls_feats=fusion.joint)
    for i in range(1, len(fusion.text_states)):
        result[f"fusion_text_{i - 1}"] = fusion.text_states[i]
        result[f"fusion_image_{i - 1}"] = fusion.image_states[i]
    minimum = torch.finfo(torch.float32).min
    result["text_extended_mask"] = ((1.0 - attention_mask.float()) * minimum)[:, None, None, :]
    result["image_extended_mask"] = torch.zeros(out.image_features.shape[0], 1, 1, out.image_features.shape[1])
    return result


def prefixed(prefix: str, values: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


# -- the passes ---------------------------------------------------------------------------------------------------
def pretrain_outputs(model, x: dict) -> dict[str, torch.Tensor]:
    mask = x["attention_mask"]
    base = {"pixels": x["pixels"], "input_ids": x["input_ids"], "attention_mask": mask}
    result = {}
    with captured(model) as got:  # plain pass on the true pairs
        out = model(base, itm=True, whole_fusion=True)  # every token of the last fusion layer, to compare them
        result.update(prefixed("pos", {**fused_outputs(got, out, mask), "itm_logits": out.itm_logits}))
    # the step's own pass computes the last layer's first tokens alone: the same logits
    torch.testing.assert_close(model(base, itm=True).itm_logits, out.itm_logits, rtol=1e-5, atol=1e-6)
    with captured(model) as got:  # MLM pass: masked text, whole image; logits at every position
        batch = {**base, "mlm_input_ids": x["mlm_input_ids"], "mlm_labels": x["mlm_labels"]}
        out = model(batch, mask_text=True, whole_fusion=True)  # every fusion state, to compare them all
        assert torch.equal(model(batch, mask_text=True).mlm_logits, out.mlm_logits)  # the step's shorter fusion
        logits = model.mlm_head(out.fusion.text_states[model.cfg.mlm_layer_index])
        head = model.mlm_head
        got["mlm_transform"] = head.norm(head.act(head.dense(out.fusion.text_states[model.cfg.mlm_layer_index])))
        mlm, _ = mlm_loss(out, batch)
        result.update(prefixed("mlm", {**fused_outputs(got, out, mask), "logits": logits, "loss": mlm}))
    with captured(model) as got:  # MIM pass: whole text, masked image (the fixture's noise)
        out = model(base, mask_image=True, image_noise=x["mim_noise"], whole_fusion=True)
        assert torch.equal(model(base, mask_image=True, image_noise=x["mim_noise"]).mim_pred, out.mim_pred)
        mim, _ = mim_loss(out, base, norm_pix_loss=model.cfg.norm_pix_loss)
        values = {**fused_outputs(got, out, mask), "mim_head_in": out.fusion.image_states[model.cfg.mim_layer],
                  "pred": out.mim_pred,
                  "target": mim_targets(x["pixels"], model.cfg.patch_size, model.cfg.norm_pix_loss),
                  "mask": out.image_mask.float(), "ids_restore": out.ids_restore, "loss": mim}
        result.update(prefixed("mim", values))
    itm_batch = {**base, "pixels": x["itm_pixels"], "itm_labels": x["itm_labels"]}
    out = model(itm_batch, itm=True)  # the swapped ITM pass, the fixture's swap
    itm, _ = itm_loss(out, itm_batch)
    result.update(prefixed("itm", {"labels": x["itm_labels"], "logits": out.itm_logits, "loss": itm,
                                   "cls_feats": out.fusion.joint, "text_pooled": out.fusion.text_pooled,
                                   "image_pooled": out.fusion.image_pooled}))
    out = model({**base, "pixels": x["itm_false_pixels"]}, itm=True)  # every sample with its false image
    result.update(prefixed("neg", {"itm_logits": out.itm_logits, "text_pooled": out.fusion.text_pooled,
                                   "image_pooled": out.fusion.image_pooled}))
    result["loss.total"] = result["mlm.loss"] + result["mim.loss"] + result["itm.loss"]
    return result


def vqa_outputs(model, x: dict) -> dict[str, torch.Tensor]:
    batch = {"pixels": x["vqa_pixels"], "input_ids": x["input_ids"], "attention_mask": x["attention_mask"],
             "answer_scores": x["vqa_targets"]}
    with captured(model) as got:
        out = model(batch, classify=True, whole_fusion=True)
        loss, _ = vqa_loss(out, batch)
        values = {**fused_outputs(got, out, x["attention_mask"]), "logits": out.class_logits,
                  "targets": x["vqa_targets"], "loss": loss}
    torch.testing.assert_close(model(batch, classify=True).class_logits, out.class_logits, rtol=1e-5, atol=1e-6)
    return prefixed("vqa", values)


def cls_outputs(model, x: dict) -> dict[str, torch.Tensor]:
    batch = {"pixels": x["pixels"], "input_ids": x["input_ids"], "attention_mask": x["attention_mask"],
             "label": x["cls_labels"]}
    out = model(batch, classify=True)
    loss, _ = classification_loss(out, batch)
    return prefixed("cls", {"logits": out.class_logits, "loss": loss, "cls_feats": out.fusion.joint})


def irtr_outputs(model, x: dict) -> dict[str, torch.Tensor]:
    ids, masks = x["irtr_text_ids"], x["irtr_text_masks"]  # [B, 1 + F, L]: candidate 0 is the true text
    batch_size, candidates = ids.shape[:2]
    batch = {"pixels": x["pixels"].repeat_interleave(candidates, dim=0), "input_ids": ids.flatten(0, 1),
             "attention_mask": masks.flatten(0, 1)}
    out = model(batch, itm=True)
    scores = model.match_score(out.itm_logits).view(batch_size, candidates)
    loss, _ = ranking_loss(scores)
    return prefixed("irtr", {"head_out": scores.reshape(-1, 1), "scores": scores, "loss": loss,
                             "cls_feats": out.fusion.joint})


PASSES = {"pretrain": pretrain_outputs, "vqa": vqa_outputs, "cls": cls_outputs, "irtr": irtr_outputs}
PREFIXES = {"pretrain": ("pos", "mlm", "mim", "itm", "neg", "loss"), "vqa": ("vqa",), "cls": ("cls",),
            "irtr": ("irtr",)}


def errors(folder: Path, work: Path, tokenizer: Path) -> dict[str, float]:
    """Max abs error of every reference output (all of them: a missing one is an error)."""
    inputs, expected = load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "outputs.safetensors"))
    measured: dict[str, float] = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for task, run_pass in PASSES.items():
            mine = run_pass(convert(folder, task, work, tokenizer), inputs)
            for name, want in expected.items():
                if name.split(".")[0] not in PREFIXES[task]:
                    continue
                assert name in mine, f"{folder.name}: no medvlp output for {name}"
                got = mine[name].float()
                assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
                measured[name] = (got - want.float()).abs().max().item() if want.numel() else 0.0
    assert set(measured) == set(expected), sorted(set(expected) - set(measured))[:5]
    return measured


@pytest.mark.parametrize("folder", SETS, ids=[p.name for p in SETS])
def test_every_output_of_the_reference_is_reproduced(folder, tmp_path, tokenizer_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixtures were made with one thread (the spread with two is 4e-7)
    try:
        measured = errors(folder, tmp_path, tokenizer_dir)
    finally:
        torch.set_num_threads(threads)
    for name, error in sorted(measured.items()):
        print(f"{folder.name} {name} {error:.2e}")
    worst = sorted(measured.items(), key=lambda item: -item[1])[:5]
    assert worst[0][1] <= TOLERANCE, f"{folder.name}: largest errors {worst}"
