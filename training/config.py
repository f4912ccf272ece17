"""Training hyper-parameters as plain dataclasses: importable without torch or Lightning (the CLI builds its
parser from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from loramint.gen.config import GeneratorConfig
from loramint.paths import DEFAULT_LIBRARY

Objective = Literal["recon", "functional"]


@dataclass
class ExpertTrainConfig:
    """Hyper-parameters of one expert's training run (YAML files under configs/experts/ mirror it).

    The defaults are the fast CPU path (see `training/fast.py` and benchmarks/bench_train.py); `reference()`
    gives the same run on the plain PEFT path it is measured against.
    """

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Leaf names of the linear layers that get a LoRA."""
    steps: int = 10
    """Optimizer steps. 10 steps at lr 2e-3 match 15 steps at 1e-3 of plain PEFT on held-out answer NLL in
    half the time (benchmarks/bench_train.py)."""
    lr: float = 2e-3
    batch_size: int = 8
    max_length: int = 128
    """Tokens per example (prompt truncated from the left, answer kept)."""
    n_metric_eval: int = 32
    """Examples of the task's evaluation split scored before/after training for the expert's metrics."""
    seed: int = 0
    trained_layers: int = 0
    """LoRA only on the last `trained_layers` decoder layers (0: every layer). Backward stops below them."""
    train_examples: int = 0
    """Distinct training examples, drawn at random (seeded) from the tasks' training splits; the steps cycle
    through them. 0: steps * batch_size, i.e. each example seen once (fewer if the tasks have fewer)."""
    answer_only_logits: bool = True
    """Vocabulary projection only at positions that predict an answer token. False: the plain PEFT forward,
    logits at every position (the reference path)."""
    cache_lower: bool = True
    """Run the frozen layers below the trained ones once per example and train on their cached output
    (Llama-style models; needs answer_only_logits). False: the whole forward at every step."""
    length_buckets: bool = True
    """Batch examples of similar length, so little compute goes to padding. False: uniformly random batches."""
    val_every: int = 0
    """Early stopping: every this many steps, score the answer NLL of the task's validation examples, keep
    the best state and stop after `patience` checks without an improvement of `min_delta`; `steps` is then
    the most steps a run may take. 0: train exactly `steps` steps, no validation."""
    patience: int = 3
    min_delta: float = 0.005
    """Nats per answer token a validation check must gain over the best so far to count as an improvement."""
    n_val: int = 50
    """Validation examples scored per check: the task's `val` split (a corpus task), else the last n_val of
    its shuffled training split (which training then leaves out)."""

    def __post_init__(self) -> None:
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha > 0,
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 8,
            "n_metric_eval": self.n_metric_eval >= 1,
            "target_modules": bool(self.target_modules),
            "trained_layers": self.trained_layers >= 0,
            "train_examples": self.train_examples >= 0,
            "val_every": self.val_every >= 0,
            "patience": self.patience >= 1,
            "min_delta": self.min_delta >= 0,
            "n_val": self.n_val >= 1,
            "cache_lower (needs answer_only_logits)": self.answer_only_logits or not self.cache_lower,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid ExpertTrainConfig field(s) {bad}: {self}")

    def reference(self) -> ExpertTrainConfig:
        """The same run on the plain PEFT path: LoRA on every layer, full logits, random batches."""
        return replace(
            self, trained_layers=0, answer_only_logits=False, cache_lower=False, length_buckets=False
        )


@dataclass
class GeneratorTrainConfig:
    library: str = DEFAULT_LIBRARY
    """Expert library to learn from (every expert whose task is in `tasks`, or all of them)."""
    out: str = ""
    """Checkpoint folder (replaced atomically when training ends). Required, and never defaulted: a training
    run must not silently replace a generator that a service is using."""
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    objective: Objective = "recon"
    """`functional` (what the shipped generator trains on) or `recon` (cheap: no base model; for quick checks
    of a library). The sum of both lost to `functional` alone on the corpus library and was removed
    (docs/generator.md)."""
    steps: int = 3000
    """Optimiser steps (at most; early stopping may end sooner)."""
    batch_size: int = 16
    """Experts per reconstruction step."""
    lr: float = 1e-3
    mix_lr: float | None = None
    """Learning rate of the residual mixture's per-module gains (`mix_gain`); None: `lr`."""
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping); steps with a non-finite loss are skipped."""
    beta: float = 1e-3
    """`recon`: weight of KL(q || learned prior) per latent dimension."""
    prior_weight: float = 1.0
    """`recon`: weight of reconstructing from the learned prior's mean (the minting path)."""
    top_k: int = 5
    """Retrieved experts forming the semantic prior (training and minting)."""
    tau: float = 0.05
    """Softmax temperature on cosine similarities for the semantic prior's weights."""
    examples_prob: float = 0.25
    """Fraction of conditions pulled towards a few of the task's examples (for `mint(..., examples=)`)."""
    n_examples: int = 5
    functional_tasks: int = 2
    """Tasks (each with its own decoded adapter) per functional step."""
    functional_batch: int = 4
    """Examples per task per functional step."""
    functional_weight: float = 1.0
    family_out_prob: float = 0.0
    """Fraction of the other functional rows (own expert not retrievable) whose retrieval also excludes every
    expert of the task's family: the situation of an unseen task from a family held out whole (the ni-family
    suite holds out ropes and quoref: 5 of its 10 unseen tasks), which leave-one-out rows never show, since
    nearly every seen task keeps close siblings. 0: leave-one-out only."""
    max_length: int = 128
    """Tokens per example for the functional loss (as the experts trained)."""
    val_tasks: int = 6
    """Seen experts held out for validation (0: none, no early stopping)."""
    val_every: int = 100
    val_examples: int = 0
    """Evaluation examples per validation task for the functional validation NLL (0: reconstruction only)."""
    monitor: Literal["val/mse", "val/nll"] = "val/mse"
    """What early stopping watches: the held-out experts' reconstruction error, or (`val_examples` > 0) the
    base model's answer NLL with their minted adapters."""
    patience: int = 10
    """Validations without improvement before stopping."""
    max_minted_cos: float = 0.9
    """A validation state whose held-out tasks' minted adapters have a mean pairwise ΔW cosine above this is
    never kept as the best (collapse: one adapter whatever the task; experts' own mean is ~0.1)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = GeneratorConfig.from_dict(self.model)
        checks = {
            "objective": self.objective in ("recon", "functional"),
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "mix_lr": self.mix_lr is None or self.mix_lr > 0,
            "grad_clip": self.grad_clip >= 0,
            "beta": self.beta >= 0,
            "top_k": self.top_k >= 1,
            "tau": self.tau > 0,
            "examples_prob": 0 <= self.examples_prob <= 1,
            "family_out_prob": 0 <= self.family_out_prob <= 1,
            "val_tasks": self.val_tasks >= 0,
            "val_every": self.val_every >= 1,
            "val_examples": self.val_examples >= 0,
            "monitor": self.monitor in ("val/mse", "val/nll")
            and (self.monitor == "val/mse" or self.val_examples > 0),
            "functional_tasks": self.functional_tasks >= 1,
            "functional_batch": self.functional_batch >= 1,
            "max_minted_cos": -1 <= self.max_minted_cos <= 1,
        }
        if bad := [k for k, ok in checks.items() if not ok]:
            raise ValueError(f"invalid generator training setting(s) {bad}: {self}")

    @property
    def needs_base(self) -> bool:
        """The base model (and the tasks' data) is needed: the functional loss or the validation NLL."""
        return self.objective == "functional" or self.val_examples > 0


@dataclass
class RouterTrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-2
    top_k: int = 2
    balance: float = 0.01
    """Weight of the load-balancing loss (MixLoRA / Switch: ~0.01)."""
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [k for k in ("steps", "batch_size", "top_k", "max_length") if getattr(self, k) < 1]
        if bad or self.lr <= 0 or self.balance < 0:
            raise ValueError(f"invalid router training setting(s) {bad or ['lr/balance']}: {self}")
