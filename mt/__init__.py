"""mt: train, run and score encoder-decoder Transformer translation models."""

__version__ = "0.1.0"
