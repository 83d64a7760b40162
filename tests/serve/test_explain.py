"""Explanations: co-attention rollout and gradient x attention on the fusion's recorded attention, heat-maps
mapped onto the original image, the Python API and ``medvlp explain``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import png_of
from PIL import Image
from torch import nn

from medvlp import explain as ex
from medvlp.cli import main
from medvlp.errors import MedvlpError


def attention_maps(layers: int, length: int, patches: int, hot: int) -> list[dict[str, torch.Tensor]]:
    """Uniform attention everywhere except the text's cross-attention, which looks at patch ``hot``."""
    def uniform(q: int, k: int) -> torch.Tensor:
        return torch.full((1, 2, q, k), 1.0 / k)

    maps = []
    for _ in range(layers):
        cross = torch.zeros(1, 2, length, patches)
        cross[..., hot] = 1.0
        maps.append({"text_self": uniform(length, length), "text_cross": cross,
                     "image_self": uniform(patches, patches), "image_cross": uniform(patches, length)})
    return maps


@pytest.mark.parametrize("hot", [1, 7, 16])
def test_rollout_follows_concentrated_cross_attention(hot):
    relevance = ex.rollout(attention_maps(2, length=5, patches=1 + 16, hot=hot))  # class token + a 4 x 4 grid
    grid = ex.normalised(relevance[0])
    assert grid.shape == (4, 4) and grid.min() == 0.0 and grid.max() == 1.0
    assert int(grid.argmax()) == hot - 1  # column 0 is the image's class token, not a patch


def test_gradient_weighting_keeps_only_what_raised_the_answer():
    maps = attention_maps(1, length=3, patches=1 + 4, hot=2)
    grads = [{name: torch.zeros_like(probs) for name, probs in layer.items()} for layer in maps]
    grads[0]["text_cross"][..., 2] = -1.0  # attention to patch 2 lowered the answer
    grads[0]["text_cross"][..., 4] = 1.0
    maps[0]["text_cross"][..., 4] = 0.5
    relevance = ex.rollout(maps, grads)[0]
    assert int(relevance.argmax()) == 3 and relevance[1] == 0  # patch 4 (index 3); patch 2 gets nothing


def test_heatmap_is_mapped_onto_the_original_image():
    grid = np.zeros((4, 4), np.float32)
    grid[1, 3] = 1.0
    size = (300, 200)  # wide: the model saw the centre 200 x 200 square
    box = ex.crop_box(size)
    assert box == (50, 0, 250, 200)
    explanation = ex.Explanation("rollout", grid, box, size, "yes", [])
    heat = explanation.heatmap()
    assert heat.shape == (200, 300) and heat.dtype == np.float32
    assert heat[:, :50].max() == 0 and heat[:, 250:].max() == 0  # never seen: no heat
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 50 + 3 * 50 <= x < 250 and 50 <= y < 100  # inside cell (row 1, column 3) of the crop
    assert explanation.hottest() == (50 + 3.5 * 50, 1.5 * 50)


@pytest.mark.parametrize("method", ex.METHODS)
def test_explain_a_real_model(vqa_predictor, method):
    image = Image.open(io.BytesIO(png_of(120, 90, seed=3)))
    result = ex.explain(vqa_predictor, image, "is there a lesion?", method=method, k=3)
    cells = vqa_predictor.model.cfg.image_size // vqa_predictor.model.cfg.patch_size
    assert result.grid.shape == (cells, cells) and result.grid.min() == 0 and result.grid.max() == 1
    assert result.size == (120, 90) and result.box == (15, 0, 105, 90)
    expected = vqa_predictor.answer(image, "is there a lesion?", k=3)
    assert [a for a, _ in result.scores] == [a for a, _ in expected]
    assert np.allclose([s for _, s in result.scores], [s for _, s in expected], atol=1e-5)
    assert result.target == expected[0][0]
    assert not any(p.grad is not None for p in vqa_predictor.model.parameters())  # nothing left behind


def test_gradient_depends_on_the_answer_explained(vqa_predictor):
    image = png_of(64, 64, seed=5)
    yes = ex.explain(vqa_predictor, image, "is there a lesion?", method="gradient", target="yes")
    ct = ex.explain(vqa_predictor, image, "is there a lesion?", method="gradient", target="ct")
    assert yes.target == "yes" and ct.target == "ct" and not np.allclose(yes.grid, ct.grid)
    with pytest.raises(MedvlpError, match="'tumour' is not one of the model's answers"):
        ex.explain(vqa_predictor, image, "is there a lesion?", target="tumour")


def test_python_api_answer_with_explain_returns_the_heatmap(vqa_predictor):
    image = png_of(100, 60, seed=2)
    answers, heat = vqa_predictor.answer(image, "is there a lesion?", k=2, explain=True)
    assert heat.shape == (60, 100) and 0 <= heat.min() and heat.max() == pytest.approx(1.0)
    assert [a for a, _ in answers] == [a for a, _ in vqa_predictor.answer(image, "is there a lesion?", k=2)]


def test_a_fusion_of_another_shape_is_one_line(vqa_predictor):
    layer = vqa_predictor.model.fusion.text_layers[0]
    original = layer.cross_attn
    layer.cross_attn = nn.Identity()  # (pytest's monkeypatch would delete a submodule on undo)
    try:
        with pytest.raises(MedvlpError, match="explanations need the co-attention fusion's a cross_attn"):
            ex.explain(vqa_predictor, png_of(64, 64), "is there a lesion?")
    finally:
        layer.cross_attn = original


def test_attention_that_no_longer_matches_is_refused(vqa_predictor):
    module = vqa_predictor.model.fusion.image_layers[1].self_attn
    module.forward = lambda *args, **kwargs: 2 * type(module).forward(module, *args, **kwargs)
    try:
        with pytest.raises(MedvlpError, match="layer 1 image_self: recomputed attention differs"):
            ex.explain(vqa_predictor, png_of(64, 64), "is there a lesion?")
    finally:
        del module.forward


def test_explain_command_writes_the_overlay(vqa_run, tmp_path, capsys):
    image = tmp_path / "scan.png"
    image.write_bytes(png_of(150, 100, seed=4))
    out = tmp_path / "heat.png"
    assert main(["explain", str(vqa_run), "--image", str(image), "--question", "Is there a lesion?",
                 "--out", str(out), "--method", "gradient"]) == 0
    assert Image.open(out).size == (150, 100) and Image.open(out).mode == "RGB"
    assert "heat-map (gradient)" in capsys.readouterr().out
    assert main(["explain", str(vqa_run), "--image", str(image), "--question", "Is there a lesion?",
                 "--out", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert main(["explain", str(vqa_run), "--image", str(tmp_path / "none.png"), "--question", "Is it?",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err  # checked before the model loads
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["explain", str(vqa_run), "--image", str(tmp_path / "broken.png"), "--question", "Is it?",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read the image" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_hit_rate_script_finds_the_lesion_and_counts_against_chance(vqa_predictor):
    from helpers import benchmark_script

    hits = benchmark_script("explain_hits")
    image, (x, y), radius = hits.lesion_scan(seed=7, index=0)
    pixels = np.asarray(image, np.float32)
    rows, cols = np.mgrid[:pixels.shape[0], :pixels.shape[1]]
    distance = np.hypot(cols - x, rows - y)
    inside = pixels[distance < radius / 2].mean()
    around = pixels[(distance > 1.5 * radius) & (distance < 3 * radius)].mean()
    assert abs(inside - around) > 30  # the recorded position is where the lesion was painted
    touching = hits.cells_touching((10.0, 10.0), 3.0, 4, (0, 0, 80, 80))
    assert touching.sum() == 1 and touching[0, 0]
    assert hits.cells_touching((20.0, 20.0), 1.0, 4, (0, 0, 80, 80)).sum() == 4  # on a corner of four cells
    rates = hits.measure(vqa_predictor, n=2, seed=7)
    assert set(rates) == {"rollout", "gradient", "chance"} and rates["chance"]["centre"] == 1 / 16
    assert all(0 <= r <= 1 for method in rates.values() for r in method.values())
