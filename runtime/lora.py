"""The adapter path of the runtime: base linear layers wrapped so that one forward pass applies, per row or
per token, a weighted mix of the resident experts.

Routing is sparse: each row (a request's adapter or mixture) or each token (a router's choice) names k of
the plan's u active experts with weights, `w, idx: [B, S, k]` (S = 1 per row, S = T per token). Two exact
ways to apply it, chosen by the number of active experts:

dense (u <= dense_max): the active experts' factors are concatenated once per plan,

    h     = x @ A_cat.T                    x: [B, T, in], A_cat: [u*r, in]      -> h: [B, T, u*r]
    h     = h * g (repeated r times)       g: w scattered into [B, S, u]
    delta = h @ B_cat.T                    B_cat: [out, u*r]                    -> [B, T, out]

   two skinny matmuls shared by every row; cheapest while u*r is small next to the layer's width.

gathered (u > dense_max): every row / token gathers only its own k experts' factors (the BGMV idea of
   Punica / S-LoRA, as batched matmuls), A_g: [B, S, k*r, in], B_g: [B, S, out, k*r], so the cost per token
   is O(k * r) whatever u is: 1,000 resident experts route as cheaply as 8.

Both equal sum_e g_e * (B_e @ A_e) x (tested against PEFT and against each other).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from loramint.runtime.stack import ExpertStack

Gates = tuple[torch.Tensor, torch.Tensor]
"""(weights [B, S, k], indices [B, S, k] into the plan's slots): a sparse routing decision."""
TokenRouter = Callable[[str, torch.Tensor], Gates]
"""(module path, x [B, T, in]) -> per-token sparse gates [B, T, k] over the plan's slots."""
DENSE_MAX = 64


def top_k_gates(scores: torch.Tensor, k: int) -> Gates:
    """Top-k of scores [..., u] per position, softmax-renormalised over the kept k."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return torch.softmax(top.values, dim=-1), top.indices


def dense_gates(gates: Gates, u: int) -> torch.Tensor:
    """[B, S, u]: the sparse gates scattered over all u slots (zeros elsewhere)."""
    w, idx = gates
    return torch.zeros(*w.shape[:-1], u, dtype=w.dtype, device=w.device).scatter(-1, idx, w)


@dataclass
class Plan:
    """Routing of one forward pass (or one generate call): active slots [u] and either fixed per-row gates
    (`gates` [B, 1, u], mixtures included) or a per-token `router`. `dense_max`: the most active experts
    applied densely (see the module doc); above it every row / token gathers its own experts."""

    slots: torch.Tensor
    gates: torch.Tensor | None = None
    router: TokenRouter | None = None
    dense_max: int = DENSE_MAX
    _factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _rows: Gates | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.gates is None) == (self.router is None):
            raise ValueError("a plan has either fixed gates or a per-token router")
        if self.gates is not None:
            if self.gates.dim() != 3 or self.gates.shape[1] != 1 or self.gates.shape[2] != len(self.slots):
                raise ValueError(
                    f"gates must be [B, 1, {len(self.slots)}] (one row per request), got {list(self.gates.shape)}"
                )
            # the rows' sparse form: k = the most experts any row mixes
            k = max(1, int((self.gates != 0).sum(-1).max()))
            top = self.gates.abs().topk(k, dim=-1)
            self._rows = (self.gates.gather(-1, top.indices), top.indices)

    @property
    def dense(self) -> bool:
        return len(self.slots) <= self.dense_max

    def factors(self, stack: ExpertStack, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat [u*r, in], B_cat [out, u*r]) of the active experts, gathered once per plan and module."""
        if module not in self._factors:
            a = stack.A[module][self.slots]  # [u, r, in]
            b = stack.B[module][self.slots]  # [u, out, r]
            u, r, n_in = a.shape
            self._factors[module] = (a.reshape(u * r, n_in), b.permute(1, 0, 2).reshape(b.shape[1], u * r))
        return self._factors[module]

    def gathered(
        self, stack: ExpertStack, module: str, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_g [B, S, k*r, in], B_g [B, S, out, k*r]): each row's / token's own experts' factors."""
        chosen = self.slots[idx]  # [B, S, k]
        a = stack.A[module][chosen]  # [B, S, k, r, in]
        b = stack.B[module][chosen]  # [B, S, k, out, r]
        n, s, k, r, n_in = a.shape
        return a.reshape(n, s, k * r, n_in), b.permute(0, 1, 3, 2, 4).reshape(n, s, b.shape[3], k * r)

    def delta(self, stack: ExpertStack, module: str, x: torch.Tensor) -> torch.Tensor:
        """[B, T, out]: the routed experts' contribution at `module` for its input x [B, T, in]."""
        w, idx = self._rows if self.router is None else self.router(module, x)
        if self.dense:
            a_cat, b_cat = self.factors(stack, module)
            gates = self.gates if self.router is None else dense_gates((w, idx), len(self.slots))
            h = x @ a_cat.T  # [B, T, u*r]
            r = a_cat.shape[0] // gates.shape[-1]
            return (h * gates.to(h.dtype).repeat_interleave(r, dim=-1)) @ b_cat.T
        if self.router is None:  # fixed per row: gather once per plan
            if module not in self._factors:
                self._factors[module] = self.gathered(stack, module, idx)
            a_g, b_g = self._factors[module]
        else:
            a_g, b_g = self.gathered(stack, module, idx)
        r = a_g.shape[2] // w.shape[-1]
        g = w.to(x.dtype).repeat_interleave(r, dim=-1)  # [B, S, k*r]
        if a_g.shape[1] == 1:  # one choice per row: batched matmuls over the row's tokens
            h = (x @ a_g[:, 0].transpose(1, 2)) * g  # [B, T, k*r]
            return h @ b_g[:, 0].transpose(1, 2)  # [B, T, out]
        h = (a_g @ x.unsqueeze(-1)).squeeze(-1) * g  # per token: [B, T, k*r]
        return (b_g @ h.unsqueeze(-1)).squeeze(-1)  # [B, T, out]


class RoutedLinear(nn.Module):
    """`base(x)` plus the active plan's expert mix; exactly `base(x)` when no plan is set."""

    def __init__(self, base: nn.Linear, module: str, stack: ExpertStack, holder: PlanHolder) -> None:
        super().__init__()
        self.base, self.module, self.stack, self.holder = base, module, stack, holder

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the wrapped layer (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.holder.plan
        if plan is None or self.module not in self.stack.A:
            return y
        return y + plan.delta(self.stack, self.module, x)


class PlanHolder:
    """The plan every RoutedLinear of one model reads (set by the runtime around each forward/generate)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None


def attach(model: nn.Module, stack: ExpertStack) -> PlanHolder:
    """Wrap every linear layer named in `stack.shapes` with a RoutedLinear; returns their shared holder."""
    holder = PlanHolder()
    for module in stack.shapes:
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, leaf)
        if isinstance(layer, RoutedLinear):
            raise ValueError(f"{module} is already routed: attach once per model")
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{module} is a {type(layer).__name__}, not nn.Linear")
        setattr(parent, leaf, RoutedLinear(layer, module, stack, holder))
    return holder


def detach(model: nn.Module) -> None:
    """Put the original linear layers back."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, RoutedLinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, layer.base)


def arrow_prototypes(stack: ExpertStack, module: str, slots: torch.Tensor) -> torch.Tensor:
    """[u, in]: each expert's top right singular vector of ΔW = B @ A (Arrow routing's prototype), from the
    r x r core of the thin factors (never the [out, in] matrix)."""
    a, b = stack.A[module][slots].double(), stack.B[module][slots].double()  # [u, r, in], [u, out, r]
    qa, ra = torch.linalg.qr(a.transpose(1, 2))  # A.T = Qa Ra: Qa [u, in, r], Ra [u, r, r]
    # ΔW = B Ra.T Qa.T, so its right singular vectors are Qa @ (right singular vectors of B Ra.T)
    _, _, vh = torch.linalg.svd(b @ ra.transpose(1, 2), full_matrices=False)  # vh: [u, r, r]
    return (qa @ vh[:, 0, :, None]).squeeze(-1).to(stack.dtype)  # [u, in]


def arrow_router(stack: ExpertStack, slots: torch.Tensor, top_k: int = 2) -> TokenRouter:
    """Per-token routing by |x . v_e| (v_e: the expert's top singular direction at that layer), top-k
    experts per token, softmax over their scores: no training (Arrow, Ostapenko et al. 2024)."""
    protos: dict[str, torch.Tensor] = {}
    k = min(top_k, len(slots))

    def route(module: str, x: torch.Tensor) -> Gates:
        if module not in protos:
            protos[module] = arrow_prototypes(stack, module, slots)
        return top_k_gates((x @ protos[module].T).abs(), k)  # scores [B, T, u] -> [B, T, k]

    return route
