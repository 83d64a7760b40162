"""Pre-training: the run config, the objectives of one step, the Lightning module, and ``pretrain()``.

One step runs the objectives the config switches on, each a pure function from ``medvlp.objectives``:

- M3AE (``paired_masking: false``): three passes, as the reference code does: masked text + whole image
  (MLM), masked image + whole text (MIM), and the ITM pass on a batch with half its images swapped at random,
  which fuses the whole images and whole texts the first two passes encoded (``swapped_itm``).
- MPMA (``paired_masking: true``): masked image (75%) and masked text (15%) in ONE pass; MLM, MIM, the global
  and local alignment and the ITM positives are all read from it, and the ITM negatives fuse its text states
  with other samples' image states (no second encoding). With ``hard_negatives`` those images are drawn in
  proportion to the softmax of the global similarity (harder negatives more often), else uniformly.

Which features the alignment losses read: those of the *pair pass*, the pass in which every image meets its
own text. Under paired masking that is the masked pass: the global loss compares the class tokens of an image
of which 25% of the patches were seen and of a text with 15% of its words masked, and the local loss matches
words to the visible patches only. This is FLIP's recipe (Li et al., CVPR 2023): contrastive learning on
masked images works about as well and costs a quarter of the vision encoder; it is what makes the paired step
one encoder pass instead of three. FLIP measured that at scale and over long schedules; over the few hundred
steps of a tiny model from scratch it halves the alignment (``mpma-tiny``, 500 steps: zero-shot R@1 0.4% /
0.5% against 1.2% / 1.1%). So ``align_whole_image`` encodes the whole image once more, vision encoder only, and
the alignment losses and the hard-negative similarities read that (the fused passes still see the masked
image). ``mpma-tiny`` switches it on (7% more time per step there); ``mpma-base`` keeps FLIP's one pass, where
a whole-image pass of ViT-B/16 would cost more than the rest of the vision work of the step. In the three-pass
step the pair pass is the MLM pass (whole image, masked text). Zero-shot retrieval embeds whole images and whole
texts (``MedVLP.embed_image``/``embed_text``).

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
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch

from medvlp.config import load_config, save_config
from medvlp.data.collate import Collator
from medvlp.data.loader import Concat, FamilyDataset, make_loader
from medvlp.data.records import read_manifest
from medvlp.data.sampler import StreamSampler
from medvlp.data.synthetic import ensure_corpus
from medvlp.errors import DataError, MedvlpError
from medvlp.integrity import RunLock, write_checksum
from medvlp.models.config import ModelConfig
from medvlp.models.model import MedVLP, build_model
from medvlp.objectives import (
    hard_negatives,
    itc_loss,
    itm_batch,
    itm_loss,
    itm_swap,
    local_alignment_loss,
    mim_loss,
    mlm_loss,
    random_negatives,
)
from medvlp.training.checkpoint import Checkpointer, checkpoint_step, resolve_checkpoint, resume_point
from medvlp.training.config import SIZE_OPTIM, DataConfig, PretrainConfig, TasksConfig, load_pretrain_config  # noqa: F401 (re-exported)
from medvlp.training.optim import build_optimizer, build_schedule
from medvlp.training.trainer import build_trainer

log = logging.getLogger(__name__)


# -- one step ----------------------------------------------------------------------------------------------------
def pretrain_losses(model: MedVLP, batch: dict[str, Any], tasks: TasksConfig) -> tuple[torch.Tensor, dict, dict]:
    """The weighted loss of one batch, its parts and metrics, and the passes' outputs (for pictures)."""
    passes: dict[str, Any] = {}
    align, reuse = tasks.align, tasks.reuse_itm
    if tasks.paired_masking:
        passes["pair"] = model(batch, mask_image=bool(tasks.mim), mask_text=bool(tasks.mlm), itm=reuse, align=align)
        passes.update({name: passes["pair"] for name in ("mlm", "mim") if getattr(tasks, name)})
    else:
        if tasks.mlm:
            passes["mlm"] = passes["pair"] = model(batch, mask_text=True, itm=reuse, align=align)
        if tasks.mim:
            passes["mim"] = model(batch, mask_image=True)
        if (align or reuse) and "pair" not in passes:
            passes["pair"] = model(batch, itm=reuse, align=align)
    if align and tasks.align_whole_image and passes["pair"].masking is not None:
        passes["pair"] = whole_image_alignment(model, passes["pair"], batch)
    parts: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}
    if tasks.mlm:
        parts["mlm"], m = mlm_loss(passes["mlm"], batch)
        metrics["mlm_acc"] = m["accuracy"]
    if tasks.mim:
        parts["mim"], _ = mim_loss(passes["mim"], batch, norm_pix_loss=model.cfg.norm_pix_loss)
    if tasks.itc:
        parts["itc"], m = itc_loss(passes["pair"], batch)
        metrics.update({f"itc_{k}": v for k, v in m.items()})
    if tasks.local:
        parts["local"], m = local_alignment_loss(passes["pair"], batch)
        metrics.update({f"local_{k}": v for k, v in m.items()})
    if tasks.itm and not (reuse and batch["input_ids"].shape[0] < 2):  # one sample has no negative to reuse
        if reuse:
            logits, labels = reused_itm(model, passes["pair"], batch, tasks.hard_negatives)
            itm_out, itm_targets = dataclasses.replace(passes["pair"], itm_logits=logits), {"itm_labels": labels}
        else:
            itm_out, itm_targets = swapped_itm(model, passes, batch)
        parts["itm"], m = itm_loss(itm_out, itm_targets)
        metrics["itm_acc"] = m["accuracy"]
    weights = tasks.weights()
    total = sum(weights[name] * loss for name, loss in parts.items())
    return total, {**{f"{k}_loss": v.detach() for k, v in parts.items()}, **metrics}, passes


def swapped_itm(model: MedVLP, passes: dict[str, Any], batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """M3AE's ITM pass: half of the batch with another sample's image (``objectives.itm_swap``), every pair fused
    and scored. Returns an output with ``itm_logits`` and the targets (``itm_labels``) for ``itm_loss``.

    The step encodes each distinct input once: when another pass of the step has already encoded the whole
    images (the MLM pass) and the whole texts (the MIM pass), the ITM pass fuses those states, the images indexed
    by the swap, instead of encoding them again. The encoders see every sample on its own, so this computes the
    same logits as the pass on the swapped batch (``itm_batch``) up to float rounding, and backward sums the two
    uses' gradients into one encoder pass. With dropout on, the ITM pass shares the other pass's encoder dropout
    masks instead of drawing its own. Without both states (``mlm`` or ``mim`` switched off) it runs its own pass.
    """
    whole_image = next((p.image_features for p in passes.values() if p.masking is None), None)
    whole_text = next((p.text_features for p in passes.values() if p.mlm_positions is None), None)
    source, labels = itm_swap(batch["input_ids"].shape[0])
    if whole_image is None or whole_text is None:
        targets = {**batch, "pixels": batch["pixels"][source.to(batch["pixels"].device)], "itm_labels": labels}
        out = passes["itm"] = model(targets, itm=True)
        return out, targets
    logits = model.match(whole_text, batch["attention_mask"], whole_image[source.to(whole_image.device)])
    return SimpleNamespace(itm_logits=logits), {"itm_labels": labels}


def whole_image_alignment(model: MedVLP, pair: Any, batch: dict[str, Any]) -> Any:
    """The pair pass with its image-side alignment embeddings (class token and patches) taken from the whole,
    unmasked image, encoded once more by the vision encoder alone."""
    tokens = model.align_head.embed_image(model.encode_image(batch["pixels"]).states)
    return dataclasses.replace(pair, image_embed=tokens[:, 0], patch_embeds=tokens[:, 1:])


def reused_itm(model: MedVLP, pair: Any, batch: dict[str, Any], hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM on the pair pass's encoder states: its own pairs as positives, and every text again with another
    sample's image (drawn by similarity with ``hard``, else uniformly) as negatives; B positives, B negatives."""
    size = pair.text_features.shape[0]
    if hard:
        donors = hard_negatives(pair.text_embed @ pair.image_embed.T)
    else:
        donors = random_negatives(size, device=pair.text_features.device)
    negatives = model.match(pair.text_features, batch["attention_mask"], pair.image_features[donors])
    logits = torch.cat([pair.itm_logits, negatives])
    matched = torch.ones(size, dtype=torch.long, device=logits.device)
    return logits, torch.cat([matched, torch.zeros_like(matched)])


def matching_accuracy(model: MedVLP, batch: dict[str, Any]) -> torch.Tensor:
    """ITM accuracy by M3AE's protocol, whatever the training objective: whole images and whole texts, half of
    the batch with another sample's image drawn at random. Validation reports it as ``itm_acc`` for every
    config; with paired masking or hard negatives the objective's own accuracy (masked pair pass, negatives
    drawn by similarity) is ``itm_objective_acc``."""
    targets = itm_batch(batch)
    return itm_loss(model(targets, itm=True), targets)[1]["accuracy"]


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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medvlp", {})
        self.batches_seen = state.get("batches_seen", 0)
        self.samples, self.bad_samples = state.get("samples", 0), state.get("bad_samples", 0)
        self.last_validation = dict(state.get("last_validation", {}))

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
    """Pre-train a model as configured; returns the run folder (config, tokenizer, checkpoints, logs, pictures)."""
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


def load_run(run: Path | str) -> tuple[PretrainConfig, MedVLP, Any]:
    """A pre-training run folder (or one of its ``checkpoints/step-*``) back as (config, model, tokenizer), the
    model in eval mode with the checkpoint's weights (safetensors; nothing is unpickled)."""
    from medvlp.constants import WEIGHTS
    from medvlp.data.tokenizer import load_tokenizer

    checkpoint = resolve_checkpoint(run)
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise MedvlpError(f"{run_dir}: no config.yaml beside checkpoints/; give the folder `medvlp pretrain` wrote")
    config = load_config(PretrainConfig, run_dir / "config.yaml")
    tokenizer = load_tokenizer(config.data.tokenizer or run_dir / "tokenizer")
    model = MedVLP.from_pretrained(config.model, checkpoint / WEIGHTS, prefix="model.",  # the Lightning module's
                                   source=str(run_dir / "config.yaml"))
    return config, model, tokenizer


def export_encoders(run: Path | str, out: Path | str) -> dict[str, Path]:
    """Save a pre-training run's two encoders and its tokenizer as Hugging Face folders (``save_pretrained``:
    ``config.json`` and ``model.safetensors``; the tokenizer's files), ``out/vision``, ``out/text`` and
    ``out/tokenizer``, so that another run starts from them through the same code as from published weights:
    ``model.vision.pretrained=out/vision model.text.pretrained=out/text data.tokenizer=out/tokenizer``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedvlpError(f"{out} is a file; export into a new folder")
    paths = {"vision": out / "vision", "text": out / "text", "tokenizer": out / "tokenizer"}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise MedvlpError(f"{taken[0]} already exists; export into another folder")
    config, model, tokenizer = load_run(run)
    if config.model.vision.conv_stem:
        raise MedvlpError(f"{run} has a convolutional stem (model.vision.conv_stem), which a Hugging Face CLIP "
                          "vision checkpoint cannot hold; fine-tune from the run itself (--init) instead")
    model.vision.model.save_pretrained(paths["vision"])
    model.text.model.save_pretrained(paths["text"])
    for weights in [*paths["vision"].glob("*.safetensors"), *paths["text"].glob("*.safetensors")]:
        write_checksum(weights)  # checked when a run starts from them (models/encoders.py)
    tokenizer.save_pretrained(str(paths["tokenizer"]))
    return paths


def zero_shot(run: Path | str, data: Path | str | None = None, split: str = "test",
              batch_size: int = 64) -> dict[str, float]:
    """Zero-shot image-text retrieval (Recall@1/5/10, both ways, in percent) of a pre-trained run on a prepared
    retrieval (or pre-training) dataset; by default the synthetic retrieval set the run's corpus came with."""
    from medvlp.evaluation.retrieval import zero_shot_retrieval

    config, model, tokenizer = load_run(run)
    root = Path(data) if data else Path(config.data.synthetic_dir) / "retrieval"
    family = read_manifest(root)["family"]
    if family not in ("retrieval", "pretrain"):
        raise DataError(f"{root} holds {family} data; zero-shot retrieval needs image-caption pairs")
    dataset = FamilyDataset(root, split, config.model.image_size, train=False)
    loader = eval_loader(config, tokenizer, dataset, batch_size)
    return {"pairs": len(dataset), **zero_shot_retrieval(model, loader, dataset.image_ids())}


def eval_loader(config: PretrainConfig, tokenizer: Any, dataset: Any, batch_size: int = 64):
    """Batches of a pre-trained run's evaluation data, in order: whole texts (nothing masked), the run's text
    length, read in this process."""
    return make_loader(dataset, Collator(tokenizer, max_length=config.data.max_text_len, mlm_probability=0.0),
                       batch_size=batch_size, num_workers=0)


def _val_split(root: Path) -> str:
    splits = read_manifest(root)["splits"]
    for split in ("val", "validation", "test"):
        if split in splits and splits[split]["rows"]:
            return split
    raise DataError(f"{root}: no val or test split to validate on; prepare it with val_fraction=0.05")

