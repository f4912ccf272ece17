"""The generator's architecture settings, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GeneratorConfig:
    cond_dim: int = 384
    """Size of the condition vector (all-MiniLM-L6-v2: 384)."""
    d_model: int = 256
    """Width of the slice tokens and of the decoder's input."""
    hidden: int = 512
    """Width of the MLPs and of the decoder trunk."""
    d_latent: int = 64
    dropout: float = 0.0
    residual_k: int = 0
    """0: the decoder emits the whole adapter. K > 0: the minted adapter is the K retrieved experts'
    similarity-weighted mixture (a learned gain per layer and module type) plus the decoded correction
    (`gen.residual`), so the description decides the starting point and minting cannot collapse to one
    adapter for every task."""

    @classmethod
    def from_dict(cls, settings: dict) -> GeneratorConfig:
        """From a checkpoint's or a YAML file's `model` mapping. Settings of variants deleted after losing
        their ablations (`REMOVED`, docs/history.md) are accepted switched off only."""
        on = sorted(k for k, off in REMOVED.items() if k in settings and settings[k] != off)
        if on:
            raise ValueError(
                f"generator settings {on} belong to variants that were removed (docs/history.md): retrain "
                "the generator without them"
            )
        return cls(**{k: v for k, v in settings.items() if k not in REMOVED})

    def __post_init__(self) -> None:
        bad = [k for k in ("cond_dim", "d_model", "hidden", "d_latent") if getattr(self, k) < 1]
        bad += ["residual_k"] if self.residual_k < 0 else []
        if bad or not 0 <= self.dropout < 1:
            raise ValueError(f"invalid GeneratorConfig field(s) {bad or ['dropout']}: {self}")


REMOVED = {"adaptive_mix": False, "own_gate": False, "max_correction": 0.0}
"""Settings of deleted variants (an adaptive mixer, a learned own-expert gate, a cap on the correction's
norm: each lost its ablation, docs/history.md) with their off values, which older checkpoints record."""
