"""The generator: a description (+ examples) -> a LoRA adapter, as the similarity-weighted mixture of the library
experts retrieved for it plus a learned correction, decoded by a network trained with a conditional-VAE prior.

`from loramint.gen import Minter` is the entry point; the import is lazy so that `loramint.gen.config` stays
importable without torch (the CLI builds its parser from it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Minter"]


def __getattr__(name: str) -> Any:
    if name == "Minter":
        from loramint.gen.minter import Minter

        return Minter
    raise AttributeError(f"module 'loramint.gen' has no attribute {name!r}")
