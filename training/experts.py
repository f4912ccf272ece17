"""Train one LoRA expert per task (Lightning + PEFT) and return it as a loramint adapter with its metrics."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.models import BaseModel
from loramint.tasks import Task
from loramint.training.config import ExpertTrainConfig
from loramint.training.data import (
    answer_logits,
    answer_nll_per_example,
    collate,
    encode_example,
    eval_split,
    train_val_split,
    trainer_device,
)
from loramint.training.fast import (
    LengthBuckets,
    answer_loss,
    cache,
    cache_examples,
    cached_nll_per_example,
    collate_cached,
)


def first_trained_layer(model: torch.nn.Module, trained_layers: int) -> int:
    """Index of the lowest decoder layer that gets a LoRA (0: every layer)."""
    n_layers = model.config.num_hidden_layers
    return max(0, n_layers - trained_layers) if trained_layers else 0


class ExpertModule(L.LightningModule):
    """The PEFT-wrapped base model; only LoRA parameters train, loss on answer tokens only.

    A batch is either token ids (`data.collate`) or the cached input of the first trained layer
    (`fast.collate_cached`, which carries `hidden` instead of `input_ids`).
    """

    def __init__(
        self, model: torch.nn.Module, lr: float, first_layer: int = 0, answer_only_logits: bool = True
    ):
        super().__init__()
        self.model = model
        self.lr = lr
        self.first_layer = first_layer
        self.answer_only_logits = answer_only_logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "hidden" in batch:  # [B, T, d] entering layer first_layer
            net = self.model.get_base_model()
            loss = answer_loss(
                net, batch["hidden"], batch["attention_mask"], batch["labels"], self.first_layer
            )
        elif self.answer_only_logits:
            logits, targets = answer_logits(self.model, batch)  # [N, V], [N]
            loss = F.cross_entropy(logits.float(), targets)
        else:  # the plain PEFT reference: logits [B, T, V], transformers' shifted loss
            loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def train_expert(
    base: BaseModel, task: Task, config: ExpertTrainConfig | None = None
) -> tuple[LoraAdapter, dict]:
    """Fit a LoRA on one task's training split (see `eval_split`)."""
    return train_lora(base, [task], config)


def train_lora(
    base: BaseModel,
    tasks: Sequence[Task],
    config: ExpertTrainConfig | None = None,
    examples_per_task: int | None = None,
) -> tuple[LoraAdapter, dict]:
    """Fit one LoRA on the training splits of `tasks` (several tasks: a multi-task LoRA).

    Metrics hold the answer NLL per token before/after on the first `n_metric_eval` evaluation examples of
    each task (per example, and their mean); evaluation examples are never trained on.
    `examples_per_task`: draw at most this many training examples from each task (seeded), so that every
    task is in the pool and the pool's cached states fit in memory.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = config or ExpertTrainConfig()
    if not tasks:
        raise ValueError("train_lora needs at least one task")
    started = time.perf_counter()
    splits = [(task, *eval_split(task, seed=config.seed)) for task in tasks]
    val_sets: list[tuple[Task, list]] = []
    if config.val_every:  # training leaves the validation examples out
        parts = [(task, *train_val_split(task, config.n_val, config.seed)) for task in tasks]
        splits = [(task, train, ev) for (task, train, _), (_, _, ev) in zip(parts, splits, strict=True)]
        val_sets = [(task, val) for task, _, val in parts if val]
        if not val_sets:
            raise ValueError(
                f"tasks {[t.name for t in tasks]} have no validation examples for early stopping"
            )
    if examples_per_task is not None:
        splits = [
            (
                task,
                random.Random(f"{config.seed}:{task.name}").sample(train, min(examples_per_task, len(train))),
                ev,
            )
            for task, train, ev in splits
        ]
    pool = [(task, ex) for task, train, _ in splits for ex in train]
    if not pool:
        raise ValueError(
            f"tasks {[t.name for t in tasks]} have no training examples outside their evaluation split"
        )
    random.Random(config.seed).shuffle(pool)
    pool = pool[: config.train_examples or config.steps * config.batch_size]
    tok = base.tokenizer
    encoded = [encode_example(tok, task, ex, config.max_length) for task, ex in pool]
    first = first_trained_layer(base.model, config.trained_layers)
    metric_sets = [(task, ev[: config.n_metric_eval]) for task, _, ev in splits]
    # get_peft_model injects LoRA into base.model in place, so base.model is the expert once wrapped
    held_out_nll = _held_out_scorer(base, metric_sets, config, first)
    val_nll = _held_out_scorer(base, val_sets, config, first) if val_sets else None

    nll_before = held_out_nll()
    cache_started = time.perf_counter()
    if config.cache_lower:
        items, collate_fn = cache(base.model, encoded, first, tok.pad_token_id), collate_cached
    else:
        items, collate_fn = encoded, partial(collate, pad_id=tok.pad_token_id)
    cache_seconds = time.perf_counter() - cache_started
    if config.length_buckets:
        sampler = LengthBuckets([len(it) for it in items], config.batch_size, config.seed)
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate_fn)
    else:
        loader = DataLoader(
            items,
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(config.seed),
        )
    L.seed_everything(config.seed, verbose=False)
    n_layers = base.model.config.num_hidden_layers
    peft_model = get_peft_model(
        base.model,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,
            layers_to_transform=list(range(first, n_layers)) if first else None,
            layers_pattern="layers" if first else None,
        ),
    )
    device = base.device  # Lightning's teardown moves the module (the base model here) to the CPU
    stopper = EarlyStopping(lambda: statistics.fmean(val_nll()), config) if val_nll is not None else None
    trainer = L.Trainer(
        max_steps=config.steps,
        **trainer_device(device),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        # tqdm, not rich: a rich bar cannot nest inside the overall per-expert bar of a library build
        callbacks=[TQDMProgressBar(leave=False), *([stopper] if stopper else [])],
        num_sanity_val_steps=0,
    )
    fit_started = time.perf_counter()
    try:
        peft_model.train()
        module = ExpertModule(peft_model, config.lr, first, config.answer_only_logits)
        if stopper is not None:
            stopper.check(0, peft_model)  # the untrained LoRA (B = 0) is the base model: the bar to beat
        trainer.fit(module, train_dataloaders=loader)
        peft_model.to(device)
        steps_run = trainer.global_step
        if stopper is not None:
            if stopper.checked_at != steps_run:  # the last steps since the last check
                stopper.check(steps_run, peft_model)
            stopper.restore(peft_model)
        fit_seconds = time.perf_counter() - fit_started
        peft_model.eval()
        nll_after = held_out_nll()
        state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        state = {k: v.detach().cpu() for k, v in state.items()}
    finally:
        peft_model.unload()  # strips the LoRA layers: the caller's base model is left as it was
        base.model.to(device).eval()
    adapter_config = AdapterConfig(base.name, config.rank, config.alpha, list(config.target_modules))
    adapter = LoraAdapter.from_state_dict(state, adapter_config)
    adapter.validate()
    metrics = {
        "answer_nll_before": round(statistics.fmean(nll_before), 5),
        "answer_nll_after": round(statistics.fmean(nll_after), 5),
        # per metric example, for paired confidence intervals of the gain (mean over examples, as the harness)
        "answer_nll_before_examples": [round(v, 4) for v in nll_before],
        "answer_nll_after_examples": [round(v, 4) for v in nll_after],
        "train_seconds": round(cache_seconds + fit_seconds, 2),
        "cache_seconds": round(cache_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_examples": len(encoded),
        "steps_run": steps_run,
        **(stopper.report(config.steps) if stopper is not None else {}),
        "first_trained_layer": first,
        "tasks": [t.name for t in tasks],
        "config": asdict(config),
    }
    return adapter, metrics


class EarlyStopping(L.Callback):
    """Scores the validation NLL every `val_every` steps, keeps a copy of the best LoRA weights and stops the
    run after `patience` checks without an improvement of `min_delta`."""

    def __init__(self, score: Callable[[], float], config: ExpertTrainConfig) -> None:
        self.score, self.every = score, config.val_every
        self.patience, self.min_delta = config.patience, config.min_delta
        self.curve: list[tuple[int, float]] = []
        self.best, self.best_step, self.bad, self.checked_at = math.inf, 0, 0, -1
        self.best_state: dict[str, torch.Tensor] = {}
        self.stopped = False

    def check(self, step: int, model: torch.nn.Module) -> bool:
        """Score now; True when the run should stop."""
        training = model.training
        nll = self.score()  # the scorer puts the model in eval mode
        model.train(training)
        self.curve.append((step, round(nll, 5)))
        self.checked_at = step
        if nll < self.best - self.min_delta:
            self.best, self.best_step, self.bad = nll, step, 0
            self.best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.bad += 1
        return self.bad >= self.patience

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and self.check(step, pl_module.model):
            self.stopped = trainer.should_stop = True

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        """Put the best weights back (the last ones may be past the best)."""
        params = dict(model.named_parameters())
        for name, value in self.best_state.items():
            params[name].copy_(value)

    def report(self, max_steps: int) -> dict:
        return {
            "val_curve": self.curve,
            "val_nll_best": round(self.best, 5),
            "best_step": self.best_step,
            "converged": self.stopped,
            "max_steps": max_steps,
        }


def _held_out_scorer(
    base: BaseModel, metric_sets: list[tuple[Task, list]], config: ExpertTrainConfig, first: int
) -> Callable[[], list[float]]:
    """A function giving base.model's answer NLL per token of each metric example (all tasks, in order), as
    the model is now. With `cache_lower`, the frozen lower layers run once here and each call runs the
    trained layers only."""
    tok = base.tokenizer
    if not config.cache_lower:

        def score() -> list[float]:
            return [
                float(v)
                for task, examples in metric_sets
                for v in answer_nll_per_example(base.model, tok, task, examples, config.max_length)
            ]

        return score
    cached = [
        cache_examples(base.model, tok, task, examples, config.max_length, first)
        for task, examples in metric_sets
    ]

    def score_cached() -> list[float]:
        base.model.eval()
        return [float(v) for items in cached for v in cached_nll_per_example(base.model, items, first)]

    return score_cached
