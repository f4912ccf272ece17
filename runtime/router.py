"""A learned per-token router: one linear gate per routed module, reading that module's own input (one
forward pass, unlike X-LoRA's two), top-k sparse with softmax over the kept experts, and the Switch/MixLoRA
load-balancing loss so that tokens spread over the experts.

Saved as `router.safetensors` (the gates) + `router.json` (expert ids in gate order, top_k, modules). No pickles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loramint.errors import NotFoundError
from loramint.runtime.lora import Gates, top_k_gates


class LearnedRouter(nn.Module):
    """gates[module]: Linear(in -> E) over `expert_ids` (in that order); `__call__(module, x)` -> [B, T, E]."""

    def __init__(self, in_features: dict[str, int], expert_ids: Sequence[str], top_k: int = 2) -> None:
        super().__init__()
        if not expert_ids:
            raise ValueError("a router needs at least one expert")
        self.expert_ids, self.top_k = list(expert_ids), min(top_k, len(expert_ids))
        self.modules_in = dict(in_features)
        self.gates = nn.ModuleDict(
            {self._key(m): nn.Linear(n, len(expert_ids)) for m, n in in_features.items()}
        )
        for gate in self.gates.values():  # start uniform: every expert equally likely
            nn.init.normal_(gate.weight, std=1e-3)
            nn.init.zeros_(gate.bias)
        self.record = False
        self.stats: list[
            tuple[torch.Tensor, torch.Tensor]
        ] = []  # (probs [N, E], chosen mask [N, E]) per call

    @staticmethod
    def _key(module: str) -> str:
        return module.replace(".", "__")

    def forward(self, module: str, x: torch.Tensor) -> Gates:  # type: ignore[override]
        """Sparse per-token gates (weights [B, T, k], indices [B, T, k] into `expert_ids`)."""
        key = self._key(module)
        if key not in self.gates:
            raise NotFoundError(f"the router has no gate for {module!r}")
        logits = self.gates[key](x.to(self.gates[key].weight.dtype))  # [B, T, E]
        weights, indices = top_k_gates(logits, self.top_k)
        if self.record:
            chosen = torch.zeros_like(logits).scatter(-1, indices, 1.0)
            probs = torch.softmax(logits, dim=-1)
            self.stats.append((probs.reshape(-1, logits.shape[-1]), chosen.reshape(-1, logits.shape[-1])))
        return weights, indices

    def balance_loss(self) -> torch.Tensor:
        """Switch-style load balance over the recorded calls: E * sum_e f_e * P_e, 1.0 when perfectly even
        (f_e: fraction of routed slots given to e, P_e: mean router probability of e); clears the record."""
        if not self.stats:
            return torch.zeros(())
        losses = []
        n = len(self.expert_ids)
        for probs, chosen in self.stats:
            f = chosen.mean(dim=0) / self.top_k  # [E]
            losses.append(n * (f * probs.mean(dim=0)).sum())
        self.stats = []
        return torch.stack(losses).mean()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(path / "router.safetensors"),
        )
        meta = {
            "format": "loramint-router",
            "expert_ids": self.expert_ids,
            "top_k": self.top_k,
            "modules": self.modules_in,
        }
        (path / "router.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        path = Path(path)
        meta_file = path / "router.json"
        if not meta_file.is_file():
            raise NotFoundError(f"{path} holds no router (router.json missing)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != "loramint-router":
            raise ValueError(f"{meta_file}: not a loramint router")
        router = cls(meta["modules"], meta["expert_ids"], meta["top_k"])
        router.load_state_dict(load_file(str(path / "router.safetensors")))
        return router
