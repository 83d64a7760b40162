"""Training: the run configs (``config``), pre-training and fine-tuning (Lightning modules and the runs),
checkpoints, the trainer, the optimiser and its schedule, and ``runs.open_run``: every run folder back as a
model."""
