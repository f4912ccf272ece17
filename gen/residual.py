"""Residual minting: the minted adapter is the retrieved experts' mixture plus the decoder's correction.

A generator trained only on the functional objective can find one adapter that helps every task of a family
and mint it whatever the description says (we measured exactly that: pairwise cosine 0.999 between the
adapters minted for 10 different unseen tasks). With `GeneratorConfig.residual_k = K > 0` the description
decides the starting point instead: ΔW_minted = g · Σ_k w_k ΔW_k + ΔW_correction, where the K experts are the
ones retrieved for the description, w_k = cos_k / Σ_j cos_j (the harness's top-k mixture), g a learned gain
per (layer, module type), and the correction is decoded from (z, c) with no library mean added (so an
untrained generator mints the top-k mixture itself). With `own_gate` a learned share alpha of the update
bypasses both and is the top-1 expert's own: ΔW = (1 - alpha)(mixture + correction) + alpha ΔW_top1, alpha
from how close the cosines are to 1 (a seen task's own description retrieves its expert at cosine 1). The
sum is stacked exactly into one LoRA adapter of rank (K + 1) r (factors concatenated); `Minter.mint(..., rank=8)` compresses it by SVD.

Distances between adapters are computed from the factors, never from the dense ΔW:
<ΔW_a, ΔW_b>_F = s_a s_b · Σ (B_aᵀ B_b) ⊙ (A_a A_bᵀ).
"""

from __future__ import annotations

import math
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


CLOSENESS_FLOOR = 1e-4
"""`closeness` saturates at 1 - cos <= 1e-4: float16 keys put an identical description at ~0.9999."""


OWN_MIN_COSINE = 0.999
"""Below this top-1 cosine the own-expert gate is exactly closed. A stored description retrieves its own
expert at >= 0.9999 (float16 keys); nothing else in the ni-family suite comes nearer than 0.990 (the seen
tasks' phrasings) or 0.976 (an unseen task's sibling), where the learned gate still gave alpha 0.002-0.024,
pulling unseen mints towards a sibling's update."""


def closeness(sims: torch.Tensor) -> torch.Tensor:
    """[..., K] cosines -> how close each is to 1 on a log scale, in [0, 1]: -log10(1 - cos) / 4, so cosine
    0.9 -> 0.25, 0.976 (a near sibling) -> 0.40, 0.999 -> 0.75, >= 0.9999 (the same description) -> 1.
    Raw cosines barely tell an exact match from a close sibling; this separates them."""
    gap = (1 - sims).clamp(CLOSENESS_FLOOR, 1.0)
    return gap.log10() / math.log10(CLOSENESS_FLOOR)


def coefficients(
    model, sims: torch.Tensor, own_gate: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual `LoraCVAE`'s mixing of its K retrieved experts with cosines `sims` [K] -> (weights [K],
    scaled by the per-module gain; direct [K], not scaled: the own-expert gate's share of the top-1; the
    correction's gain, a scalar): ΔW = gain · Σ weights_k ΔW_k + Σ direct_k ΔW_k + corr_gain · ΔW_corr.
    `own_gate=False`: as if the gate were closed (alpha 0)."""
    weights, correction_gain = model.mix(sims)
    alpha = model.own_share(sims) if own_gate else sims.new_zeros(sims.shape[:-1])
    direct = torch.zeros_like(weights)
    direct[..., 0] = alpha
    return (1 - alpha) * weights, direct, (1 - alpha) * correction_gain


def compose(
    layout: Layout,
    experts: Sequence[LoraAdapter],
    weights: torch.Tensor,
    correction: LoraAdapter,
    gain: torch.Tensor | None = None,
    correction_gain: torch.Tensor | float = 1.0,
    direct: torch.Tensor | None = None,
    coef: torch.Tensor | None = None,
) -> LoraAdapter:
    """One adapter with ΔW = Σ_k (gain[layer, type] · weights[k] + direct[k]) ΔW(experts[k])
    + correction_gain · ΔW(correction), exactly; `coef` [K, layers, types], when given, is each expert's
    whole coefficient per module instead (a generator ensemble's mean of its members' coefficients).

    Built per module type for every layer at once (a stack, one multiply and a concatenation per part: a
    third of the time of a loop over the modules, same floats); the result's factors are views of those
    stacks. Rank Σ r_k + r_correction with lora_alpha = rank (scaling 1: every part's own scaling and
    weight is folded into its B rows). Differentiable in `weights`, `gain` and the correction's factors."""
    if len(experts) != weights.shape[0]:
        raise ValueError(f"{len(experts)} experts but {weights.shape[0]} weights")
    if direct is not None and direct.shape != weights.shape:
        raise ValueError(
            f"direct coefficients {tuple(direct.shape)} do not match the weights' {tuple(weights.shape)}"
        )
    if direct is None:
        direct = torch.zeros_like(weights)
    # the coefficients follow the factors: a GPU generator's mixing rule composes CPU-held experts on the CPU
    device = next(iter(correction.weights.values()))[0].device
    weights, direct = weights.to(device), direct.to(device)
    gain = gain.to(device) if gain is not None else None
    if isinstance(correction_gain, torch.Tensor):
        correction_gain = correction_gain.to(device)
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ti, module_type in enumerate(layout.module_types):  # every layer of a module type at once
        paths = [layout.path(layer, module_type) for layer in layout.layers]
        g = gain[:, ti] if gain is not None else torch.ones(len(paths), device=device)
        a_parts, b_parts = [], []
        for k, (expert, w, d) in enumerate(zip(experts, weights, direct, strict=True)):
            scaling = torch.tensor([expert.config.scaling(p) for p in paths], device=device)
            a_parts.append(torch.stack([expert.weights[p][0] for p in paths]))  # [L, r, in]
            b = torch.stack([expert.weights[p][1] for p in paths])  # [L, out, r]
            c = coef[k, :, ti].to(device) if coef is not None else g * w + d  # [L]
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


def bounded_gain(
    layout: Layout,
    experts: Sequence[LoraAdapter],
    weights: torch.Tensor,
    correction: LoraAdapter,
    gain: torch.Tensor | None,
    correction_gain: torch.Tensor | float,
    ratio: float,
) -> torch.Tensor:
    """The correction's gain, shrunk so that ||correction_gain · ΔW(correction)|| <= ratio · ||mixture||,
    where the mixture is Σ_k gain · weights_k ΔW(experts[k]) (as `compose` builds it, without the own-expert
    gate's direct share). Differentiable; unchanged when the correction is within the bound."""
    mixture = compose(layout, experts, weights, correction, gain, 0.0)  # the correction's part is zero
    mix_norm = delta_inner(mixture, mixture).clamp_min(0).sqrt()
    corr_norm = (
        torch.as_tensor(correction_gain, device=mix_norm.device).abs()
        * delta_inner(correction, correction).clamp_min(0).sqrt()
    )
    scale = (ratio * mix_norm / corr_norm.clamp_min(1e-12)).clamp(max=1.0)
    return correction_gain * scale


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
    own_gate: bool = True,
) -> LoraAdapter:
    """One adapter from the decoder's normalised tokens {group: [L, dim]} of a `LoraCVAE` `model`: the whole
    adapter (de-normalised), or with `model.config.residual_k` the correction (scaled, no library mean)
    composed with the retrieved `experts` (raw canonical factors) by the model's mixing rule on their cosines
    `sims` [K] (`coefficients`; `own_gate=False`: with the own-expert gate closed)."""
    layout = model.layout
    if not model.config.residual_k:
        return layout.from_tokens(normalizer.denormalize(tokens))
    if sims is None or len(experts) != model.config.residual_k:
        raise ValueError(f"a residual generator needs its {model.config.residual_k} retrieved experts")
    correction = layout.from_tokens({g: t * normalizer.scale[g].to(t) for g, t in tokens.items()})
    weights, direct, correction_gain = coefficients(model, sims.to(model.mix_gain), own_gate)
    if model.config.max_correction:
        correction_gain = bounded_gain(
            layout, experts, weights, correction, model.mix_gain, correction_gain, model.config.max_correction
        )
    return compose(layout, experts, weights, correction, model.mix_gain, correction_gain, direct)
