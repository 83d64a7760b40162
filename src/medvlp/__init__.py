"""medvlp: medical vision-and-language pre-training (M3AE, MPMA) and its benchmark.

Use a trained run from Python (see docs/python-api.md)::

    import medvlp
    model = medvlp.load("runs/demo/benchmark/vqa/pre-trained-seed0")  # fine-tuned, pre-trained or exported
    model.answer("scan.png", "Is there a lesion?")

``import medvlp`` is light: torch and the model are imported when ``load`` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medvlp.constants import VERSION as __version__

__all__ = ["load", "__version__"]

if TYPE_CHECKING:
    from medvlp.predict import Predictor


def load(run: Any, *, window: Any = None, frame: int | None = None) -> Predictor:
    """A trained run folder, ready to ``answer``, ``classify``, ``rank``, ``embed_image`` and ``embed_text``.

    Args:
        run: a fine-tuned run (``medvlp finetune``), a pre-training run (``medvlp pretrain``, or a
            ``checkpoints/step-*`` of one), a converted checkpoint (``medvlp convert``) or an export
            (``medvlp export``).
        window: for DICOM images: a preset such as ``"lung"``, ``"minmax"`` or ``(center, width)``; ``None``: the
            file's own window.
        frame: for multi-frame DICOM: the frame to read; ``None``: the middle one.

    Returns:
        A ``medvlp.predict.Predictor``. A folder that is no run is a one-line ``MedvlpError``.
    """
    from medvlp.predict import load as load_run

    return load_run(run, window=window, frame=frame)
