"""Residual minting: the minted adapter is the retrieved experts' mixture plus the decoder's correction.

A generator trained only on the functional objective can find one adapter that helps every task of a family
and mint it whatever the description says (we measured exactly that: pairwise cosine 0.999 between the
adapters minted for 10 different unseen tasks). With `GeneratorConfig.residual_k = K > 0` the description
decides the starting point instead: ΔW_minted = g · Σ_k w_k ΔW_k + ΔW_correction, where the K experts are the
ones retrieved for the description, w_k = cos_k / Σ_j cos_j (the harness's top-k mixture), g a learned gain
per (layer, module type), and the correction is decoded from (z, c) with no library mean added (so an
untrained generator mints the top-k mixture itself). The sum is stacked exactly into one LoRA adapter of rank (K + 1) r (factors concatenated); `Minter.mint(..., rank=8)` compresses it by SVD.

Distances between adapters are computed from the factors, never from the dense ΔW:
<ΔW_a, ΔW_b>_F = s_a s_b · Σ (B_aᵀ B_b) ⊙ (A_a A_bᵀ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.gen.layout import Layout, Normalizer


def mixture_weights(sims: torch.Tensor) -> torch.Tensor:
    """[..., K] cosines -> weights cos_k / Σ_j cos_j (negative cosines count as 0; all <= 0: uniform)."""
    pos = sims.clamp_min(0)
    total = pos.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(pos, 1.0 / pos.shape[-1])
    return torch.where(total > 0, pos / total.clamp_min(1e-12), uniform)


OWN_MIN_COSINE = 0.999
"""A description whose nearest expert is at least this close is that expert's own (a stored description
retrieves its expert at >= 0.9999 with float16 keys; nothing else in the ni-family suite came nearer than
0.990): such a description mints that expert exactly (`gen.minter.own_experts`)."""


def compose(
    layout: Layout,
    experts: Sequence[LoraAdapter],
    weights: torch.Tensor,
    correction: LoraAdapter,
    gain: torch.Tensor | None = None,
    correction_gain: torch.Tensor | float = 1.0,
    coef: torch.Tensor | None = None,
) -> LoraAdapter:
    """One adapter with ΔW = Σ_k gain[layer, type] · weights[k] · ΔW(experts[k])
    + correction_gain · ΔW(correction), exactly; `coef` [K, layers, types], when given, is each expert's
    whole coefficient per module instead (a generator ensemble's mean of its members' coefficients).

    Built per module type for every layer at once (a stack, one multiply and a concatenation per part: a
    third of the time of a loop over the modules, same floats); the result's factors are views of those
    stacks. Rank Σ r_k + r_correction with lora_alpha = rank (scaling 1: every part's own scaling and
    weight is folded into its B rows). Differentiable in `weights`, `gain` and the correction's factors."""
    if len(experts) != weights.shape[0]:
        raise ValueError(f"{len(experts)} experts but {weights.shape[0]} weights")
    # the coefficients follow the factors: a GPU generator's mixing rule composes CPU-held experts on the CPU
    device = next(iter(correction.weights.values()))[0].device
    weights = weights.to(device)
    gain = gain.to(device) if gain is not None else None
    if isinstance(correction_gain, torch.Tensor):
        correction_gain = correction_gain.to(device)
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ti, module_type in enumerate(layout.module_types):  # every layer of a module type at once
        paths = [layout.path(layer, module_type) for layer in layout.layers]
        g = gain[:, ti] if gain is not None else torch.ones(len(paths), device=device)
        a_parts, b_parts = [], []
        for k, (expert, w) in enumerate(zip(experts, weights, strict=True)):
            scaling = torch.tensor([expert.config.scaling(p) for p in paths], device=device)
            a_parts.append(torch.stack([expert.weights[p][0] for p in paths]))  # [L, r, in]
            b = torch.stack([expert.weights[p][1] for p in paths])  # [L, out, r]
            c = coef[k, :, ti].to(device) if coef is not None else g * w  # [L]
            b_parts.append(b * (c * scaling)[:, None, None])
        scaling = torch.tensor([correction.config.scaling(p) for p in paths], device=device)
        a_parts.append(torch.stack([correction.weights[p][0] for p in paths]))
        b = torch.stack([correction.weights[p][1] for p in paths])
        b_parts.append(b * (correction_gain * scaling)[:, None, None])
        stacked[module_type] = (
            torch.cat(a_parts, dim=1),
            torch.cat(b_parts, dim=2),
        )  # [L, R, in], [L, out, R]
    rank = sum(e.config.r for e in experts) + correction.config.r
    config = AdapterConfig(layout.base_model, rank, float(rank), list(layout.module_types))
    out = {
        layout.path(layer, t): (stacked[t][0][i], stacked[t][1][i])
        for i, layer in enumerate(layout.layers)
        for t in layout.module_types
    }
    return LoraAdapter(config, out)


def delta_inner(x: LoraAdapter, y: LoraAdapter) -> torch.Tensor:
    """Σ over the modules of x of the Frobenius inner product <ΔW_x, ΔW_y> (a scalar, differentiable)."""
    total = torch.zeros((), device=next(iter(x.weights.values()))[0].device)
    for module, (ax, bx) in x.weights.items():
        ay, by = y.weights[module]
        s = x.config.scaling(module) * y.config.scaling(module)
        total = total + s * ((bx.T @ by) * (ax @ ay.T)).sum()
    return total


def delta_cosines(adapters: Sequence[LoraAdapter]) -> torch.Tensor:
    """[n, n] cosines between the adapters' whole updates (all modules' ΔW as one vector)."""
    n = len(adapters)
    gram = torch.zeros(n, n)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = delta_inner(adapters[i], adapters[j]).detach().float()
    norm = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norm[:, None] / norm[None, :]


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    if n < 2:
        raise ValueError("a mean pairwise value needs at least 2 adapters")
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))


def delta_error(pred: LoraAdapter, target: LoraAdapter) -> torch.Tensor:
    """||ΔW_pred - ΔW_target||² / ||ΔW_target||² over all modules (differentiable in pred)."""
    tt = delta_inner(target, target).detach()
    return (delta_inner(pred, pred) - 2 * delta_inner(pred, target) + tt) / tt.clamp_min(1e-30)


def assemble(
    model,
    normalizer: Normalizer,
    tokens: dict[str, torch.Tensor],
    experts: Sequence[LoraAdapter] = (),
    sims: torch.Tensor | None = None,
) -> LoraAdapter:
    """One adapter from the decoder's normalised tokens {group: [L, dim]} of a `LoraCVAE` `model`: the whole
    adapter (de-normalised), or with `model.config.residual_k` the correction (scaled, no library mean)
    composed with the retrieved `experts` (raw canonical factors) by the model's mixing rule on their cosines
    `sims` [K] (`LoraCVAE.mix`)."""
    layout = model.layout
    if not model.config.residual_k:
        return layout.from_tokens(normalizer.denormalize(tokens))
    if sims is None or len(experts) != model.config.residual_k:
        raise ValueError(f"a residual generator needs its {model.config.residual_k} retrieved experts")
    correction = layout.from_tokens({g: t * normalizer.scale[g].to(t) for g, t in tokens.items()})
    return compose(layout, experts, model.mix(sims.to(model.mix_gain)), correction, model.mix_gain)
