"""An adapter as the generator sees it: one token per (layer, module type, factor), grouped by
(module type, factor) so that one output head per group emits every layer's slice in one batched pass.

A `Layout` fixes which modules of which base model an adapter family covers (same rank everywhere); it turns
an adapter into `{group: [n_layers, dim]}` tensors and back, exactly. A `Normalizer` z-scores each group with
statistics fitted on the library (element-wise mean per layer, one scale per layer: 50 experts are too few
for element-wise variances), saved as safetensors + JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loramint.adapters import LAYER_RE, AdapterConfig, LoraAdapter
from loramint.errors import AdapterError
from loramint.paths import atomic_write_bytes

FACTORS = ("A", "B")


@dataclass(frozen=True)
class Layout:
    """Module paths per (layer, module type) of an adapter family, and their [out, in] shapes."""

    base_model: str
    rank: int
    alpha: float
    layers: tuple[int, ...]
    module_types: tuple[str, ...]
    """Leaf names, e.g. ("q_proj", "v_proj")."""
    templates: dict[str, str]
    """module type -> its path with a `{layer}` slot, e.g. "model.layers.{layer}.self_attn.q_proj"."""
    shapes: dict[str, tuple[int, int]]
    """module type -> (out, in)."""

    @classmethod
    def of(cls, adapter: LoraAdapter) -> Layout:
        """The layout of `adapter`: every module type in every layer, one rank (what the library trains)."""
        cfg = adapter.config
        if cfg.rank_pattern or cfg.alpha_pattern or cfg.use_rslora:
            raise AdapterError(
                "the generator needs one rank and alpha for every module (no patterns, no rsLoRA)"
            )
        found: dict[tuple[int, str], str] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for module, (a, b) in adapter.weights.items():
            match = LAYER_RE.search(module)
            if not match:
                raise AdapterError(f"module {module!r} is not inside a decoder layer")
            leaf = module.rsplit(".", 1)[-1]
            found[int(match.group(1)), leaf] = module
            if a.shape[0] != cfg.r:
                raise AdapterError(f"module {module!r} has rank {a.shape[0]}, the adapter's r is {cfg.r}")
            if shapes.setdefault(leaf, (b.shape[0], a.shape[1])) != (b.shape[0], a.shape[1]):
                raise AdapterError(f"module type {leaf!r} has different shapes in different layers")
        layers = tuple(sorted({layer for layer, _ in found}))
        types = tuple(sorted(shapes))
        missing = [(layer, t) for layer in layers for t in types if (layer, t) not in found]
        if missing:
            raise AdapterError(
                f"adapter lacks modules {missing[:4]}: the generator needs every type in every layer"
            )
        templates: dict[str, set[str]] = {}
        for (layer, t), module in found.items():
            templates.setdefault(t, set()).add(module.replace(f".layers.{layer}.", ".layers.{layer}."))
        if bad := {t: sorted(v) for t, v in templates.items() if len(v) != 1}:
            raise AdapterError(f"module paths of one type differ across layers: {bad}")
        return cls(
            cfg.base_model,
            cfg.r,
            cfg.alpha,
            layers,
            types,
            {t: v.pop() for t, v in templates.items()},
            shapes,
        )

    def path(self, layer: int, module_type: str) -> str:
        return self.templates[module_type].format(layer=layer)

    @property
    def groups(self) -> list[str]:
        """Group keys "<module type>.<factor>", e.g. "q_proj.A"."""
        return [f"{t}.{f}" for t in self.module_types for f in FACTORS]

    def group_shape(self, group: str) -> tuple[int, int]:
        """(rows, cols) of one layer's slice: A [r, in], B [out, r]."""
        module_type, factor = group.rsplit(".", 1)
        out_f, in_f = self.shapes[module_type]
        return (self.rank, in_f) if factor == "A" else (out_f, self.rank)

    def to_tokens(self, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        """{group: [n_layers, rows * cols]} (float32): each layer's factor flattened row-major."""
        if Layout.of(adapter) != self:
            raise AdapterError(f"adapter layout {Layout.of(adapter)} differs from {self}")
        out = {}
        for group in self.groups:
            module_type, factor = group.rsplit(".", 1)
            index = FACTORS.index(factor)
            out[group] = torch.stack(
                [
                    adapter.weights[self.path(layer, module_type)][index].reshape(-1).float()
                    for layer in self.layers
                ]
            )
        return out

    def from_tokens(self, tokens: dict[str, torch.Tensor]) -> LoraAdapter:
        """The adapter whose `to_tokens` is `tokens`."""
        if set(tokens) != set(self.groups):
            raise AdapterError(f"expected groups {self.groups}, got {sorted(tokens)}")
        weights: dict[str, list[torch.Tensor]] = {}
        for group, values in tokens.items():
            rows, cols = self.group_shape(group)
            if tuple(values.shape) != (len(self.layers), rows * cols):
                raise AdapterError(
                    f"group {group}: expected [{len(self.layers)}, {rows * cols}], got {list(values.shape)}"
                )
            module_type, factor = group.rsplit(".", 1)
            for i, layer in enumerate(self.layers):
                pair = weights.setdefault(self.path(layer, module_type), [None, None])  # type: ignore[list-item]
                pair[FACTORS.index(factor)] = values[i].reshape(rows, cols).float().contiguous()
        config = AdapterConfig(self.base_model, self.rank, self.alpha, list(self.module_types))
        return LoraAdapter(config, {m: (a, b) for m, (a, b) in sorted(weights.items())})

    def to_json(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "module_types": list(self.module_types)}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        shapes = {k: tuple(v) for k, v in data["shapes"].items()}
        return cls(
            data["base_model"],
            int(data["rank"]),
            float(data["alpha"]),
            tuple(data["layers"]),
            tuple(data["module_types"]),
            dict(data["templates"]),
            shapes,  # type: ignore[arg-type]
        )


@dataclass
class Normalizer:
    """Per group: x_norm = (x - mean) / scale with mean [n_layers, dim] and scale [n_layers, 1]."""

    mean: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]

    @classmethod
    def fit(cls, samples: list[dict[str, torch.Tensor]], eps: float = 1e-8) -> Normalizer:
        """Statistics over `samples` (each a `Layout.to_tokens` result, ideally of canonical factors)."""
        if not samples:
            raise ValueError("Normalizer.fit needs at least one sample")
        mean, scale = {}, {}
        for group in samples[0]:
            stack = torch.stack([s[group] for s in samples])  # [N, n_layers, dim]
            mean[group] = stack.mean(dim=0)  # [n_layers, dim]
            centred = stack - mean[group]
            scale[group] = centred.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(eps)[:, None]  # [n_layers, 1]
        return cls(mean, scale)

    def normalize(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {g: (v - self.mean[g].to(v)) / self.scale[g].to(v) for g, v in tokens.items()}

    def denormalize(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {g: v * self.scale[g].to(v) + self.mean[g].to(v) for g, v in tokens.items()}

    def save(self, path: str | Path) -> None:
        """One safetensors file (`<group>.mean`, `<group>.scale`), written atomically."""
        path = Path(path)
        tensors = {f"{g}.mean": t.contiguous() for g, t in self.mean.items()}
        tensors |= {f"{g}.scale": t.contiguous() for g, t in self.scale.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            tensors,
            str(tmp),
            metadata={"format": "loramint-normalizer", "groups": json.dumps(list(self.mean))},
        )
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        tensors = load_file(str(path))
        groups = sorted({k.rsplit(".", 1)[0] for k in tensors})
        return cls({g: tensors[f"{g}.mean"] for g in groups}, {g: tensors[f"{g}.scale"] for g in groups})
