"""The HTTP API and page of ``medvlp serve``: a FastAPI app around an ``Engine``.

Every error a request can cause is one line of JSON, ``{"error": "..."}``, with 413 (too large), 422 (not
usable) or 503 (busy, timed out); a 500 only for a fault of the server, with no traceback in the response.
Forms are parsed here (not by FastAPI's ``Form`` parameters) so that the limits are the server's config values;
``openapi_extra`` documents each form on the ``/docs`` page.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from medvlp import __version__
from medvlp.errors import MedvlpError
from medvlp.serve.batching import MicroBatcher, QueueFull
from medvlp.serve.engine import Engine, RequestError

log = logging.getLogger("medvlp")
STATIC = Path(__file__).parent / "static"
CLOSED = {"yes", "no"}  # answers of closed questions; every other answer is open


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` ends in 413, whether or not it states its length."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(self.max_bytes)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


def too_large(max_bytes: int) -> JSONResponse:
    return error(413, f"the request is larger than {max_bytes / 2**20:g} MB (serve option max_upload_mb); send "
                      "a smaller image")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def form_doc(fields: dict[str, tuple[str, str]], required: tuple[str, ...] = ()) -> dict:
    """OpenAPI for a multipart form: ``{name: (type, description)}``; type "file", "files", "string", "strings",
    "integer" or "boolean"."""
    schema = {"file": {"type": "string", "format": "binary"}, "string": {"type": "string"},
              "integer": {"type": "integer"}, "boolean": {"type": "boolean"}}
    schema["files"] = {"type": "array", "items": schema["file"]}
    schema["strings"] = {"type": "array", "items": schema["string"]}
    properties = {name: {**schema[kind], "description": text} for name, (kind, text) in fields.items()}
    body = {"type": "object", "properties": properties, "required": list(required)}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}}}


IMAGE_OPTIONS = {"window": ("string", ("DICOM display window: a preset (lung, bone, brain, ...), minmax or "
                                       "CENTER,WIDTH; default the file's own")),
                 "frame": ("integer", "DICOM frame of a multi-frame file (default the middle one)")}
EXPLAIN_OPTIONS = {"explain": ("boolean", "add a heat-map of where the top answer came from"),
                   "method": ("string", "rollout (co-attention rollout, default) or gradient (gradient x attention)")}


class Form:
    """A parsed multipart form, read within the server's limits."""

    def __init__(self, form: Any, engine: Engine) -> None:
        self.form, self.engine, self.config = form, engine, engine.config

    async def image(self, name: str = "image") -> Any:
        upload = self.form.get(name)
        if upload is None:
            raise RequestError(422, f"attach the image as the multipart file field {name!r}")
        return await self._decode(upload, name)

    async def images(self, name: str = "images") -> list[Any]:
        uploads = self.form.getlist(name)
        if len(uploads) > self.config.max_items:
            raise RequestError(413, f"{len(uploads)} images in {name!r}; at most {self.config.max_items} (serve "
                                    "option max_items)")
        return [await self._decode(upload, name) for upload in uploads]

    async def _decode(self, upload: Any, name: str) -> Any:
        if not isinstance(upload, UploadFile):
            raise RequestError(422, f"{name!r} must be a file upload, not a text field")
        data = await upload.read()
        frame = self.integer("frame", None, 0, 100_000)
        # decoding is CPU work: off the event loop, beside (not on) the model's thread
        return await asyncio.to_thread(self.engine.decode, data, self.form.get("window") or None, frame)

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.form.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise RequestError(422, f"give the {name!r} field (a non-empty text)")
            return None
        return self._check_text(value, name)

    def texts(self, name: str) -> list[str]:
        values = self.form.getlist(name)
        if len(values) > self.config.max_items:
            raise RequestError(413, f"{len(values)} texts in {name!r}; at most {self.config.max_items} (serve "
                                    "option max_items)")
        return [self._check_text(value, name) for value in values]

    def _check_text(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise RequestError(422, f"{name!r} must be a text field, not a file")
        if len(value) > self.config.max_text_chars:
            raise RequestError(422, f"{name!r} is {len(value):,} characters long; at most "
                                    f"{self.config.max_text_chars:,} (serve option max_text_chars)")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.form.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RequestError(422, f"{name!r} must be an integer, got {str(value)[:40]!r}") from None
        if not low <= number <= high:
            raise RequestError(422, f"{name!r} = {number}: must be {low} to {high}")
        return number

    def flag(self, name: str) -> bool:
        value = str(self.form.get(name, "")).strip().lower()
        if value in ("", "0", "false", "no", "off"):
            return False
        if value in ("1", "true", "yes", "on"):
            return True
        raise RequestError(422, f"{name!r} must be true or false, got {value[:40]!r}")


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving ``engine``: the JSON API under ``/v1``, ``/healthz``, the page at ``/`` and the
    OpenAPI page at ``/docs``."""
    config = engine.config
    app = FastAPI(title="medvlp", version=__version__,
                  description="Medical vision-and-language models: answer, classify, rank, embed, explain.")
    app.add_middleware(BodyLimit, max_bytes=int(config.max_upload_mb * 2**20))
    wait_s = config.max_wait_ms / 1000
    batchers = {name: MicroBatcher(fn, engine.executor, max_batch=config.max_batch, max_wait_s=wait_s,
                                   max_queue=config.max_queue)
                for name, fn in (("scores", engine.scores_batch), ("match", engine.match_batch),
                                 ("embed_image", engine.embed_image_batch), ("embed_text", engine.embed_text_batch))}
    app.state.engine, app.state.batchers = engine, batchers
    text_bytes = config.max_text_chars * 4 + 1024  # UTF-8 takes at most 4 bytes a character

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message)

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return too_large(int(config.max_upload_mb * 2**20))

    @app.exception_handler(MedvlpError)
    async def on_medvlp_error(request: Request, e: MedvlpError) -> JSONResponse:
        return error(422, str(e))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def on_fault(request: Request, e: Exception) -> JSONResponse:
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(e).__name__}); the server log has the details")

    async def read_form(request: Request) -> Form:
        if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                   "application/x-www-form-urlencoded")):
            raise RequestError(422, "send the request as multipart/form-data (e.g. curl -F image=@scan.png -F "
                                    "question='...')")
        try:
            form = await request.form(max_part_size=text_bytes, max_files=config.max_items + 4,
                                      max_fields=config.max_items + 16)
        except HTTPException as e:
            if "maximum size" in str(e.detail):  # a text field over max_part_size
                raise RequestError(422, f"a text field is too long; questions and texts may have at most "
                                        f"{config.max_text_chars:,} characters (serve option max_text_chars)") from None
            raise RequestError(422, f"cannot read the form ({e.detail}); send multipart/form-data") from None
        return Form(form, engine)

    async def submit(name: str, item: Any) -> Any:
        try:
            return await asyncio.wait_for(batchers[name].submit(item), config.request_timeout_s)
        except QueueFull:
            raise RequestError(503, f"the server is busy ({config.max_queue} requests waiting, serve option "
                                    "max_queue); retry in a moment") from None
        except TimeoutError:
            raise RequestError(503, f"no answer within {config.request_timeout_s:g} s (serve option "
                                    "request_timeout_s); the server is busy, retry in a moment") from None

    async def on_model_thread(fn: Any, *args: Any) -> Any:
        future = asyncio.get_running_loop().run_in_executor(engine.executor, fn, *args)
        try:
            return await asyncio.wait_for(future, config.request_timeout_s)
        except TimeoutError:
            raise RequestError(503, f"no answer within {config.request_timeout_s:g} s (serve option "
                                    "request_timeout_s); the server is busy, retry in a moment") from None

    async def pixels(image: Any) -> Any:  # the crop and resize: CPU work, off the event loop
        return await asyncio.to_thread(engine.pixels, image)

    def need(task: str, endpoint: str) -> None:
        if engine.predictor.task != task:
            kind = engine.predictor.task or engine.kind
            raise RequestError(422, f"this server's run is a {kind} run; /v1/{endpoint} needs a "
                                    f"{task} run (GET /v1/model lists what it can do)")

    async def labelled(form: Form, text_field: str, endpoint: str) -> dict[str, Any]:
        """The shared body of /v1/answer and /v1/classify."""
        image = await form.image()
        text = form.text(text_field)
        k = form.integer("k", 5, 1, config.max_top_k)
        out: dict[str, Any] = {text_field: text}
        if form.flag("explain"):
            method = form.form.get("method") or "rollout"
            explanation = await on_model_thread(engine.explain, image, text, method, k)
            ranked = explanation.scores
            out["explanation"] = explanation_json(explanation)
        else:
            scores = await submit("scores", (await pixels(image), text))
            values, indices = scores.topk(min(k, len(engine.predictor.classes)))
            ranked = [(engine.predictor.classes[i], s) for i, s in zip(indices.tolist(), values.tolist())]
        key = "answers" if endpoint == "answer" else "labels"
        out[key] = [{key[:-1]: name, "probability": round(score, 6),
                     **({"type": "closed" if name.lower() in CLOSED else "open"} if endpoint == "answer" else {})}
                    for name, score in ranked]
        return out

    @app.post("/v1/answer", summary="Answer a question about an image (a VQA run)", openapi_extra=form_doc({
        "image": ("file", "PNG, JPEG or DICOM"), "question": ("string", "the question"),
        "k": ("integer", "how many answers (default 5)"), **EXPLAIN_OPTIONS, **IMAGE_OPTIONS},
        ("image", "question")))
    async def answer(request: Request) -> dict[str, Any]:
        need("vqa", "answer")
        return await labelled(await read_form(request), "question", "answer")

    @app.post("/v1/classify", summary="Classify an image with its text (a classification run)",
              openapi_extra=form_doc({"image": ("file", "PNG, JPEG or DICOM"),
                                      "text": ("string", "the text paired with the image (e.g. a referral note)"),
                                      "k": ("integer", "how many labels (default all)"), **EXPLAIN_OPTIONS,
                                      **IMAGE_OPTIONS}, ("image", "text")))
    async def classify(request: Request) -> dict[str, Any]:
        need("classification", "classify")
        return await labelled(await read_form(request), "text", "classify")

    @app.post("/v1/rank", summary="Rank images for a text, or texts for an image (image-text matching)",
              openapi_extra=form_doc({
                  "text": ("string", "rank the uploaded images (or, without images, the gallery) for this text"),
                  "images": ("files", "the images to rank"), "image": ("file", "rank the texts for this image"),
                  "texts": ("strings", "the texts to rank"), "k": ("integer", "how many results (default all)"),
                  **IMAGE_OPTIONS}))
    async def rank(request: Request) -> dict[str, Any]:
        form = await read_form(request)
        k = form.integer("k", None, 1, max(config.max_items, engine.config.max_gallery))
        text = form.text("text", required=False)
        if text is not None and "image" not in form.form:
            images = await form.images()
            if images:
                inputs = [await pixels(image) for image in images]
                scores = await asyncio.gather(*(submit("match", (p, text)) for p in inputs))
                uploads = form.form.getlist("images")
                names = [getattr(u, "filename", None) or f"image {i}" for i, u in enumerate(uploads)]
                results = [{"index": i, "name": names[i], "score": s} for i, s in enumerate(scores)]
            elif engine.gallery:
                scores = await on_model_thread(engine.rank_gallery, text)
                results = [{"index": i, "name": engine.gallery[i].name, "url": f"/v1/gallery/{i}", "score": s}
                           for i, s in enumerate(scores)]
            else:
                raise RequestError(422, "attach the images to rank as 'images' files (this server has no "
                                        "--gallery)")
        else:
            image = await form.image()
            texts = form.texts("texts")
            if not texts:
                raise RequestError(422, "give the texts to rank as 'texts' fields, or a 'text' with 'images'")
            one = await pixels(image)
            scores = await asyncio.gather(*(submit("match", (one, t)) for t in texts))
            results = [{"index": i, "text": t, "score": s} for i, (t, s) in enumerate(zip(texts, scores))]
        results.sort(key=lambda r: -r["score"])
        return {"results": results[:k] if k else results}

    @app.post("/v1/embed", summary="Global embeddings of an image and/or a text (unit length, shared space)",
              openapi_extra=form_doc({"image": ("file", "PNG, JPEG or DICOM"), "text": ("string", "a text"),
                                      **IMAGE_OPTIONS}))
    async def embed(request: Request) -> dict[str, Any]:
        form = await read_form(request)
        text = form.text("text", required=False)
        out: dict[str, Any] = {}
        if "image" in form.form:
            out["image_embedding"] = await submit("embed_image", await pixels(await form.image()))
        if text is not None:
            out["text_embedding"] = await submit("embed_text", text)
        if not out:
            raise RequestError(422, "give an 'image' file, a 'text' field or both")
        return out

    @app.get("/v1/model", summary="What the served run is: method, task, labels, image size, limits")
    async def model() -> dict[str, Any]:
        passes = {name: {"passes": len(b.batch_sizes), "requests": sum(b.batch_sizes)}
                  for name, b in batchers.items()}
        return {**engine.describe(), "batching": passes}

    @app.get("/v1/gallery/{index}", summary="An image of the --gallery folder", include_in_schema=True)
    async def gallery_image(index: int) -> FileResponse:
        if not 0 <= index < len(engine.gallery):
            raise RequestError(404, f"no gallery image {index} (the gallery holds {len(engine.gallery)})")
        return FileResponse(engine.gallery[index])

    @app.get("/healthz", summary="Liveness: 200 once the model is loaded")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def explanation_json(explanation: Any) -> dict[str, Any]:
    """An ``Explanation`` for the API: the patch grid (rows of numbers in [0, 1]), the crop it covers in the
    original image's pixels, the original size, and the heat-map over the original image as a PNG (grey, 0-255)."""
    from PIL import Image

    heat = (explanation.heatmap() * 255 + 0.5).astype("uint8")
    png = io.BytesIO()
    Image.fromarray(heat, "L").save(png, "PNG")
    return {"method": explanation.method, "answer": explanation.target,
            "grid": [[round(float(v), 4) for v in row] for row in explanation.grid],
            "box": list(explanation.box), "image_size": list(explanation.size),
            "heatmap_png": base64.b64encode(png.getvalue()).decode("ascii")}
