"""What every generator offers: the one protocol that serving, evaluation and the CLI program against.

`Minter` (one trained generator) and `EnsembleMinter` (several trained alike, minting the mean of their
updates) both implement it, and `Minter.from_pretrained` loads either from a checkpoint folder. A mint is
staged so that callers can time or batch its parts: `condition` (descriptions -> embeddings), `decode` (one
batched pass of the network), `retrieve` (the library experts each condition composes with) and `adapter`
(one row's tokens + its retrieved experts -> a `LoraAdapter`); `mint_many` runs them for a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from loramint.adapters import LoraAdapter


@runtime_checkable
class MintingModel(Protocol):
    @property
    def max_rank(self) -> int:
        """Rank of a minted adapter before any truncation."""

    @property
    def layout(self) -> Any:
        """The adapter layout it mints (base model, target modules, layers, rank)."""

    @property
    def encoder(self) -> Any:
        """The description encoder; its name and dimension must match the library's."""

    @property
    def bank(self) -> Any:
        """The library experts it composes with (names, description keys, factors)."""

    def condition(
        self, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
    ) -> torch.Tensor:
        """[B, C] unit conditions."""

    def retrieve(self, cond: torch.Tensor) -> list:
        """Per row: the retrieved experts and their similarities."""

    def decode(self, cond: torch.Tensor) -> Any:
        """The network's output for a batch of conditions (the learned prior's mean)."""

    def row(self, tokens: Any, i: int) -> Any:
        """Row `i` of `decode`'s output."""

    def adapter(self, tokens: Any, retrieved: Any) -> LoraAdapter:
        """One adapter from a row of tokens and that row's retrieved experts."""

    def mint_many(
        self,
        descriptions: Sequence[str],
        examples: Sequence[Sequence[str] | None] | None = None,
        rank: int | None = None,
    ) -> list[LoraAdapter]:
        """One adapter per description, in one decoder pass."""

    def mint(
        self,
        description: str,
        examples: Sequence[str] | None = None,
        rank: int | None = None,
    ) -> LoraAdapter:
        """One adapter."""

    def fuse(
        self, descriptions: Sequence[str], weights: Sequence[float] | None = None, rank: int | None = None
    ) -> LoraAdapter:
        """One adapter for several tasks."""

    def provenance(
        self, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
    ) -> list[dict]:
        """Per description: the experts a mint draws on and the confidence."""
