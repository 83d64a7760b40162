"""medvlp: medical vision-and-language pre-training (M3AE, MPMA) and its benchmark."""

__version__ = "0.1.0"
