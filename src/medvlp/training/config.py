"""The configs of a training run, typed and checked, in a module that imports neither torch nor Lightning: a
command reads and checks its whole config (a mistyped key, a value out of range) in a fraction of a second,
before anything heavy is imported or loaded. ``pretrain``, ``finetune``, ``trainer``, ``optim`` and
``downstream`` re-export the classes they use from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medvlp.config import at_least, check, load_config, not_empty, one_of, within
from medvlp.data.synth_config import SynthConfig
from medvlp.errors import ConfigError
from medvlp.models.config import ModelConfig, model_config, model_size_of, model_sizes, size_spec

TASK_NAMES = ("vqa", "classification", "retrieval")  # the downstream tasks (training/downstream.py: TASKS)


def check_crop_scale(scale: tuple[float, float], key: str) -> None:
    """One line for a crop area range that is not ``0 < low <= high <= 1``."""
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ConfigError(f"{key} = [{low}, {high}]: need 0 < low <= high <= 1 (fractions of the area)")


PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16",
              "64")


def _devices_ok(value: str) -> bool:
    """Lightning's ``devices``: auto, a count (-1: all), or a comma-separated list of device indices."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if value == "auto" or (len(parts) == 1 and parts[0] == "-1"):
        return True
    return bool(parts) and all(p.isdigit() for p in parts) and ("," in str(value) or int(parts[0]) >= 1)


@dataclass
class TrainerConfig:
    max_steps: int = field(default=500, metadata=at_least(1))
    accumulate: int = field(default=1, metadata=at_least(1, "batches per optimiser step"))
    # bf16-mixed where it pays (see trainer.choose_precision), else 32-true
    precision: str = field(default="auto", metadata=one_of(*PRECISIONS))
    accelerator: str = "auto"
    devices: str = field(default="auto", metadata=check(
        _devices_ok, "must be auto, a device count of at least 1 (-1: all) or device indices such as 0,1"))
    strategy: str = "auto"  # "ddp", "fsdp", ... from Lightning
    num_nodes: int = field(default=1, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    val_every: int = field(default=100, metadata=at_least(1, "steps between validations"))
    # pre-training validates on this many batches; fine-tuning on the whole split
    val_batches: int = field(default=4, metadata=at_least(1))
    checkpoint_every: int = field(default=100, metadata=at_least(0, "steps between checkpoints; 0: only at the end"))
    keep_checkpoints: int = field(default=2, metadata=at_least(1, "the newest checkpoints kept"))
    log_every: int = field(default=10, metadata=at_least(1))
    pictures: int = field(default=4, metadata=at_least(0))  # held-out samples in each pre-training validation picture
    progress_bar: bool = True
    compile: bool = False  # torch.compile the encoders, fusion and pixel decoder (see docs/performance.md)


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata=check(  # encoders' learning rate
        lambda v: 0 < v < 1, "must be above 0 and below 1 (AdamW trains at 1e-6 to 1e-2)"))
    head_lr_mult: float = 5.0  # fusion module and heads
    classifier_lr_mult: float | None = None  # the downstream classifier, new when fine-tuning (None: head_lr_mult)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1  # fraction of the steps (or a step count when >= 1)
    grad_clip: float = 1.0  # 0 turns clipping off

    def validate(self) -> None:
        if self.lr <= 0 or self.head_lr_mult <= 0 or (self.classifier_lr_mult or 1) <= 0:
            raise ConfigError(f"optim.lr={self.lr}, optim.head_lr_mult={self.head_lr_mult}, optim.classifier_lr_mult="
                              f"{self.classifier_lr_mult}: all must be > 0")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup, optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass
class RetrievalConfig:
    """Retrieval fine-tuning and evaluation."""

    negatives: int = 3  # hard negatives per true pair, each way (images for its text, texts for its image)
    itc: float = 1.0  # weight of the global contrastive loss beside the ITM ranking loss
    eval_mode: str = "two-stage"  # "two-stage" | "exhaustive" | "zero-shot" (see evaluation/retrieval.py)
    rerank_k: int = 16  # candidates per query that two-stage evaluation re-ranks with the ITM score
    eval_batch_size: int = 256  # image-text pairs per fusion pass in evaluation


@dataclass
class TasksConfig:
    """Pre-training objectives: a weight each (0 switches one off) and how the passes are run.

    M3AE is ``mlm, mim, itm`` with separate passes; MPMA adds ``itc`` (global alignment) and ``local`` (local
    alignment), ``paired_masking`` and ``hard_negatives``. Every switch works on its own, for ablations.
    """

    mlm: float = 1.0
    mim: float = 1.0
    itm: float = 1.0
    itc: float = 0.0  # global image-text contrastive alignment (MPMA's GLA, global part)
    local: float = 0.0  # word-to-patch alignment (MPMA's GLA, local part)
    paired_masking: bool = False  # MPMA: one pass with masked image and masked text; M3AE: separate passes
    hard_negatives: bool = False  # ITM negatives drawn by similarity instead of uniformly
    align_whole_image: bool = False  # alignment reads a second, unmasked vision pass (see the module docstring)

    def weights(self) -> dict[str, float]:
        return {"mlm": self.mlm, "mim": self.mim, "itm": self.itm, "itc": self.itc, "local": self.local}

    @property
    def align(self) -> bool:
        """Whether the pair pass needs the alignment embeddings (losses, or similarities for hard negatives)."""
        return bool(self.itc or self.local or (self.itm and self.hard_negatives))

    @property
    def reuse_itm(self) -> bool:
        """ITM from the pair pass's encoder states (positives + one negative per text) instead of M3AE's own pass
        on a batch with half its images swapped."""
        return bool(self.itm and (self.paired_masking or self.hard_negatives))

    def validate(self) -> None:
        weights = self.weights()
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ConfigError(f"tasks: weights must be >= 0 and at least one > 0, got {weights}")


@dataclass
class DataConfig:
    """Where the pairs come from. ``train`` lists prepared pre-training datasets (several are read as one,
    e.g. ROCO + MedICaT); empty means the built-in synthetic corpus, generated into ``synthetic_dir``."""

    train: list[str] = field(default_factory=list)
    synthetic_dir: str = field(default="runs/data/synthetic", metadata=not_empty("where the synthetic corpus goes"))
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    tokenizer: str | None = None  # a tokenizer directory or hub id; None trains a BPE on the captions
    # of the trained tokenizer
    vocab_size: int = field(default=4096, metadata=at_least(261, "256 bytes + 5 special tokens"))
    max_text_len: int = field(default=64, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))
    num_workers: int = field(default=2, metadata=at_least(0, "0 reads in the training process"))
    # of training samples whose image cannot be read, before the run stops
    max_bad_fraction: float = field(default=0.01, metadata=within(0, 1, "a fraction of the samples"))
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area range of the random resized crops


@dataclass
class PretrainConfig:
    run_dir: str = field(default="runs/pretrain", metadata=not_empty("the run folder"))
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
        check_crop_scale(self.data.crop_scale, "data.crop_scale")
        if self.data.max_text_len + 2 > self.model.text.max_position_embeddings:
            raise ConfigError(f"data.max_text_len={self.data.max_text_len} does not fit the text encoder's "
                              f"{self.model.text.max_position_embeddings} positions")


def load_pretrain_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Defaults of the named model size (``model_size``, read first), then the file, then the overrides."""
    size = model_size_of(path, overrides)
    base = PretrainConfig(model_size=size, model=model_config(size), optim=SIZE_OPTIM[size])
    return load_config(PretrainConfig, path, overrides, base=base)


# Each named size's pre-training rate and warm-up, and its fine-tuning image size (models/sizes/NAME.yaml).
SIZE_OPTIM = {size: OptimConfig(**size_spec(size)["pretrain_optim"]) for size in model_sizes()}
FINETUNE_IMAGE_SIZE = {size: size_spec(size)["finetune_image_size"] for size in model_sizes()}


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``init`` names a pre-training run (or a fine-tuned run of the same task and classes);
    ``null`` trains from scratch: the ``model_size`` model, with ``model.vision.pretrained`` /
    ``model.text.pretrained`` encoders when set (the baseline without medical pre-training)."""

    task: str = "vqa"  # vqa | classification | retrieval
    data: str | None = None  # a prepared dataset of the task's family; null: the synthetic corpus's
    init: str | None = None
    run_dir: str = field(default="runs/finetune", metadata=not_empty("the run folder"))
    model_size: str = "tiny"
    model: ModelConfig = field(default_factory=lambda: model_config("tiny"))  # used when init is null
    image_size: int | None = None  # fine-tuning image size; null: 80 for tiny, 384 for base
    tokenizer: str | None = None  # null: init's tokenizer, else a BPE trained on the training texts
    vocab_size: int = field(default=4096, metadata=at_least(261, "256 bytes + 5 special tokens"))
    synthetic_dir: str = field(default="runs/data/synthetic", metadata=not_empty("where the synthetic corpus goes"))
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    label_field: str = "label"  # the record field a classification task learns (MELINDA: i_meth, p_meth, ...)
    val_fraction: float = 0.1  # of the training images held out for validation when the data has no val split
    # which split picks the best checkpoint: "val" (its own, or held out from train), or "test" to reproduce the
    # reference M3AE protocol on VQA-RAD, whose published valset.json is a copy of testset.json (selection on test)
    select_on: Literal["val", "test"] = "val"
    max_text_len: int = field(default=64, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))
    num_workers: int = field(default=2, metadata=at_least(0, "0 reads in the training process"))
    crop_scale: tuple[float, float] = (0.9, 1.0)  # training crops: mild, a question may ask about the edge
    classes: list[str] = field(default_factory=list)  # the classifier's classes, filled from the data
    # how VQA answers of the data meet the classes: as stored ("medvlp"), or each through the reference M3AE's
    # normalisation ("m3ae": a converted M3AE run, whose classes are the reference's normalised answers)
    answer_normalization: Literal["medvlp", "m3ae"] = "medvlp"
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, classifier_lr_mult=10.0, warmup=0.1))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=300, val_every=100))

    @property
    def resolved_image_size(self) -> int:
        """``image_size``, or the model size's fine-tuning default when it is null."""
        return self.image_size or FINETUNE_IMAGE_SIZE[self.model_size]

    def validate(self) -> None:
        if self.task not in TASK_NAMES:
            raise ConfigError(f"unknown task {self.task!r}; known: {', '.join(TASK_NAMES)}")
        self.optim.validate()
        t = self.trainer
        if t.max_steps <= 0 or t.accumulate <= 0 or self.batch_size <= 0 or t.val_every <= 0:
            raise ConfigError("trainer.max_steps, trainer.accumulate, trainer.val_every and batch_size must be "
                              "positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction}: must be in (0, 1)")
        check_crop_scale(self.crop_scale, "crop_scale")
        r = self.retrieval
        if r.negatives < 1 or r.rerank_k < 1 or r.itc < 0:
            raise ConfigError("retrieval.negatives and retrieval.rerank_k must be >= 1 and retrieval.itc >= 0")
        if self.task == "retrieval" and r.negatives >= self.batch_size:
            raise ConfigError(f"retrieval.negatives={r.negatives} needs a batch_size above it (got "
                              f"{self.batch_size}): negatives are drawn from the batch")


def load_finetune_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Defaults of the named model size (``model_size``, read first), then the file, then the overrides."""
    size = model_size_of(path, overrides)
    return load_config(FinetuneConfig, path, overrides, base=FinetuneConfig(model_size=size, model=model_config(size)))
