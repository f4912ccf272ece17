"""Task descriptions (optionally with a few examples) -> L2-normalised embeddings via sentence-transformers."""
