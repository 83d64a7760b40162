"""Pre-training: the run config, the objectives of one step, the Lightning module, and ``pretrain()``.

One step runs the objectives the config switches on, each a pure function from ``medvlp.objectives``:

- M3AE (``paired_masking: false``): three passes, as the reference code does: masked text + whole image
  (MLM), masked image + whole text (MIM), and the ITM pass on a batch with half its images swapped.
- MPMA (``paired_masking: true``): masked image and masked text in ONE pass, MLM and MIM both computed from it,
  plus the ITM pass.

Every step's randomness (masks, swaps, dropout) is seeded from ``(seed, step)`` and every sample's (crop,
caption choice, word masking) from its position in the sample stream, so a resumed run repeats exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medvlp.config import load_config, peek, save_config
from medvlp.data.collate import Collator
from medvlp.data.loader import Concat, FamilyDataset, make_loader
from medvlp.data.records import read_manifest
from medvlp.data.sampler import StreamSampler
from medvlp.data.synthetic import SynthConfig, ensure_corpus
from medvlp.errors import ConfigError, DataError, MedvlpError
from medvlp.log import quiet_lightning
from medvlp.models.config import ModelConfig, model_config
from medvlp.models.model import MedVLP, build_model
from medvlp.objectives import itm_batch, itm_loss, mim_loss, mlm_loss
from medvlp.training.checkpoint import Checkpointer, SafeCheckpointIO, resolve_checkpoint
from medvlp.training.optim import OptimConfig, build_optimizer, build_schedule

log = logging.getLogger(__name__)


# -- config ------------------------------------------------------------------------------------------------------
@dataclass
class TasksConfig:
    """Pre-training objectives: a weight each (0 switches one off) and how the masked passes are run."""

    mlm: float = 1.0
    mim: float = 1.0
    itm: float = 1.0
    paired_masking: bool = False  # MPMA: one pass with masked image and masked text; M3AE: separate passes

    def validate(self) -> None:
        weights = {"mlm": self.mlm, "mim": self.mim, "itm": self.itm}
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ConfigError(f"tasks: weights must be >= 0 and at least one > 0, got {weights}")


@dataclass
class DataConfig:
    """Where the pairs come from. ``train`` lists prepared pre-training datasets (several are read as one,
    e.g. ROCO + MedICaT); empty means the built-in synthetic corpus, generated into ``synthetic_dir``."""

    train: list[str] = field(default_factory=list)
    synthetic_dir: str = "runs/data/synthetic"
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    tokenizer: str | None = None  # a tokenizer directory or hub id; None trains a BPE on the captions
    vocab_size: int = 4096  # of the trained tokenizer
    max_text_len: int = 64
    batch_size: int = 32
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # of training samples whose image cannot be read, before the run stops


@dataclass
class TrainerConfig:
    max_steps: int = 500
    accumulate: int = 1
    precision: str = "auto"  # bf16-mixed where bf16 matrix work is fast (GPU, CPU with AMX), else 32-true
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"  # "ddp", "fsdp", ... from Lightning
    num_nodes: int = 1
    seed: int = 0
    val_every: int = 100  # steps between validations
    val_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    pictures: int = 4  # held-out samples in each validation picture
    progress_bar: bool = True


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    model_size: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: model_config("tiny"))
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> None:
        self.model.validate()
        self.tasks.validate()
        self.optim.validate()
        t = self.trainer
        if t.max_steps <= 0 or t.accumulate <= 0 or self.data.batch_size <= 0:
            raise ConfigError("trainer.max_steps, trainer.accumulate and data.batch_size must be positive")
        if self.data.max_text_len + 2 > self.model.text.max_position_embeddings:
            raise ConfigError(f"data.max_text_len={self.data.max_text_len} does not fit the text encoder's "
                              f"{self.model.text.max_position_embeddings} positions")


def load_pretrain_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults of the named model size (``model_size``, read first), then the file, then the overrides."""
    size = peek(path, overrides, "model_size", "tiny")
    if size not in SIZE_OPTIM:
        raise ConfigError(f"unknown model size {size!r}; known sizes: {', '.join(sorted(SIZE_OPTIM))}")
    base = PretrainConfig(model_size=size, model=model_config(size), optim=SIZE_OPTIM[size])
    return load_config(PretrainConfig, path, overrides, base=base)


# A tiny model from scratch learns at a higher rate than the papers' pre-trained encoders: at 1e-4 its ITM
# accuracy was still at chance after 350 demo steps; at 5e-4 it left chance by step 400.
SIZE_OPTIM = {"tiny": OptimConfig(lr=5e-4, warmup=0.05), "base": OptimConfig()}


# -- one step ----------------------------------------------------------------------------------------------------
def pretrain_losses(model: MedVLP, batch: dict[str, Any], tasks: TasksConfig) -> tuple[torch.Tensor, dict, dict]:
    """The weighted loss of one batch, its parts and metrics, and the outputs (for pictures)."""
    parts: dict[str, torch.Tensor] = {}
    outputs: dict[str, Any] = {}
    if tasks.paired_masking and (tasks.mlm or tasks.mim):
        out = model(batch, mask_image=bool(tasks.mim), mask_text=bool(tasks.mlm))
        outputs["mlm"] = outputs["mim"] = out
    else:
        if tasks.mlm:
            outputs["mlm"] = model(batch, mask_text=True)
        if tasks.mim:
            outputs["mim"] = model(batch, mask_image=True)
    metrics: dict[str, torch.Tensor] = {}
    if tasks.mlm:
        parts["mlm"], m = mlm_loss(outputs["mlm"], batch)
        metrics["mlm_acc"] = m["accuracy"]
    if tasks.mim:
        parts["mim"], _ = mim_loss(outputs["mim"], batch, norm_pix_loss=model.cfg.norm_pix_loss)
    if tasks.itm:
        swapped = itm_batch(batch)
        outputs["itm"] = model(swapped, itm=True)
        parts["itm"], m = itm_loss(outputs["itm"], swapped)
        metrics["itm_acc"] = m["accuracy"]
    weights = {"mlm": tasks.mlm, "mim": tasks.mim, "itm": tasks.itm}
    total = sum(weights[name] * loss for name, loss in parts.items())
    return total, {**{f"{k}_loss": v.detach() for k, v in parts.items()}, **metrics}, outputs


class TrainingDiverged(MedvlpError):
    pass


class PretrainModule(L.LightningModule):
    def __init__(self, config: PretrainConfig, model: MedVLP, tokenizer: Any, train_data, val_data):
        super().__init__()
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.batches_seen = 0  # training batches consumed, for resuming the sample stream
        self.samples = self.bad_samples = 0
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
        for name in ("mlm_loss", "mim_loss", "itm_loss"):
            if name in logs:
                self.log(name.split("_")[0], logs[name], prog_bar=True, batch_size=batch["n"], logger=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        torch.manual_seed(self.config.trainer.seed + 7919 * batch_idx)  # the same masks at every validation
        loss, logs, outputs = pretrain_losses(self.model, batch, self.config.tasks)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=batch["n"], sync_dist=True)
        self.log("val/loss", loss, batch_size=batch["n"], sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.config.trainer.pictures:
            from medvlp.training.pictures import save_pretrain_picture

            save_pretrain_picture(self.run_dir / "pictures" / f"step-{self.global_step:06d}.png", self.model,
                                  batch, outputs, self.tokenizer, self.config.trainer.pictures)

    # state for resuming the stream
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medvlp"] = {"batches_seen": self.batches_seen, "samples": self.samples,
                                "bad_samples": self.bad_samples}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medvlp", {})
        self.batches_seen = state.get("batches_seen", 0)
        self.samples, self.bad_samples = state.get("samples", 0), state.get("bad_samples", 0)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.config.optim)
        schedule = build_schedule(optimizer, self.config.trainer.max_steps, self.config.optim.warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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
    import dataclasses

    if model.text.pretrained:
        return model
    text = dataclasses.replace(model.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return dataclasses.replace(model, text=text)


def pretrain(config: PretrainConfig, *, resume: bool = False, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Pre-train a model as configured; returns the run folder (config, tokenizer, checkpoints, logs, pictures)."""
    run_dir = Path(config.run_dir)
    checkpoint = None
    if resume:
        checkpoint = resolve_checkpoint(run_dir)
    elif (run_dir / "checkpoints").exists():
        raise MedvlpError(f"{run_dir} already holds a run; continue it with --resume or choose another run_dir")
    L.seed_everything(config.trainer.seed, verbose=False)
    roots, _ = training_data(config)
    tokenizer = prepare_tokenizer(config, roots)
    config.model = with_tokenizer(config.model, tokenizer)
    config.validate()
    save_config(config, run_dir / "config.yaml")

    size = config.model.image_size
    train = Concat([FamilyDataset(r, "train", size, train=True, seed=config.trainer.seed) for r in roots])
    val = Concat([FamilyDataset(r, _val_split(r), size, train=False) for r in roots])
    module = PretrainModule(config, build_model(config.model), tokenizer, train, val)
    t = config.trainer
    # logs/version_N per launch: a resumed run adds a version instead of overwriting the first one's logs
    csv = L.pytorch.loggers.CSVLogger(run_dir, name="logs")
    loggers = [csv, L.pytorch.loggers.TensorBoardLogger(run_dir, name="logs", version=csv.version,
                                                        default_hp_metric=False)]
    quiet_lightning()
    trainer = L.Trainer(
        default_root_dir=run_dir, max_steps=t.max_steps, max_epochs=1, accelerator=t.accelerator,
        devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, precision=resolve_precision(t.precision),
        accumulate_grad_batches=t.accumulate, gradient_clip_val=config.optim.grad_clip or None,
        val_check_interval=t.val_every * t.accumulate, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=min(t.log_every, t.max_steps), logger=loggers, enable_checkpointing=False,
        callbacks=[Checkpointer(run_dir / "checkpoints", t.checkpoint_every, t.keep_checkpoints), *callbacks],
        plugins=[SafeCheckpointIO()], use_distributed_sampler=False, enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=str(checkpoint) if checkpoint else None, weights_only=True)
    return run_dir


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 autocast where bf16 matrix work is fast (a CUDA GPU with bf16, a CPU with AMX), else fp32.
    On a CPU without AMX (AVX2 only) bf16 matmuls are emulated and a tiny step ran 10x slower than in fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16-mixed" if "amx_bf16" in flags else "32-true"


def _val_split(root: Path) -> str:
    splits = read_manifest(root)["splits"]
    for split in ("val", "validation", "test"):
        if split in splits and splits[split]["rows"]:
            return split
    raise DataError(f"{root}: no val or test split to validate on; prepare it with val_fraction=0.05")

