"""How task examples become model inputs: chat-formatted prompt, answer tokens as the only labels.

The model sees the example's input (with the task's own prefix, if any) and never the task description;
the description goes to the library and the generator only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loramint.tasks import Example, Task

IGNORE = -100
EVAL_SIZE = 200
"""Examples per task held out for evaluation (half the task when it has fewer than 2 * EVAL_SIZE)."""


def eval_split(task: Task, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples. Every job uses this one split: experts never train on evaluation examples."""
    return task.split(n_eval=min(EVAL_SIZE, len(task.examples) // 2), seed=seed)


def prompt_text(tokenizer, task: Task, example: Example) -> str:
    """Chat-formatted prompt ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": task.prompt(example)}], add_generation_prompt=True, tokenize=False
    )


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: the loss is on answer tokens only

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_example(
    tokenizer, task: Task, example: Example, max_length: int, answer: str | None = None
) -> Encoded:
    """Tokenise prompt + answer + end-of-turn; truncate the prompt from the left so the answer survives."""
    prompt = tokenizer(prompt_text(tokenizer, task, example), add_special_tokens=False).input_ids
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target = tokenizer(answer if answer is not None else example.output, add_special_tokens=False).input_ids
    target = (target + end)[: max(1, max_length // 2)]
    prompt = prompt[-(max_length - len(target)) :]
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/attention_mask/labels, all [B, T]."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, T] bool, targets [N]): position t is kept when token t+1 is an answer token.

    `model(..., logits_to_keep=keep).logits` is then [N, V], row n predicting targets[n] (row-major order).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N]) at the N answer-predicting positions of a `collate` batch.

    Only those positions go through the vocabulary projection (transformers' `logits_to_keep`): on prompt
    tokens the [V, d] lm_head would cost as much as several decoder layers.
    """
    keep, targets = answer_targets(batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    return out.logits, targets


@torch.no_grad()
def answer_nll(
    model, tokenizer, task: Task, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> float:
    """Mean negative log-likelihood per answer token (lower is better)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    encoded = [encode_example(tokenizer, task, ex, max_length) for ex in examples]
    encoded.sort(key=lambda enc: len(enc.input_ids))  # similar lengths per batch: little padding
    for start in range(0, len(encoded), batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(encoded[start : start + batch_size], tokenizer.pad_token_id).items()
        }
        logits, targets = answer_logits(model, batch)  # [N, V], [N]
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)
