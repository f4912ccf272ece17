"""Train the generator (`gen.model.LoraCVAE`) on a library's experts with Lightning.

Objectives (`objective`):
- `recon`: reconstruct each expert's normalised canonical factors from its posterior sample and from the
  learned prior's mean (what minting decodes), + beta * KL(q(z | W, c) || p(z | c, semantic prior)). Cheap.
- `functional`: the base model's answer loss on the expert's task examples with the adapter decoded from the
  prior mean applied (T2L's "SFT" mode). Costs a base-model forward and backward per step. What the shipped
  generator trains on: on the converged corpus library it beat the conditional-VAE sum of both (recon + KL +
  functional) on validation NLL, held-out families and distinctness of minted adapters (docs/generator.md).
Minting decodes the learned prior's mean; nothing samples the latent (the functional objective never trains
the prior's variance).

Every step conditions on a random phrasing of each task (`gen.phrasings`; some rows also pulled towards a
few of the task's examples), and the semantic prior comes from the K nearest *other* training experts
(leave-one-out, as at mint time for an unseen task). Validation holds out `val_tasks` seen experts whole:
their zero-shot reconstruction error (prior mean, neighbours from the training experts only) and, when
`val_examples` > 0, the base model's answer NLL on their evaluation examples with the minted adapter (with
base and the real expert alongside, so the log shows the fraction of the expert's gain recovered). The best
validation state is kept (early stopping); the checkpoint is safetensors + JSON (`gen.minter`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset

from loramint.adapters import LoraAdapter, apply_lora
from loramint.gen.data import ExpertSet
from loramint.gen.minter import Bank, save_generator
from loramint.gen.model import LoraCVAE, semantic_prior
from loramint.gen.phrasings import phrasings
from loramint.gen.residual import assemble, delta_cosines, delta_error, mean_off_diagonal
from loramint.index import ExpertLibrary
from loramint.models import BaseModel
from loramint.sysinfo import machine
from loramint.tasks import Task
from loramint.training.config import GeneratorTrainConfig
from loramint.training.data import answer_logits, collate, encode_example, eval_split, trainer_device

SHOT_VARIANTS = 8  # example-conditioned conditions per task


# ---- data ----------------------------------------------------------------------------------------------------


def example_text(task: Task, example) -> str:
    """How an example is shown to the encoder for in-context conditioning."""
    return f"{example.input}\n{example.output}"


@dataclass
class TrainingData:
    """The experts, split into train/val, with each task's conditions and encoded training examples."""

    experts: ExpertSet
    train: list[int]
    val: list[int]
    tasks: dict[str, Task]
    """Expert name -> its task (for the functional loss and example conditioning); may be partial."""
    shots: list[torch.Tensor]
    """Per expert [V, C]: the description pulled towards V random handfuls of examples ([0, C]: no task data)."""
    families: list[str]
    """Per expert its family as the library records it ('' for none): validation and family-out rows."""


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def select_val(names: Sequence[str], n: int, seed: int) -> list[int]:
    """Validation expert indices: `n` experts chosen by hash (reproducible, nobody picks them by hand)."""
    return sorted(sorted(range(len(names)), key=lambda i: _rank(seed, names[i]))[:n])


def example_conditions(
    library: ExpertLibrary, task: Task, n_variants: int, n_examples: int, seed: int
) -> torch.Tensor:
    """[n_variants, C]: the description pulled towards random handfuls of the task's training examples."""
    train, _ = eval_split(task)
    rng = random.Random(seed)
    rows = []
    for _ in range(n_variants):
        shots = rng.sample(train, min(n_examples, len(train)))
        rows.append(library.encoder.encode_task(task.description, [example_text(task, ex) for ex in shots]))
    return torch.from_numpy(np.stack(rows)).float()


def retrievable_experts(library: ExpertLibrary) -> list:
    """The experts whose quality card does not rule them out of retrieval (`retrievable: false`)."""
    return [e for e in library.list() if e.metrics.get("retrievable", True) is not False]


def load_training_data(
    library: ExpertLibrary, tasks: Sequence[Task], config: GeneratorTrainConfig
) -> TrainingData:
    """Experts of `tasks` (all experts when `tasks` is empty), phrasings encoded, val experts chosen.
    Experts whose quality card shows no gain over the base model (`retrievable: false`) are left out: the
    generator retrieves and mixes only experts that help their own task."""
    by_name = {t.name: t for t in tasks}
    experts = [e for e in retrievable_experts(library) if not by_name or e.name in by_name]
    families = [e.family or "" for e in experts]
    val = select_val([e.name for e in experts], config.val_tasks, config.seed)
    train = [i for i in range(len(experts)) if i not in val]
    if len(train) < config.top_k + 1:  # checked before the experts are loaded and their phrasings encoded
        raise ValueError(
            f"{len(experts)} experts cannot train a generator with top_k={config.top_k} after holding out "
            f"{len(val)} for validation (val_tasks={config.val_tasks}): build more experts or lower it"
        )
    variants = {
        e.name: phrasings(e.description, by_name[e.name].descriptions if e.name in by_name else ())
        for e in experts
    }
    data = ExpertSet.from_library(library, [e.id for e in experts], variants)
    shots = [
        example_conditions(library, by_name[name], SHOT_VARIANTS, config.n_examples, config.seed)
        if name in by_name and config.examples_prob > 0
        else torch.zeros(0, data.keys.shape[1])
        for name in data.names
    ]
    tasks_of = {n: by_name[n] for n in data.names if n in by_name}
    family = dict(zip((e.name for e in experts), families, strict=True))
    return TrainingData(data, train, val, tasks_of, shots, [family[n] for n in data.names])


class StepBatches(IterableDataset):
    """An endless stream of (expert indices, condition row per expert) for the training steps: row r < P_i
    is phrasing r, row P_i + v the v-th example-conditioned variant (taken with probability `examples_prob`)."""

    def __init__(
        self,
        n_phrasings: list[int],
        n_shots: list[int],
        train: list[int],
        batch_size: int,
        examples_prob: float,
        seed: int,
    ) -> None:
        self.n_phrasings, self.n_shots, self.train = n_phrasings, n_shots, train
        self.batch_size, self.examples_prob, self.seed = batch_size, examples_prob, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed)
        while True:
            idx = rng.sample(self.train, min(self.batch_size, len(self.train)))
            rows = [
                self.n_phrasings[i] + rng.randrange(self.n_shots[i])
                if self.n_shots[i] and rng.random() < self.examples_prob
                else rng.randrange(self.n_phrasings[i])
                for i in idx
            ]
            yield {"idx": torch.tensor(idx), "row": torch.tensor(rows)}


# ---- the Lightning module ------------------------------------------------------------------------------------


class GeneratorModule(L.LightningModule):
    def __init__(
        self,
        data: TrainingData,
        config: GeneratorTrainConfig,
        base: BaseModel | None = None,
    ) -> None:
        super().__init__()
        self.cfg = config
        self.data = data
        experts = data.experts
        self.net = LoraCVAE(experts.layout, config.model)
        self.base = [base]  # a list: Lightning must neither register, move nor checkpoint the base model
        self.tokens = experts.tokens  # {group: [N, L, dim]}
        self.keys = experts.keys  # [N, C]
        self.conds = [
            torch.cat([c, s]) for c, s in zip(experts.conds, data.shots, strict=True)
        ]  # [P_i + V_i, C]
        self.train_idx = torch.tensor(data.train)
        self.families = data.families  # '' (no family): never excluded as a family
        self.family_members = {
            f: torch.tensor([x == f for x in self.families]) for f in set(self.families) if f
        }  # family -> [N] bool
        layout, norm = experts.layout, experts.normalizer
        self.raw_experts = [  # raw canonical factors: the residual mixture's parts and the ΔW-space targets
            layout.from_tokens(norm.denormalize({g: t[i] for g, t in self.tokens.items()}))
            for i in range(len(experts))
        ]
        self.best: dict[str, Any] = {"score": float("inf"), "state": None, "step": 0}
        self.skipped = 0  # training steps skipped for a non-finite loss or gradient
        self.nonfinite_params: set[str] = set()
        self.nonfinite_weights: dict[str, Any] | None = None  # the step that left a weight NaN/inf, and which
        self.nonfinite_validation: dict[str, Any] | None = None  # the first NaN validation: step and stage
        self.curve: list[dict[str, float]] = []
        self._encoded: dict[str, list] = {}
        self._val_reference: dict[str, float] | None = None
        if config.needs_base:
            if base is None:
                raise ValueError("the functional objective and validation NLL need the base model")
            for p in base.model.parameters():
                p.requires_grad_(False)

    # -- helpers --
    def _tok(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {g: t[idx] for g, t in self.tokens.items()}

    def retrieve(
        self,
        cond: torch.Tensor,
        own: Sequence[int | None],
        k: int,
        family_out: Sequence[bool] = (),
    ):
        """The top-k of the training experts by cosine with each row of `cond` -> (indices into the whole
        expert set [B, K], cosines [B, K]). Row b never retrieves its own expert `own[b]` (leave-one-out:
        what an unseen task's description retrieves); with `family_out[b]` it retrieves no expert of that
        task's family either (unless fewer than k training experts would be left)."""
        sims = cond @ self.keys.T  # [B, N]
        allowed = torch.zeros(len(self.keys), dtype=torch.bool)
        allowed[self.train_idx] = True
        mask = allowed.expand(len(cond), -1).clone()
        for row, i in enumerate(own):
            if i is None:
                continue
            mask[row, i] = False
            if family_out and family_out[row] and self.families[i]:
                kept = mask[row] & ~self.family_members[self.families[i]]
                if int(kept.sum()) >= k:
                    mask[row] = kept
        top = sims.masked_fill(~mask, -torch.inf).topk(k, dim=-1)
        return top.indices, top.values

    def semantic(
        self, cond: torch.Tensor, own: Sequence[int | None], family_out: Sequence[bool] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The semantic prior [B, Z] x 2 from the top-k training experts (see `retrieve`)."""
        nbr, sims = self.retrieve(cond, own, self.cfg.top_k, family_out)
        flat = nbr.reshape(-1)
        mu, logvar = self.net.encode(self._tok(flat), self.keys[flat])  # [B*K, Z]
        shape = (*nbr.shape, -1)
        return semantic_prior(mu.reshape(shape), logvar.reshape(shape), sims, self.cfg.tau)

    def conditions(self, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.conds[i][r] for i, r in zip(idx.tolist(), rows.tolist(), strict=True)])

    def mint_tokens(
        self, cond: torch.Tensor, own: Sequence[int | None], family_out: Sequence[bool] = ()
    ) -> dict[str, torch.Tensor]:
        """Normalised tokens decoded from the learned prior's mean (the minting path), differentiable."""
        sem_mu, sem_logvar = self.semantic(cond, own, family_out)
        mu_p, _ = self.net.prior(cond, sem_mu, sem_logvar)
        return self.net.decode(mu_p, cond)

    def assemble(
        self,
        tokens: dict[str, torch.Tensor],
        cond: torch.Tensor,
        own: Sequence[int | None],
        family_out: Sequence[bool] = (),
    ) -> list[LoraAdapter]:
        """Each row's adapter from decoded tokens {group: [B, L, dim]}: with a residual generator composed
        with the K training experts nearest its condition (never its own), as `Minter` does."""
        k = self.net.config.residual_k
        if k:
            nbrs, sims = self.retrieve(cond, own, k, family_out)
        normalizer = self.data.experts.normalizer
        out = []
        for b in range(cond.shape[0]):
            row = {g: t[b] for g, t in tokens.items()}
            if k:
                experts = [self.raw_experts[i] for i in nbrs[b].tolist()]
                out.append(assemble(self.net, normalizer, row, experts, sims[b]))
            else:
                out.append(assemble(self.net, normalizer, row))
        return out

    def encoded(self, name: str, split: int) -> list:
        key = f"{name}:{split}"
        if key not in self._encoded:
            task, tok = self.data.tasks[name], self.base[0].tokenizer
            examples = eval_split(task)[split]
            self._encoded[key] = [encode_example(tok, task, ex, self.cfg.max_length) for ex in examples]
        return self._encoded[key]

    # -- training --
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        idx, rows = batch["idx"], batch["row"]
        cond = self.conditions(idx, rows)  # [B, C]
        loss = torch.zeros(())
        logs = {}
        if self.cfg.objective == "recon":
            target = self._tok(idx)
            sem_mu, sem_logvar = self.semantic(cond, idx.tolist())
            out = self.net(target, cond, sem_mu, sem_logvar)
            recon, prior = (
                self.recon_error(tokens, cond, idx)
                for tokens in (out["recon"], self.net.decode(out["mu_p"], cond))
            )
            kl = out["kl"].mean() / self.cfg.model.d_latent
            loss = recon + self.cfg.prior_weight * prior + self.cfg.beta * kl
            logs |= {"train/recon": recon, "train/prior_mse": prior, "train/kl": kl}
        if self.cfg.objective == "functional":
            fn = self.functional(idx[: self.cfg.functional_tasks], cond[: self.cfg.functional_tasks])
            loss = loss + self.cfg.functional_weight * fn
            logs["train/nll"] = fn
        if not torch.isfinite(loss):  # skip the step: one overflow must not poison the weights
            self.skipped += 1
            return None
        self.log_dict(logs | {"train/loss": loss}, prog_bar=True, on_step=True, batch_size=len(idx))
        return loss

    def recon_error(
        self, tokens: dict[str, torch.Tensor], cond: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """Reconstruction error of decoded tokens against the experts `idx`: element-wise MSE of normalised
        tokens, or for a residual generator the relative ΔW error of the composed adapter (its tokens are a
        correction, not an adapter)."""
        if not self.net.config.residual_k:
            return group_mse(tokens, self._tok(idx))
        adapters = self.assemble(tokens, cond, idx.tolist())
        return torch.stack(
            [delta_error(a, self.raw_experts[i]) for a, i in zip(adapters, idx.tolist(), strict=True)]
        ).mean()

    def functional(self, idx: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean answer loss of the base model with each expert's minted adapter on its own training examples."""
        base = self.base[0]
        own = idx.tolist()
        other = random.Random(self.global_step * 7919 + 3)  # which rows also lose their family
        family_out = [other.random() < self.cfg.family_out_prob for _ in own]
        tokens = self.mint_tokens(cond, own, family_out)
        adapters = self.assemble(tokens, cond, own, family_out)
        losses = []
        for b, i in enumerate(own):
            name = self.data.experts.names[i]
            if name not in self.data.tasks:
                raise ValueError(f"expert {name!r} has no task data: pass the suite for the functional loss")
            items = self.encoded(name, 0)
            picked = random.Random(self.global_step * 1000 + i).sample(
                items, min(self.cfg.functional_batch, len(items))
            )
            batch = collate(picked, base.tokenizer.pad_token_id)
            with apply_lora(base.model, adapters[b]):
                logits, targets = answer_logits(base.model, batch)
            losses.append(F.cross_entropy(logits.float(), targets))
        return torch.stack(losses).mean()

    # -- validation --
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        val = torch.tensor(self.data.val)
        cond = self.keys[val]
        with torch.no_grad():
            tokens = self.mint_tokens(cond, [None] * len(val))
            minted = self.assemble(tokens, cond, [None] * len(val))
            metrics = {"val/mse": self.recon_error(tokens, cond, val)}
            if len(val) > 1:  # collapse check: minted adapters of different tasks must differ like experts do
                metrics["val/minted_cos"] = mean_off_diagonal(delta_cosines(minted))
                metrics["val/expert_cos"] = mean_off_diagonal(
                    delta_cosines([self.raw_experts[i] for i in val.tolist()])
                )
            if self.cfg.val_examples:
                metrics |= self.val_nll(val, minted)
        self.log_dict(metrics, prog_bar=True, batch_size=1)
        score = float(metrics[self.cfg.monitor])
        if not np.isfinite(score) and self.nonfinite_validation is None:
            with torch.no_grad():
                stage = self.nonfinite_stage(cond)
            self.nonfinite_validation = {"step": int(self.global_step), "stage": stage or "scoring"}
        self.curve.append({"step": self.global_step, **{k: float(v) for k, v in metrics.items()}})
        if score < self.best["score"] and not collapsed(metrics, self.cfg.max_minted_cos):
            self.best = {
                "score": score,
                "state": copy.deepcopy(self.net.state_dict()),
                "step": self.global_step,
            }

    def val_nll(self, val: torch.Tensor, minted: list[LoraAdapter]) -> dict[str, float]:
        """Answer NLL on the val tasks' evaluation examples: minted, and (once) base and the real expert."""
        model = self.base[0].model
        ref = self._val_reference is None
        sums = {"nll": 0.0, "base": 0.0, "expert": 0.0}
        for b, i in enumerate(val.tolist()):
            items = self.encoded(self.data.experts.names[i], 1)[: self.cfg.val_examples]
            batch = collate(items, self.base[0].tokenizer.pad_token_id)
            with apply_lora(model, minted[b]):
                sums["nll"] += batch_nll(model, batch)
            if ref:
                sums["base"] += batch_nll(model, batch)
                with apply_lora(model, self.raw_experts[i]):
                    sums["expert"] += batch_nll(model, batch)
        n = len(val)
        if ref:
            self._val_reference = {"base": sums["base"] / n, "expert": sums["expert"] / n}
        nll = sums["nll"] / n
        base, expert = self._val_reference["base"], self._val_reference["expert"]
        return {
            "val/nll": nll,
            "val/base_nll": base,
            "val/expert_nll": expert,
            "val/recovered": (base - nll) / max(base - expert, 1e-9),
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at the first step that leaves a non-finite weight (the best validation state is kept), and
        name the parameters, instead of training on and validating NaN."""
        bad = [n for n, p in self.net.named_parameters() if not p.isfinite().all()]
        if bad and self.nonfinite_weights is None:
            self.nonfinite_weights = {"step": int(self.global_step), "params": bad}
            self.trainer.should_stop = True

    def nonfinite_stage(self, cond: torch.Tensor) -> str | None:
        """The first stage of the minting path whose output is not finite for `cond`, or None."""
        sem_mu, sem_logvar = self.semantic(cond, [None] * len(cond))
        mu_p, logvar_p = self.net.prior(cond, sem_mu, sem_logvar)
        stages = {"semantic prior mean": sem_mu, "semantic prior log-variance": sem_logvar}
        stages |= {"learned prior mean": mu_p, "learned prior log-variance": logvar_p}
        stages |= {f"decoded {g}": t for g, t in self.net.decode(mu_p, cond).items()}
        return next((name for name, t in stages.items() if not t.isfinite().all()), None)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Drop the step's gradients when any is non-finite (a finite loss can still back-propagate an inf,
        e.g. through a saturated softmax): one bad batch must not turn the generator's weights into NaN."""
        bad = [
            n for n, p in self.net.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
        ]
        if bad:
            self.skipped += 1
            self.nonfinite_params.update(bad)
            for p in self.net.parameters():
                p.grad = None

    def configure_optimizers(self):
        """AdamW; the residual mixture's per-module gains (a few hundred numbers that few steps inform) at
        `mix_lr`."""
        params = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        mixing = [p for n, p in params if n == "mix_gain"]
        groups = [{"params": [p for n, p in params if n != "mix_gain"]}]
        if mixing:
            groups.append({"params": mixing, "lr": self.cfg.mix_lr or self.cfg.lr})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def train_dataloader(self) -> DataLoader:
        batches = StepBatches(
            [len(c) for c in self.data.experts.conds],
            [len(s) for s in self.data.shots],
            self.data.train,
            self.cfg.batch_size,
            self.cfg.examples_prob,
            self.cfg.seed,
        )
        return DataLoader(batches, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)


def collapsed(metrics: dict[str, Any], limit: float) -> bool:
    """A validation state that mints nearly one adapter whatever the task: the held-out tasks' minted
    adapters' mean pairwise ΔW cosine is above `limit` and above their real experts' own (a library whose
    experts are that alike may mint alike adapters)."""
    if "val/minted_cos" not in metrics:
        return False
    minted = float(metrics["val/minted_cos"])
    return minted > limit and minted > float(metrics["val/expert_cos"])


def group_mse(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over groups of each group's element-wise MSE (groups differ in size by 3x for SmolLM2 q/v)."""
    return torch.stack([F.mse_loss(pred[g], target[g]) for g in target]).mean()


@torch.no_grad()
def batch_nll(model, batch: dict[str, torch.Tensor]) -> float:
    logits, targets = answer_logits(model, batch)
    return float(F.cross_entropy(logits.float(), targets))


# ---- the job -------------------------------------------------------------------------------------------------


def posterior_bank(net: LoraCVAE, experts: ExpertSet) -> Bank:
    """Every expert's posterior mean/log-variance under the trained encoder, with its description key."""
    with torch.no_grad():
        mu, logvar = net.encode(experts.tokens, experts.keys)
    factors = experts.normalizer.denormalize(experts.tokens) if net.config.residual_k else None
    return Bank(list(experts.names), experts.keys.clone(), mu, logvar, factors)


def train_generator(
    config: GeneratorTrainConfig,
    tasks: Sequence[Task] = (),
    base: BaseModel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, keep the best validation state, write the checkpoint to `config.out`; returns the report."""
    if not config.out:
        raise ValueError(
            "train.out is required: the folder the new generator is written to (e.g. data/generator/mine)"
        )
    L.seed_everything(config.seed, verbose=False)
    started = time.perf_counter()
    with ExpertLibrary.open(config.library) as library:
        data = load_training_data(library, tasks, config)
        encoder = library.encoder.name
    if config.needs_base:
        missing = [
            data.experts.names[i] for i in data.train + data.val if data.experts.names[i] not in data.tasks
        ]
        if missing:
            raise ValueError(f"no task data for experts {missing[:3]}: pass the suite that built the library")
    module = GeneratorModule(data, config, base)
    callbacks: list = [TQDMProgressBar(refresh_rate=10)] if progress else []
    if data.val:
        callbacks.append(
            EarlyStopping(
                config.monitor, patience=config.patience, mode="min", check_on_train_epoch_end=False
            )
        )
    trainer = L.Trainer(
        max_steps=config.steps,
        max_epochs=-1,
        **trainer_device(base.device if base is not None else torch.device("cpu")),
        val_check_interval=config.val_every if data.val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1 if data.val else 0,
        num_sanity_val_steps=1 if data.val else 0,  # the untrained generator is the curve's first point
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=callbacks,
        gradient_clip_val=config.grad_clip or None,
    )
    trainer.fit(module)
    if module.best["state"] is not None:
        module.net.load_state_dict(module.best["state"])
    net = module.net.eval()
    report = {
        "steps": int(trainer.global_step),
        "best_step": module.best["step"] if data.val else int(trainer.global_step),
        "skipped_nonfinite_steps": module.skipped,
        "nonfinite_grad_params": sorted(module.nonfinite_params),
        "nonfinite_weights": module.nonfinite_weights,
        "nonfinite_validation": module.nonfinite_validation,
        "best": module.best["score"] if data.val else None,
        "monitor": config.monitor,
        "curve": module.curve,
        "n_experts": len(data.experts),
        "train": [data.experts.names[i] for i in data.train],
        "val": [data.experts.names[i] for i in data.val],
        "trained_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "generator_params": sum(p.numel() for p in net.parameters()),
        "generator_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
        "library_bytes": int(sum(t.numel() * 4 for t in data.experts.tokens.values())),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    save_generator(
        config.out,
        net,
        data.experts.normalizer,
        posterior_bank(net, data.experts),
        encoder=encoder,
        top_k=config.top_k,
        tau=config.tau,
        extra={"train_config": asdict(config), "report": report},
        files={"curve.json": json.dumps(module.curve, indent=2).encode()},
    )
    return report


STALE_KEY_COSINE = 0.9999
"""A bank entry whose stored description key is less similar than this to the library's is stale."""
STALE_DELTA_ERROR = 1e-3
"""A bank entry whose update differs from the library expert's by more than this (relative ΔW error; float16
storage alone gives about 1e-5) is stale: the expert was retrained under the same name."""


def refresh_bank(
    checkpoint: str | Path, library: str | Path, out: str | Path | None = None
) -> dict[str, Any]:
    """Bring a generator checkpoint's bank up to `library`'s retrievable experts as they are now, the trained
    network unchanged: experts built (or retrained, or re-described) after the generator was trained get a
    new entry (key: the stored description embedding; latent: the trained encoder's posterior of its
    canonical factors, normalised as the generator was trained), experts no longer retrievable leave, and
    every other entry is kept bit for bit (so a mint that draws only on those is the same adapter as before).
    Writes the checkpoint to `out` (default: in place, replaced only once complete); returns {"before",
    "after", "added", "updated", "removed"} (expert names)."""
    from loramint.errors import GeneratorError
    from loramint.gen.minter import Minter

    minter = Minter.from_pretrained(checkpoint)
    if not isinstance(minter, Minter):
        raise GeneratorError(f"{checkpoint} is an ensemble: refresh each member's bank, then ensemble them")
    with ExpertLibrary.open(library) as lib:
        if lib.encoder.name != minter.meta.get("encoder"):
            raise GeneratorError(
                f"library {library} embeds descriptions with {lib.encoder.name!r}, the generator was trained "
                f"with {minter.meta.get('encoder')!r}"
            )
        fit = retrievable_experts(lib)
        if len(fit) < max(minter.top_k, minter.model.config.residual_k):
            raise GeneratorError(
                f"library {library} has {len(fit)} retrievable experts, the generator retrieves {minter.top_k}"
            )
        experts = ExpertSet.from_library(lib, [e.id for e in fit], normalizer=minter.normalizer)
    if experts.layout != minter.layout:
        raise GeneratorError(
            f"library {library} holds adapters of another layout (base model, modules or rank) than the "
            "generator mints"
        )
    old, layout = minter.bank, minter.layout
    where = {name: i for i, name in enumerate(old.names)}
    fresh = posterior_bank(minter.model, experts)

    def current(j: int, i: int) -> bool:  # bank entry i still describes library expert j
        if float(old.keys[i] @ experts.keys[j]) < STALE_KEY_COSINE:
            return False
        if old.factors is None or fresh.factors is None:
            return True
        library_expert = layout.from_tokens({g: t[j] for g, t in fresh.factors.items()})
        return float(delta_error(old.expert(layout, i), library_expert)) <= STALE_DELTA_ERROR

    at = {name: j for j, name in enumerate(experts.names)}
    rows = [  # the bank's order kept (a refresh with nothing to do rewrites the same bank), new experts after
        (old, i) if current(at[name], i) else (fresh, at[name])
        for i, name in enumerate(old.names)
        if name in at
    ] + [(fresh, j) for j, name in enumerate(experts.names) if name not in where]
    bank = Bank(
        [b.names[i] for b, i in rows],
        *(torch.stack([getattr(b, k)[i] for b, i in rows]) for k in ("keys", "mu", "logvar")),
        factors={g: torch.stack([b.factors[g][i].float() for b, i in rows]) for g in old.factors}
        if old.factors is not None
        else None,
    )
    fixed = {"format", "version", "model", "layout", "encoder", "top_k", "tau", "bank"}
    extra = {k: v for k, v in minter.meta.items() if k not in fixed}
    extra["bank_source"] = {"library": str(library), "experts": len(bank)}
    curve = Path(checkpoint, "curve.json")
    files = {"curve.json": curve.read_bytes()} if curve.is_file() else None
    save_generator(
        out or checkpoint,
        minter.model,
        minter.normalizer,
        bank,
        encoder=minter.meta["encoder"],
        top_k=minter.top_k,
        tau=minter.tau,
        extra=extra,
        files=files,
    )
    return {
        "before": len(old),
        "after": len(bank),
        "added": [n for n in experts.names if n not in where],
        "updated": [fresh.names[j] for b, j in rows if b is fresh and fresh.names[j] in where],
        "removed": [n for n in old.names if n not in at],
    }


def plot_curve(curve: Sequence[dict[str, float]], path: str | Path) -> Path:
    """The learning curve: each validation metric against the step, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in curve[0] if k != "step"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [c["step"] for c in curve]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(steps, [c[key] for c in curve], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
