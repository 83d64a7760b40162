"""The pre-training recipe (``objectives.recipes``): M3AE and MPMA as one framework, each component a switch,
which passes a step runs, and the ITM and alignment variants."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_model_and_batch

from medvlp.objectives.recipes import pretrain_losses
from medvlp.training.config import TasksConfig


# -- MPMA: one framework with M3AE, each component a switch -----------------------------------------------------
class CountingModel(torch.nn.Module):
    """Counts forward passes and fusion-only ITM calls of a model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.passes, self.matches = model, [], 0
        self.cfg = model.cfg

    def forward(self, batch, **flags):
        self.passes.append({k for k, v in flags.items() if v})
        return self.inner(batch, **flags)

    def match(self, *args):
        self.matches += 1
        return self.inner.match(*args)


@pytest.mark.parametrize("switches, passes, matches, parts", [
    ({}, [{"mask_text"}, {"mask_image"}], 1, {"mlm", "mim", "itm"}),  # M3AE: ITM fuses the other passes' states
    ({"paired_masking": True, "itc": 1.0, "local": 1.0, "hard_negatives": True},
     [{"mask_image", "mask_text", "itm", "align"}], 1, {"mlm", "mim", "itm", "itc", "local"}),  # MPMA: one pass
    ({"paired_masking": True}, [{"mask_image", "mask_text", "itm"}], 1, {"mlm", "mim", "itm"}),
    ({"itc": 1.0}, [{"mask_text", "align"}, {"mask_image"}], 1, {"mlm", "mim", "itm", "itc"}),
    ({"mim": 0.0}, [{"mask_text"}, {"itm"}], 0, {"mlm", "itm"}),  # no whole-text pass to reuse: its own ITM pass
    ({"hard_negatives": True}, [{"mask_text", "itm", "align"}, {"mask_image"}], 1, {"mlm", "mim", "itm"}),
    ({"mlm": 0.0, "mim": 0.0, "itm": 0.0, "itc": 1.0}, [{"align"}], 0, {"itc"}),
    ({"paired_masking": True, "mlm": 0.0, "itc": 1.0}, [{"mask_image", "itm", "align"}], 1, {"mim", "itm", "itc"}),
])
def test_each_component_is_a_switch(switches, passes, matches, parts):
    net, batch = tiny_model_and_batch()
    counting = CountingModel(net)
    loss, logs, _ = pretrain_losses(counting, batch, TasksConfig(**switches))
    assert counting.passes == passes and counting.matches == matches
    assert {k.removesuffix("_loss") for k in logs if k.endswith("_loss")} == parts
    assert torch.isfinite(loss)
    loss.backward()
    assert net.text.word_embeddings.weight.grad is not None
    assert net.vision.model.embeddings.patch_embedding.weight.grad is not None


def test_reused_itm_pairs_every_text_with_its_own_image_and_another():
    from medvlp.objectives.recipes import reused_itm

    net, batch = tiny_model_and_batch(batch_size=5)
    pair = net(batch, itm=True, align=True)
    for hard in (False, True):
        logits, labels = reused_itm(net, pair, batch, hard)
        assert logits.shape == (10, 2) and labels.tolist() == [1] * 5 + [0] * 5
        assert torch.allclose(logits[:5], pair.itm_logits)


def test_a_batch_of_one_skips_the_reused_itm():
    net, batch = tiny_model_and_batch(batch_size=1)
    _, logs, _ = pretrain_losses(net, batch, TasksConfig(paired_masking=True, hard_negatives=True, itc=1.0))
    assert "itm_loss" not in logs and "mlm_loss" in logs and "itc_loss" in logs


def test_whole_image_alignment_reads_every_patch_while_the_fused_pass_stays_masked():
    net, batch = tiny_model_and_batch()
    tasks = TasksConfig(paired_masking=True, itc=1.0, local=1.0, hard_negatives=True, align_whole_image=True)
    _, logs, passes = pretrain_losses(net, batch, tasks)
    pair, whole = passes["pair"], net.align_head.embed_image(net.encode_image(batch["pixels"]).states)
    assert torch.allclose(pair.image_embed, whole[:, 0], atol=1e-5)
    assert torch.allclose(pair.patch_embeds, whole[:, 1:], atol=1e-5) and pair.patch_embeds.shape[1] == 16
    assert pair.image_features.shape[1] == 1 + 4 and {"mim_loss", "itc_loss", "local_loss"} <= logs.keys()
    _, _, passes = pretrain_losses(net, batch, dataclasses.replace(tasks, align_whole_image=False))
    assert passes["pair"].patch_embeds.shape[1] == 4  # switched off: the 4 visible patches of 16


