"""Generator ensembles: several generators trained alike (different seeds) over one library mint one adapter
whose update is the exact mean of theirs.

One generator's unseen-task quality varies by tens of points of the oracle's gain from seed to seed
(README "Generator"); averaging the members' updates keeps what they agree on and shrinks what each one
invents alone. The average is exact: the members' factors are concatenated (A rows stacked, B columns
stacked and scaled by weight x scaling), so the rank is the sum of the members' ranks; `rank=` keeps the
strongest components of the mean (SVD).

An ensemble checkpoint is a folder: `generator.json` (format `loramint-generator-ensemble`, the member
folders relative to it, their weights) and the members, each a complete generator checkpoint
(`loramint ensemble-generator OUT MEMBER...` writes one). `Minter.from_pretrained` loads either kind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.errors import GeneratorError
from loramint.gen.minter import own_adapter, own_experts, provenance, truncate
from loramint.paths import staged_dir

FORMAT = "loramint-generator-ensemble"
VERSION = 1


def average(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> LoraAdapter:
    """The adapter whose every ΔW is Σ_m weights_m ΔW_m (default: the plain mean), exactly: factors
    concatenated, rank Σ r_m, lora_alpha = rank (scaling 1, each part's scaling folded into its B)."""
    if not adapters:
        raise ValueError("average needs at least one adapter")
    w = [1.0 / len(adapters)] * len(adapters) if weights is None else [float(x) for x in weights]
    if len(w) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(w)} weights")
    modules = adapters[0].modules
    if any(sorted(a.modules) != sorted(modules) for a in adapters):
        raise ValueError("the adapters to average must target the same modules")
    out = {}
    for m in modules:
        a_parts = [a.weights[m][0] for a in adapters]
        b_parts = [a.weights[m][1] * (wm * a.config.scaling(m)) for a, wm in zip(adapters, w, strict=True)]
        out[m] = (torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1))
    rank = sum(a.config.r for a in adapters)
    first = adapters[0].config
    config = AdapterConfig(first.base_model, rank, float(rank), list(first.target_modules))
    return LoraAdapter(config, out)


class EnsembleMinter:
    """Several generators trained alike, minting the exact mean of their updates (implements
    `gen.protocol.MintingModel`, like `Minter`)."""

    def __init__(
        self,
        members: Sequence,
        weights: Sequence[float] | None = None,
        meta: dict | None = None,
        decode_dtype: str = "float32",
    ):
        if len(members) < 2:
            raise GeneratorError("an ensemble needs at least 2 member generators")
        first = members[0]
        for m in members[1:]:
            if m.layout != first.layout:
                raise GeneratorError(
                    "ensemble members must mint for the same layout (base model, modules, rank)"
                )
            if m.bank.names != first.bank.names:
                raise GeneratorError("ensemble members must be trained over the same library (bank)")
        w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
        if len(w) != len(members) or any(x < 0 for x in w) or sum(w) <= 0:
            raise GeneratorError(f"weights must be {len(members)} non-negative numbers with a positive sum")
        self.members = list(members)
        self.weights = [x / sum(w) for x in w]
        self.meta = meta or {}
        self.decode_dtype = decode_dtype
        if decode_dtype not in ("float32", "bfloat16"):
            raise GeneratorError(f"decode_dtype must be float32 or bfloat16, got {decode_dtype!r}")
        if decode_dtype == "bfloat16":  # the decoding path's linear layers stored in bfloat16 once: autocast
            for m in self.members:  # then casts nothing per call (bit-identical to casting them each time)
                for _, layer in m.model.decoding_linears():
                    layer.to(torch.bfloat16)

    # what callers of a Minter read
    @property
    def layout(self):
        return self.members[0].layout

    @property
    def encoder(self):
        return self.members[0].encoder

    @property
    def bank(self):
        return self.members[0].bank

    @property
    def model(self):
        return self.members[0].model

    @property
    def max_rank(self) -> int:
        if self.fast:
            k = self.members[0].model.config.residual_k
            return (k + len(self.members)) * self.layout.rank
        return sum(m.max_rank for m in self.members)

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder=None, device: str = "cpu") -> EnsembleMinter:
        from loramint.gen.minter import Minter

        path = Path(path)
        meta = json.loads((path / "generator.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise GeneratorError(f"{path}/generator.json is not a {FORMAT} version {VERSION} checkpoint")
        members = []
        for rel in meta["members"]:
            member = Minter.from_pretrained(path / rel, encoder=encoder, device=device)
            encoder = encoder or member.encoder  # one encoder for all (same name: checked below)
            members.append(member)
        names = {m.meta.get("encoder") for m in members}
        if len(names) != 1:
            raise GeneratorError(f"ensemble members were trained with different encoders: {sorted(names)}")
        return cls(members, meta.get("weights"), meta, meta.get("decode_dtype", "float32"))

    @property
    def fast(self) -> bool:
        """Residual members with one K: one compose for the whole ensemble (the retrieved experts once,
        with the mean of the members' coefficients, + the members' corrections), rank K r + M r instead of
        M (K + 1) r, the same update."""
        ks = {m.model.config.residual_k for m in self.members}
        return len(ks) == 1 and 0 not in ks

    # ---- the stages of minting (benchmarks/bench_mint.py times them; mint_many chains them) ----------------
    def condition(self, descriptions, examples=None) -> torch.Tensor:
        return self.members[0].condition(descriptions, examples)  # one encoder for all

    def retrieve(self, cond: torch.Tensor):
        return self.members[0].retrieve(cond)  # one bank for all (checked at load)

    def decode(self, cond: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Each member's decoded tokens {group: [B, L, dim]} (in bfloat16 when `decode_dtype` says so)."""
        with self._autocast(cond.device.type):
            return [m.decode(cond) for m in self.members]

    def row(self, tokens: list[dict[str, torch.Tensor]], i: int) -> list[dict[str, torch.Tensor]]:
        return [{g: t[i] for g, t in member.items()} for member in tokens]

    @torch.no_grad()
    def adapter(self, tokens: list[dict[str, torch.Tensor]], retrieved) -> LoraAdapter:
        """One row's adapter from its members' tokens (`row`) and its retrieval (`retrieve`, row i)."""
        from loramint.gen.residual import compose

        experts, sims = retrieved
        coef, corrections = 0.0, []
        for m, w, toks in zip(self.members, self.weights, tokens, strict=True):
            mix_gain = m.model.mix_gain.detach().float().cpu()  # [L, T]
            weights = m.model.mix(sims.float()).cpu()  # [K]
            coef = coef + w * (weights[:, None, None] * mix_gain[None])  # [K, L, T]
            scale = m.normalizer.scale
            corrections.append(m.layout.from_tokens({g: t.float().cpu() * scale[g] for g, t in toks.items()}))
        correction = average(corrections, self.weights)
        ones = torch.ones(len(experts))
        return compose(self.layout, experts, ones, correction, None, 1.0, coef=coef)

    def _autocast(self, device_type: str):
        if self.decode_dtype == "bfloat16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def provenance(
        self, descriptions: Sequence[str], examples: Sequence[Sequence[str] | None] | None = None
    ) -> list[dict]:
        """What minting each description draws on: the members share one bank (`gen.minter.provenance`)."""
        return provenance(self, descriptions, examples)

    def mint_many(
        self,
        descriptions: Sequence[str],
        examples: Sequence[Sequence[str] | None] | None = None,
        rank: int | None = None,
    ) -> list[LoraAdapter]:
        _check_rank(rank, self.max_rank)
        if not descriptions:
            return []
        cond = self.condition(descriptions, examples)
        own = own_experts(self, cond)  # a library expert's own description mints that expert
        rest = [i for i, o in enumerate(own) if o is None]
        minted: dict[int, LoraAdapter] = {}
        if rest and self.fast:
            sub = cond[rest]
            tokens, retrieved = self.decode(sub), self.retrieve(sub)
            minted = {i: self.adapter(self.row(tokens, j), retrieved[j]) for j, i in enumerate(rest)}
        elif rest:
            shots = [examples[i] for i in rest] if examples is not None else None
            with self._autocast(cond.device.type):
                per = [m.mint_many([descriptions[i] for i in rest], shots) for m in self.members]
            minted = {i: average([p[j] for p in per], self.weights) for j, i in enumerate(rest)}
        out = [minted[i] if o is None else own_adapter(self, o) for i, o in enumerate(own)]
        return out if rank is None else [truncate(a, rank) for a in out]

    def mint(
        self,
        description: str,
        examples: Sequence[str] | None = None,
        rank: int | None = None,
    ) -> LoraAdapter:
        return self.mint_many([description], [examples], rank)[0]

    def fuse(
        self, descriptions: Sequence[str], weights: Sequence[float] | None = None, rank: int | None = None
    ) -> LoraAdapter:
        device = self.members[0].bank.keys.device.type
        with self._autocast(device):  # bfloat16 members decode under autocast only
            fused = average([m.fuse(descriptions, weights) for m in self.members], self.weights)
        if rank is not None:
            _check_rank(rank, fused.config.r)
            return truncate(fused, rank)
        return fused


def _check_rank(rank: int | None, max_rank: int) -> None:
    from loramint.gen.minter import check_rank

    check_rank(rank, max_rank)


def save_ensemble(
    out: str | Path,
    members: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    decode_dtype: str = "float32",
) -> Path:
    """Write an ensemble checkpoint at `out` over the generator checkpoints `members` (copied into it as
    member-0, member-1, ...: the folder is self-contained). The result is loaded once before it replaces
    anything at `out`, so a broken or mismatched member is refused and nothing stored is lost.
    `decode_dtype` "bfloat16": the members decode under bfloat16 autocast (~4x faster on a CPU with
    native bfloat16; corrections differ from float32 by ~0.2%)."""
    out = Path(out)
    members = [Path(m) for m in members]
    if len(members) < 2:
        raise GeneratorError("an ensemble needs at least 2 member generators")
    for m in members:
        meta_file = m / "generator.json"
        if not meta_file.is_file():
            raise GeneratorError(f"{m} is not a generator checkpoint (no generator.json)")
        if json.loads(meta_file.read_text()).get("format") == FORMAT:
            raise GeneratorError(f"{m} is itself an ensemble: give its members")
    with staged_dir(out, replace=True) as tmp:
        rels = []
        for i, m in enumerate(members):
            shutil.copytree(m, tmp / f"member-{i}")
            rels.append(f"member-{i}")
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "members": rels,
            "decode_dtype": decode_dtype,
            "encoder": json.loads((members[0] / "generator.json").read_text()).get("encoder"),
        }
        if weights is not None:
            meta["weights"] = [float(x) for x in weights]
        meta["sources"] = [str(m) for m in members]
        (tmp / "generator.json").write_text(json.dumps(meta, indent=2))
        EnsembleMinter.from_pretrained(tmp)  # refuses mismatched members before anything is replaced
    return out
