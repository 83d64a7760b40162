"""Using a trained model from Python: ``medvlp.load(RUN)`` and what ``medvlp predict`` calls::

    import medvlp
    model = medvlp.load("runs/vqa")                       # a fine-tuned, pre-trained or exported run folder
    model.answer("scan.png", "Is there a lesion?", k=3)  # [("yes", 0.93), ("no", 0.05), ...]
    model.answer(["a.png", "b.dcm"], "Is there a lesion?")  # one list of answers per image, in one batch
    model.classify("scan.png", "58-year-old, staging")   # [("bilateral lesions", 0.71), ...]
    ranking = model.rank(["a.png", "b.dcm"], "a large mass in the left lung")
    ranking[0], ranking.score, ranking.skipped           # ("b.dcm", 0.91), "ITM match probability ...", []
    model.embed_image(["a.png", "b.dcm"])                # unit-length global embeddings [2, E]

What a run can do depends on what it learned: a fine-tuned VQA run answers, a classification run classifies;
every run with an ITM head (fine-tuned or pre-trained) ranks; a pre-trained run whose global alignment was
trained (MPMA: ``tasks.itc``) ranks by the cosine similarity of the global embeddings, optionally re-ranked by
the ITM head (``rerank=k``); an exported run (``medvlp export``: the two encoders and the tokenizer) only embeds.

Each method takes one item or a list and runs the model on batches of ``batch_size``. Images are file paths
(PNG, JPEG, DICOM, ...), encoded bytes or PIL images, converted and resized as a prepared dataset's images;
DICOM files are rendered with their stored window unless ``load(run, window="lung")`` (a preset, ``"minmax"``
or ``(center, width)``) says otherwise, and from their middle frame unless ``frame=`` names one. A file that
cannot be read is a one-line ``DataError``, except in ``rank``, which skips it and lists it in ``skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvlp.data.collate import stack_images
from medvlp.data.images import DEFAULT_MAX_PIXELS, ImageError, Window, open_image
from medvlp.data.text import MAX_TEXT_CHARS, clean_text
from medvlp.data.transforms import EvalTransform
from medvlp.errors import DataError, MedvlpError

ImageLike = str | Path | bytes | Image.Image
log = logging.getLogger(__name__)

ITM_SCORE = "ITM match probability in [0, 1] (the image-text matching head: 1 = matches the query)"
MATCHED_SCORE = ("ITM 'matched' logit, unbounded (the reference M3AE's retrieval score: higher = matches the "
                 "query better)")
COSINE_SCORE = "cosine similarity of the global image and text embeddings, in [-1, 1] (higher = closer)"


class Ranking(list):
    """``rank``'s result: ``(image, score)`` pairs, best first; ``score`` says what the numbers are and
    ``skipped`` lists ``(image, reason)`` for the images that could not be read."""

    def __init__(self, items: Sequence[tuple[Any, float]], score: str, skipped: Sequence[tuple[Any, str]] = ()):
        super().__init__(items)
        self.score, self.skipped = score, list(skipped)


class Predictor:
    """A trained run, ready to use (see the module docstring); ``medvlp.load`` makes one.

    Args:
        model: the ``MedVLP`` (put in eval mode).
        tokenizer: its tokenizer.
        kind: ``fine-tuned``, ``pre-trained`` or ``exported``.
        max_text_len: texts are cut to this many tokens (the run's training length).
        task: the fine-tuning task (``vqa``, ``classification``, ``retrieval``); ``None`` otherwise.
        classes: the classifier's answers or labels, in order.
        aligned: whether the global embeddings were trained to match image and text (ranking by embedding).
        window, frame: how DICOM images are read (``data.images.open_image``).
        config: the run's config, kept for reference.
        max_pixels, max_text_chars: input limits (decoded pixels of an image, characters of a text).
    """

    def __init__(self, model, tokenizer: Any, *, kind: str, max_text_len: int, task: str | None = None,
                 classes: Sequence[str] = (), aligned: bool = True, window: Window = None,
                 frame: int | None = None, config: Any = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_text_chars: int = MAX_TEXT_CHARS):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.max_pixels, self.max_text_chars = max_pixels, max_text_chars  # input limits (decoded pixels, text)
        self.kind, self.task, self.classes = kind, task, list(classes)
        self.aligned = aligned  # whether the global embeddings were trained to match image and text
        self.max_text_len, self.window, self.frame = max_text_len, window, frame
        self.transform = EvalTransform(model.cfg.image_size)

    # -- inputs ----------------------------------------------------------------------------------------------
    def pixels(self, image: ImageLike) -> torch.Tensor:
        """One image as the model sees it: uint8 [C, S, S]; a one-line ``DataError`` when it cannot be read."""
        if isinstance(image, Image.Image):
            data = image if image.mode in ("L", "RGB") else image.convert("RGB")
        else:
            source = Path(image) if isinstance(image, (str, Path)) else image
            try:
                data = open_image(source, window=self.window, frame=self.frame, max_pixels=self.max_pixels)
            except ImageError as e:
                where = source if isinstance(source, Path) else "the image bytes"
                raise DataError(f"{where}: cannot read the image ({e}); {image_fix(e)}") from None
        return self.transform(data)

    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [N, L] of ``texts`` (padded to the longest, cut at the run's length)."""
        encoding = self.tokenizer([self.text(t) for t in texts], truncation=True, max_length=self.max_text_len,
                                  padding="longest",
                                  return_tensors="pt")
        return encoding["input_ids"], encoding["attention_mask"]

    def text(self, text: str) -> str:
        """A question, text or query as the model reads it: control characters removed, length bounded (a line
        says what was changed)."""
        cleaned, notes = clean_text(text, self.max_text_chars)
        if notes:
            log.warning("the text %r...: %s", cleaned[:40], ", ".join(notes))
        return cleaned

    def batch(self, images: Sequence[ImageLike | torch.Tensor], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's input for image-text pairs: ``pixels``, ``input_ids``, ``attention_mask``. Images are
        files, bytes or PIL images, or pixels that ``pixels`` already made."""
        ids, mask = self.tokens(texts)
        pixels = [image if isinstance(image, torch.Tensor) else self.pixels(image) for image in images]
        return {"pixels": stack_images(pixels), "input_ids": ids, "attention_mask": mask}

    # -- tasks -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, image: ImageLike | Sequence[ImageLike], question: str | Sequence[str], k: int = 5,
               batch_size: int = 32, explain: bool | str = False):
        """The ``k`` best answers with their scores (the sigmoid of each answer's logit, as trained), best
        first. One image and one question give one list; a list of either (the other one item or a list of the
        same length) gives one list per pair.

        With ``explain`` (True for co-attention rollout, or a method name of ``medvlp.explain.METHODS``; one
        image and one question) returns ``(answers, heatmap)``: the heat-map of the top answer, float32 [H, W] in
        [0, 1] over the original image.
        """
        if explain:
            if not (is_one(image) and isinstance(question, str)):
                raise MedvlpError("answer(..., explain=...) explains one image and one question at a time")
            from medvlp.explain import explain_answer

            return explain_answer(self, image, question, k, "rollout" if explain is True else explain)
        self._need("vqa", "answer questions")
        return self._classify(image, question, k, batch_size, lambda logits: logits.sigmoid())

    @torch.no_grad()
    def classify(self, image: ImageLike | Sequence[ImageLike], text: str | Sequence[str], k: int | None = None,
                 batch_size: int = 32) -> list:
        """Labels with their probabilities (softmax), most likely first.

        Args:
            image: one image (path, bytes, PIL image) or a list.
            text: the text that goes with it (a clinical note, a caption) or a list (paired as in ``answer``).
            k: the number of labels to return; ``None``: all.
            batch_size: pairs per model pass.

        Returns:
            ``[(label, probability), ...]`` for one pair; one such list per pair for lists.
        """
        self._need("classification", "classify")
        return self._classify(image, text, k, batch_size, lambda logits: logits.softmax(dim=-1))

    def _classify(self, image, text, k: int | None, batch_size: int, probabilities) -> list:
        images, texts, single = pairs(image, text)
        k = min(k or len(self.classes), len(self.classes))
        results = []
        for start in range(0, len(images), batch_size):
            batch = self.batch(images[start:start + batch_size], texts[start:start + batch_size])
            scores, indices = probabilities(self.model(batch, classify=True).class_logits.float()).topk(k, dim=-1)
            results += [[(self.classes[i], s) for i, s in zip(row_i, row_s)]
                        for row_i, row_s in zip(indices.tolist(), scores.tolist())]
        return results[0] if single else results

    @torch.no_grad()
    def embed_image(self, image: ImageLike | Sequence[ImageLike], batch_size: int = 64) -> torch.Tensor:
        """Unit-length global embeddings: [E] for one image, [N, E] for a list (``batch_size`` images per
        pass). For an exported run (no alignment head), the vision encoder's class token, normalised."""
        images = [image] if is_one(image) else list(image)
        chunks = [self._embed_pixels(stack_images([self.pixels(i) for i in images[s:s + batch_size]]))
                  for s in range(0, len(images), batch_size)]
        embeddings = torch.cat(chunks) if chunks else torch.empty(0)
        return embeddings[0] if is_one(image) else embeddings

    @torch.no_grad()
    def embed_text(self, text: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-length global embeddings: [E] for one text, [N, E] for a list (``batch_size`` texts per pass;
        an exported run: the text encoder's first token, normalised)."""
        texts = [text] if isinstance(text, str) else list(text)
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokens(texts[start:start + batch_size])
            if self.kind == "exported":
                chunks.append(torch.nn.functional.normalize(self.model.encode_text(ids, mask)[:, 0].float(), dim=-1))
            else:
                chunks.append(self.model.embed_text(ids, mask).float())
        embeddings = torch.cat(chunks) if chunks else torch.empty(0)
        return embeddings[0] if isinstance(text, str) else embeddings

    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "exported":
            return torch.nn.functional.normalize(self.model.encode_image(pixels).cls.float(), dim=-1)
        return self.model.embed_image(pixels).float()

    @torch.no_grad()
    def rank(self, images: Sequence[ImageLike], query: str | Sequence[str], *, by: str | None = None,
             rerank: int | None = None, batch_size: int = 64) -> Ranking | list[Ranking]:
        """``images`` ordered by how well they match ``query`` (a list of queries: one ``Ranking`` each).

        ``by="itm"`` scores every image with the ITM head (match probability); ``by="embedding"`` by the cosine
        similarity of the global embeddings, and with ``rerank=k`` the ``k`` best of those re-scored by the ITM
        head (the result then holds those ``k``). The default: embeddings for a pre-trained run whose alignment
        was trained, the ITM head otherwise. Images that cannot be read are skipped and listed in
        ``Ranking.skipped``."""
        if self.kind == "exported":
            raise MedvlpError("an exported run holds the two encoders only (no ITM head, no trained alignment): "
                              "it cannot rank; load the pre-training run it came from")
        images = [images] if is_one(images) else list(images)
        if not images:
            raise MedvlpError("rank: no images given")
        by = by or ("embedding" if rerank or (self.kind == "pre-trained" and self.aligned) else "itm")
        if by not in ("itm", "embedding"):
            raise MedvlpError(f"rank: by={by!r}; give 'itm' or 'embedding'")
        if by == "embedding" and not self.aligned:
            raise MedvlpError("this run's global embeddings were not trained to align image and text "
                              "(tasks.itc=0, as M3AE): rank with the ITM head instead (by='itm', no rerank)")
        kept, pixels, skipped = [], [], []
        for image in images:
            try:
                pixels.append(self.pixels(image))
                kept.append(image)
            except DataError as e:
                skipped.append((image, str(e)))
        if not kept:
            raise DataError(f"rank: none of the {len(images)} images could be read (e.g. {skipped[0][1]})")
        queries = [query] if isinstance(query, str) else list(query)
        rankings = [self._rank_one(kept, pixels, q, by, rerank, batch_size, skipped) for q in queries]
        return rankings[0] if isinstance(query, str) else rankings

    def _rank_one(self, images: list, pixels: list[torch.Tensor], query: str, by: str, rerank: int | None,
                  batch_size: int, skipped: list) -> Ranking:
        score_name = ITM_SCORE if self.model.cfg.itm_score == "log_odds" else MATCHED_SCORE
        candidates = list(range(len(images)))
        if by == "embedding":
            text = self.embed_text(query)
            similarity = torch.cat([self._embed_pixels(stack_images(pixels[s:s + batch_size])) @ text
                                    for s in range(0, len(pixels), batch_size)])
            order = similarity.argsort(descending=True).tolist()
            if not rerank:
                return Ranking([(images[i], similarity[i].item()) for i in order], COSINE_SCORE, skipped)
            candidates = order[:rerank]
            score_name = f"{score_name}; the {len(candidates)} best by embedding similarity, re-ranked"
        scores = self._match(query, [pixels[i] for i in candidates], batch_size)
        order = scores.argsort(descending=True).tolist()
        return Ranking([(images[candidates[i]], scores[i].item()) for i in order], score_name, skipped)

    def _match(self, query: str, pixels: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """The ITM score of ``query`` with each image (the text encoded once, images in batches): the match
        probability, or the "matched" logit for a run that ranks by it (``model.itm_score``, M3AE's retrieval)."""
        ids, mask = self.tokens([query])
        text = self.model.encode_text(ids, mask)
        scores = []
        for start in range(0, len(pixels), batch_size):
            states = self.model.encode_image(stack_images(pixels[start:start + batch_size])).states
            size = states.shape[0]
            logits = self.model.match(text.expand(size, -1, -1), mask.expand(size, -1), states)
            scores.append(self.itm_score(logits))
        return torch.cat(scores)

    def itm_score(self, itm_logits: torch.Tensor) -> torch.Tensor:
        """What ranking reports for ITM logits [..., 2]: the match probability, or the "matched" logit for a run
        that ranks by it (``model.itm_score = matched``, as the reference M3AE's retrieval head does)."""
        score = self.model.match_score(itm_logits.float())
        return score.sigmoid() if self.model.cfg.itm_score == "log_odds" else score  # sigmoid(log-odds) = P

    def _need(self, task: str, what: str) -> None:
        if self.task == task:
            return
        if self.task is None:
            raise MedvlpError(f"this is a {self.kind} run; it cannot {what} (that needs a run fine-tuned for "
                              f"{task}: medvlp finetune --task {task} --init RUN)")
        raise MedvlpError(f"this model was fine-tuned for {self.task}; it cannot {what} (that needs a {task} run)")


def is_one(item: Any) -> bool:
    """Whether ``item`` is one image (a path, bytes or a PIL image) rather than a list of them."""
    return isinstance(item, (str, Path, bytes, Image.Image))


def pairs(image: Any, text: Any) -> tuple[list, list[str], bool]:
    """Images and texts as two lists of the same length (one item repeated against a list), and whether both
    were single items."""
    images = [image] if is_one(image) else list(image)
    texts = [text] if isinstance(text, str) else list(text)
    if len(images) == 1 and len(texts) > 1:
        images = images * len(texts)
    if len(texts) == 1 and len(images) > 1:
        texts = texts * len(images)
    if len(images) != len(texts) or not images:
        raise MedvlpError(f"give one image per text: got {len(images)} images and {len(texts)} texts")
    return images, texts, is_one(image) and isinstance(text, str)


def image_fix(error: ImageError) -> str:
    """What to do about an unreadable image: install the DICOM decoders when that is what was missing."""
    from medvlp.data.dicom import DECODERS_MISSING

    if DECODERS_MISSING in str(error):
        return 'install them with: pip install "medvlp[dicom]"'
    return "give a PNG, JPEG or DICOM file"


def load(run: str | Path, *, window: Window = None, frame: int | None = None) -> Predictor:
    """A run folder as a ``Predictor`` (``training.runs.open_run`` opens it).

    Args:
        run: a fine-tuned run (``medvlp finetune``), a pre-training run (``medvlp pretrain``) or one of its
            ``checkpoints/step-*``, a converted checkpoint (``medvlp convert``) or an export (``medvlp export``).
        window: how DICOM images are windowed: a preset (``"lung"``), ``"minmax"`` or ``(center, width)``;
            ``None``: the file's stored window.
        frame: the frame of a multi-frame DICOM; ``None``: the middle one.

    Returns:
        The ``Predictor``, its model in eval mode. A folder that is no run is a one-line ``MedvlpError``.
    """
    from medvlp.training.runs import open_run

    check_window(window)
    opened = open_run(run)
    return Predictor(opened.model, opened.tokenizer, kind=opened.kind, max_text_len=opened.max_text_len,
                     task=opened.task, classes=opened.classes, aligned=opened.aligned, window=window, frame=frame,
                     config=opened.config)


def check_window(window: Window) -> None:
    """A one-line ``ConfigError`` for a DICOM window that is not a preset, ``minmax`` or (center, width)."""
    from medvlp.data.dicom import _window

    _window(window)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


def images_in(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (by suffix: PNG, JPEG, TIFF, BMP, DICOM), sorted, for ``rank``; a folder
    that is missing or holds none is a one-line ``DataError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
