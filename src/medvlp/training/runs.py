"""Opening a run folder: the one way from disk back to a model, for every kind of folder medvlp writes.

========================  ================================================  ===================================
kind                      folder                                            what builds the model
========================  ================================================  ===================================
``pre-trained``           ``medvlp pretrain``'s run_dir (its latest          ``MedVLP.from_pretrained`` of the
                          checkpoint), ``checkpoints/`` or one               checkpoint (weights named
                          ``checkpoints/step-*``; ``medvlp convert --task    ``model.*``)
                          pretrain`` output
``fine-tuned``            ``medvlp finetune``'s run_dir; ``medvlp convert``  ``MedVLP.from_pretrained`` of the
                          output of a downstream checkpoint                  folder (its best weights)
``exported``              ``medvlp export`` output (``vision/``, ``text/``,  the two Hugging Face encoders, as
                          ``tokenizer/``)                                    a run that starts from them
========================  ================================================  ===================================

``open_run`` returns a ``Run``: the model (eval mode), its tokenizer, the run's config, and for a fine-tuned run
its task and classes. ``medvlp.load`` (``predict.load``) wraps it into a ``Predictor``; fine-tuning from
``init``, evaluation, zero-shot retrieval and export all open runs through it. The model is built from the
``model.yaml`` beside its weights alone; a run written before medvlp saved ``model.yaml`` is built from its
``config.yaml``'s ``model`` section instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlp.config import load_config
from medvlp.constants import WEIGHTS
from medvlp.errors import MedvlpError
from medvlp.models.model import MedVLP
from medvlp.training.config import FinetuneConfig, PretrainConfig

KINDS = ("pre-trained", "fine-tuned", "exported")
_WHAT = {  # what to give instead, for each kind a caller needs
    "pre-trained": "a pre-training run (the run_dir `medvlp pretrain` wrote, or one of its checkpoints/step-*)",
    "fine-tuned": f"a fine-tuned run (the run_dir `medvlp finetune` wrote: config.yaml and {WEIGHTS})",
    "exported": "an export (the folder `medvlp export` wrote: vision/, text/ and tokenizer/)",
}


@dataclass
class Run:
    """An opened run folder.

    Attributes:
        kind: ``pre-trained``, ``fine-tuned`` or ``exported`` (``KINDS``).
        path: the folder read: the checkpoint folder of a pre-training run, else the run folder.
        config: the run's config (``PretrainConfig`` or ``FinetuneConfig``); ``None`` for an export.
        model: the model, in eval mode.
        tokenizer: its tokenizer.
        task: the fine-tuning task (``vqa``, ``classification``, ``retrieval``); ``None`` otherwise.
        classes: the classifier's answers or labels, in order; empty when it has none.
    """

    kind: str
    path: Path
    config: PretrainConfig | FinetuneConfig | None
    model: MedVLP
    tokenizer: Any
    task: str | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def max_text_len(self) -> int:
        """The text length (in tokens) the run was trained with; for an export, what its text encoder holds."""
        if isinstance(self.config, PretrainConfig):
            return self.config.data.max_text_len
        if isinstance(self.config, FinetuneConfig):
            return self.config.max_text_len
        return self.model.cfg.text.max_position_embeddings - 2

    @property
    def aligned(self) -> bool:
        """Whether the global image and text embeddings were trained to match (a fine-tuned run is taken to be;
        a pre-training run when ``tasks.itc`` was on; an export never)."""
        if isinstance(self.config, PretrainConfig):
            return bool(self.config.tasks.itc)
        return self.kind == "fine-tuned"


def run_kind(path: Path | str) -> str:
    """Which kind of run ``path`` holds, from its files alone (nothing is read): ``fine-tuned`` (weights beside
    a config), ``exported`` (``vision/``, ``text/``, ``tokenizer/``), else ``pre-trained`` (checked on opening)."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / "config.yaml").is_file():
        return "fine-tuned"
    if all((path / part).is_dir() for part in ("vision", "text", "tokenizer")):
        return "exported"
    return "pre-trained"


def open_run(path: Path | str, kind: str | None = None) -> Run:
    """Open a run folder of any kind (see the module docstring).

    Args:
        path: the folder.
        kind: the kind the caller needs (``KINDS``); another kind is a one-line ``MedvlpError`` saying what to
            give instead. ``None`` takes any.

    Returns:
        The ``Run``, its model in eval mode with the saved weights (safetensors, checksum compared; nothing is
        unpickled). A folder that is no run, or weights that do not fit, are a one-line ``MedvlpError``.
    """
    path = Path(path)
    if not path.is_dir():
        raise MedvlpError(f"{path}: no such run folder")
    found = run_kind(path)
    if kind is not None and found != kind:
        raise MedvlpError(f"{path} is not {_WHAT[kind]}; it looks like {_WHAT[found].split(' (')[0]}")
    return {"pre-trained": _pretrained, "fine-tuned": _finetuned, "exported": _exported}[found](path)


def _pretrained(path: Path) -> Run:
    from medvlp.data.tokenizer import load_tokenizer
    from medvlp.training.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise MedvlpError(f"{run_dir}: no config.yaml beside checkpoints/; give the folder `medvlp pretrain` wrote")
    config = load_config(PretrainConfig, run_dir / "config.yaml")
    model = MedVLP.from_pretrained(checkpoint, prefix="model.", default_config=config.model,  # the Lightning
                                   default_source=str(run_dir / "config.yaml"))  # module's names
    tokenizer = load_tokenizer(config.data.tokenizer or run_dir / "tokenizer")
    return Run("pre-trained", checkpoint, config, model, tokenizer)


def _finetuned(path: Path) -> Run:
    from medvlp.data.tokenizer import load_tokenizer

    config = load_config(FinetuneConfig, path / "config.yaml")
    model = MedVLP.from_pretrained(path, default_config=config.model, default_source=str(path / "config.yaml"))
    own = path / "tokenizer"  # a converted run may refer to its tokenizer by hub id instead
    tokenizer = load_tokenizer(own if own.is_dir() or not config.tokenizer else config.tokenizer)
    return Run("fine-tuned", path, config, model, tokenizer, task=config.task, classes=list(config.classes))


def _exported(path: Path) -> Run:
    """The encoders built the way a run starts from published encoders (``model.vision.pretrained``, ...); only
    they are meaningful (the fusion and heads are new)."""
    from medvlp.data.tokenizer import load_tokenizer
    from medvlp.models.config import model_config
    from medvlp.models.model import build_model

    vision = json.loads((path / "vision" / "config.json").read_text())
    cfg = model_config("tiny", image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 16),
                       vision={"pretrained": str(path / "vision")}, text={"pretrained": str(path / "text")})
    return Run("exported", path, None, build_model(cfg).eval(), load_tokenizer(path / "tokenizer"))
