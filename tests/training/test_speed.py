"""The faster pre-training step computes what the straightforward one does: each speed-up against the plain
computation, with dropout off (the ``tiny`` size has none), on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from medvlp.models.config import model_config
from medvlp.models.model import build_model, param_groups
from medvlp.objectives import itm_batch, itm_loss, mim_loss, mlm_loss
from medvlp.objectives.recipes import pretrain_losses
from medvlp.training import trainer as trainer_module
from medvlp.training.config import TasksConfig
from medvlp.training.optim import OptimConfig, build_optimizer
from medvlp.training.trainer import LARGE_MODEL_PARAMS, choose_precision


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config("tiny")).train()


def random_batch(batch_size: int = 6, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 4096, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # one padded text
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
    labels[:, 0] = -100
    return {"pixels": torch.randint(0, 256, (batch_size, 3, 64, 64), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask, "mlm_input_ids": torch.where(labels != -100, 4, ids),
            "mlm_labels": labels}


def three_pass_losses(model, batch) -> dict[str, torch.Tensor]:
    """M3AE's step as the reference runs it: masked text + whole image, masked image + whole text, and an ITM
    pass that encodes the batch with half its images swapped all over again."""
    mlm = model(batch, mask_text=True)
    mim = model(batch, mask_image=True)
    targets = itm_batch(batch)
    itm = model(targets, itm=True)
    return {"mlm": mlm_loss(mlm, batch)[0], "mim": mim_loss(mim, batch, norm_pix_loss=model.cfg.norm_pix_loss)[0],
            "itm": itm_loss(itm, targets)[0]}


def gradients(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_m3ae_step_encodes_each_input_once_with_the_losses_and_gradients_of_three_passes():
    model, batch = tiny(), random_batch()
    torch.manual_seed(7)
    plain = three_pass_losses(model, batch)
    plain_grads = gradients(model, sum(plain.values()))
    torch.manual_seed(7)
    total, logs, passes = pretrain_losses(model, batch, TasksConfig())
    assert "itm" not in passes  # the ITM pass encoded nothing of its own
    for name, value in plain.items():
        assert torch.allclose(logs[f"{name}_loss"], value, atol=1e-5), name
    assert torch.allclose(total, sum(plain.values()), atol=1e-5)
    grads = gradients(model, total)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-5), name


def test_fused_adamw_takes_the_steps_of_the_per_tensor_loop():
    models = tiny(), tiny()
    config = OptimConfig(lr=1e-3)
    fused = build_optimizer(models[0], config)
    assert fused.defaults["fused"]  # on the CPU too
    groups = param_groups(models[1], config.lr, config.weight_decay, config.head_lr_mult, config.classifier_lr_mult)
    loop = torch.optim.AdamW(groups, betas=config.betas, eps=config.eps, foreach=False, fused=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert not torch.equal(next(models[0].parameters()), next(tiny().parameters()))  # it did step


@pytest.mark.parametrize("flags, cuda, params, expected, why", [
    ({"avx2"}, None, 200_000_000, "32-true", "emulated"),
    ({"avx2", "amx_bf16", "avx512_bf16"}, None, 1_000_000, "bf16-mixed", "AMX"),
    ({"avx512_bf16"}, None, 200_000_000, "bf16-mixed", "AVX-512 BF16 and a model of 200M"),
    ({"avx512_bf16"}, None, 5_000_000, "32-true", "small model (5.0M"),
    ({"avx512_bf16"}, None, None, "32-true", "model size not given"),
    (set(), True, 1, "bf16-mixed", "GPU with bf16"),
    (set(), False, 1, "16-mixed", "GPU without bf16"),
])
def test_auto_precision_picks_bf16_where_it_pays(monkeypatch, flags, cuda, params, expected, why):
    monkeypatch.setattr(trainer_module, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda))
    precision, reason = choose_precision("auto", params)
    assert precision == expected and why in reason
    assert choose_precision("32-true", params) == ("32-true", "as configured")
    if cuda is not None:  # accelerator=cpu looks at the CPU even beside a GPU
        assert choose_precision("auto", LARGE_MODEL_PARAMS, "cpu")[0] == "32-true"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    real = trainer_module.Path
    monkeypatch.setattr(trainer_module, "Path", lambda p: real(cpuinfo) if p == "/proc/cpuinfo" else real(p))
    assert trainer_module.cpu_flags() == {"fpu", "avx2", "avx512_bf16"}


def test_the_fusion_stops_at_the_layers_the_heads_read_with_the_states_of_the_whole_fusion():
    model, batch = tiny(), random_batch()
    model.eval()
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encode_image(batch["pixels"]).states
    whole = model.fusion(text, batch["attention_mask"], image)
    layers = model.cfg.fusion.num_layers
    for text_upto, image_upto in [(layers, 0), (0, 1), (0, 0), (1, 2)]:
        part = model.fusion(text, batch["attention_mask"], image, (text_upto, image_upto))
        assert part.joint is None and len(part.text_states) + len(part.image_states) < 2 * (layers + 1)
        assert torch.equal(part.text_states[text_upto], whole.text_states[text_upto])
        assert torch.equal(part.image_states[image_upto], whole.image_states[image_upto])
    assert torch.equal(model.fusion(text, batch["attention_mask"], image, (layers, layers)).joint, whole.joint)


@pytest.mark.parametrize("tasks", [TasksConfig(), TasksConfig(paired_masking=True, itc=1.0, local=1.0,
                                                                hard_negatives=True, itm=0.0)])
def test_the_step_with_a_shorter_fusion_has_the_losses_and_gradients_of_the_whole_fusion(monkeypatch, tasks):
    model, batch = tiny(), random_batch()
    torch.manual_seed(7)
    total, logs, _ = pretrain_losses(model, batch, tasks)
    grads = gradients(model, total)
    forward = type(model.fusion).forward
    monkeypatch.setattr(type(model.fusion), "forward",
                        lambda self, *args, upto=None, first_only=None: forward(self, *args[:3]))
    torch.manual_seed(7)
    whole_total, whole_logs, _ = pretrain_losses(model, batch, tasks)
    whole_grads = gradients(model, whole_total)
    for name, value in whole_logs.items():
        assert torch.allclose(logs[name], value, atol=1e-6), name
    assert grads.keys() == whole_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, whole_grads[name], atol=1e-6), name


REUSE_PROBE = """
import ctypes, json, resource, sys, torch
libc = ctypes.CDLL(None)
if sys.argv[1] == "keep":
    from medvlp.training.trainer import keep_freed_memory
    if not keep_freed_memory():
        print("null"); sys.exit(0)
if not hasattr(libc, "mallinfo2"):
    print("null"); sys.exit(0)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
def step():  # what a step does to memory: blocks of many MiB, all freed at its end
    blocks = [torch.ones(6 * 2**20) for _ in range(6)]  # 24 MiB each
    during = libc.mallinfo2()
    del blocks
    return during
before = libc.mallinfo2()
during = step()
after = libc.mallinfo2()
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(json.dumps({"mapped": during.hblkhd - before.hblkhd, "trimmed": during.arena - after.arena,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}))
"""


def memory_of_steps(mode: str) -> dict | None:
    """What three steps of 144 MiB do to the allocator, in a fresh process: bytes of the first step's blocks the
    kernel mapped for them alone, bytes of heap given back after it, page faults of the third step."""
    done = subprocess.run([sys.executable, "-c", REUSE_PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_step_reuses_the_memory_the_last_step_freed_without_page_faults():
    """``build_trainer`` calls ``keep_freed_memory``: a step's blocks come from the heap, which keeps them when they
    are freed, so the next steps fault (almost) nothing: now and then one block lands above the heap's earlier
    top and faults its 6,144 pages in. glibc's default maps such blocks from the kernel and unmaps them at once.
    (How many pages the default faults at later steps depends on the process's history: 36,864 or almost none.)"""
    kept = memory_of_steps("keep")
    if kept is None:
        pytest.skip("the C library is not glibc (2.33 or later)")
    assert kept["mapped"] == 0 and kept["trimmed"] == 0
    assert kept["faults"] < 10_000  # 144 MiB is 36,864 pages of 4 KiB
    assert memory_of_steps("default")["mapped"] >= 144 * 2**20
