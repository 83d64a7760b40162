"""Multi-process pre-training on the CPU: two DDP processes (gloo) train as one process does at the same global
batch, for M3AE and for MPMA (whose global alignment gathers embeddings across ranks).

Rank ``r`` reads global batches ``r, r + 2, ...`` of the sample stream (``StreamSampler``), so two ranks at
``data.batch_size=4`` read, step by step, exactly the samples of one process at ``data.batch_size=8``, and DDP
averages their gradients. The runs are not bit-equal: each rank draws its image masks and ITM swaps for its own
half of the batch, the collator seeds text masking per rank batch, and MLM averages over each rank's masked
words before the ranks are averaged. So the check is a tolerance on the validation losses after 4 steps
(validation reads the same held-out batch, with the same masks, in both runs): 2% for MLM, MIM and ITC, 10% for
ITM, whose 4-step value depends most on which pairs were swapped. MPMA's local alignment is left out: it
contrasts each rank's own batch (see ``objectives.local_alignment_loss``), so its value depends on the batch per
rank by design. About a minute on a shared 2-core machine: both two-process runs go at once, and the
one-process runs in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medvlp.data.synthetic import ensure_corpus
from medvlp.training.pretrain import load_pretrain_config, pretrain

ROOT = Path(__file__).resolve().parents[2]
CORPUS = [f"data.synthetic.{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
          for split, n in (("train", 48 if family == "pretrain" else 8), ("val", 8), ("test", 4))]
TOLERANCE = {"mlm_loss": 0.02, "mim_loss": 0.02, "itc_loss": 0.02, "itm_loss": 0.10}


def overrides(tmp_path: Path, run: str, batch_size: int) -> list[str]:
    return [f"run_dir={tmp_path / run}", f"data.synthetic_dir={tmp_path / 'data'}", f"data.batch_size={batch_size}",
            "data.num_workers=0", "trainer.max_steps=4", "trainer.val_every=4", "trainer.val_batches=1",
            "trainer.checkpoint_every=4", "trainer.pictures=0", "trainer.progress_bar=false", "data.vocab_size=400",
            "data.synthetic.workers=1", "trainer.accelerator=cpu", *CORPUS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_train_like_one_at_the_same_global_batch(tmp_path):
    methods = {"m3ae": None, "mpma": str(ROOT / "src" / "medvlp" / "configs" / "mpma-tiny.yaml")}
    first = load_pretrain_config(None, overrides(tmp_path, "corpus", 8))
    ensure_corpus(Path(first.data.synthetic_dir), first.data.synthetic)  # once, before the runs share it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    two = {}
    for method, path in methods.items():
        command = [sys.executable, "-m", "medvlp", "pretrain", *(["--config", path] if path else []),
                   *overrides(tmp_path, f"{method}-2", 4), "trainer.devices=2", "trainer.strategy=ddp"]
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        two[method] = subprocess.Popen(command, env={**env, **rendezvous},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    one = {method: pretrain(load_pretrain_config(path, overrides(tmp_path, f"{method}-1", 8)))
           for method, path in methods.items()}
    for method, proc in two.items():
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log[-3000:]
        single = json.loads((one[method] / "metrics.json").read_text())
        double = json.loads((tmp_path / f"{method}-2" / "metrics.json").read_text())
        assert single["step"] == double["step"] == 4
        compared = [name for name in TOLERANCE if f"val/{name}" in single]
        assert len(compared) == (4 if method == "mpma" else 3)
        for name in compared:
            assert double[f"val/{name}"] == pytest.approx(single[f"val/{name}"], rel=TOLERANCE[name]), (method, name)


def test_two_nodes_under_torchrun_read_disjoint_samples_and_end_with_the_same_weights(tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice on 127.0.0.1, as two nodes would start it: every rank reads
    its own global batches of the sample stream (together: all of them, once) and both end with the same weights.
    The tokenizer is trained beforehand and named (``data.tokenizer``), as a multi-node run should do, so that the
    ranks, which start at once, do not each train one into the shared run folder."""
    from medvlp.data.tokenizer import train_tokenizer

    batch, steps = 4, 3
    config = load_pretrain_config(None, overrides(tmp_path, "corpus", batch))
    corpus = ensure_corpus(Path(config.data.synthetic_dir), config.data.synthetic)
    from medvlp.data.records import Records

    captions = [c for value in Records(corpus / "pretrain", "train").column("captions") for c in value]
    train_tokenizer(captions, tmp_path / "tokenizer", vocab_size=400)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", port,
         str(Path(__file__).with_name("torchrun_worker.py")), str(tmp_path),
         *overrides(tmp_path, "run", batch), f"trainer.max_steps={steps}", f"data.tokenizer={tmp_path / 'tokenizer'}",
         "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path) for node in range(2)]
    logs = [proc.communicate(timeout=300)[0].decode() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [log[-3000:] for log in logs]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [steps, steps]
    # rank r reads global batches r, r + 2, ...: disjoint, and together the first 2 * steps batches of the stream
    for rank, record in enumerate(ranks):
        assert record["keys"] == [k for b in range(rank, 2 * steps, 2) for k in range(b * batch, (b + 1) * batch)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
