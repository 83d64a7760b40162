"""Using a fine-tuned model: answer a question about an image, classify an image-text pair, rank images for a
text. A small Python API and what ``medvlp predict`` calls::

    from medvlp import predict
    model = predict.load("runs/vqa")                      # a run folder written by `medvlp finetune`
    model.answer("scan.png", "Is there a lesion?", k=3)  # [("yes", 0.93), ("no", 0.05), ...]
    model.classify("scan.png", "58-year-old, staging")   # [("bilateral lesions", 0.71), ...]
    model.rank(["a.png", "b.dcm"], "a large mass in the left lung")  # [("b.dcm", 4.2), ("a.png", -1.3)]

Images are file paths (PNG, JPEG, DICOM, ...), encoded bytes or PIL images; they go through the same
conversion and evaluation transform as a prepared dataset's images. DICOM files are rendered with their stored
window unless ``load(run, window="lung")`` (a preset, ``"minmax"`` or ``(center, width)``) says otherwise, and
from their middle frame unless ``frame=`` names one. A file that cannot be read is a one-line ``DataError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvlp.data.collate import Collator, stack_images
from medvlp.data.images import DEFAULT_MAX_PIXELS, ImageError, Window, open_image
from medvlp.data.text import MAX_TEXT_CHARS, clean_text
from medvlp.data.transforms import EvalTransform
from medvlp.errors import DataError, MedvlpError
from medvlp.objectives import match_score
from medvlp.training.finetune import FinetuneConfig, load_finetuned

ImageLike = str | Path | bytes | Image.Image
log = logging.getLogger(__name__)


class Predictor:
    """A fine-tuned run, ready to answer. ``task`` says which of ``answer`` / ``classify`` / ``rank`` it can do
    (``rank`` works with any run: it uses the ITM head)."""

    def __init__(self, config: FinetuneConfig, model, tokenizer: Any, *, window: Window = None,
                 frame: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, max_text_chars: int = MAX_TEXT_CHARS):
        self.config, self.model, self.tokenizer = config, model.eval(), tokenizer
        self.window, self.frame = window, frame
        self.max_pixels, self.max_text_chars = max_pixels, max_text_chars
        self.task, self.classes = config.task, list(config.classes)
        self.transform = EvalTransform(model.cfg.image_size)
        self.collator = Collator(tokenizer, max_length=config.max_text_len, mlm_probability=0.0)

    # -- inputs ----------------------------------------------------------------------------------------------
    def pixels(self, image: ImageLike) -> torch.Tensor:
        """One image as the model sees it: uint8 [C, S, S]."""
        if isinstance(image, Image.Image):
            data = image if image.mode in ("L", "RGB") else image.convert("RGB")
        else:
            source = Path(image) if isinstance(image, (str, Path)) else image
            try:
                data = open_image(source, window=self.window, frame=self.frame, max_pixels=self.max_pixels)
            except ImageError as e:
                where = source if isinstance(source, Path) else "the image bytes"
                raise DataError(f"{where}: cannot read the image ({e}); give a PNG, JPEG or DICOM file") from None
        return self.transform(data)

    def batch(self, images: Sequence[ImageLike], texts: Sequence[str]) -> dict[str, Any]:
        return self.collator([{"pixels": self.pixels(image), "text": self.text(text)}
                              for image, text in zip(images, texts)])

    def text(self, text: str) -> str:
        """A question, text or query as the model reads it: control characters removed, length bounded (a line
        says what was changed)."""
        cleaned, notes = clean_text(text, self.max_text_chars)
        if notes:
            log.warning("the text %r...: %s", cleaned[:40], ", ".join(notes))
        return cleaned

    # -- tasks -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, image: ImageLike, question: str, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` best answers with their scores (the sigmoid of each answer's logit, as trained)."""
        self._need("vqa", "answer questions")
        logits = self.model(self.batch([image], [question]), classify=True).class_logits[0].float()
        scores, indices = logits.sigmoid().topk(min(k, len(self.classes)))
        return [(self.classes[i], s) for i, s in zip(indices.tolist(), scores.tolist())]

    @torch.no_grad()
    def classify(self, image: ImageLike, text: str, k: int | None = None) -> list[tuple[str, float]]:
        """Labels with their probabilities (softmax), most likely first; the top ``k`` when given."""
        self._need("classification", "classify")
        logits = self.model(self.batch([image], [text]), classify=True).class_logits[0].float()
        scores, indices = logits.softmax(dim=0).topk(min(k or len(self.classes), len(self.classes)))
        return [(self.classes[i], s) for i, s in zip(indices.tolist(), scores.tolist())]

    @torch.no_grad()
    def rank(self, images: Sequence[ImageLike], query: str, batch_size: int = 64) -> list[tuple[Any, float]]:
        """``images`` ordered by how well they match ``query`` (ITM log-odds, highest first), with the scores."""
        if not images:
            raise MedvlpError("rank: no images given")
        tokens = self.collator.tokenizer([self.text(query)], truncation=True, max_length=self.collator.max_length,
                                         return_tensors="pt")
        text = self.model.encode_text(tokens["input_ids"], tokens["attention_mask"])  # once, for every image
        mask = tokens["attention_mask"].to(text.device)
        scores = []
        for start in range(0, len(images), batch_size):
            pixels = stack_images([self.pixels(image) for image in images[start:start + batch_size]])
            states = self.model.encode_image(pixels).states
            size = states.shape[0]
            logits = self.model.match(text.expand(size, -1, -1), mask.expand(size, -1), states)
            scores.extend(match_score(logits.float()).tolist())
        order = sorted(range(len(images)), key=lambda i: -scores[i])
        return [(images[i], scores[i]) for i in order]

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise MedvlpError(f"this model was fine-tuned for {self.task}; it cannot {what} (that needs a {task} "
                              "run)")


def load(run: str | Path, *, window: Window = None, frame: int | None = None) -> Predictor:
    """A fine-tuned run folder (written by ``medvlp finetune``) as a ``Predictor``; ``window`` and ``frame``
    apply to DICOM images."""
    return Predictor(*load_finetuned(run), window=window, frame=frame)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


def images_in(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix, sorted), for ``rank``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
