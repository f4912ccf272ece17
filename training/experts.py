"""Train one LoRA expert per task (Lightning + PEFT) and return it as a loramint adapter with its metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.models import BaseModel
from loramint.tasks import Task
from loramint.training.data import answer_nll, collate, encode_example, eval_split


@dataclass
class ExpertTrainConfig:
    """Hyper-parameters of one expert's training run (YAML files under configs/experts/ mirror it)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Leaf names of the linear layers that get a LoRA."""
    steps: int = 50
    """Optimizer steps."""
    lr: float = 5e-4
    batch_size: int = 8
    max_length: int = 128
    """Tokens per example (prompt truncated from the left, answer kept)."""
    n_metric_eval: int = 32
    """Examples of the task's evaluation split scored before/after training for the expert's metrics."""
    seed: int = 0

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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid ExpertTrainConfig field(s) {bad}: {self}")


class ExpertModule(L.LightningModule):
    """The PEFT-wrapped base model; only LoRA parameters train, loss on answer tokens only."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
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
    base: BaseModel, tasks: Sequence[Task], config: ExpertTrainConfig | None = None
) -> tuple[LoraAdapter, dict]:
    """Fit one LoRA on the training splits of `tasks` (several tasks: a multi-task LoRA).

    Metrics hold the mean answer NLL before/after on the first `n_metric_eval` evaluation examples of each
    task; evaluation examples are never trained on.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = config or ExpertTrainConfig()
    if not tasks:
        raise ValueError("train_lora needs at least one task")
    splits = [(task, *eval_split(task, seed=config.seed)) for task in tasks]
    tok = base.tokenizer
    encoded = [encode_example(tok, task, ex, config.max_length) for task, train, _ in splits for ex in train]
    if not encoded:
        raise ValueError(
            f"tasks {[t.name for t in tasks]} have no training examples outside their evaluation split"
        )

    def held_out_nll(model) -> float:
        scores = [
            answer_nll(model, tok, task, ev[: config.n_metric_eval], config.max_length)
            for task, _, ev in splits
        ]
        return sum(scores) / len(scores)

    nll_before = held_out_nll(base.model)
    L.seed_everything(config.seed, verbose=False)
    peft_model = get_peft_model(
        base.model,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.target_modules),
            lora_dropout=0.0,
        ),
    )
    loader = DataLoader(
        encoded,
        batch_size=config.batch_size,
        shuffle=True,
        collate_fn=lambda items: collate(items, tok.pad_token_id),
        generator=torch.Generator().manual_seed(config.seed),
    )
    trainer = L.Trainer(
        max_steps=config.steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        # tqdm, not rich: a rich bar cannot nest inside the overall per-expert bar of a library build
        callbacks=[TQDMProgressBar(leave=False)],
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    try:
        peft_model.train()
        trainer.fit(ExpertModule(peft_model, config.lr), train_dataloaders=loader)
        seconds = time.perf_counter() - started
        peft_model.eval()
        nll_after = held_out_nll(peft_model)
        state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        state = {k: v.detach().cpu() for k, v in state.items()}
    finally:
        peft_model.unload()  # strips the LoRA layers: the caller's base model is left as it was
        base.model.eval()
    adapter_config = AdapterConfig(base.name, config.rank, config.alpha, list(config.target_modules))
    adapter = LoraAdapter.from_state_dict(state, adapter_config)
    adapter.validate()
    metrics = {
        "answer_nll_before": round(nll_before, 5),
        "answer_nll_after": round(nll_after, 5),
        "train_seconds": round(seconds, 2),
        "train_examples": len(encoded),
        "tasks": [t.name for t in tasks],
        "config": asdict(config),
    }
    return adapter, metrics
