"""Train one LoRA expert per task (Lightning + PEFT) and return it as a loramint adapter with its metrics."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from loramint.adapters import AdapterConfig, LoraAdapter
from loramint.models import BaseModel
from loramint.tasks import Task
from loramint.training.data import answer_nll, collate, encode_example


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
    n_eval: int = 16
    """Held-out examples for the before/after answer NLL stored in the expert's metrics."""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha > 0,
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "max_length": self.max_length >= 8,
            "n_eval": self.n_eval >= 1,
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
    """Fit a LoRA on `task`'s training split; metrics hold answer NLL before/after on held-out examples."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = config or ExpertTrainConfig()
    train, held_out = task.split(n_eval=min(config.n_eval, len(task.examples) // 2), seed=config.seed)
    if not train:
        raise ValueError(
            f"task {task.name!r} has no training examples left after holding out {config.n_eval}"
        )
    tok = base.tokenizer
    nll_before = answer_nll(base.model, tok, task, held_out, config.max_length)

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
    encoded = [encode_example(tok, task, ex, config.max_length) for ex in train]
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
        nll_after = answer_nll(peft_model, tok, task, held_out, config.max_length)
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
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "config": asdict(config),
    }
    return adapter, metrics
