"""Fine-tuning: a pre-trained (or fresh) model on one downstream task, with model selection on validation.

``finetune(config)`` reads a prepared dataset of the task's family (by default the synthetic corpus's), starts
from ``init`` (a pre-training run, or a fine-tuned run of the same task and classes) or from scratch, resizes
the model to the fine-tuning image size (the vision position table is interpolated once and then learned),
trains for ``trainer.max_steps`` steps, evaluates the validation split every ``trainer.val_every`` steps and
keeps the best weights by the task's selection metric, then evaluates the best weights on the test split.

A fine-tuned run folder holds ``config.yaml`` (the resolved config, including the model's architecture and
the classifier's classes in order), ``tokenizer/``, ``model.safetensors`` (the best weights) with ``model.yaml``
(the model's config), ``metrics.json`` (best validation and test metrics) and ``logs/`` (training curves).
``training.runs.open_run`` reads it back.

A dataset without a validation split (VQA-RAD ships train and test only) gives up ``val_fraction`` of its
training *images*, with all their questions, so that no image is both trained on and validated on.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medvlp.config import save_config
from medvlp.constants import MODEL_CONFIG, WEIGHTS
from medvlp.data.collate import Collator
from medvlp.data.loader import FamilyDataset, eval_loader, make_loader
from medvlp.data.records import Records, read_manifest
from medvlp.data.sampler import StreamSampler
from medvlp.data.splits import Rows, holdout_images
from medvlp.data.synthetic import ensure_corpus
from medvlp.data.tokenizer import save_tokenizer
from medvlp.errors import ConfigError, DataError, MedvlpError
from medvlp.integrity import RunLock
from medvlp.models.model import MedVLP, build_model
from medvlp.training.checkpoint import Checkpointer, checkpoint_step, resume_point
from medvlp.training.config import FINETUNE_IMAGE_SIZE, FinetuneConfig, load_finetune_config  # noqa: F401 (re-exported)
from medvlp.training.downstream import TASKS, DownstreamTask, downstream_task
from medvlp.training.optim import lightning_optimization
from medvlp.training.runs import open_run, run_kind
from medvlp.training.trainer import build_trainer

log = logging.getLogger(__name__)






def task_data(config: FinetuneConfig, task: DownstreamTask) -> Path:
    """The prepared dataset to fine-tune on (the synthetic corpus's for the task when none is named)."""
    if config.data:
        root = Path(config.data)
    else:
        root = ensure_corpus(Path(config.synthetic_dir), config.synthetic) / task.family
    family = read_manifest(root)["family"]
    if family != task.family:
        raise DataError(f"{root} holds {family} data; task {config.task} needs {task.family} data "
                        f"(choose task={_task_of(family)} or another dataset)")
    return root


def _task_of(family: str) -> str:
    return next((t.name for t in TASKS.values() if t.family == family), "?")


def data_classes(root: Path, task: DownstreamTask, label_field: str) -> list[str]:
    """The classifier's classes from the manifest (answers of every split, as the papers do), or the values of
    ``label_field`` when a classification dataset trains on another field than ``label``."""
    if task.classes is None:
        return []
    manifest = read_manifest(root)
    if task.name == "classification" and label_field != "label":
        values = set()
        for split in manifest["splits"]:
            try:
                values.update(v for v in Records(root, split).column(label_field) if v is not None)
            except KeyError:
                raise DataError(f"{root}: its records have no field {label_field!r} to classify by; set "
                                "label_field to one they have") from None
        return sorted(values)
    return list(manifest.get(task.classes, []))


def check_classes(have: Sequence[str], need: Sequence[str], source: str, data: Path, ordered: bool = True) -> None:
    """Refuse a classifier trained on other classes than the data's (never silently re-initialised); with
    ``ordered=False`` the same classes in another order pass (the caller maps them by name)."""
    if list(have) == list(need) or (not ordered and len(have) == len(need) and set(have) == set(need)):
        return
    missing = [c for c in need if c not in set(have)]
    example = f"; e.g. {missing[0]!r} is new" if missing else ""
    raise MedvlpError(f"{source} was fine-tuned on {len(have)} classes but {data} has {len(need)}, in another "
                      f"order or set{example}; fine-tune from the pre-training run instead (init=PRETRAIN_RUN)")


# -- the model ---------------------------------------------------------------------------------------------------
def initial_model(config: FinetuneConfig, classes: Sequence[str], texts) -> tuple[MedVLP, Any]:
    """(model, tokenizer) to start from: ``init``'s weights, or a fresh model; its classifier sized to ``classes``
    (a pre-training run's model gets a new one; a fine-tuned run's must already fit)."""
    from medvlp.data.tokenizer import load_tokenizer, train_tokenizer
    from medvlp.training.pretrain import with_tokenizer

    if config.init:
        if run_kind(config.init) == "exported":
            export = Path(config.init)
            raise MedvlpError(f"init={export} is an export (the encoders only); start from it with init=null "
                              f"model.vision.pretrained={export / 'vision'} model.text.pretrained={export / 'text'} "
                              f"tokenizer={export / 'tokenizer'}")
        init = open_run(config.init)
        model, tokenizer = init.model, init.tokenizer
        if init.task is not None:
            if init.task != config.task:
                raise MedvlpError(f"init={config.init} was fine-tuned for {init.task}, not {config.task}; "
                                  "start from a pre-training run")
            check_classes(init.classes, classes, config.init, Path(config.data or "the data"))
        elif classes:
            fresh = MedVLP(dataclasses.replace(model.cfg, num_classes=len(classes)))
            missing, _ = fresh.load_state_dict(model.state_dict(), strict=False)  # all but the new classifier
            assert all(name.startswith("classifier.") for name in missing), missing
            model = fresh
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
    else:
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
        else:
            tokenizer = train_tokenizer(texts(), Path(config.run_dir) / "tokenizer", vocab_size=config.vocab_size)
        model_cfg = dataclasses.replace(with_tokenizer(config.model, tokenizer), num_classes=len(classes))
        model = build_model(model_cfg)
    size = config.resolved_image_size
    if size % model.cfg.patch_size:
        raise ConfigError(f"image_size={size} is not a multiple of the patch size {model.cfg.patch_size}")
    model.resize_image(size)
    return model.train(), tokenizer


# -- training ----------------------------------------------------------------------------------------------------
class FinetuneModule(L.LightningModule):
    def __init__(self, config: FinetuneConfig, task: DownstreamTask, model: MedVLP, tokenizer: Any, train_data):
        super().__init__()
        self.config, self.task, self.model, self.tokenizer = config, task, model, tokenizer
        self.train_data = train_data
        self.batches_seen = 0  # training batches consumed, for resuming the sample stream

    def train_dataloader(self):
        c, t = self.config, self.config.trainer
        sampler = StreamSampler(len(self.train_data), c.batch_size, t.max_steps * t.accumulate, seed=t.seed,
                                rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        sampler.start_batch = self.batches_seen
        return make_loader(self.train_data, collator(c, self.tokenizer), batch_size=c.batch_size, sampler=sampler,
                           num_workers=c.num_workers)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        # dropout seeded per batch, as in pre-training: a resumed run draws what an uninterrupted one would
        torch.manual_seed(self.config.trainer.seed * 1_000_003 + self.batches_seen)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medvlp"] = {"batches_seen": self.batches_seen}
        checkpoint[MODEL_CONFIG] = self.model.cfg  # written as the checkpoint's model.yaml (not into trainer.pt)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_seen = checkpoint.get("medvlp", {}).get("batches_seen", 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.batches_seen += 1
        if batch["n"] == 0:
            return None
        loss, metrics = self.task.loss(self.model, batch, self.config.retrieval)
        if not torch.isfinite(loss):
            raise MedvlpError(f"fine-tuning loss became {loss.item()} at step {self.global_step}; lower optim.lr")
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=batch["n"])
        self.log("train/loss", loss.detach(), batch_size=batch["n"])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch["n"], logger=False)
        return loss

    def configure_optimizers(self):
        return lightning_optimization(self.model, self.config.optim, self.config.trainer.max_steps,
                                      str(self.trainer.precision))


class ModelSelection(L.Callback):
    """Every ``val_every`` steps and at the end: evaluate the validation split, log it, and write the weights
    to ``model.safetensors`` when the selection metric beats the best so far."""

    def __init__(self, evaluate, selection: str, run_dir: Path, every: int):
        self.evaluate, self.selection, self.run_dir, self.every = evaluate, selection, run_dir, every
        self.best: dict[str, float] | None = None
        self.best_step = -1
        self.history: list[dict[str, float]] = []

    def _validate(self, trainer: L.Trainer, module: FinetuneModule) -> None:
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        module.model.eval()
        with trainer.precision_plugin.forward_context():  # the training precision (bf16 autocast where used)
            metrics = self.evaluate(module.model)
        module.model.train()
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
        if self.best is None or metrics[self.selection] > self.best[self.selection]:
            self.best, self.best_step = metrics, step
            if trainer.is_global_zero:
                module.model.save_pretrained(self.run_dir, {"step": str(step)})

    def state_dict(self) -> dict[str, Any]:
        """The validations so far, saved in each checkpoint (``model.safetensors`` holds the best weights)."""
        return {"best": self.best, "best_step": self.best_step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.history = state["best"], state["best_step"], list(state["history"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._validate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._validate(trainer, module)


def collator(config: FinetuneConfig, tokenizer: Any) -> Collator:
    return Collator(tokenizer, max_length=config.max_text_len, mlm_probability=0.0, seed=config.trainer.seed)


def evaluation_split(root: Path, split: str | None = None) -> str:
    splits = read_manifest(root)["splits"]
    if split is not None:
        return split
    return next((s for s in ("test", "val", "validation") if splits.get(s, {}).get("rows")), "train")


def finetune(config: FinetuneConfig, callbacks: Sequence[L.Callback] = (), *, resume: bool = False) -> Path:
    """Fine-tune as configured.

    Args:
        config: the run's config (``training.config.load_finetune_config``); its ``data``, ``classes`` and
            ``model`` are filled in from the data and ``init``.
        callbacks: more Lightning callbacks for the trainer.
        resume: continue a run that was stopped from its last checkpoint (``run_dir/checkpoints``, removed once
            the run has finished).

    Returns:
        The run folder: ``config.yaml``, ``tokenizer/``, the best weights (``model.safetensors`` with
        ``model.yaml``), ``metrics.json`` (best validation, test) and ``logs/``. A run that fails before it wrote
        weights or a checkpoint leaves no folder behind when this call created it."""
    run_dir = Path(config.run_dir)
    created = not run_dir.exists()
    try:
        with RunLock(run_dir):
            return _finetune(config, callbacks, resume)
    except BaseException:
        if created and run_dir.is_dir() and not any((run_dir / part).exists() for part in (WEIGHTS, "checkpoints")):
            shutil.rmtree(run_dir)  # only what this call wrote: a config, a tokenizer, empty logs, the lock
        raise
    finally:
        collect_loaders()


def collect_loaders() -> None:
    """Free a finished run's DataLoader iterators here: the trainer holds them in reference cycles, and if the
    garbage collector met them first inside the next run's forked worker, they would print tracebacks there."""
    gc.collect()


def _finetune(config: FinetuneConfig, callbacks: Sequence[L.Callback], resume: bool) -> Path:
    run_dir = Path(config.run_dir)
    checkpoint = None
    if resume:
        if (run_dir / "metrics.json").is_file() and not (run_dir / "checkpoints").exists():
            log.info("%s has finished (metrics.json): nothing to do", run_dir)
            return run_dir
        checkpoint = resume_point(run_dir)
        if checkpoint is not None:
            log.info("resuming %s from step %d of %d", run_dir, checkpoint_step(checkpoint), config.trainer.max_steps)
    elif (run_dir / WEIGHTS).exists() or (run_dir / "checkpoints").exists():
        raise MedvlpError(f"{run_dir} already holds a fine-tuned model; continue a stopped run with --resume or "
                          "choose another run_dir")
    config.validate()
    task = downstream_task(config.task)
    L.seed_everything(config.trainer.seed, verbose=False)
    root = task_data(config, task)
    config.data = str(root)
    config.classes = data_classes(root, task, config.label_field)
    if task.classes and not config.classes:
        raise DataError(f"{root}: the manifest lists no {task.classes}; prepare the dataset again")
    size = config.resolved_image_size
    args = dict(answer_vocab=config.classes, labels=config.classes, label_field=config.label_field)
    train_full = FamilyDataset(root, "train", size, train=True, seed=config.trainer.seed,
                               crop_scale=tuple(config.crop_scale), **args)
    val_split = next((s for s in ("val", "validation") if s in read_manifest(root)["splits"]), None)
    if config.select_on == "test":
        test_split = evaluation_split(root)
        log.warning("select_on=test: the best checkpoint is chosen on %s's %s split, as the reference M3AE does on "
                    "VQA-RAD; its test figures are then optimistic (for comparison with the paper only)", root,
                    test_split)
        train, val = train_full, FamilyDataset(root, test_split, size, train=False, **args)
    elif val_split:
        train, val = train_full, FamilyDataset(root, val_split, size, train=False, **args)
    else:
        train_rows, val_rows = holdout_images(train_full.image_ids(), config.val_fraction,
                                              config.trainer.seed)
        train, val = Rows(train_full, train_rows), Rows(FamilyDataset(root, "train", size, train=False, **args),
                                                        val_rows)
        log.info("%s has no val split: %d of its training questions (%.0f%% of the images) held out for model "
                 "selection", root, len(val_rows), 100 * config.val_fraction)

    def texts():
        field_name = {"vqa": "question", "classification": "text", "retrieval": "caption"}[task.family]
        yield from train_full.records.column(field_name)

    run_dir.mkdir(parents=True, exist_ok=True)
    start = config
    if checkpoint is not None and not config.tokenizer and (run_dir / "tokenizer" / "tokenizer.json").is_file():
        # the tokenizer this run trained (or took from init) at its start, not a new one
        start = dataclasses.replace(config, tokenizer=str(run_dir / "tokenizer"))
    model, tokenizer = initial_model(start, config.classes, texts)
    config.model, config.image_size = model.cfg, model.cfg.image_size
    save_config(config, run_dir / "config.yaml")
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        save_tokenizer(tokenizer, run_dir / "tokenizer")

    val_loader = eval_loader(val, tokenizer, config.max_text_len, 2 * config.batch_size, config.num_workers)
    selection = ModelSelection(lambda m: task.evaluate(m, val_loader, val, config.retrieval), task.selection,
                               run_dir, config.trainer.val_every)
    t = config.trainer
    checkpointer = Checkpointer(run_dir / "checkpoints", t.checkpoint_every, t.keep_checkpoints)
    trainer = build_trainer(run_dir, t, grad_clip=config.optim.grad_clip,
                            callbacks=[selection, checkpointer, *callbacks], validate=False,
                            params=sum(p.numel() for p in model.parameters()))
    trainer.fit(FinetuneModule(config, task, model, tokenizer, train), ckpt_path=checkpoint and str(checkpoint),
                weights_only=True)
    if not trainer.is_global_zero:
        return run_dir
    metrics = evaluate_run(run_dir)
    metrics = {"task": config.task, "data": config.data, "init": config.init, "best_step": selection.best_step,
               "val": selection.best, **metrics,
               "val_history": selection.history}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # finished: the best weights are model.safetensors
    return run_dir


def run_answers(config: FinetuneConfig, need: Sequence[str], source: str, data: Path) -> dict[str, int]:
    """Answer (or label) -> class index of a run for a dataset whose classes are ``need``, checked: the same
    classes in any order, or with ``answer_normalization="m3ae"`` the same classes once each stored answer is
    normalised as the reference M3AE does (several stored answers may then share a class)."""
    index = {name: i for i, name in enumerate(config.classes)}
    if config.task == "vqa" and config.answer_normalization == "m3ae":
        from medvlp.data.text import reference_answer

        normalised = {answer: reference_answer(answer) for answer in need}
        check_classes(config.classes, sorted(set(normalised.values())), source, data, ordered=False)
        return {answer: index[label] for answer, label in normalised.items()}
    check_classes(config.classes, need, source, data, ordered=False)  # the mapping below follows the run's order
    return index


def evaluate_run(run: Path | str, data: Path | str | None = None, split: str | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a fine-tuned run (its best weights).

    Args:
        run: the fine-tuned run folder (or a converted downstream checkpoint).
        data: a prepared dataset of the run's task family; ``None``: the run's own.
        split: the split to evaluate; ``None``: test (or the last split there is).
        overrides: changes to the retrieval evaluation (``{"eval_mode": "exhaustive"}``).

    Returns:
        ``{"split": SPLIT, "rows": N, SPLIT: {metric: value}}`` (the task's metrics, in percent).
    """
    opened = open_run(run, "fine-tuned")
    config, model, tokenizer = opened.config, opened.model, opened.tokenizer
    task = downstream_task(config.task)
    if not data and not config.data:
        raise MedvlpError(f"{run} names no dataset (a converted checkpoint); give one with --data PREPARED")
    root = Path(data) if data else Path(config.data)
    family = read_manifest(root)["family"]
    if family != task.family:
        raise DataError(f"{root} holds {family} data; {run} was fine-tuned for {config.task} on {task.family} data")
    answers = run_answers(config, data_classes(root, task, config.label_field), str(run), root)
    split = evaluation_split(root, split)
    dataset = FamilyDataset(root, split, config.model.image_size, train=False, answer_vocab=answers,
                            labels=config.classes, label_field=config.label_field)
    retrieval = dataclasses.replace(config.retrieval, **(overrides or {}))
    loader = eval_loader(dataset, tokenizer, config.max_text_len, 2 * config.batch_size, config.num_workers)
    metrics = task.evaluate(model, loader, dataset, retrieval)
    return {"split": split, "rows": len(dataset), split: metrics}
