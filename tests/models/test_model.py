"""MedVLP end to end: shapes, which layer each head reads, padding, image sizes, bf16, parameter groups, and
MPMA's alignment outputs, retrieval embeddings and ITM on reused encoder states."""

import dataclasses

import pytest
import torch

from medvlp.models import CLIP_MEAN, CLIP_STD, build_model, model_config, normalize_pixels, param_groups
from medvlp.objectives import hard_negatives, itc_loss, itm_batch, itm_loss, local_alignment_loss, mim_loss, mlm_loss

VOCAB = 300  # the shared tiny config's vocabulary (tests/conftest.py)


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config).eval()


def make_batch(batch=4, length=12, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    input_ids[:, 0] = 0
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    labels = torch.full((batch, length), -100)
    labels[:, 2:4] = input_ids[:, 2:4]
    mlm_input_ids = input_ids.clone()
    mlm_input_ids[:, 2:4] = 2
    return {"pixels": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
            "input_ids": input_ids, "attention_mask": attention_mask, "mlm_input_ids": mlm_input_ids,
            "mlm_labels": labels}


def test_pixels_are_normalised_with_clip_statistics(model):
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    expected = (torch.tensor([0.0, 1.0, 128 / 255]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(model.normalize(pixels)[0, :, 0, 0], expected)
    torch.testing.assert_close(normalize_pixels(pixels), model.normalize(pixels))


def test_forward_shapes_and_only_requested_heads(model):
    batch = make_batch()
    plain = model(batch)
    assert plain.mlm_logits is None and plain.mim_pred is None and plain.itm_logits is None
    assert plain.masking is None and plain.image_mask is None
    assert plain.image_features.shape == (4, 17, 128) and plain.text_features.shape == (4, 12, 128)
    assert plain.image_cls.shape == (4, 128) and plain.text_cls.shape == (4, 128)
    assert plain.joint.shape == (4, 256) and len(plain.text_states) == 3
    out = model(batch, mask_text=True, mask_image=True, itm=True)
    assert out.mlm_logits.shape == (8, VOCAB)  # two labelled positions per sample
    assert out.mim_pred.shape == (4, 16, 16 * 16 * 3)
    assert out.itm_logits.shape == (4, 2)
    assert out.image_features.shape == (4, 1 + 4, 128) and out.image_mask.sum() == 4 * 12


def test_mlm_reads_the_masked_copy_of_the_text(model):
    batch = make_batch()
    a = model(batch, mask_text=True)
    b = model({**batch, "input_ids": batch["input_ids"] + 1}, mask_text=True)
    torch.testing.assert_close(a.mlm_logits, b.mlm_logits)
    c = model({**batch, "mlm_input_ids": batch["input_ids"]}, mask_text=True)
    assert not torch.allclose(a.mlm_logits, c.mlm_logits)


def _perturb(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))


def test_mim_reads_the_configured_fusion_layer_and_mlm_the_last():
    torch.manual_seed(0)
    cfg = model_config("tiny", text={"vocab_size": VOCAB}, fusion={"num_layers": 3}, mim_layer=1)
    model = build_model(cfg).eval()
    batch = make_batch()
    run = lambda: model(batch, mask_text=True, mask_image=True, generator=torch.Generator().manual_seed(1))  # noqa: E731
    base = run()
    _perturb(model.fusion.image_layers[1])  # layer 2 reads states[1] and writes states[2]: after the MIM input
    _perturb(model.fusion.text_layers[2])
    after = run()
    torch.testing.assert_close(after.mim_pred, base.mim_pred)
    assert not torch.allclose(after.mlm_logits, base.mlm_logits)
    _perturb(model.fusion.image_layers[0])  # before the MIM input
    assert not torch.allclose(run().mim_pred, base.mim_pred)


def test_padding_is_invisible_to_the_whole_model(model):
    batch = make_batch()
    extra = 5
    g = torch.Generator().manual_seed(7)
    padded = dict(batch)
    mask = torch.cat([batch["attention_mask"], torch.zeros(4, extra, dtype=torch.long)], 1)
    for key in ("input_ids", "mlm_input_ids"):
        garbage = torch.randint(0, VOCAB, mask.shape, generator=g)
        ids = torch.cat([batch[key], torch.zeros(4, extra, dtype=torch.long)], 1)
        padded[key] = torch.where(mask.bool(), ids, garbage)
    padded["attention_mask"] = mask
    padded["mlm_labels"] = torch.cat([batch["mlm_labels"], torch.full((4, extra), -100)], 1)
    kwargs = dict(mask_text=True, mask_image=True, itm=True, align=True)
    a = model(batch, generator=torch.Generator().manual_seed(3), **kwargs)
    b = model(padded, generator=torch.Generator().manual_seed(3), **kwargs)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(b.text_features[:, :12][real], a.text_features[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.word_embeds[:, :12][real], a.word_embeds[real], atol=1e-5, rtol=1e-5)
    for x, y in zip(a.text_states, b.text_states, strict=True):
        torch.testing.assert_close(y[:, :12][real], x[real], atol=1e-5, rtol=1e-5)
    for name in ("mlm_logits", "mim_pred", "itm_logits", "joint", "image_features", "image_embed", "text_embed",
                 "patch_embeds"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itc_loss(b)[0], itc_loss(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(local_alignment_loss(b, padded)[0], local_alignment_loss(a, batch)[0], atol=1e-5,
                               rtol=1e-5)


def test_a_model_built_at_64_runs_at_96(model):
    batch = make_batch(size=96)
    out = model(batch, mask_image=True, itm=True)
    assert out.image_features.shape == (4, 1 + 9, 128)
    assert out.mim_pred.shape == (4, 36, 768) and out.image_mask.shape == (4, 36)
    assert model(batch).image_features.shape == (4, 1 + 36, 128)


def test_three_m3ae_passes_in_bf16_autocast_train_and_give_finite_losses(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).train()
    batch = make_batch(batch=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlm, mlm_metrics = mlm_loss(model(batch, mask_text=True), batch)
        mim, _ = mim_loss(model(batch, mask_image=True), batch, norm_pix_loss=model.cfg.norm_pix_loss)
        swapped = itm_batch(batch, torch.Generator().manual_seed(0))
        itm, itm_metrics = itm_loss(model(swapped, itm=True), swapped)
    total = mlm + mim + itm
    assert all(torch.isfinite(x) for x in (mlm, mim, itm)) and total.dtype == torch.float32
    assert 0 <= mlm_metrics["accuracy"] <= 1 and 0 <= itm_metrics["accuracy"] <= 1
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    m3ae = {name: g for name, g in grads.items() if not name.startswith("align_head.")}  # M3AE has no alignment
    assert all(g is not None and torch.isfinite(g).all() for g in m3ae.values()), \
        [n for n, g in m3ae.items() if g is None]
    assert all(grads[name] is None for name in grads if name not in m3ae)


def test_param_groups_split_encoders_from_fusion_and_heads(model):
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, weight_decay=0.01)}
    assert set(groups) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(5e-4)
    assert groups["encoder"]["weight_decay"] == 0.01 and groups["head_no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("mim_decoder.mask_token", "fusion.modality.weight", "vision.model.embeddings.class_embedding",
                 "text.model.embeddings.word_embeddings.weight", "fusion.text_layers.0.ffn_norm.weight",
                 "mim_decoder.blocks.0.self_attn.in_proj_bias", "itm_head.fc.bias", "align_head.logit_scale"):
        assert id(named[name]) in no_decay, name
    for name in ("fusion.text_layers.0.ffn.0.weight", "vision.model.embeddings.patch_embedding.weight",
                 "mim_decoder.blocks.0.self_attn.in_proj_weight", "itm_head.fc.weight", "align_head.image_proj.weight",
                 "align_head.text_proj.weight"):
        assert id(named[name]) not in no_decay, name
    head = {id(p) for g in ("head", "head_no_decay") for p in groups[g]["params"]}
    assert all(id(p) in head for n, p in named.items() if n.startswith("align_head."))  # 5x lr, like the heads
    encoder = {id(p) for g in ("encoder", "encoder_no_decay") for p in groups[g]["params"]}
    assert all((id(p) in encoder) == n.startswith(("vision.", "text.")) for n, p in named.items())


def test_a_few_steps_on_one_batch_lower_all_three_losses(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).train()
    optimiser = torch.optim.AdamW(param_groups(model, lr=1e-3))
    batch = make_batch(batch=8)
    swapped = itm_batch(batch, torch.Generator().manual_seed(0))

    def losses():
        mlm, _ = mlm_loss(model(batch, mask_text=True), batch)
        mim, _ = mim_loss(model(batch, mask_image=True, generator=torch.Generator().manual_seed(0)), batch)
        itm, _ = itm_loss(model(swapped, itm=True), swapped)
        return mlm, mim, itm

    first = [x.item() for x in losses()]
    for _ in range(12):
        optimiser.zero_grad()
        sum(losses()).backward()
        optimiser.step()
    last = [x.item() for x in losses()]
    assert all(b < a for a, b in zip(first, last, strict=True)), (first, last)


# -- MPMA: alignment, retrieval embeddings, ITM on reused encoder states -----------------------------------------


def test_align_gives_unit_embeddings_of_this_pass_and_the_initial_scale(model):
    batch = make_batch()
    plain = model(batch)
    assert plain.image_embed is None and plain.word_embeds is None and plain.logit_scale is None
    out = model(batch, align=True)
    assert out.image_embed.shape == (4, 128) and out.text_embed.shape == (4, 128)  # tiny: embed_dim 128
    assert out.patch_embeds.shape == (4, 16, 128) and out.word_embeds.shape == (4, 12, 128)
    for name in ("image_embed", "text_embed", "patch_embeds", "word_embeds"):
        norms = getattr(out, name).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert out.logit_scale.shape == () and out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(out.word_embeds[:, 0], out.text_embed)
    masked = model(batch, mask_image=True, mask_text=True, align=True)
    assert masked.patch_embeds.shape == (4, 4, 128)  # the visible patches of this pass
    assert not torch.allclose(masked.word_embeds, out.word_embeds)  # the masked text of this pass


def test_logit_scale_is_clamped_at_100(tiny_config):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config, temperature=0.001)).eval()
    assert model.align_head.logit_scale.item() == pytest.approx(6.9078, abs=1e-4)  # log(1000), the raw value
    assert model(make_batch(batch=3), align=True).logit_scale.item() == pytest.approx(100.0, rel=1e-5)


def test_retrieval_embeddings_equal_the_unmasked_forward(model):
    batch = make_batch()
    out = model(batch, align=True)
    torch.testing.assert_close(model.embed_image(batch["pixels"]), out.image_embed)
    torch.testing.assert_close(model.embed_text(batch["input_ids"], batch["attention_mask"]), out.text_embed)
    # zero-shot retrieval: similarity of every text with every image
    assert (model.embed_text(batch["input_ids"], batch["attention_mask"]) @ out.image_embed.T).shape == (4, 4)


def test_match_reuses_encoder_states_for_itm(model):
    batch = make_batch()
    out = model(batch, itm=True, align=True)
    mask = batch["attention_mask"]
    torch.testing.assert_close(model.match(out.text_features, mask, out.image_features), out.itm_logits)
    donors = hard_negatives(out.logit_scale * out.text_embed @ out.image_embed.T, torch.Generator().manual_seed(0))
    assert not (donors == torch.arange(4)).any()
    swapped = model({**batch, "pixels": batch["pixels"][donors]}, itm=True)
    torch.testing.assert_close(model.match(out.text_features, mask, out.image_features[donors]), swapped.itm_logits,
                               atol=1e-5, rtol=1e-5)


def test_one_mpma_pass_with_alignment_and_hard_negative_itm_trains_in_bf16(tiny_config):
    """Paired masking, ITC, local alignment and ITM with hard negatives from the same encoder states."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config, memory_slots=4)).train()
    batch = make_batch(batch=6)
    g = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, mask_image=True, mask_text=True, align=True, generator=g)
        parts = [mlm_loss(out, batch)[0], mim_loss(out, batch)[0], itc_loss(out)[0],
                 local_alignment_loss(out, batch)[0]]
        with torch.no_grad():
            sim = out.logit_scale * out.text_embed @ out.image_embed.T
        image_donors, text_donors = hard_negatives(sim, g), hard_negatives(sim.T, g)
        mask = batch["attention_mask"]
        logits = torch.cat([
            model.match(out.text_features, mask, out.image_features),
            model.match(out.text_features, mask, out.image_features[image_donors]),
            model.match(out.text_features[text_donors], mask[text_donors], out.image_features),
        ])
        labels = torch.cat([torch.ones(6, dtype=torch.long), torch.zeros(12, dtype=torch.long)])
        itm, _ = itm_loss(dataclasses.replace(out, itm_logits=logits), {"itm_labels": labels})
        parts.append(itm)
    assert all(torch.isfinite(x) and x.dtype == torch.float32 for x in parts)
    sum(parts).backward()
    head = model.align_head
    assert head.logit_scale.grad is not None and head.image_proj.weight.grad.abs().sum() > 0
    assert head.text_proj.weight.grad.abs().sum() > 0 and model.itm_head.fc.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
