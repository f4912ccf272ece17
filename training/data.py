"""How task examples become model inputs: chat-formatted prompt, answer tokens as the only labels.

The model sees the example's input (with the task's own prefix, if any) and never the task description;
the description goes to the library and the generator only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loramint.tasks import Example, Task

IGNORE = -100
ENCODING_VERSION = 2
"""Bumped whenever the token sequences built here change (2: the input, not the chat header or instruction,
is cut when a prompt is too long): part of every expert's config hash and of the harness's score keys."""
EVAL_SIZE = 200
"""Examples per task held out for evaluation (half the task when it has fewer than 2 * EVAL_SIZE)."""


def trainer_device(device: torch.device) -> dict:
    """Lightning Trainer arguments that train on `device`, the base model's: its CPU or its own GPU (never
    "auto", which would move a CPU model to a GPU that happens to be there, or pick GPU 0 for cuda:1)."""
    if device.type == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    return {"accelerator": "gpu", "devices": [device.index or 0]}


def eval_split(task: Task, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples. Every job uses this one split: experts never train on evaluation examples.

    A corpus task's fixed splits give (train, test); other tasks hold out EVAL_SIZE examples by seed."""
    if task.splits:
        return task.part("train"), task.part("test")
    return task.split(n_eval=min(EVAL_SIZE, len(task.examples) // 2), seed=seed)


def train_val_split(task: Task, n_val: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples for early stopping, never overlapping `eval_split`'s evaluation examples:
    a corpus task's train and val splits, else its training split with the last `n_val` (at most a quarter)
    held back for validation."""
    if task.splits:
        return task.part("train"), task.part("val")[:n_val]
    train = eval_split(task, seed)[0]
    n = min(n_val, len(train) // 4)
    return (train[:-n], train[-n:]) if n else (train, [])


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


def prompt_ids(tokenizer, task: Task, example: Example, budget: int) -> list[int]:
    """Token ids of the chat-formatted prompt, at most `budget` of them.

    A prompt that does not fit loses the start of the example's input, never the chat template's header,
    the task's prefix (or a baseline's instruction) or the end of the input: the model still reads who it
    is, what it is asked and the text nearest the question. Only when those alone exceed the budget is the
    whole prompt cut from the left.
    """
    text = prompt_text(tokenizer, task, example)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= budget:
        return ids
    content = task.prompt(example)
    start = text.find(content) + len(task.prefix)  # where example.input begins in the text
    if start < len(task.prefix) or not example.input:
        return ids[-budget:]
    head, tail = text[:start], text[start + len(example.input) :]
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    keep = budget - len(head_ids) - len(tail_ids)
    if keep < 1:
        return ids[-budget:]
    body = tokenizer(example.input, add_special_tokens=False).input_ids
    return head_ids + body[-keep:] + tail_ids


def encode_example(
    tokenizer, task: Task, example: Example, max_length: int, answer: str | None = None
) -> Encoded:
    """Tokenise prompt + answer + end-of-turn in `max_length` tokens: the answer (up to half of them) is
    kept whole and the prompt fits in the rest (`prompt_ids`: the input's start goes first)."""
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    target = tokenizer(answer if answer is not None else example.output, add_special_tokens=False).input_ids
    target = (target + end)[: max(1, max_length // 2)]
    prompt = prompt_ids(tokenizer, task, example, max_length - len(target))
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
def answer_logprob_sums(
    model, items: Sequence[Encoded], pad_id: int, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the answer tokens' log-probabilities [n], answer token count [n]) of each encoded example.

    Batches run in length order (little padding); results come back in the items' order.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    sums, counts = np.zeros(len(items)), np.zeros(len(items))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in rows], pad_id).items()}
        logits, targets = answer_logits(model, batch)  # [N, V], [N]
        logp = -F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
        sums[rows], counts[rows] = per_row(logp, answer_targets(batch["labels"])[0])
    return sums, counts


def per_row(values: torch.Tensor, keep: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Row sums and counts of `values` [N], the entries of a [B, T] mask `keep` in row-major order."""
    rows = keep.nonzero()[:, 0]  # [N]
    sums = torch.zeros(keep.shape[0], device=values.device).index_add_(0, rows, values.float())
    return sums.cpu().numpy(), keep.sum(dim=1).cpu().numpy()


def answer_nll_per_example(
    model, tokenizer, task: Task, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> np.ndarray:
    """[n]: each example's negative log-likelihood per answer token (the harness's `answer_nll` values)."""
    sums, counts = _reference_sums(model, tokenizer, task, examples, max_length, batch_size)
    return -sums / counts


def answer_nll(
    model, tokenizer, task: Task, examples: Sequence[Example], max_length: int = 256, batch_size: int = 8
) -> float:
    """Mean negative log-likelihood per answer token over all answer tokens (lower is better)."""
    sums, counts = _reference_sums(model, tokenizer, task, examples, max_length, batch_size)
    return float(-sums.sum() / max(counts.sum(), 1))


def _reference_sums(
    model, tokenizer, task: Task, examples: Sequence[Example], max_length: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`answer_logprob_sums` of the examples' reference answers."""
    encoded = [encode_example(tokenizer, task, ex, max_length) for ex in examples]
    return answer_logprob_sums(model, encoded, tokenizer.pad_token_id, batch_size)
