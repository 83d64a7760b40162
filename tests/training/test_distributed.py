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

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


def environment() -> dict[str, str]:
    """The environment of a medvlp subprocess: this checkout's package, one thread per process."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def launch(cwd: Path, arguments: list[str]) -> subprocess.Popen:
    """``medvlp pretrain ARGUMENTS`` on 2 DDP processes, in its own process group (the rank 1 that Lightning starts
    included), output collected."""
    command = [sys.executable, "-m", "medvlp", "pretrain", *arguments, "trainer.devices=2", "trainer.strategy=ddp"]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return subprocess.Popen(command, env={**environment(), **rendezvous}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def finished(proc: subprocess.Popen) -> str:
    """Wait for a launched run; its output, once it has ended well."""
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    return log


class Background:
    """The 2-process M3AE run that two tests compare with, started once and waited for by the first that needs it."""

    def __init__(self, root: Path):
        self.root, self.run = root, root / "m3ae-2"
        self.proc = launch(root, [*overrides(root, self.run.name, 4), "trainer.checkpoint_every=2"])

    @functools.cached_property
    def done(self) -> Path:
        finished(self.proc)
        return self.run


@pytest.fixture(scope="module")
def m3ae_two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    first = load_pretrain_config(None, overrides(root, "corpus", 8))
    ensure_corpus(Path(first.data.synthetic_dir), first.data.synthetic)  # once, before the runs share it
    background = Background(root)
    yield background
    if background.proc.poll() is None:
        os.killpg(background.proc.pid, signal.SIGKILL)


def test_two_ddp_processes_train_like_one_at_the_same_global_batch(m3ae_two_processes):
    root = m3ae_two_processes.root
    mpma = str(ROOT / "src" / "medvlp" / "configs" / "mpma-tiny.yaml")
    paired = ["tasks.paired_masking=true"]  # the paper's one pass (mpma-base's); M3AE's run covers the unpaired ones
    two = {"mpma": launch(root, ["--config", mpma, *overrides(root, "mpma-2", 4), *paired])}
    one = {method: pretrain(load_pretrain_config(path, overrides(root, f"{method}-1", 8) + extra))
           for method, path, extra in [("m3ae", None, []), ("mpma", mpma, paired)]}
    finished(two["mpma"])
    m3ae_two_processes.done
    for method in one:
        single = json.loads((one[method] / "metrics.json").read_text())
        double = json.loads((root / f"{method}-2" / "metrics.json").read_text())
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
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", port,
         str(Path(__file__).with_name("torchrun_worker.py")), str(tmp_path),
         *overrides(tmp_path, "run", batch), f"trainer.max_steps={steps}", f"data.tokenizer={tmp_path / 'tokenizer'}",
         "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp"],
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path) for node in range(2)]
    logs = [proc.communicate(timeout=300)[0].decode() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [log[-3000:] for log in logs]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [steps, steps]
    # rank r reads global batches r, r + 2, ...: disjoint, and together the first 2 * steps batches of the stream
    for rank, record in enumerate(ranks):
        assert record["keys"] == [k for b in range(rank, 2 * steps, 2) for k in range(b * batch, (b + 1) * batch)]
    assert ranks[0]["weights"] == ranks[1]["weights"]


def group_pids(group: int) -> list[int]:
    """The live processes of process group ``group`` (from ``/proc``; zombies left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if fields[0] != "Z" and int(fields[2]) == group:
            pids.append(int(stat.parent.name))
    return pids


def test_a_two_process_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(m3ae_two_processes):
    """Rank 0 of a 2-process run (the process the user started; Lightning started rank 1) gets SIGKILL once the
    step-2 checkpoint exists; the orphaned rank 1 does not linger, ``--resume`` on 2 processes again is not blocked by
    the killed rank 0's lock (a ``flock``, which the kernel dropped with it) and ends, at step 4, with the weights,
    optimiser state and metrics of the uninterrupted run, bit for bit: gloo adds the two ranks' gradients in the
    same order in every run, and each step's randomness comes from the step, not from what ran before."""
    from medvlp.training.checkpoint import LATEST, load_trainer_state, load_weights

    root = m3ae_two_processes.root
    run = root / "killed"
    arguments = [*overrides(root, run.name, 4), "trainer.checkpoint_every=2"]
    killed = launch(root, arguments)
    group: set[int] = set()
    while not (run / "checkpoints" / "step-000002").is_dir():  # renamed into place once complete
        assert killed.poll() is None, killed.communicate()[0].decode()[-3000:]
        group.update(group_pids(killed.pid))
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)  # what `kill -9 PID` of the medvlp command (rank 0) does
    try:
        assert killed.wait(60) == -signal.SIGKILL
        assert len(group) >= 2, group  # rank 0 and the rank 1 it started (and any short-lived helper process)
        for _ in range(600):  # rank 1, orphaned, stops itself on gloo's lost connection: it must not linger
            if not group_pids(killed.pid):
                break
            time.sleep(0.1)
        assert not group_pids(killed.pid), "rank 1 outlived the killed rank 0 by a minute"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # whatever is left of the run, should the test fail
        output = killed.communicate()[0].decode()
    stopped_at = int((run / "checkpoints" / LATEST).read_text().strip().removeprefix("step-"))
    assert stopped_at < 4 and not (run / "metrics.json").exists(), output[-3000:]  # killed mid-run
    assert (run / ".lock").read_text().strip() == str(killed.pid)  # the lock file names the dead rank 0

    log = finished(launch(root, ["--resume", *arguments]))
    assert f"resuming {run} from step {stopped_at} of 4" in log
    whole, resumed = (folder / "checkpoints" / "step-000004" for folder in (m3ae_two_processes.done, run))
    a, b = load_weights(whole / "model.safetensors"), load_weights(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    sa, sb = load_trainer_state(whole), load_trainer_state(resumed)
    assert all(sa[name] == sb[name] for name in ("global_step", "medvlp", "lr_schedulers"))
    for x, y in zip(sa["optimizer_states"], sb["optimizer_states"], strict=True):
        assert x["state"].keys() == y["state"].keys()
        assert all(torch.equal(x["state"][i][k], y["state"][i][k]) for i in x["state"] for k in x["state"][i])
    assert (whole.parents[1] / "metrics.json").read_text() == (run / "metrics.json").read_text()
