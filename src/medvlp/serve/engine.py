"""The model behind ``medvlp serve``: a run loaded once, uploads decoded within limits, and the batched
functions the app's micro-batchers call (all on one model thread, under ``torch.inference_mode()`` and, where
the machine and the run allow, bf16 autocast)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from medvlp.data.collate import stack_images
from medvlp.data.images import ImageError, open_image
from medvlp.errors import ConfigError, MedvlpError

log = logging.getLogger("medvlp")


@dataclass
class ServeConfig:
    """``medvlp serve`` settings (``key=value`` on its command line). Limits answer with HTTP 413 (too large),
    422 (not usable) or 503 (busy), as one line of JSON: ``{"error": "..."}``."""

    max_upload_mb: float = 32.0  # a request body above this is refused (413)
    max_pixels: int = 50_000_000  # an image decoding to more pixels (width x height) is refused (413)
    max_text_chars: int = 2_000  # a longer question or text is refused (422)
    max_items: int = 64  # images or texts in one /v1/rank request (413)
    max_top_k: int = 100  # the largest k a request may ask for
    request_timeout_s: float = 30.0  # a request that waits longer for the model gets 503
    max_queue: int = 256  # requests waiting per kind of work; more get 503 at once
    max_batch: int = 32  # requests sharing one forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    precision: str = "auto"  # auto (bf16 autocast where the machine and the run support it) | bf16 | fp32
    device: str = "auto"  # auto (CUDA when there is one) | cpu | cuda
    max_gallery: int = 5_000  # images of --gallery DIR kept for ranking

    def validate(self) -> None:
        positive = ("max_upload_mb", "max_pixels", "max_text_chars", "max_items", "max_top_k", "request_timeout_s",
                    "max_queue", "max_batch", "max_gallery")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"serve option {name}={getattr(self, name)}: must be positive")
        if self.max_wait_ms < 0:
            raise ConfigError(f"serve option max_wait_ms={self.max_wait_ms}: must be 0 or more")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"serve option precision={self.precision!r}: choose auto, bf16 or fp32")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"serve option device={self.device!r}: choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("serve option device=cuda: this machine has no CUDA device; use device=auto")


class RequestError(Exception):
    """A request the server cannot serve: an HTTP status and one line saying what to change."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Engine:
    """A loaded run and everything the HTTP layer asks of it. The ``*_batch`` functions take lists of items
    and return one result per item; they run on ``self.executor`` (one thread)."""

    def __init__(self, predictor: Any, config: ServeConfig, *, kind: str = "fine-tuned", run: str = "",
                 gallery: list[Path] | None = None) -> None:
        config.validate()
        self.predictor, self.config, self.kind, self.run = predictor, config, kind, run
        self.model = predictor.model
        self.device = torch.device("cuda" if config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.model.to(self.device)
        self.bf16 = self._bf16()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="medvlp-model")
        self.gallery: list[Path] = []
        self._gallery_pixels: list[torch.Tensor] = []
        if gallery:
            self.load_gallery(gallery)

    @classmethod
    def from_run(cls, run: Path | str, config: ServeConfig, gallery: list[Path] | None = None) -> Engine:
        """A run folder loaded as ``medvlp.load`` loads it: fine-tuned (every endpoint of its task) or pre-trained
        (ranking and embeddings only); an exported run (encoders only) is refused in one line."""
        from medvlp import predict

        predictor = predict.load(run)
        if predictor.kind == "exported":
            raise MedvlpError(f"{run}: an exported run holds the encoders only; serve the pre-training run it came "
                              "from, or a fine-tuned run")
        return cls(predictor, config, kind=predictor.kind, run=str(run), gallery=gallery)

    # -- precision -----------------------------------------------------------------------------------------------
    def _bf16(self) -> bool:
        """bf16 autocast: asked for, or ``auto`` where the run's precision resolves to bf16 on this machine."""
        from medvlp.training.trainer import resolve_precision

        if self.config.precision != "auto":
            return self.config.precision == "bf16"
        trainer = getattr(self.predictor.config, "trainer", None)
        wanted = getattr(trainer, "precision", "auto")  # what the run was trained with
        if wanted != "auto":
            return wanted.startswith("bf16")
        if self.device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return not torch.cuda.is_available() and resolve_precision("auto") == "bf16-mixed"  # a CPU with AMX

    def context(self) -> contextlib.ExitStack:
        """Inference mode plus bf16 autocast where used."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.bf16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack

    # -- inputs --------------------------------------------------------------------------------------------------
    def decode(self, data: bytes, window: Any = None, frame: int | None = None) -> Image.Image:
        """Uploaded bytes as an "L" or "RGB" image, within ``max_pixels``; ``RequestError`` otherwise."""
        from medvlp.data import dicom

        limit = self.config.max_pixels
        if not data:
            raise RequestError(422, "the image upload is empty; attach a PNG, JPEG or DICOM file")
        if not dicom.is_dicom(data):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    width, height = Image.open(io.BytesIO(data)).size  # reads the header only
            except Image.DecompressionBombError:
                raise RequestError(413, f"the image has more than {limit:,} pixels (serve option max_pixels); "
                                        "send a smaller image") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                raise RequestError(422, "the upload is not a readable image; send a PNG, JPEG or DICOM "
                                        "file") from None
            if width * height > limit:
                raise RequestError(413, f"the image is {width} x {height} = {width * height:,} pixels; at most "
                                        f"{limit:,} (serve option max_pixels); send a smaller image")
        try:
            image = open_image(data, window=window, frame=frame)
        except (ImageError, ConfigError) as e:
            raise RequestError(422, f"cannot read the image: {e}") from None
        if image.width * image.height > limit:
            raise RequestError(413, f"the image is {image.width} x {image.height} pixels; at most {limit:,} "
                                    "(serve option max_pixels)")
        return image

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The model's input for a decoded image: uint8 [C, S, S]."""
        return self.predictor.transform(image)

    # -- batched work ----------------------------------------------------------------------------------------
    def scores_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[torch.Tensor]:
        """(pixels, text) pairs -> each pair's class scores (VQA: sigmoid, classification: softmax)."""
        batch = self.predictor.batch([p for p, _ in items], [t for _, t in items])
        with self.context():
            logits = self.model(batch, classify=True).class_logits.float().cpu()
        scores = logits.sigmoid() if self.predictor.task == "vqa" else logits.softmax(dim=-1)
        return list(scores)

    def match_batch(self, items: list[tuple[torch.Tensor, str]]) -> list[float]:
        """(pixels, text) pairs -> each pair's ITM score, as ``Predictor.itm_score`` reports it."""
        batch = self.predictor.batch([p for p, _ in items], [t for _, t in items])
        with self.context():
            logits = self.model(batch, itm=True).itm_logits.float()
        return self.predictor.itm_score(logits).cpu().tolist()

    def embed_image_batch(self, items: list[torch.Tensor]) -> list[list[float]]:
        with self.context():
            return self.model.embed_image(stack_images(items)).float().cpu().tolist()

    def embed_text_batch(self, items: list[str]) -> list[list[float]]:
        tokens = self.tokens(items)
        with self.context():
            return self.model.embed_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu().tolist()

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.predictor.tokens(texts)
        return {"input_ids": ids, "attention_mask": mask}

    # -- the gallery ---------------------------------------------------------------------------------------------
    def load_gallery(self, files: list[Path]) -> None:
        """Decode and transform the gallery once (uint8 model inputs are small: 288 x 288 grey is 83 kB)."""
        if len(files) > self.config.max_gallery:
            raise MedvlpError(f"the gallery has {len(files):,} images; at most {self.config.max_gallery:,} (serve "
                              "option max_gallery)")
        for path in files:
            try:
                image = open_image(path)
            except ImageError as e:
                log.warning("gallery: skipping %s (%s)", path, e)
                continue
            self.gallery.append(path)
            self._gallery_pixels.append(self.pixels(image))
        if not self.gallery:
            raise MedvlpError("the gallery holds no readable image")

    def rank_gallery(self, text: str, chunk: int = 64) -> list[float]:
        """ITM scores (``Predictor.itm_score``) of ``text`` with every gallery image (in gallery order); the text
        is encoded once."""
        tokens = self.tokens([text])
        scores: list[float] = []
        with self.context():
            states = self.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
            mask = tokens["attention_mask"].to(states.device)
            for start in range(0, len(self._gallery_pixels), chunk):
                images = self.model.encode_image(stack_images(self._gallery_pixels[start:start + chunk])).states
                size = images.shape[0]
                logits = self.model.match(states.expand(size, -1, -1), mask.expand(size, -1), images)
                scores.extend(self.predictor.itm_score(logits).cpu().tolist())
        return scores

    # -- explanations ------------------------------------------------------------------------------------------
    def explain(self, image: Image.Image, text: str, method: str, k: int) -> Any:
        from medvlp.explain import explain

        return explain(self.predictor, image, text, method=method, k=k)

    # -- what the run is --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "run": Path(self.run).name if self.run else None,
            "kind": self.kind,
            "method": "mpma" if cfg.memory_slots > 0 else "m3ae",
            "task": self.predictor.task,
            "classes": list(self.predictor.classes),
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "max_text_tokens": self.predictor.max_text_len,
            "device": self.device.type,
            "precision": "bf16-autocast" if self.bf16 else "fp32",
            "gallery": len(self.gallery),
            "endpoints": self.endpoints(),
            "limits": {k: v for k, v in dataclasses.asdict(self.config).items()
                       if k not in ("precision", "device")},
        }

    def endpoints(self) -> list[str]:
        task = self.predictor.task
        return [*(["answer"] if task == "vqa" else []), *(["classify"] if task == "classification" else []),
                "rank", "embed", *(["explain"] if task in ("vqa", "classification") else [])]
