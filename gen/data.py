"""The generator's training set: a library's experts as normalised canonical slice tokens, with the
embeddings of their descriptions (several phrasings each) and the neighbours that form the semantic prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loramint.gen.canonical import canonicalize
from loramint.gen.layout import Layout, Normalizer
from loramint.index import ExpertLibrary


@dataclass
class ExpertSet:
    """N experts of one `Layout`: tokens {group: [N, L, dim]} (normalised canonical factors), description
    embeddings (keys [N, C]: the library's stored ones, used for retrieval) and per-expert phrasings
    (conds[i]: [P_i, C], the first row = the stored description)."""

    ids: list[str]
    names: list[str]
    layout: Layout
    normalizer: Normalizer
    tokens: dict[str, torch.Tensor]
    keys: torch.Tensor
    conds: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_library(
        cls,
        library: ExpertLibrary,
        ids: Sequence[str] | None = None,
        phrasings: dict[str, Sequence[str]] | None = None,
        normalizer: Normalizer | None = None,
    ) -> ExpertSet:
        """Every (or the given) expert of `library`; `phrasings` maps an expert's name to more descriptions
        of its task (augmentation); `normalizer` defaults to one fitted on these experts."""
        experts = [library.get(i) for i in ids] if ids is not None else library.list()
        if not experts:
            raise ValueError(f"library {library.root} has no experts to learn from")
        adapters = [canonicalize(e.load_adapter()) for e in experts]
        layout = Layout.of(adapters[0])
        raw = [layout.to_tokens(a) for a in adapters]  # raises on an expert of another layout
        normalizer = normalizer or Normalizer.fit(raw)
        normed = [normalizer.normalize(r) for r in raw]
        tokens = {g: torch.stack([n[g] for n in normed]) for g in layout.groups}
        _, keys = library.embeddings([e.id for e in experts])
        conds = []
        for expert, key in zip(experts, keys, strict=True):
            extra = [
                p for p in (phrasings or {}).get(expert.name, []) if p.strip() and p != expert.description
            ]
            rows = [key[None]] + ([library.encoder.encode(extra)] if extra else [])
            conds.append(torch.from_numpy(np.concatenate(rows)).float())
        return cls(
            [e.id for e in experts],
            [e.name for e in experts],
            layout,
            normalizer,
            tokens,
            torch.from_numpy(keys).float(),
            conds,
        )

    def neighbours(
        self, query: torch.Tensor, k: int, exclude: Sequence[int | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, k], cosines [B, k]) of the k experts nearest each unit query [B, C], best first;
        exclude[b] (an expert's own index, for leave-one-out training) is never returned for row b."""
        if not 1 <= k < len(self) + (exclude is None):
            raise ValueError(f"k must be in [1, {len(self) - (exclude is not None)}], got {k}")
        sims = query @ self.keys.T  # [B, N]
        if exclude is not None:
            for row, own in enumerate(exclude):
                if own is not None:
                    sims[row, own] = -torch.inf
        top = sims.topk(k, dim=-1)
        return top.indices, top.values
