"""The adapter path of the runtime: base linear layers wrapped so that one forward pass applies, per row or
per token, a weighted mix of the resident experts.

For the u experts active in a pass (slots [u]) and gates g ([B, 1, u] per row, [B, T, u] per token):

    h     = x @ A_cat.T                    x: [B, T, in], A_cat: [u*r, in]      -> h: [B, T, u*r]
    h     = h * g (repeated r times)                                            -> [B, T, u*r]
    delta = h @ B_cat.T                    B_cat: [out, u*r]                    -> [B, T, out]

which is exactly sum_e g_e * (B_e @ A_e) x: the base matmul is shared by every row, the adapter path costs
O(u * r) per token (two skinny matmuls), and rows with different adapters or mixtures share one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from loramint.runtime.stack import ExpertStack

TokenRouter = Callable[[str, torch.Tensor], torch.Tensor]
"""(module path, x [B, T, in]) -> gates [B, T, u] over the plan's slots (per-token routing)."""


@dataclass
class Plan:
    """Routing of one forward pass (or one generate call): active slots [u] and either fixed gates
    [B, 1, u] (per row, mixtures included) or a per-token router computing gates from each layer's input."""

    slots: torch.Tensor
    gates: torch.Tensor | None = None
    router: TokenRouter | None = None
    _factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.gates is None) == (self.router is None):
            raise ValueError("a plan has either fixed gates or a per-token router")

    def factors(self, stack: ExpertStack, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat [u*r, in], B_cat [out, u*r]) of the active experts, gathered once per plan and module."""
        if module not in self._factors:
            a = stack.A[module][self.slots]  # [u, r, in]
            b = stack.B[module][self.slots]  # [u, out, r]
            u, r, n_in = a.shape
            self._factors[module] = (a.reshape(u * r, n_in), b.permute(1, 0, 2).reshape(b.shape[1], u * r))
        return self._factors[module]


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
        a_cat, b_cat = plan.factors(self.stack, self.module)  # [u*r, in], [out, u*r]
        gates = plan.gates if plan.router is None else plan.router(self.module, x)  # [B, 1|T, u]
        h = x @ a_cat.T  # [B, T, u*r]
        r = a_cat.shape[0] // gates.shape[-1]
        h = h * gates.to(h.dtype).repeat_interleave(r, dim=-1)
        return y + h @ b_cat.T  # [B, T, out]


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

    def route(module: str, x: torch.Tensor) -> torch.Tensor:
        if module not in protos:
            protos[module] = arrow_prototypes(stack, module, slots)
        scores = (x @ protos[module].T).abs()  # [B, T, u]
        top = scores.topk(k, dim=-1)
        return torch.zeros_like(scores).scatter_(-1, top.indices, torch.softmax(top.values, dim=-1))

    return route
