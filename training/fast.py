"""The fast CPU training path: frozen lower layers run once per example, LoRA trains the upper layers only,
and the vocabulary projection runs only where the next token is an answer token.

A decoder-only LM is `embed -> layers[0..n) -> norm -> lm_head`. With LoRA only on layers >= L0 (the
first trained layer), the hidden states entering layer L0 never change during training, so they are
computed once per example (`lower_states`, no grad) and every optimizer step runs layers L0.. only
(`answer_loss`); backward stops at L0. Same model, same loss: tests compare both against the full forward.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

from loramint.tasks import Example, Task
from loramint.training.data import IGNORE, Encoded, answer_targets, collate, encode_example, per_row


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(decoder, lm_head) of a Llama-style causal LM: `decoder` has embed_tokens, layers, norm, rotary_emb."""
    core, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if core is None or head is None or not all(hasattr(core, name) for name in needed):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style causal LM (model.model.{{{','.join(needed)}}} + "
            "lm_head): train it with ExpertTrainConfig(cache_lower=False, answer_only_logits=False)"
        )
    return core, head


def run_layers(
    core: nn.Module, h: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[nn.Module]
) -> torch.Tensor:
    """Apply decoder `layers` to hidden states h: [B, T, d] of right-padded rows (attention_mask: [B, T]).

    Right padding means every row's positions count 0, 1, ... from its first token, as in the full forward,
    so a layer fed cached states sees exactly the rotary phases and causal mask it would have seen there.
    """
    from transformers.masking_utils import create_causal_mask

    # no KV cache: the argument is `cache` in newer transformers (`past_key_values` is deprecated there)
    no_cache = {
        "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None
    }
    pos = torch.arange(h.shape[1], device=h.device)[None]  # [1, T]
    mask = create_causal_mask(
        config=core.config, inputs_embeds=h, attention_mask=attention_mask, position_ids=pos, **no_cache
    )
    rope = core.rotary_emb(h, position_ids=pos)  # (cos, sin): [1, T, head_dim] each
    for layer in layers:
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)  # [B, T, d]
    return h


@torch.no_grad()
def lower_states(
    model: nn.Module, items: Sequence[Encoded], first_layer: int, pad_id: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """Hidden states entering layer `first_layer`, one [T_i, d] tensor per item (no padding kept).

    Items run in length order so a batch pads little; the result is in the items' order.
    """
    core, _ = decoder_parts(model)
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([items[i] for i in rows], pad_id)
        mask = batch["attention_mask"].to(device)  # [B, T]
        h = core.embed_tokens(batch["input_ids"].to(device))  # [B, T, d]
        h = run_layers(core, h, mask, core.layers[:first_layer])
        for row, i in enumerate(rows):
            out[i] = h[row, : len(items[i].input_ids)].clone()  # [T_i, d]
    return out  # type: ignore[return-value]


def answer_loss(
    model: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    first_layer: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy on answer tokens, from hidden states entering layer `first_layer`.

    hidden: [B, T, d], attention_mask and labels: [B, T]. `first_layer=0` with hidden = embed(input_ids)
    is the whole model. The lm_head ([V, d], V = 49152 for SmolLM2) runs on the N answer positions only,
    not on all B*T: on prompt tokens it would cost as much as several decoder layers.
    """
    core, head = decoder_parts(model)
    h = core.norm(run_layers(core, hidden, attention_mask, core.layers[first_layer:]))  # [B, T, d]
    keep, targets = answer_targets(labels)  # [B, T], [N]
    logits = head(h[keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


@dataclass
class Cached:
    """One training example after the frozen lower layers."""

    hidden: torch.Tensor  # [T, d] entering the first trained layer
    labels: torch.Tensor  # [T], IGNORE on prompt tokens

    def __len__(self) -> int:
        return self.labels.shape[0]


def collate_cached(items: Sequence[Cached]) -> dict[str, torch.Tensor]:
    """Right-pad cached rows: hidden [B, T, d], attention_mask [B, T], labels [B, T]."""
    width, d = max(len(it) for it in items), items[0].hidden.shape[1]
    hidden = items[0].hidden.new_zeros(len(items), width, d)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, it in enumerate(items):
        hidden[row, : len(it)] = it.hidden
        mask[row, : len(it)] = 1
        labels[row, : len(it)] = it.labels
    return {"hidden": hidden, "attention_mask": mask, "labels": labels}


def cache(model: nn.Module, items: Sequence[Encoded], first_layer: int, pad_id: int) -> list[Cached]:
    """Encoded examples -> their input to layer `first_layer`, with their labels."""
    hidden = lower_states(model, items, first_layer, pad_id)
    return [Cached(h, torch.tensor(it.labels)) for h, it in zip(hidden, items, strict=True)]


def cache_examples(
    model: nn.Module, tokenizer, task: Task, examples: Sequence[Example], max_length: int, first_layer: int
) -> list[Cached]:
    """`cache` of a task's examples, encoded as `data.encode_example` does."""
    encoded = [encode_example(tokenizer, task, ex, max_length) for ex in examples]
    return cache(model, encoded, first_layer, tokenizer.pad_token_id)


@torch.no_grad()
def cached_nll_sums(
    model: nn.Module, items: Sequence[Cached], first_layer: int, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the answer tokens' NLL [n], answer token count [n]) of each cached item, from its states
    entering `first_layer` (== data.answer_logprob_sums of the same examples, negated)."""
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    sums, counts = np.zeros(len(items)), np.zeros(len(items))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_cached([items[i] for i in rows]).items()}
        nll = answer_loss(
            model, batch["hidden"], batch["attention_mask"], batch["labels"], first_layer, "none"
        )  # [N]
        sums[rows], counts[rows] = per_row(nll, answer_targets(batch["labels"])[0])
    return sums, counts


def cached_nll_per_example(
    model: nn.Module, items: Sequence[Cached], first_layer: int, batch_size: int = 16
) -> np.ndarray:
    """[n]: each cached item's NLL per answer token (== data.answer_nll_per_example of the same examples)."""
    sums, counts = cached_nll_sums(model, items, first_layer, batch_size)
    return sums / counts


class LengthBuckets(Sampler[list[int]]):
    """Batches of similar length, in random order: shuffle, cut into windows of `window` batches, sort each
    window by length, split it into batches, shuffle the batches. Padding nearly vanishes while every epoch
    still visits the examples in a fresh random order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 16) -> None:
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, window
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]
