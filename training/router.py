"""Train the runtime's learned per-token router (Lightning): the experts and the base model stay frozen, only
the per-module gates learn, from the answer loss on the seen tasks' training examples (all tasks mixed in
every batch) plus `balance` x the load-balancing loss."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from loramint.runtime.lora import Plan
from loramint.runtime.router import LearnedRouter
from loramint.runtime.runtime import Runtime
from loramint.tasks import Task
from loramint.training.config import RouterTrainConfig
from loramint.training.data import answer_logits, collate, encode_example, eval_split, trainer_device


class RouterModule(L.LightningModule):
    def __init__(self, runtime: Runtime, router: LearnedRouter, config: RouterTrainConfig) -> None:
        super().__init__()
        self.router, self.cfg = router, config
        self.rt = [runtime]  # not a submodule: Lightning must not train, move or checkpoint the base model
        self.slots = runtime.stack.slots(router.expert_ids, runtime._load)
        for p in runtime.base.model.parameters():
            p.requires_grad_(False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        rt = self.rt[0]
        self.router.record = True
        rt.holder.plan = Plan(self.slots, router=self.router)
        try:
            logits, targets = answer_logits(rt.base.model, batch)
        finally:
            rt.holder.plan = None
            self.router.record = False
        nll = F.cross_entropy(logits.float(), targets)
        balance = self.router.balance_loss()
        loss = nll + self.cfg.balance * balance
        self.log_dict({"nll": nll, "balance": balance}, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.router.parameters(), lr=self.cfg.lr)


def train_router(
    runtime: Runtime,
    tasks: Sequence[Task],
    expert_ids: Sequence[str],
    config: RouterTrainConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> tuple[LearnedRouter, dict]:
    """A router over `expert_ids` trained on the training examples of `tasks`; saved to `out` if given."""
    config = config or RouterTrainConfig()
    L.seed_everything(config.seed, verbose=False)
    tok = runtime.base.tokenizer
    items = [encode_example(tok, t, ex, config.max_length) for t in tasks for ex in eval_split(t)[0]]
    if not items:
        raise ValueError("no training examples to train the router on")
    random.Random(config.seed).shuffle(items)
    shapes = runtime.stack.shapes
    router = LearnedRouter({m: shapes[m][1] for m in shapes}, expert_ids, config.top_k)
    module = RouterModule(runtime, router, config)
    loader = DataLoader(
        items, batch_size=config.batch_size, shuffle=True, collate_fn=lambda b: collate(b, tok.pad_token_id)
    )
    trainer = L.Trainer(
        max_steps=config.steps,
        max_epochs=-1,
        **trainer_device(runtime.base.device),
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(module, loader)
    router.to(runtime.base.device).eval()  # Lightning's teardown left it on the CPU
    if out is not None:
        router.save(out)
    return router, {"steps": int(trainer.global_step), "wall_s": round(time.perf_counter() - started, 1)}
