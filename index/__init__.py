"""The expert library: PEFT adapter folders on disk, SQLite metadata, a FAISS index over descriptions."""

from loramint.index.library import Expert, ExpertLibrary
from loramint.index.vectors import IndexParams, VectorIndex

__all__ = ["Expert", "ExpertLibrary", "IndexParams", "VectorIndex"]
