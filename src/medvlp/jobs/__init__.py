"""User-facing jobs built on training and evaluation: the main job (``demo``) and the benchmark runner."""
