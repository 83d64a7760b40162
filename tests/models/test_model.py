"""MedVLP end to end: shapes, which layer each head reads, padding, image sizes, bf16, parameter groups."""

import pytest
import torch

from medvlp.models import CLIP_MEAN, CLIP_STD, build_model, model_config, normalize_pixels, param_groups
from medvlp.objectives import itm_batch, itm_loss, mim_loss, mlm_loss

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(model_config("tiny", text={"vocab_size": VOCAB})).eval()


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
    kwargs = dict(mask_text=True, mask_image=True, itm=True)
    a = model(batch, generator=torch.Generator().manual_seed(3), **kwargs)
    b = model(padded, generator=torch.Generator().manual_seed(3), **kwargs)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(b.text_features[:, :12][real], a.text_features[real], atol=1e-5, rtol=1e-5)
    for x, y in zip(a.text_states, b.text_states, strict=True):
        torch.testing.assert_close(y[:, :12][real], x[real], atol=1e-5, rtol=1e-5)
    for name in ("mlm_logits", "mim_pred", "itm_logits", "joint", "image_features"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)


def test_a_model_built_at_64_runs_at_96(model):
    batch = make_batch(size=96)
    out = model(batch, mask_image=True, itm=True)
    assert out.image_features.shape == (4, 1 + 9, 128)
    assert out.mim_pred.shape == (4, 36, 768) and out.image_mask.shape == (4, 36)
    assert model(batch).image_features.shape == (4, 1 + 36, 128)


def test_three_m3ae_passes_in_bf16_autocast_train_and_give_finite_losses():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", text={"vocab_size": VOCAB})).train()
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
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]


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
                 "mim_decoder.blocks.0.self_attn.in_proj_bias", "itm_head.fc.bias"):
        assert id(named[name]) in no_decay, name
    for name in ("fusion.text_layers.0.ffn.0.weight", "vision.model.embeddings.patch_embedding.weight",
                 "mim_decoder.blocks.0.self_attn.in_proj_weight", "itm_head.fc.weight"):
        assert id(named[name]) not in no_decay, name
    encoder = {id(p) for g in ("encoder", "encoder_no_decay") for p in groups[g]["params"]}
    assert all((id(p) in encoder) == n.startswith(("vision.", "text.")) for n, p in named.items())


def test_a_few_steps_on_one_batch_lower_all_three_losses():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", text={"vocab_size": VOCAB})).train()
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
