"""Pre-training: the run (``pretrain()``) and its Lightning module; the run config is ``training.config``.

One step is the recipe of ``objectives.recipes.pretrain_losses`` (M3AE's three passes or MPMA's paired pass, and
every switch of ``tasks``; its module docstring explains them); this module feeds it batches, logs its figures,
validates, draws pictures and writes checkpoints.

Every step's randomness (masks, swaps, negatives, dropout) is seeded from ``(seed, step)`` and every sample's
(crop, caption choice, word masking) from its position in the sample stream, so a resumed run repeats exactly
what an uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medvlp.config import save_config
from medvlp.constants import MODEL_CONFIG
from medvlp.data.collate import Collator
from medvlp.data.loader import Concat, FamilyDataset, make_loader
from medvlp.data.records import read_manifest
from medvlp.data.sampler import StreamSampler
from medvlp.data.synthetic import ensure_corpus
from medvlp.errors import DataError, MedvlpError
from medvlp.integrity import RunLock
from medvlp.models.config import ModelConfig
from medvlp.models.model import MedVLP, build_model
from medvlp.objectives.recipes import matching_accuracy, pretrain_losses
from medvlp.training.checkpoint import Checkpointer, checkpoint_step, resume_point
from medvlp.training.config import SIZE_OPTIM, DataConfig, PretrainConfig, TasksConfig, load_pretrain_config  # noqa: F401 (re-exported)
from medvlp.training.optim import lightning_optimization
from medvlp.training.trainer import build_trainer

log = logging.getLogger(__name__)


class TrainingDiverged(MedvlpError):
    pass


class PretrainModule(L.LightningModule):
    def __init__(self, config: PretrainConfig, model: MedVLP, tokenizer: Any, train_data, val_data):
        super().__init__()
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.batches_seen = 0  # training batches consumed, for resuming the sample stream
        self.samples = self.bad_samples = 0
        self.last_validation: dict[str, float] = {}  # the latest validation's figures, for metrics.json
        self.run_dir = Path(config.run_dir)

    # data
    def _collator(self, mlm: bool) -> Collator:
        d = self.config.data
        return Collator(self.tokenizer, max_length=d.max_text_len,
                        mlm_probability=self.config.model.text_mask_ratio if mlm else 0.0,
                        seed=self.config.trainer.seed)

    def train_dataloader(self):
        t, d = self.config.trainer, self.config.data
        sampler = StreamSampler(len(self.train_data), d.batch_size, t.max_steps * t.accumulate, seed=t.seed,
                                rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        sampler.start_batch = self.batches_seen
        return make_loader(self.train_data, self._collator(True), batch_size=d.batch_size, sampler=sampler,
                           num_workers=d.num_workers)

    def val_dataloader(self):
        d, t = self.config.data, self.config.trainer
        rows = min(len(self.val_data), t.val_batches * d.batch_size)
        subset = torch.utils.data.Subset(self.val_data, range(rows))
        return make_loader(subset, self._collator(True), batch_size=d.batch_size, num_workers=d.num_workers)

    # steps
    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        torch.manual_seed(self.config.trainer.seed * 1_000_003 + self.batches_seen)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.batches_seen += 1
        self.samples += batch["n"] + batch["n_bad"]
        self.bad_samples += batch["n_bad"]
        if self.bad_samples > self.config.data.max_bad_fraction * max(self.samples, 100):
            raise DataError(f"{self.bad_samples} of {self.samples} training samples could not be read, more than "
                            f"data.max_bad_fraction={self.config.data.max_bad_fraction}; check the data "
                            "(the lines above name them) or prepare it again")
        if batch["n"] == 0:
            return None
        loss, logs, _ = pretrain_losses(self.model, batch, self.config.tasks)
        if not torch.isfinite(loss):
            last = self.run_dir / "checkpoints"
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items())
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.global_step} ({parts}); training stopped, the last good "
                f"checkpoint is in {last}; lower optim.lr or check the data")
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, batch_size=batch["n"])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch["n"])
        for name in ("mlm_loss", "mim_loss", "itm_loss", "itc_loss", "local_loss"):
            if name in logs:
                self.log(name.split("_")[0], logs[name], prog_bar=True, batch_size=batch["n"], logger=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        torch.manual_seed(self.config.trainer.seed + 7919 * batch_idx)  # the same masks at every validation
        tasks = self.config.tasks
        loss, logs, outputs = pretrain_losses(self.model, batch, tasks)
        if tasks.reuse_itm and "itm_acc" in logs:  # report ITM as M3AE does, so that every config compares
            logs["itm_objective_acc"] = logs.pop("itm_acc")
            logs["itm_acc"] = matching_accuracy(self.model, batch)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=batch["n"], sync_dist=True)
        self.log("val/loss", loss, batch_size=batch["n"], sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.config.trainer.pictures:
            from medvlp.training.pictures import save_pretrain_picture

            save_pretrain_picture(self.run_dir / "pictures" / f"step-{self.global_step:06d}.png", self.model,
                                  batch, outputs, self.tokenizer, self.config.trainer.pictures)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validation = {k: round(v.item(), 4) for k, v in self.trainer.callback_metrics.items()
                                    if k.startswith("val/")}

    # state for resuming the stream (and the figures of the latest validation, which a resumed run reports)
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medvlp"] = {"batches_seen": self.batches_seen, "samples": self.samples,
                                "bad_samples": self.bad_samples, "last_validation": self.last_validation}
        checkpoint[MODEL_CONFIG] = self.model.cfg  # written as the checkpoint's model.yaml (not into trainer.pt)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medvlp", {})
        self.batches_seen = state.get("batches_seen", 0)
        self.samples, self.bad_samples = state.get("samples", 0), state.get("bad_samples", 0)
        self.last_validation = dict(state.get("last_validation", {}))

    def configure_optimizers(self):
        return lightning_optimization(self.model, self.config.optim, self.config.trainer.max_steps,
                                      str(self.trainer.precision))


# -- the run -----------------------------------------------------------------------------------------------------
def training_data(config: PretrainConfig) -> tuple[list[Path], Any]:
    """The prepared datasets to train on (generating the synthetic corpus when none is named)."""
    d = config.data
    if d.train:
        roots = [Path(p) for p in d.train]
        for root in roots:
            family = read_manifest(root)["family"]
            if family not in ("pretrain", "retrieval"):
                raise DataError(f"data.train: {root} holds {family} data; pre-training needs image-caption pairs")
        return roots, None
    corpus = ensure_corpus(Path(d.synthetic_dir), d.synthetic)
    return [corpus / "pretrain"], corpus


def prepare_tokenizer(config: PretrainConfig, roots: Sequence[Path]):
    """The run's tokenizer: the configured one, the run's own (when resuming), or a BPE trained now."""
    from medvlp.data.records import Records
    from medvlp.data.tokenizer import load_tokenizer, train_tokenizer

    own = Path(config.run_dir) / "tokenizer"
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    if (own / "tokenizer.json").is_file():
        return load_tokenizer(own)

    def texts():
        for root in roots:
            records = Records(root, "train")
            column = "captions" if records.family == "pretrain" else "caption"
            for value in records.column(column):
                yield from (value if isinstance(value, list) else [value])

    return train_tokenizer(texts(), own, vocab_size=config.data.vocab_size)


def with_tokenizer(model: ModelConfig, tokenizer: Any) -> ModelConfig:
    """The model config with the text vocabulary of the tokenizer (when the text encoder is built here)."""
    if model.text.pretrained:
        return model
    text = dataclasses.replace(model.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return dataclasses.replace(model, text=text)


def compile_parts(model: MedVLP) -> None:
    """``torch.compile`` the encoders, the fusion and the pixel decoder in place (their weights keep their names).
    Off by default: on a 2-core CPU the first step of ``m3ae-tiny`` compiled for 4 minutes and the later steps
    ran slower than without compiling (docs/performance.md)."""
    for part in (model.vision, model.text, model.fusion, model.mim_decoder):
        part.compile()


def pretrain(config: PretrainConfig, *, resume: bool = False, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Pre-train a model as configured.

    Args:
        config: the run's config (``training.config.load_pretrain_config``); ``config.model`` gets the trained
            tokenizer's vocabulary.
        resume: continue the run in ``config.run_dir`` from its latest checkpoint (exactly as if it had not
            stopped); without it a folder that already holds a run is refused.
        callbacks: more Lightning callbacks for the trainer.

    Returns:
        The run folder: ``config.yaml``, ``tokenizer/``, ``checkpoints/step-*`` (weights, ``model.yaml``, trainer
        state), ``metrics.json`` (the last validation), ``logs/`` and ``pictures/``.
    """
    try:
        return _pretrain(config, resume, callbacks)
    finally:
        gc.collect()  # see finetune.collect_loaders: the next run's workers must not inherit this run's loaders


def _pretrain(config: PretrainConfig, resume: bool, callbacks: Sequence[L.Callback]) -> Path:
    run_dir = Path(config.run_dir)
    with RunLock(run_dir):
        checkpoint = None
        if resume and (checkpoint := resume_point(run_dir)) is not None:
            step = checkpoint_step(checkpoint)
            if step >= config.trainer.max_steps:
                log.info("%s finished at step %d (trainer.max_steps=%d): nothing to do; raise trainer.max_steps to "
                         "train further", run_dir, step, config.trainer.max_steps)
                return run_dir
            log.info("resuming %s from step %d of %d", run_dir, step, config.trainer.max_steps)
        elif not resume and (run_dir / "checkpoints").exists():
            raise MedvlpError(f"{run_dir} already holds a run; continue it with --resume or choose another run_dir")
        L.seed_everything(config.trainer.seed, verbose=False)
        roots, _ = training_data(config)
        tokenizer = prepare_tokenizer(config, roots)
        config.model = with_tokenizer(config.model, tokenizer)
        config.validate()
        save_config(config, run_dir / "config.yaml")

        size = config.model.image_size
        train = Concat([FamilyDataset(r, "train", size, train=True, seed=config.trainer.seed,
                                     crop_scale=tuple(config.data.crop_scale)) for r in roots])
        val = Concat([FamilyDataset(r, _val_split(r), size, train=False) for r in roots])
        module = PretrainModule(config, build_model(config.model), tokenizer, train, val)
        if config.trainer.compile:
            compile_parts(module.model)
        t = config.trainer
        callbacks = [Checkpointer(run_dir / "checkpoints", t.checkpoint_every, t.keep_checkpoints), *callbacks]
        trainer = build_trainer(run_dir, t, grad_clip=config.optim.grad_clip, callbacks=callbacks, validate=True,
                                params=sum(p.numel() for p in module.model.parameters()))
        trainer.fit(module, ckpt_path=str(checkpoint) if checkpoint else None, weights_only=True)
        if trainer.is_global_zero:
            metrics = {"step": trainer.global_step, **module.last_validation}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        return run_dir


def _val_split(root: Path) -> str:
    splits = read_manifest(root)["splits"]
    for split in ("val", "validation", "test"):
        if split in splits and splits[split]["rows"]:
            return split
    raise DataError(f"{root}: no val or test split to validate on; prepare it with val_fraction=0.05")

