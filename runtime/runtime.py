"""The runtime's Python API: a base model with resident experts, generating and scoring mixed batches.

    rt = Runtime("smollm2-135m", library="data/library-corpus")
    rt.generate(["Q1", "Q2", "Q3"], adapters=["expert-a", {"expert-a": 0.5, "expert-b": 0.5}, "auto"])

Per row, `adapters` may be None (the base model), an expert id, a mixture {id: weight}, or "auto" (the
prompt is retrieved against the library, top-k experts mixed by similarity). `routing="arrow"` instead routes
every token among the given experts (or all resident ones) by Arrow, and `routing="learned"` by a trained
`LearnedRouter` (`training/router.py`). Experts come from the library on first
use (LRU-resident, `capacity` at most) or from `add()` (minted or uploaded adapters).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from loramint.adapters import LoraAdapter
from loramint.errors import NotFoundError
from loramint.index import ExpertLibrary
from loramint.models import BaseModel, default_device, left_pad, load_base_model
from loramint.runtime.lora import Plan, arrow_router, attach
from loramint.runtime.router import LearnedRouter
from loramint.runtime.stack import ExpertStack, linear_shapes

Route = Union[None, str, Mapping[str, float]]  # noqa: UP007 (a runtime alias, read by users)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def similarity_weights(similarities: Sequence[float]) -> list[float]:
    """Mixture weights from cosine similarities: max(cos, 0) normalised to sum 1 (uniform if none is > 0:
    nothing is similar at all, so no reason to prefer one)."""
    scores = [max(float(s), 0.0) for s in similarities]
    if sum(scores) == 0:
        scores = [1.0] * len(scores)
    return [s / sum(scores) for s in scores]


class Runtime:
    def __init__(
        self,
        base: str | BaseModel = "smollm2-135m",
        library: str | Path | ExpertLibrary | None = None,
        capacity: int = 64,
        max_rank: int = 16,
        target_modules: Sequence[str] = TARGETS,
        device: str | None = None,
        top_k: int = 2,
        router: str | Path | LearnedRouter | None = None,
        loader: Callable[[str], LoraAdapter] | None = None,
    ) -> None:
        """`loader(id)` -> adapter: where experts named in requests come from when they are not resident
        (default: those given to `add`, then the library)."""
        device = default_device(device)
        self.base = base if isinstance(base, BaseModel) else load_base_model(base, device=device)
        self.library = ExpertLibrary.open(library) if isinstance(library, (str, Path)) else library
        self.top_k = top_k
        model = self.base.model
        shapes = linear_shapes(model, target_modules)
        self.stack = ExpertStack(shapes, capacity, max_rank, self.base.device, next(model.parameters()).dtype)
        self.holder = attach(model, self.stack)
        self._local: dict[str, LoraAdapter] = {}
        self.router = LearnedRouter.load(router) if isinstance(router, (str, Path)) else router
        self._lock = threading.RLock()  # one forward pass owns the model's plan at a time
        self.loader = loader

    # ---- experts -----------------------------------------------------------------------------------------
    def add(self, expert_id: str, adapter: LoraAdapter) -> None:
        """Serve `adapter` under `expert_id` (kept so it comes back after an eviction)."""
        self.stack.add(expert_id, adapter)
        self._local[expert_id] = adapter

    def remove(self, expert_id: str) -> None:
        """Stop serving `expert_id`: its resident copy goes, and it is loaded afresh if named again."""
        with self._lock:
            self._local.pop(expert_id, None)
            if expert_id in self.stack:
                self.stack.remove(expert_id)

    def _load(self, expert_id: str) -> LoraAdapter:
        if expert_id in self._local:
            return self._local[expert_id]
        if self.loader is not None:
            return self.loader(expert_id)
        if self.library is None or expert_id not in self.library:
            raise NotFoundError(f"no expert {expert_id!r} (not added, not in the library)")
        return self.library.get(expert_id).load_adapter()

    def resolve(self, route: Route, prompt: str) -> dict[str, float]:
        """One row's route as {expert id: weight} ({} for the base model)."""
        if route is None:
            return {}
        if route == "auto":
            if self.library is None:
                raise ValueError('adapters="auto" needs a library to retrieve from')
            hits = self.library.search(prompt, k=self.top_k)
            return dict(zip([e.id for e, _ in hits], similarity_weights([s for _, s in hits]), strict=True))
        if isinstance(route, str):
            return {route: 1.0}
        return {str(k): float(v) for k, v in route.items()}

    def plan(self, routes: Sequence[dict[str, float]], routing: str = "request") -> Plan | None:
        """The plan for a batch: the union of the rows' experts and a [B, 1, u] gate matrix; or per token,
        Arrow over the union (or every resident expert when no row names one), or the learned router."""
        active = list(dict.fromkeys(e for r in routes for e in r))
        if routing == "learned":
            if self.router is None:
                raise ValueError('routing="learned" needs a trained router: Runtime(router=...)')
            # a loaded or CPU-trained router follows the stack (a no-op once it is there)
            self.router.to(self.stack.device)
            return Plan(self.stack.slots(self.router.expert_ids, self._load), router=self.router)
        if routing == "arrow":
            active = active or self.stack.ids
            if not active:
                raise ValueError("Arrow routing needs resident experts or named ones")
            slots = self.stack.slots(active, self._load)
            return Plan(slots, router=arrow_router(self.stack, slots, self.top_k))
        if routing != "request":
            raise ValueError(f"routing must be 'request', 'arrow' or 'learned', got {routing!r}")
        if not active:
            return None
        slots = self.stack.slots(active, self._load)
        gates = torch.zeros(len(routes), 1, len(active), device=self.stack.device)
        for row, route in enumerate(routes):
            for eid, w in route.items():
                gates[row, 0, active.index(eid)] = w
        return Plan(slots, gates=gates)

    # ---- inference ----------------------------------------------------------------------------------------
    def _prompts(self, prompts: Sequence[str], chat: bool) -> list[list[int]]:
        tok = self.base.tokenizer
        if not chat or getattr(tok, "chat_template", None) is None:
            return [tok(p, add_special_tokens=False).input_ids for p in prompts]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        return [tok(t, add_special_tokens=False).input_ids for t in texts]

    def _batch(self, prompts: Sequence[str], adapters, routing: str, chat: bool):
        """(input ids [B, W] left-padded, attention mask, plan, pad id) of one generate/stream call."""
        if isinstance(adapters, (str, Mapping)) or adapters is None:
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapter routes")
        routes = [self.resolve(a, p) for a, p in zip(adapters, prompts, strict=True)]
        pad = self.base.pad_id
        input_ids, mask = left_pad(self._prompts(prompts, chat), pad)
        return input_ids.to(self.base.device), mask.to(self.base.device), self.plan(routes, routing), pad

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        adapters: Sequence[Route | str] | Route | str = None,
        max_new_tokens: int | Sequence[int] = 64,
        routing: str = "request",
        chat: bool = True,
        streamer=None,
        cancel: threading.Event | None = None,
    ) -> list[str]:
        """Greedy completions of every prompt in one batch (KV cache), each row with its own adapter /
        mixture and its own `max_new_tokens` (an int for all); a row that is done stops costing anything but
        its padding. `cancel.set()` ends the pass after the current step; `streamer`: a transformers streamer
        fed the new tokens [B] of every step."""
        limits = _limits(max_new_tokens, len(prompts))
        with self._lock:
            input_ids, mask, plan, pad = self._batch(prompts, adapters, routing, chat)
            self.holder.plan = plan
            try:
                out = self.base.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max(limits),
                    do_sample=False,
                    pad_token_id=pad,
                    streamer=streamer,
                    stopping_criteria=[_RowStop(input_ids.shape[1], limits, cancel)],
                )
            finally:
                self.holder.plan = None
        tok = self.base.tokenizer
        new = [row[:n] for row, n in zip(out[:, input_ids.shape[1] :], limits, strict=True)]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    def stream(
        self,
        prompts: Sequence[str],
        adapters: Sequence[Route | str] | Route | str = None,
        max_new_tokens: int | Sequence[int] = 64,
        routing: str = "request",
        chat: bool = True,
        cancel: threading.Event | None = None,
        usage: list[Usage] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Like `generate`, but yields (row, text piece) as tokens are decoded, every row of the batch
        interleaved; a row's pieces join to its completion (unstripped). Decoding runs in a worker thread;
        an error there is raised here. Closing the iterator early cancels the pass after its current step.
        `usage`, if given, receives one `Usage` per row (tokens generated, finish reason) at the end."""
        limits = _limits(max_new_tokens, len(prompts))
        tok = self.base.tokenizer
        eos = self.base.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        streamer = _StepStreamer()
        errors: list[BaseException] = []
        cancel = cancel or threading.Event()

        def work() -> None:
            try:
                self.generate(prompts, adapters, limits, routing, chat, streamer=streamer, cancel=cancel)
            except BaseException as e:  # noqa: BLE001 (handed to the consumer)
                errors.append(e)
            finally:
                streamer.end()

        threading.Thread(target=work, daemon=True, name="loramint-stream").start()
        tokens: list[list[int]] = [[] for _ in prompts]
        sent = [""] * len(prompts)
        finish = [""] * len(prompts)
        try:
            while (step := streamer.queue.get()) is not None:
                for row, token in enumerate(step):
                    if finish[row]:
                        continue
                    if token in eos:
                        finish[row] = "stop"
                        continue
                    tokens[row].append(token)
                    if len(tokens[row]) >= limits[row]:
                        finish[row] = "length"
                    text = tok.decode(tokens[row], skip_special_tokens=True)
                    if text.endswith("\ufffd") and not finish[row]:  # a character split across tokens
                        continue
                    if len(text) > len(sent[row]):
                        yield row, text[len(sent[row]) :]
                        sent[row] = text
        finally:
            cancel.set()  # the consumer stopped early (or we are done): the pass ends after this step
        if errors:
            raise errors[0]
        if usage is not None:
            usage.extend(Usage(len(t), f or "length") for t, f in zip(tokens, finish, strict=True))

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, adapters: Sequence[Route] | Route = None, routing: str = "request"
    ) -> torch.Tensor:
        """[B, T, V] logits of token ids (no chat template), each row with its own route."""
        if isinstance(adapters, (str, Mapping)) or adapters is None:
            adapters = [adapters] * input_ids.shape[0]
        routes = [
            self.resolve(a, "") if a != "auto" else self._auto_of(input_ids[i])
            for i, a in enumerate(adapters)
        ]
        with self._lock:
            self.holder.plan = self.plan(routes, routing)
            try:
                return self.base.model(input_ids=input_ids.to(self.base.device)).logits
            finally:
                self.holder.plan = None

    @torch.no_grad()
    def answer_nll(self, items: Sequence, routes: Sequence[Route]) -> np.ndarray:
        """[n] mean negative log-likelihood per answer token of each encoded example (`input_ids`, `labels`
        with -100 on prompt tokens: `training.data.encode_example`), row i under routes[i]; one pass."""
        from loramint.training.data import answer_logits, answer_targets, collate, per_row

        if len(items) != len(routes):
            raise ValueError(f"{len(items)} examples but {len(routes)} routes")
        if not items:
            return np.zeros(0)
        batch = {k: v.to(self.base.device) for k, v in collate(items, self.base.pad_id).items()}
        resolved = [self.resolve(r, "") for r in routes]
        with self._lock:
            self.holder.plan = self.plan(resolved)
            try:
                logits, targets = answer_logits(self.base.model, batch)
            finally:
                self.holder.plan = None
        logp = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        sums, counts = per_row(logp, answer_targets(batch["labels"])[0])
        return -sums / np.maximum(counts, 1)

    def _auto_of(self, ids: torch.Tensor) -> dict[str, float]:
        return self.resolve("auto", self.base.tokenizer.decode(ids, skip_special_tokens=True))


class _StepStreamer:
    """A transformers streamer for batches: the prompt is skipped, then each step's new tokens [B] are queued
    as a list (None ends the stream)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


@dataclass(frozen=True)
class Usage:
    """One streamed row's outcome: tokens generated and why it ended ("stop": end of sequence, "length":
    its max_new_tokens)."""

    completion_tokens: int
    finish_reason: str


def _limits(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n or any(not isinstance(m, int) or m < 1 for m in limits):
        raise ValueError(
            f"max_new_tokens must be a positive int or one per prompt ({n}), got {max_new_tokens!r}"
        )
    return limits


class _RowStop:
    """Stopping criterion: row b is done after limits[b] new tokens; every row once `cancel` is set."""

    def __init__(self, width: int, limits: list[int], cancel: threading.Event | None) -> None:
        self.width, self.cancel = width, cancel
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return (input_ids.shape[1] - self.width >= self.limits).to(input_ids.device)
