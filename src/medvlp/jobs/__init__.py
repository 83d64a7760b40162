"""User-facing jobs built on training and evaluation: the main job (``demo``), the benchmark runner, zero-shot
retrieval (``zero_shot``) and the export of a run's encoders (``export``)."""
