"""Minting: a trained generator checkpoint + a description (optionally a few examples) -> a PEFT adapter.

`Minter.from_pretrained("data/generator/corpus").mint("Answer questions about how long events last")`
embeds the description, retrieves the K nearest library experts from the checkpoint's bank (their
description embeddings and latent posteriors), forms the semantic prior, decodes the learned prior's mean
in one batched pass, de-normalises and returns a `LoraAdapter` (`.save(dir)` writes a
stock PEFT folder). `fuse` mixes the latents of several descriptions into one multi-task adapter.

A checkpoint is a folder: `generator.json` (format, model config, layout, encoder id, prior settings, the
training config and metrics), `model.safetensors`, `normalizer.safetensors`, `bank.safetensors`. No pickles.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.errors import GeneratorError
from loramint.gen.canonical import canonicalize
from loramint.gen.layout import Layout, Normalizer
from loramint.gen.model import GeneratorConfig, LoraCVAE, semantic_prior
from loramint.gen.protocol import MintingModel
from loramint.gen.residual import OWN_MIN_COSINE, assemble, compose
from loramint.paths import staged_dir

FORMAT = "loramint-generator"
VERSION = 1
MAX_DESCRIPTION_CHARS = 8000
MAX_EXAMPLES = 64


@dataclass
class Bank:
    """The retrievable experts: names, description embeddings keys [N, C], posterior mu/logvar [N, Z]."""

    names: list[str]
    keys: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    factors: dict[str, torch.Tensor] | None = None
    """Residual generators: the experts' raw canonical factors as layout tokens {group: [N, L, dim]}."""

    def __len__(self) -> int:
        return len(self.names)

    def expert(self, layout: Layout, i: int) -> LoraAdapter:
        """Expert i as an adapter (float32), from `factors`."""
        if self.factors is None:
            raise GeneratorError("this bank holds no expert factors (not a residual generator)")
        return layout.from_tokens({g: t[i].float() for g, t in self.factors.items()})


def save_generator(
    path: str | Path,
    model: LoraCVAE,
    normalizer: Normalizer,
    bank: Bank,
    *,
    encoder: str,
    top_k: int,
    tau: float,
    extra: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint folder (with `files`, {name: content}, beside the tensors); an existing one at `path`
    is replaced only once the new one is complete."""
    path = Path(path)
    with staged_dir(path, replace=True) as tmp:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": asdict(model.config),
            "layout": model.layout.to_json(),
            "encoder": encoder,
            "top_k": top_k,
            "tau": tau,
            "bank": bank.names,
            **(extra or {}),
        }
        (tmp / "generator.json").write_text(json.dumps(meta, indent=2, default=str))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        normalizer.save(tmp / "normalizer.safetensors")
        tensors = {"keys": bank.keys, "mu": bank.mu, "logvar": bank.logvar}
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
        if model.config.residual_k:
            if bank.factors is None:
                raise GeneratorError("a residual generator's bank must hold its experts' factors")
            # fp16: LoRA factors lose nothing measurable and the checkpoint halves
            tensors |= {f"factors.{g}": t.detach().cpu().half().contiguous() for g, t in bank.factors.items()}
        save_file(tensors, str(tmp / "bank.safetensors"))
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
    return path


class Minter:
    """A trained generator ready to mint (implements `gen.protocol.MintingModel`); see the module docstring."""

    def __init__(
        self,
        model: LoraCVAE,
        normalizer: Normalizer,
        bank: Bank,
        encoder,
        top_k: int = 5,
        tau: float = 0.1,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= top_k <= len(bank):
            raise GeneratorError(f"top_k must be in [1, {len(bank)}] (the bank's size), got {top_k}")
        if encoder.dim != model.config.cond_dim:
            raise GeneratorError(
                f"encoder {encoder.name!r} gives {encoder.dim}-d embeddings, the generator expects "
                f"{model.config.cond_dim}: was it trained with another encoder?"
            )
        if not model.config.residual_k <= len(bank):
            raise GeneratorError(
                f"residual_k {model.config.residual_k} exceeds the bank's {len(bank)} experts"
            )
        self.model = model.eval()
        self.normalizer, self.bank, self.encoder = normalizer, bank, encoder
        self.top_k, self.tau = top_k, tau
        self.meta = meta or {}
        self._experts: dict[int, LoraAdapter] = {}

    @property
    def max_rank(self) -> int:
        """Rank of a minted adapter before any truncation: r, or (residual_k + 1) r for a residual generator."""
        return (self.model.config.residual_k + 1) * self.layout.rank

    @property
    def layout(self) -> Layout:
        return self.model.layout

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder=None, device: str = "cpu") -> MintingModel:
        """Load a checkpoint folder written by `save_generator` (`loramint train-generator`), or an ensemble's
        (`loramint ensemble-generator`): either implements `gen.protocol.MintingModel`."""
        path = Path(path)
        meta_file = path / "generator.json"
        if not meta_file.is_file():
            raise GeneratorError(f"{path} is not a generator checkpoint (no generator.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise GeneratorError(f"{meta_file} is not valid JSON: {exc}") from exc
        if meta.get("format") == "loramint-generator-ensemble":  # several generators' mints averaged
            from loramint.gen.ensemble import EnsembleMinter

            return EnsembleMinter.from_pretrained(path, encoder=encoder, device=device)  # type: ignore[return-value]
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise GeneratorError(
                f"{meta_file}: expected format {FORMAT!r} version {VERSION}, "
                f"got {meta.get('format')!r} version {meta.get('version')!r}"
            )
        model = LoraCVAE(Layout.from_json(meta["layout"]), GeneratorConfig.from_dict(meta["model"]))
        try:
            missing, unexpected = model.load_state_dict(
                load_file(str(path / "model.safetensors")), strict=False
            )
            normalizer = Normalizer.load(path / "normalizer.safetensors")
            tensors = load_file(str(path / "bank.safetensors"))
        except (OSError, RuntimeError) as exc:
            raise GeneratorError(f"cannot read the tensors of {path}: {exc}") from exc
        if missing or unexpected:
            raise GeneratorError(
                f"{path}/model.safetensors: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        factors = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("factors.")} or None
        if model.config.residual_k and factors is None:
            raise GeneratorError(
                f"{path}/bank.safetensors lacks the experts' factors a residual generator needs"
            )
        bank = Bank(
            list(meta["bank"]), *(tensors[k].to(device) for k in ("keys", "mu", "logvar")), factors=factors
        )
        if encoder is None:
            from loramint.encoders import Encoder

            encoder = Encoder(meta["encoder"])
        model.to(device)
        return cls(model, normalizer, bank, encoder, int(meta["top_k"]), float(meta["tau"]), meta)

    # ---- conditioning ---------------------------------------------------------------------------------------
    def condition(
        self, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
    ) -> torch.Tensor:
        """[B, C] unit vectors: each description, pulled towards its example texts when it has some."""
        examples = examples if examples is not None else [None] * len(descriptions)
        if len(examples) != len(descriptions):
            raise GeneratorError(f"{len(descriptions)} descriptions but {len(examples)} example lists")
        rows = []
        for text, shots in zip(descriptions, examples, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise GeneratorError(f"a description must be a non-empty string, got {text!r}")
            if len(text) > MAX_DESCRIPTION_CHARS:
                raise GeneratorError(
                    f"description has {len(text)} characters, the limit is {MAX_DESCRIPTION_CHARS}"
                )
            shots = list(shots or [])
            if len(shots) > MAX_EXAMPLES or not all(isinstance(s, str) and s.strip() for s in shots):
                raise GeneratorError(f"examples must be at most {MAX_EXAMPLES} non-empty strings")
            rows.append(self.encoder.encode_task(text, shots))
        device = self.bank.keys.device
        return torch.from_numpy(np.stack(rows)).float().to(device)

    def neighbours(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, K], cosines [B, K]) of the bank's nearest experts to each condition, best first."""
        top = (cond @ self.bank.keys.T).topk(self.top_k, dim=-1)
        return top.indices, top.values

    def prior_inputs(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The semantic prior (mean, logvar) [B, Z] of each condition's retrieved experts."""
        idx, sims = self.neighbours(cond)
        return semantic_prior(self.bank.mu[idx], self.bank.logvar[idx], sims, self.tau)

    # ---- minting ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def mint_many(
        self,
        descriptions: Sequence[str],
        examples: Sequence[Sequence[str] | None] | None = None,
        rank: int | None = None,
    ) -> list[LoraAdapter]:
        """One adapter per description, decoded in one batched pass."""
        check_rank(rank, self.max_rank)
        if not descriptions:
            return []
        cond = self.condition(descriptions, examples)
        own = own_experts(self, cond)
        rest = [i for i, o in enumerate(own) if o is None]
        minted: dict[int, LoraAdapter] = {}
        if rest:
            sub = cond[rest]
            tokens = self.model.generate(sub, *self.prior_inputs(sub))
            retrieved = self.retrieve(sub)
            minted = {i: self.adapter(self.row(tokens, j), retrieved[j], rank) for j, i in enumerate(rest)}
        return [minted[i] if o is None else own_adapter(self, o, rank) for i, o in enumerate(own)]

    def decode(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoded tokens {group: [B, L, dim]} of conditions [B, C] (the learned prior's mean)."""
        with torch.no_grad():
            return self.model.generate(cond, *self.prior_inputs(cond))

    def row(self, tokens: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Row i of `decode`'s tokens, for `adapter`."""
        return {g: t[i] for g, t in tokens.items()}

    # The stages of `mint_many`, public so that a caller can time or batch them (benchmarks/bench_mint.py):
    # condition -> prior_inputs + retrieve -> model.generate -> adapter.
    def retrieve(self, cond: torch.Tensor) -> list[tuple[list[LoraAdapter], torch.Tensor | None]]:
        """Per condition row: the residual generator's retrieved experts (raw canonical factors) and their
        cosines, best first; ([], None) for a non-residual generator."""
        k = self.model.config.residual_k
        if not k:
            return [([], None)] * cond.shape[0]
        top = (cond @ self.bank.keys.T).topk(k, dim=-1)
        return [
            ([self._expert(int(i)) for i in idx], sims.float().cpu())
            for idx, sims in zip(top.indices, top.values, strict=True)
        ]

    def _expert(self, i: int) -> LoraAdapter:
        if i not in self._experts:
            self._experts[i] = self.bank.expert(self.layout, i)
        return self._experts[i]

    def provenance(
        self, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
    ) -> list[dict]:
        """What minting each description draws on (see the module function `provenance`)."""
        return provenance(self, descriptions, examples)

    def mint(
        self,
        description: str,
        examples: Sequence[str] | None = None,
        rank: int | None = None,
    ) -> LoraAdapter:
        """An adapter for the task `description` says (and `examples` show); `rank` below the library's
        keeps the strongest components (same scale). A library expert's own description mints that expert
        (`own_experts`)."""
        return self.mint_many([description], [examples], rank)[0]

    @torch.no_grad()
    def fuse(
        self, descriptions: Sequence[str], weights: Sequence[float] | None = None, rank: int | None = None
    ) -> LoraAdapter:
        """One adapter for several tasks (ICM-Fusion): the weighted mean of their prior latents, decoded with
        the weighted mean of their conditions."""
        if len(descriptions) < 1:
            raise GeneratorError("fuse needs at least one description")
        w = torch.tensor(weights if weights is not None else [1.0] * len(descriptions), dtype=torch.float32)
        if w.shape != (len(descriptions),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise GeneratorError(
                f"weights must be {len(descriptions)} non-negative numbers with a positive sum"
            )
        w = (w / w.sum()).to(self.bank.keys.device)[:, None]  # [D, 1]
        cond = self.condition(descriptions)  # [D, C]
        mu, _ = self.model.prior(cond, *self.prior_inputs(cond))  # [D, Z]
        mixed = torch.nn.functional.normalize((w * cond).sum(0, keepdim=True), dim=-1)  # [1, C]
        tokens = self.model.decode((w * mu).sum(0, keepdim=True), mixed)
        experts, mixture = [], None
        if self.model.config.residual_k:  # each description's retrieved mixture, weighted by its share
            per = self.retrieve(cond)
            experts = [e for es, _ in per for e in es]
            shares = w[:, 0].to(self.model.mix_gain)
            mixture = torch.cat(
                [
                    wd * self.model.mix(s.to(self.model.mix_gain))
                    for wd, (_, s) in zip(shares, per, strict=True)
                ]
            ).cpu()
        return self._adapter({g: t[0] for g, t in tokens.items()}, rank, experts, mixture, fused=True)

    def adapter(
        self,
        tokens: dict[str, torch.Tensor],
        retrieved: tuple[Sequence[LoraAdapter], torch.Tensor | None] = ((), None),
        rank: int | None = None,
    ) -> LoraAdapter:
        """One row's adapter from its decoded tokens {group: [L, dim]} (`model.generate`, row i) and its
        retrieval (`retrieve`, row i): what `mint` returns for that row."""
        return self._adapter(tokens, rank, *retrieved)

    def _adapter(
        self,
        tokens: dict[str, torch.Tensor],
        rank: int | None,
        experts: Sequence[LoraAdapter] = (),
        sims: torch.Tensor | None = None,
        fused: bool = False,
    ) -> LoraAdapter:
        """Normalised tokens of one adapter (+ a residual generator's retrieved experts) -> a `LoraAdapter`
        (canonical factors when not residual; optionally truncated to `rank` by SVD). `fused`: `sims` are
        the mixture's final weights already (`fuse`)."""
        check_rank(rank, self.max_rank)
        tokens = {g: t.float().cpu() for g, t in tokens.items()}
        if fused and self.model.config.residual_k:  # weights already final: compose, not assemble
            correction = self.layout.from_tokens(
                {g: t * self.normalizer.scale[g].to(t) for g, t in tokens.items()}
            )
            adapter = compose(self.layout, experts, sims, correction, self.model.mix_gain.detach().cpu())
        else:
            adapter = assemble(self.model, self.normalizer, tokens, experts, sims)
        return adapter if rank is None else truncate(adapter, rank)


def own_experts(minter, cond: torch.Tensor) -> list[int | None]:
    """Per condition row [B, C], the bank index of the library expert whose own description it is (nearest
    expert at cosine >= `OWN_MIN_COSINE`), else None. Such a row mints that expert itself: the library
    holds the converged adapter for this very task, and a correction over a mixture can only move away from
    it (measured: docs/history.md). Only a residual generator's bank holds the experts to serve."""
    if not minter.model.config.residual_k or minter.bank.factors is None:
        return [None] * cond.shape[0]
    best = (cond @ minter.bank.keys.T).max(dim=-1)
    return [
        int(i) if float(c) >= OWN_MIN_COSINE else None
        for i, c in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]


def own_adapter(minter, i: int, rank: int | None = None) -> LoraAdapter:
    """Bank expert i as a fresh adapter (float32), at most `rank` components."""
    adapter = minter.bank.expert(minter.layout, i)
    return adapter if rank is None else truncate(adapter, rank)


def provenance(
    minter, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
) -> list[dict]:
    """Per description, what a mint draws on: the library experts the generator retrieves for it (name,
    cosine similarity of their descriptions and, for a residual generator, their share `weight` of the
    mixture; best first), `confidence`, the best of those similarities (near 1: the library holds this very
    task; low: nothing in it fits) and `exact`, whether the mint is the nearest expert itself (a library
    expert's own description: `own_experts`; its weight is then 1). Works for a Minter or an ensemble."""
    cond = minter.condition(descriptions, examples)  # [B, C]
    k = min(max(minter.model.config.residual_k, 1), len(minter.bank))
    top = (cond @ minter.bank.keys.T).topk(k, dim=-1)
    # each retrieved expert's share of the mixture, before the per-module gains: the fixed rule, the same
    # for every member of an ensemble
    shares = minter.model.mix(top.values).float().cpu().tolist() if minter.model.config.residual_k else None
    own = own_experts(minter, cond)
    out = []
    for row, (idx, sims) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True)):
        experts = [
            {"id": minter.bank.names[i], "similarity": round(s, 4)} for i, s in zip(idx, sims, strict=True)
        ]
        exact = own[row] is not None
        if shares is not None:
            row_shares = [1.0] + [0.0] * (len(experts) - 1) if exact else shares[row]
            for expert, share in zip(experts, row_shares, strict=True):
                expert["weight"] = round(float(share), 4)
        out.append({"experts": experts, "confidence": experts[0]["similarity"], "exact": exact})
    return out


def check_rank(rank: int | None, max_rank: int) -> None:
    """A requested rank (None: keep the minted one) must be an integer in [1, max_rank] (not a bool)."""
    if rank is not None and (
        not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max_rank
    ):
        raise GeneratorError(f"rank must be an integer in [1, {max_rank}], got {rank!r}")


def truncate(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """The best rank-`rank` approximation of each module's ΔW (leading SVD components), same scale. A rank
    at or above the adapter's own keeps the adapter as it is: a rank is a cap on components, and padding
    would only store zeros (and a config whose `r` disagrees with its tensors does not load in PEFT)."""
    if rank >= adapter.config.r:
        return adapter
    canon = canonicalize(adapter)
    cfg = adapter.config
    config = AdapterConfig(cfg.base_model, rank, cfg.alpha * rank / cfg.r, list(cfg.target_modules))
    return LoraAdapter(
        config, {m: (a[:rank].clone(), b[:, :rank].clone()) for m, (a, b) in canon.weights.items()}
    )
