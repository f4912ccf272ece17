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
    adaptive_mix: bool = False
    """Residual generators only: a small net maps the K retrieved cosines to the mixture's weights and to a
    gain on the correction (initialised to cos_k / Σ cos_j and 1, the fixed rule), so a description that
    retrieves its own expert (cosine ~1, a seen task) can mint that expert instead of expert + correction."""
    own_gate: bool = False
    """Residual generators only: a learned gate alpha from how close the retrieved cosines are to 1
    (`gen.residual.closeness`) blends the minted update towards the top-1 expert's own,
    ΔW = (1 - alpha) (mixture + correction) + alpha ΔW_top1, so a description that is a library expert's
    (cosine 1) mints that expert while a near sibling (0.98) keeps the mixture. Starts closed (alpha ~ 0.002):
    the generator it is added to mints what it did."""
    max_correction: float = 0.0
    """Residual generators only: > 0 caps the decoded correction's ΔW norm (after its gain) at this multiple
    of the retrieved mixture's ΔW norm (Frobenius over all modules; `gen.residual.bounded_gain`), so the
    description's mixture stays the base point. Without a cap the functional objective grew a nearly
    task-independent correction of 2-7x the mixture's norm, its size varying from run to run (README
    "Generator"). 0: no cap."""

    def __post_init__(self) -> None:
        bad = [k for k in ("cond_dim", "d_model", "hidden", "d_latent") if getattr(self, k) < 1]
        bad += ["residual_k"] if self.residual_k < 0 else []
        bad += ["adaptive_mix"] if self.adaptive_mix and not self.residual_k else []
        bad += ["own_gate"] if self.own_gate and not self.residual_k else []
        bad += (
            ["max_correction"]
            if self.max_correction < 0 or (self.max_correction and not self.residual_k)
            else []
        )
        if bad or not 0 <= self.dropout < 1:
            raise ValueError(f"invalid GeneratorConfig field(s) {bad or ['dropout']}: {self}")
