"""Values every layer shares, in one place; this module imports nothing."""

VERSION = "0.1.0"

# CLIP's per-channel pixel mean and standard deviation (RGB, pixels in [0, 1]): the model standardises its inputs
# with them, as CLIP and M3AE do.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

IGNORE_INDEX = -100  # the label of a text position that MLM does not predict (cross-entropy's ignore_index)

# File names in a run folder.
WEIGHTS = "model.safetensors"  # a model's weights (a fine-tuned run's best, or one checkpoint's)
MODEL_CONFIG = "model.yaml"  # beside the weights: the config of the model they belong to (ModelConfig)
TRAINER_STATE = "trainer.pt"  # optimiser, schedule, loop and sample-stream state of a checkpoint
LATEST = "latest"  # in checkpoints/: the name of the newest complete checkpoint folder
