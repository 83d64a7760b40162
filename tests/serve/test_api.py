"""The HTTP API in-process (httpx on the ASGI app): every endpoint, every limit, bad uploads, and concurrent
requests answered exactly as sequential ones."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png_of
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from medvlp.serve import build  # noqa: E402 (after the skips: the serve extra may be missing)
from medvlp.serve.app import create_app  # noqa: E402
from medvlp.serve.engine import Engine, ServeConfig  # noqa: E402

QUESTION = "is there a lesion?"


def app_for(predictor, **settings):
    return create_app(Engine(predictor, ServeConfig(precision="fp32", **settings)))


def run(app, requests):
    """Run ``requests(client)`` (a coroutine function) against ``app`` in-process."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://medvlp") as client:
            return await requests(client)
    return asyncio.run(go())


def post(client, path, files=None, **data):
    return client.post(path, files=files, data=data)


def one_line_error(response, status, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def vqa_app(vqa_predictor):
    return app_for(vqa_predictor)


def test_health_model_docs_and_page(vqa_app, vqa_predictor):
    async def requests(client):
        return [await client.get(path) for path in ("/healthz", "/v1/model", "/openapi.json", "/docs", "/")]

    health, model, openapi, docs, page = run(vqa_app, requests)
    assert health.json() == {"status": "ok"}
    info = model.json()
    assert info["task"] == "vqa" and info["classes"] == vqa_predictor.classes and info["image_size"] == 64
    assert info["kind"] == "fine-tuned" and info["method"] in ("m3ae", "mpma") and info["precision"] == "fp32"
    assert info["limits"]["max_batch"] == 32
    paths = openapi.json()["paths"]
    assert {"/v1/answer", "/v1/classify", "/v1/rank", "/v1/embed", "/v1/model", "/healthz"} <= set(paths)
    form = paths["/v1/answer"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "question", "explain"} <= set(form["properties"])
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert page.status_code == 200 and 'id="question"' in page.text and "http" not in page.text.split("<script>")[0]


def test_answer_is_what_the_model_says(vqa_app, vqa_predictor):
    image = png_of(90, 70, seed=1)
    response = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("a.png", image)}, question=QUESTION, k=3))
    body = response.json()
    expected = vqa_predictor.answer(image, QUESTION, k=3)
    assert [a["answer"] for a in body["answers"]] == [a for a, _ in expected]
    assert np.allclose([a["probability"] for a in body["answers"]], [s for _, s in expected], atol=1e-5)
    assert {a["type"] for a in body["answers"] if a["answer"] in ("yes", "no")} <= {"closed"}
    assert "explanation" not in body


@pytest.mark.parametrize("method", ["rollout", "gradient"])
def test_answer_with_explanation(vqa_app, method):
    response = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("a.png", png_of(120, 80))},
                                           question=QUESTION, explain="true", method=method))
    explanation = response.json()["explanation"]
    assert explanation["method"] == method and explanation["image_size"] == [120, 80]
    assert explanation["box"] == [20, 0, 100, 80] and np.array(explanation["grid"]).shape == (4, 4)
    heat = Image.open(io.BytesIO(base64.b64decode(explanation["heatmap_png"])))
    assert heat.size == (120, 80) and np.asarray(heat)[:, :20].max() == 0  # outside the crop: no heat
    bad = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("a.png", png_of(64, 64))}, question=QUESTION,
                                      explain="true", method="saliency"))
    one_line_error(bad, 422, "rollout, gradient")


def test_classify(classification_predictor, vqa_app):
    app = app_for(classification_predictor)
    image = png_of(64, 64, seed=2)
    body = run(app, lambda c: post(c, "/v1/classify", {"image": ("a.png", image)}, text="58-year-old")).json()
    expected = classification_predictor.classify(image, "58-year-old")
    assert [row["label"] for row in body["labels"]] == [label for label, _ in expected]
    assert sum(row["probability"] for row in body["labels"]) == pytest.approx(1.0, abs=1e-4)
    one_line_error(run(app, lambda c: post(c, "/v1/answer", {"image": ("a.png", image)}, question=QUESTION)),
                   422, "classification run", "/v1/answer")
    one_line_error(run(vqa_app, lambda c: post(c, "/v1/classify", {"image": ("a.png", image)}, text="x")),
                   422, "vqa run")


def test_rank_both_ways_and_the_gallery(vqa_predictor, tmp_path):
    images = [png_of(64, 64, seed=s) for s in range(3)]
    for i, data in enumerate(images):
        (tmp_path / f"g{i}.png").write_bytes(data)
    engine = Engine(vqa_predictor, ServeConfig(precision="fp32"), gallery=sorted(tmp_path.glob("*.png")))
    app = create_app(engine)
    text = "a small round mass in the liver"

    async def requests(client):
        files = [("images", (f"i{i}.png", data)) for i, data in enumerate(images)]
        by_text = await client.post("/v1/rank", files=files, data={"text": text})
        by_image = await client.post("/v1/rank", files={"image": ("a.png", images[0])},
                                     data={"texts": [text, "what modality is this", "58-year-old"], "k": "2"})
        gallery = await client.post("/v1/rank", files={}, data={"text": text})
        picture = await client.get("/v1/gallery/1")
        missing = await client.get("/v1/gallery/9")
        return by_text, by_image, gallery, picture, missing

    by_text, by_image, gallery, picture, missing = run(app, requests)
    expected = vqa_predictor.rank(images, text)
    results = by_text.json()["results"]
    assert [r["index"] for r in results] == [images.index(image) for image, _ in expected]
    assert np.allclose([r["score"] for r in results], [s for _, s in expected], atol=1e-4)
    assert results[0]["name"] == f"i{results[0]['index']}.png"
    assert len(by_image.json()["results"]) == 2
    ranked = gallery.json()["results"]
    assert [r["name"] for r in ranked] == [f"g{images.index(image)}.png" for image, _ in expected]
    assert ranked[0]["url"].startswith("/v1/gallery/")
    assert picture.status_code == 200 and picture.content == images[1]
    one_line_error(missing, 404, "no gallery image 9")


def test_embed(vqa_app, vqa_predictor):
    image = png_of(64, 64, seed=3)
    body = run(vqa_app, lambda c: post(c, "/v1/embed", {"image": ("a.png", image)}, text="a mass")).json()
    vector = np.array(body["image_embedding"])
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    with torch.inference_mode():
        expected = vqa_predictor.model.embed_image(vqa_predictor.pixels(image)[None])[0]
    assert np.allclose(vector, expected.numpy(), atol=1e-5)
    assert np.linalg.norm(body["text_embedding"]) == pytest.approx(1.0, abs=1e-4)
    one_line_error(run(vqa_app, lambda c: post(c, "/v1/embed", None, k="1")), 422, "'image' file, a 'text'")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but holds one compressed row: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def test_bad_uploads_and_limits(vqa_predictor):
    app = app_for(vqa_predictor, max_upload_mb=0.5, max_text_chars=200, max_items=2, max_pixels=1_000_000)
    good = png_of(64, 64)

    async def requests(client):
        def answer(image=good, **data):
            return client.post("/v1/answer", files={"image": ("a.png", image)}, data={"question": QUESTION, **data})

        async def chunked():  # no Content-Length: the limit counts the bytes as they arrive
            yield (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                   b"Content-Type: image/png\r\n\r\n")
            for _ in range(4):
                yield b"x" * (200 * 1024)

        return {
            "empty": await answer(b""),
            "not an image": await answer(b"GIF89a but not really" * 10),
            "text as image": await client.post("/v1/answer", data={"image": "x", "question": QUESTION}),
            "no image": await client.post("/v1/answer", data={"question": QUESTION}, files={"other": ("a", b"1")}),
            "too many pixels": await answer(png_header_only(2000, 2000)),
            "bomb": await answer(png_header_only(60_000, 60_000)),
            "too large": await answer(b"\x89PNG" + bytes(600 * 1024)),
            "chunked": await client.post("/v1/answer", content=chunked(),
                                         headers={"content-type": "multipart/form-data; boundary=x"}),
            "long question": await answer(question="why " * 60),
            "1 MB question": await client.post("/v1/answer", files={"image": ("a.png", good)},
                                               data={"question": "a" * 400_000}),
            "no question": await answer(question=" "),
            "bad k": await answer(k="many"),
            "k out of range": await answer(k="0"),
            "bad flag": await answer(explain="maybe"),
            "json": await client.post("/v1/answer", json={"question": QUESTION}),
            "too many images": await client.post("/v1/rank", data={"text": "a"},
                                                 files=[("images", (f"{i}.png", good)) for i in range(3)]),
            "bad window": await answer(window="nowhere"),
        }

    r = run(app, requests)
    one_line_error(r["empty"], 422, "empty")
    one_line_error(r["not an image"], 422, "not a readable image")
    one_line_error(r["text as image"], 422, "file upload")
    one_line_error(r["no image"], 422, "'image'")
    one_line_error(r["too many pixels"], 413, "2000 x 2000", "max_pixels")
    one_line_error(r["bomb"], 413, "max_pixels")
    one_line_error(r["too large"], 413, "max_upload_mb")
    one_line_error(r["chunked"], 413, "max_upload_mb")
    one_line_error(r["long question"], 422, "'question' is 240 characters", "max_text_chars")
    one_line_error(r["1 MB question"], 422, "max_text_chars")
    one_line_error(r["no question"], 422, "'question'")
    one_line_error(r["bad k"], 422, "'k' must be an integer")
    one_line_error(r["k out of range"], 422, "'k' = 0")
    one_line_error(r["bad flag"], 422, "'explain' must be true or false")
    one_line_error(r["json"], 422, "multipart/form-data")
    one_line_error(r["too many images"], 413, "max_items")
    assert r["bad window"].status_code == 200  # a window applies to DICOM only


def test_dicom_upload_with_window_and_frame(vqa_app, vqa_predictor):
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    lung = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("ct.dcm", data)}, question=QUESTION,
                                       window="lung"))
    from medvlp.predict import Predictor

    expected = Predictor(vqa_predictor.model, vqa_predictor.tokenizer, kind="fine-tuned", max_text_len=32, task="vqa",
                         classes=vqa_predictor.classes, config=vqa_predictor.config, window="lung")
    assert lung.json()["answers"][0]["answer"] == expected.answer(data, QUESTION, k=1)[0][0]
    assert lung.json()["answers"][0]["probability"] == pytest.approx(expected.answer(data, QUESTION, k=1)[0][1],
                                                                     abs=1e-5)
    bad = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("ct.dcm", data)}, question=QUESTION,
                                      window="nowhere"))
    one_line_error(bad, 422, "nowhere")
    frame = run(vqa_app, lambda c: post(c, "/v1/answer", {"image": ("ct.dcm", data)}, question=QUESTION, frame="5"))
    one_line_error(frame, 422, "frame")


def test_concurrent_requests_answer_as_sequential_ones(vqa_predictor):
    app = app_for(vqa_predictor, max_batch=8, max_wait_ms=20)
    images = [png_of(64 + 8 * (i % 3), 64, seed=i) for i in range(12)]
    questions = [QUESTION, "what modality is this", "how many lesions are there in the left lung today"]

    def ask(client, i):
        return client.post("/v1/answer", files={"image": ("a.png", images[i])},
                           data={"question": questions[i % 3], "k": "7"})

    async def sequential(client):
        return [(await ask(client, i)).json() for i in range(len(images))]

    async def concurrent(client):
        return [r.json() for r in await asyncio.gather(*(ask(client, i) for i in range(len(images))))]

    alone = run(app, sequential)
    batcher = app.state.batchers["scores"]
    assert set(batcher.batch_sizes) == {1}
    together = run(app, concurrent)
    assert max(batcher.batch_sizes) > 1  # some requests shared a forward pass
    assert all(size <= 8 for size in batcher.batch_sizes)
    for a, b in zip(alone, together, strict=True):
        assert a["question"] == b["question"]
        assert [x["answer"] for x in a["answers"]] == [x["answer"] for x in b["answers"]]
        assert np.allclose([x["probability"] for x in a["answers"]], [x["probability"] for x in b["answers"]],
                           atol=1e-5)


def block_model_thread(engine):
    """Occupy the model's thread until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(10)

    engine.executor.submit(hold)
    started.wait(5)
    return release


def test_a_full_queue_and_a_timeout_are_503(vqa_predictor):
    app = app_for(vqa_predictor, max_queue=1, max_batch=1, max_wait_ms=0)
    engine = app.state.engine

    async def flood(client):
        release = block_model_thread(engine)
        tasks = [asyncio.ensure_future(post(client, "/v1/answer", {"image": ("a.png", png_of(64, 64, seed=i))},
                                            question=QUESTION)) for i in range(4)]
        await asyncio.sleep(0.5)
        release.set()
        return await asyncio.gather(*tasks)

    responses = run(app, flood)
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and codes[-1] == 503
    one_line_error(next(r for r in responses if r.status_code == 503), 503, "max_queue")

    app = app_for(vqa_predictor, request_timeout_s=0.2)
    engine = app.state.engine

    async def slow(client):
        release = block_model_thread(engine)
        try:
            return await post(client, "/v1/answer", {"image": ("a.png", png_of(64, 64))}, question=QUESTION)
        finally:
            release.set()

    one_line_error(run(app, slow), 503, "request_timeout_s")


def test_serve_loads_a_run_folder_and_refuses_what_is_not_one(vqa_run, tmp_path, capsys):
    from medvlp.cli import main

    app = build(vqa_run, ["precision=fp32", "max_batch=4"])
    info = run(app, lambda c: c.get("/v1/model")).json()
    assert info["run"] == vqa_run.name and info["task"] == "vqa" and info["limits"]["max_batch"] == 4
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a medvlp checkpoint" in capsys.readouterr().err
    assert main(["serve", str(vqa_run), "max_batch=0"]) == 2
    assert "max_batch=0: must be positive" in capsys.readouterr().err
    assert main(["serve", str(vqa_run), "max_bach=4"]) == 2
    assert "did you mean 'max_batch'" in capsys.readouterr().err


def test_a_pretraining_run_ranks_and_embeds(tiny_pretrain_run, tmp_path):
    images = [png_of(64, 64, seed=s) for s in range(2)]
    for i, data in enumerate(images):
        (tmp_path / f"g{i}.png").write_bytes(data)
    app = build(tiny_pretrain_run, ["precision=fp32"], gallery=tmp_path)

    async def requests(client):
        return (await client.get("/v1/model"), await client.post("/v1/rank", data={"text": "a mass"}),
                await client.post("/v1/embed", data={"text": "a mass"}),
                await post(client, "/v1/answer", {"image": ("a.png", images[0])}, question=QUESTION))

    model, ranked, embedded, answer = run(app, requests)
    assert model.json()["kind"] == "pre-trained" and model.json()["endpoints"] == ["rank", "embed"]
    assert sorted(r["name"] for r in ranked.json()["results"]) == ["g0.png", "g1.png"]
    assert np.linalg.norm(embedded.json()["text_embedding"]) == pytest.approx(1.0, abs=1e-4)
    one_line_error(answer, 422, "pre-trained run", "/v1/answer")
