"""Task descriptions (optionally with a few examples) -> L2-normalised embeddings via sentence-transformers."""

from loramint.encoders.text import DEFAULT_ENCODER, Encoder, EncoderConfig, resolve_encoder

__all__ = ["DEFAULT_ENCODER", "Encoder", "EncoderConfig", "resolve_encoder"]
