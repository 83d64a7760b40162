"""``medvlp export``: a pre-training run's encoders and tokenizer as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

from medvlp.errors import MedvlpError
from medvlp.integrity import write_checksum
from medvlp.training.runs import open_run


def export_encoders(run: Path | str, out: Path | str) -> dict[str, Path]:
    """Save a pre-training run's two encoders and its tokenizer as Hugging Face folders, so that another run starts
    from them through the same code as from published weights: ``model.vision.pretrained=OUT/vision
    model.text.pretrained=OUT/text data.tokenizer=OUT/tokenizer``.

    Args:
        run: a pre-training run folder (its latest checkpoint) or one of its ``checkpoints/step-*``.
        out: a new folder (or an existing one without ``vision``, ``text``, ``tokenizer`` in it).

    Returns:
        ``{"vision": OUT/vision, "text": OUT/text, "tokenizer": OUT/tokenizer}``: each encoder's ``config.json``
        and ``model.safetensors`` (with a ``.sha256`` checksum, checked when a run starts from it), and the
        tokenizer's files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedvlpError(f"{out} is a file; export into a new folder")
    paths = {"vision": out / "vision", "text": out / "text", "tokenizer": out / "tokenizer"}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise MedvlpError(f"{taken[0]} already exists; export into another folder")
    opened = open_run(run, "pre-trained")
    model = opened.model
    if model.cfg.vision.conv_stem:
        raise MedvlpError(f"{run} has a convolutional stem (model.vision.conv_stem), which a Hugging Face CLIP "
                          "vision checkpoint cannot hold; fine-tune from the run itself (--init) instead")
    model.vision.model.save_pretrained(paths["vision"])
    model.text.model.save_pretrained(paths["text"])
    for weights in [*paths["vision"].glob("*.safetensors"), *paths["text"].glob("*.safetensors")]:
        write_checksum(weights)  # checked when a run starts from them (models/encoders.py)
    opened.tokenizer.save_pretrained(str(paths["tokenizer"]))
    return paths
