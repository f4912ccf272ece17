"""Canonical LoRA factors: one representative per update ΔW, so different experts' factors are comparable.

LoRA factors are not unique: B·A = (B·R)(R⁻¹·A) for every invertible R, so two experts with the same ΔW can
have unrelated A and B, and averaging or regressing raw factors is meaningless. The canonical form comes from
the thin SVD ΔW = B·A = U·S·Vᵀ: A' = √S·Vᵀ and B' = U·√S, components by decreasing singular value, each
component's sign fixed so the largest-magnitude entry of its row of A' is positive. Then B'·A' = B·A and
every factorisation of the same ΔW maps to the same (A', B') (up to ties in S or in the sign rule, which
random-like trained weights do not have).

The SVD is computed from QR decompositions of the thin factors: O((in + out)·r²), never the [out, in] ΔW.
"""

from __future__ import annotations

import torch

from loramint.adapters import LoraAdapter


def canonical_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [r, in], B' [out, r]) for A [r, in], B [out, r]: the canonical factors of ΔW = B·A."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"expected A [r, in] and B [out, r], got {tuple(a.shape)} and {tuple(b.shape)}")
    r = a.shape[0]
    qb, rb = torch.linalg.qr(b.double())  # [out, r], [r, r]
    qa, ra = torch.linalg.qr(a.double().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # B·A = qb (rb raᵀ) qaᵀ; core [r, r] -> u [r, r], s [r], vh [r, r]
    root = s.sqrt()  # [r]
    a_c = root[:, None] * (qa @ vh.T).T  # [r, in]: √S·Vᵀ
    b_c = (qb @ u) * root[None, :]  # [out, r]: U·√S
    peak = a_c.abs().argmax(dim=1)  # [r]
    sign = torch.sign(a_c[torch.arange(r), peak])
    sign[sign == 0] = 1.0  # a zero component (rank-deficient ΔW) keeps its sign
    return (a_c * sign[:, None]).to(a.dtype), (b_c * sign[None, :]).to(b.dtype)


def canonicalize(adapter: LoraAdapter) -> LoraAdapter:
    """The same adapter (same config, same ΔW per module) with canonical factors."""
    return LoraAdapter(adapter.config, {m: canonical_factors(a, b) for m, (a, b) in adapter.weights.items()})
