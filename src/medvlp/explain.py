"""Where an answer came from: a heat-map over the image, read from the fusion's co-attention.

Two methods, both over the co-attention fusion's layers (each layer: self-attention in each stream, then each
stream's cross-attention to the other):

- ``"rollout"``: **co-attention rollout**. Attention rollout (Abnar & Zuidema, 2020) extended to two streams
  with the update rules of Chefer et al. (2021, "Generic Attention-model Explainability for Interpreting
  Bi-Modal and Encoder-Decoder Transformers"): relevance maps ``R_tt``, ``R_ti``, ``R_ii``, ``R_it`` start at
  identity / zero and every attention map, averaged over heads, adds its mixing (``R_xy += A_xy @ R_yy`` etc.).
  The heat-map is the row of the text stream's first token (which the joint representation pools) in ``R_ti``,
  over the image patches: how much of each patch reached the text through the rolled-out cross-attention.
- ``"gradient"``: **gradient x attention** (Chefer et al., 2021): the same rules, each map replaced by
  ``mean over heads of relu(dlogit/dA * A)`` for the chosen answer's logit, so only attention that raised
  that answer counts.

The attention probabilities are recomputed from each attention module's own query/key/value projections inside
a forward hook, and the hook returns the recomputed output, so gradients flow through them. The hook checks
that the recomputation equals the module's output and says so in one line when the fusion's attention has
changed shape. Heat-maps come back on the model's patch grid and mapped onto the ORIGINAL image (the evaluation
transform's centre crop and resize undone): see ``Explanation.heatmap``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from medvlp.errors import MedvlpError

METHODS = ("rollout", "gradient")
STREAMS = ("text", "image")


@dataclass
class Explanation:
    """A heat-map for one image and text.

    - ``grid`` float32 [G, G]: relevance per patch of the model's input (raster order), scaled to [0, 1].
    - ``box`` (left, top, right, bottom): the part of the original image the model saw, in its pixels.
    - ``size`` (width, height) of the original image.
    - ``target``: the answer (or label) explained; ``scores``: the answers / labels with their scores.
    """

    method: str
    grid: np.ndarray
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    target: str
    scores: list[tuple[str, float]]

    def heatmap(self) -> np.ndarray:
        """float32 [H, W] over the original image, in [0, 1]: the grid resized (bilinear) onto the crop the
        model saw; 0 outside it (the model never saw those pixels)."""
        return grid_to_image(self.grid, self.box, self.size)

    def hottest(self) -> tuple[float, float]:
        """(x, y) in original pixels of the centre of the hottest grid cell."""
        return cell_centre(int(self.grid.argmax()), self.grid.shape[0], self.box)


def crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre square ``EvalTransform`` resizes to the model's input, for an image of ``size`` (w, h)."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def grid_to_image(grid: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """A [G, G] grid onto the original image: float32 [H, W], the grid bilinearly resized to ``box``."""
    left, top, right, bottom = box
    out = np.zeros((size[1], size[0]), np.float32)
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(grid, np.float32))[None, None],
                            size=(bottom - top, right - left), mode="bilinear", align_corners=False)
    out[top:bottom, left:right] = resized[0, 0].clamp_(0, 1).numpy()
    return out


def cell_centre(index: int, cells: int, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(x, y) in original pixels of the centre of grid cell ``index`` (raster order) of a ``cells``-wide grid."""
    left, top, right, bottom = box
    row, col = divmod(index, cells)
    return left + (col + 0.5) * (right - left) / cells, top + (row + 0.5) * (bottom - top) / cells


# -- recording the fusion's attention ----------------------------------------------------------------------------


def fusion_attention(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Per fusion layer, its four attention modules: ``{"text_self", "text_cross", "image_self",
    "image_cross"}``. Checked at run time: a fusion of another shape is a one-line ``MedvlpError``."""
    fusion = getattr(model, "fusion", None)
    layers = [getattr(fusion, f"{stream}_layers", None) for stream in STREAMS]
    problem = None
    if not all(isinstance(stream, nn.ModuleList) for stream in layers) or len(layers[0]) != len(layers[1]):
        problem = "model.fusion.text_layers / image_layers (two module lists of equal length)"
    else:
        for layer in (*layers[0], *layers[1]):
            for name in ("self_attn", "cross_attn"):
                attn = getattr(layer, name, None)
                if not (isinstance(getattr(attn, "num_heads", None), int)
                        and all(isinstance(getattr(attn, part, None), nn.Linear)
                                for part in ("query", "key", "value", "out"))):
                    problem = f"a {name} with query/key/value/out projections and num_heads in every fusion layer"
    if problem:
        raise MedvlpError(f"explanations need the co-attention fusion's {problem}; this model's fusion "
                          f"({type(fusion).__name__}) has another structure")
    return [{f"{stream}_{kind}": getattr(layer, f"{kind}_attn") for stream, layer in zip(STREAMS, pair)
             for kind in ("self", "cross")} for pair in zip(*layers)]


def attend(module: nn.Module, query: Tensor, context: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Multi-head attention of ``module``'s projections written out: (output [B, Lq, W], probabilities
    [B, heads, Lq, Lk])."""
    heads = module.num_heads

    def split(x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(module.query(query)), split(module.key(context)), split(module.value(context))
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return module.out((probs @ v).transpose(1, 2).flatten(2)), probs


@contextmanager
def recording(model: nn.Module) -> Iterator[list[dict[str, Tensor]]]:
    """Within the block, every forward pass of ``model`` records its fusion's attention probabilities: the
    yielded list gets, per layer, ``{"text_self": [B, h, L, L], "text_cross": [B, h, L, 1+K], "image_self":
    ..., "image_cross": [B, h, 1+K, L]}``. With gradients enabled they are part of the graph (the hook returns
    the output computed from them), so ``torch.autograd.grad`` can reach them."""
    layers = fusion_attention(model)
    maps: list[dict[str, Tensor]] = [{} for _ in layers]
    handles = []

    def hook_for(index: int, name: str):
        def hook(module, args, kwargs, output):
            try:
                query, context = args[0], args[1] if len(args) > 1 else kwargs["context"]
            except (IndexError, KeyError):
                raise MedvlpError(f"fusion layer {index} {name}: called without (query, context); the fusion's "
                                  "attention has changed and medvlp.explain must follow it") from None
            key_mask = args[2] if len(args) > 2 else kwargs.get("key_mask")
            out, probs = attend(module, query, context, key_mask)
            if not torch.allclose(out.float(), output.float(), atol=1e-4, rtol=1e-3):
                raise MedvlpError(f"fusion layer {index} {name}: recomputed attention differs from the module's "
                                  "output; the fusion's attention has changed and medvlp.explain must follow it")
            maps[index][name] = probs
            return out

        return hook

    try:
        for index, layer in enumerate(layers):
            for name, module in layer.items():
                handles.append(module.register_forward_hook(hook_for(index, name), with_kwargs=True))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def rollout(maps: list[dict[str, Tensor]], grads: list[dict[str, Tensor]] | None = None) -> Tensor:
    """Co-attention rollout (see the module docstring) -> relevance of the text's first token to each image
    patch, [B, K]. With ``grads`` (the same structure as ``maps``: each map's gradient) each map is weighed by
    its gradient, ``relu(grad * A)`` averaged over heads (gradient x attention)."""

    def mean(index: int, name: str) -> Tensor:
        probs = maps[index][name].detach()
        if grads is not None:
            return (grads[index][name] * probs).clamp(min=0).mean(dim=1)
        return probs.mean(dim=1)

    first = maps[0]["text_cross"]
    batch, _, length, patches = first.shape
    r_tt = torch.eye(length, device=first.device).expand(batch, -1, -1)
    r_ii = torch.eye(patches, device=first.device).expand(batch, -1, -1)
    r_ti = first.new_zeros(batch, length, patches, dtype=torch.float32)
    r_it = first.new_zeros(batch, patches, length, dtype=torch.float32)
    for i in range(len(maps)):
        a_tt, a_ii = mean(i, "text_self").float(), mean(i, "image_self").float()
        r_tt, r_ti = r_tt + a_tt @ r_tt, r_ti + a_tt @ r_ti
        r_ii, r_it = r_ii + a_ii @ r_ii, r_it + a_ii @ r_it
        a_ti, a_it = mean(i, "text_cross").float(), mean(i, "image_cross").float()
        r_tt, r_ti, r_ii, r_it = (r_tt + a_ti @ r_it, r_ti + a_ti @ r_ii,
                                  r_ii + a_it @ r_ti, r_it + a_it @ r_tt)
    return r_ti[:, 0, 1:]  # the text's first token; the image's class token (column 0) is no patch


def normalised(relevance: Tensor) -> np.ndarray:
    """[K] relevance -> float32 [G, G] grid scaled to [0, 1] (min to 0, max to 1: rollout's relevance sits on a
    large even floor, the residual paths, and the differences are what shows where it looked); a flat map is 0."""
    cells = math.isqrt(relevance.numel())
    if cells * cells != relevance.numel():
        raise MedvlpError(f"the image stream has {relevance.numel()} patches, not a square grid")
    grid = relevance.detach().float().reshape(cells, cells).cpu().numpy()
    low, high = grid.min(), grid.max()
    return ((grid - low) / (high - low) if high > low else np.zeros_like(grid)).astype(np.float32)


# -- explaining a prediction --------------------------------------------------------------------------------------


def explain(predictor: Any, image: Any, text: str, *, method: str = "rollout", target: str | None = None,
            k: int = 5) -> Explanation:
    """A heat-map of where ``predictor`` (a ``medvlp.predict.Predictor`` of a VQA or classification run)
    looked to answer ``text`` about ``image`` (a path, bytes or PIL image).

    Args:
        method: ``"rollout"`` (co-attention rollout) or ``"gradient"`` (gradient x attention).
        target: the answer / label to explain (default: the top one); only ``"gradient"`` depends on it.
        k: how many answers ``Explanation.scores`` keeps.

    Returns:
        The ``Explanation`` (grid, crop box, original size, answers with their scores).
    """
    if method not in METHODS:
        raise MedvlpError(f"explain method {method!r}: choose one of {', '.join(METHODS)}")
    if predictor.task not in ("vqa", "classification"):
        raise MedvlpError(f"this model was fine-tuned for {predictor.task}; explanations need a vqa or "
                          "classification run")
    decoded = decode(predictor, image)
    batch = predictor.batch([decoded], [text])
    gradient = method == "gradient"
    with torch.inference_mode(False), torch.set_grad_enabled(gradient), recording(predictor.model) as maps:
        logits = predictor.model(batch, classify=True, whole_fusion=True).class_logits[0].float()
        probs = logits.sigmoid() if predictor.task == "vqa" else logits.softmax(dim=0)
        classes = predictor.classes
        chosen = int(probs.argmax()) if target is None else _index(classes, target)
        grads = None
        if gradient:  # d logit / d attention, for the attention maps only (the weights keep no .grad)
            names = [(i, name) for i, layer in enumerate(maps) for name in layer]
            values = torch.autograd.grad(logits[chosen], [maps[i][name] for i, name in names])
            grads = [{} for _ in maps]
            for (i, name), value in zip(names, values):
                grads[i][name] = value
        relevance = rollout(maps, grads)[0]
    scores, indices = probs.detach().topk(min(k, len(classes)))
    return Explanation(method, normalised(relevance), crop_box(decoded.size), decoded.size, classes[chosen],
                       [(classes[i], s) for i, s in zip(indices.tolist(), scores.tolist())])


def explain_answer(predictor: Any, image: Any, question: str, k: int = 5,
                   method: str = "rollout") -> tuple[list[tuple[str, float]], np.ndarray]:
    """``Predictor.answer(..., explain=...)``: the ``k`` best answers and the heat-map of the top one, float32
    [H, W] over the original image."""
    predictor._need("vqa", "answer questions")
    explanation = explain(predictor, image, question, method=method, k=k)
    return explanation.scores, explanation.heatmap()


def decode(predictor: Any, image: Any) -> Image.Image:
    """The image as the predictor decodes it (before its crop and resize), "L" or "RGB"."""
    from medvlp.data.images import ImageError, open_image, to_standard_mode
    from medvlp.errors import DataError

    if isinstance(image, Image.Image):
        return to_standard_mode(image)
    try:
        return open_image(image, window=predictor.window, frame=predictor.frame)
    except ImageError as e:
        where = image if not isinstance(image, bytes) else "the image bytes"
        raise DataError(f"{where}: cannot read the image ({e}); give a PNG, JPEG or DICOM file") from None


def _index(classes: list[str], target: str) -> int:
    try:
        return classes.index(target)
    except ValueError:
        raise MedvlpError(f"{target!r} is not one of the model's answers (e.g. {', '.join(classes[:5])})") from None


# -- pictures -----------------------------------------------------------------------------------------------------


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image in grey with the heat-map blended over it (a blue-to-red ramp; cold cells stay clear)."""
    grey = np.asarray(image.convert("L"), np.float32)[..., None] / 255.0
    heat = np.clip(heatmap, 0, 1)[..., None]
    ramp = np.concatenate([np.clip(1.5 - np.abs(4 * heat - c), 0, 1) for c in (3, 2, 1)], axis=-1)  # r, g, b
    weight = alpha * heat
    blended = grey * (1 - weight) + ramp * weight
    return Image.fromarray((blended * 255 + 0.5).astype(np.uint8), "RGB")
