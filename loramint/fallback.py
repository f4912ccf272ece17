"""Serve a minted adapter or fall back to the base model: the decision every mint reports.

A generator always returns weights, whether or not its library holds anything like the task. Two signals say
whether to trust them:

- `confidence`: the best cosine similarity between the request and a library expert's description
  (`gen.minter.provenance`). Below `FallbackPolicy.min_confidence` nothing in the library is near.
- a check on the request's solved examples (input and expected output), base model and minted adapter side
  by side (`check_examples`), on two grounds. Likelihood: how much better the adapter tells each example's
  output from the other examples' outputs (`Check.gain`, nats per answer token); an adapter that does not
  gain more than `min_gain` is not served. Answers: the greedy answers of both to the examples' inputs,
  scored against the expected outputs (ROUGE-L, `Check.base_answers` / `Check.minted_answers`); an adapter
  whose answers score below the base model's is not served, whatever its likelihood gain (a free-text
  adapter can make the right output likelier and still write worse answers).

    policy = FallbackPolicy(min_confidence=0.3, min_gain=0.0)
    decision = decide(policy, confidence=0.52, check=check)   # Decision(fell_back=..., reason=...)

The base model is the safe choice: falling back serves exactly what the user had without minting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the policy is imported by configuration code: no torch until an adapter is checked
    import numpy as np

    from loramint.tasks import Task
    from loramint.training.data import Encoded

Scorer = Callable[[Sequence["Encoded"], Sequence[bool]], "np.ndarray"]
"""(encoded examples, whether each row runs with the minted adapter) -> each row's mean answer NLL [n]."""
Answerer = Callable[[Sequence[str], Sequence[bool], Sequence[int]], Sequence[str]]
"""(prompts as the model reads them before its chat template, whether each row runs with the minted adapter,
new-token limit of each row) -> each row's greedy answer."""
ANSWER_MARGIN = 8
"""New tokens an answer may take beyond its expected output's length."""
MAX_ANSWER_TOKENS = 64
"""The longest answer either model may give in the check."""


@dataclass(frozen=True)
class FallbackPolicy:
    min_confidence: float = 0.0
    """Below this best similarity to a library expert, serve the base model (0: never on this ground)."""
    min_gain: float = 0.0
    """On solved examples, the minted adapter's `Check.gain` must exceed this (nats per answer token) or the
    base model is served."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_confidence) and -1.0 <= self.min_confidence <= 1.0):
            raise ValueError(f"min_confidence must lie in [-1, 1], got {self.min_confidence!r}")
        if not math.isfinite(self.min_gain):
            raise ValueError(f"min_gain must be a finite number of nats, got {self.min_gain!r}")


@dataclass(frozen=True)
class Check:
    """The minted adapter against the base model on the request's solved examples.

    Contrastive when the examples have at least two different outputs: for each example, its own output is
    scored against the other examples' outputs as distractors (mean log-probability per answer token, as
    multiple-choice tasks are scored), and `gain` is how much the adapter widens the margin of the right
    output over the best distractor. A shared answer format moves every candidate alike, so only telling
    the answers apart counts, not producing their format. With a single distinct output, `gain` is the drop
    in answer loss instead."""

    n: int
    base_nll: float
    minted_nll: float
    contrastive: bool
    base_margin: float | None = None
    minted_margin: float | None = None
    base_correct: int | None = None
    minted_correct: int | None = None
    """Examples whose own output scored above every distractor."""
    base_answers: float | None = None
    minted_answers: float | None = None
    """Mean ROUGE-L of the greedy answers against the expected outputs (None: answers not generated)."""

    @property
    def answers_worse(self) -> bool:
        """Whether the adapter's answers to the examples score below the base model's."""
        return self.minted_answers is not None and self.minted_answers < self.base_answers  # type: ignore[operator]

    @property
    def gain(self) -> float:
        if self.contrastive:
            return float(self.minted_margin - self.base_margin)  # type: ignore[operator]
        return self.base_nll - self.minted_nll

    def as_dict(self) -> dict:
        out = {
            "examples": self.n,
            "contrastive": self.contrastive,
            "gain": round(self.gain, 4),
            "base_nll": round(self.base_nll, 4),
            "minted_nll": round(self.minted_nll, 4),
        }
        if self.contrastive:
            out |= {
                "base_margin": round(self.base_margin, 4),  # type: ignore[arg-type]
                "minted_margin": round(self.minted_margin, 4),  # type: ignore[arg-type]
                "base_correct": self.base_correct,
                "minted_correct": self.minted_correct,
            }
        if self.minted_answers is not None:
            out |= {
                "base_answers": round(self.base_answers, 4),
                "minted_answers": round(self.minted_answers, 4),
            }
        return out


@dataclass(frozen=True)
class Decision:
    fell_back: bool
    reason: str | None = None


def decide(policy: FallbackPolicy, confidence: float, check: Check | None = None) -> Decision:
    """Fall back when the library holds nothing near (confidence), or when solved examples were given and
    the adapter does not do better than the base model on them (likelihood), or answers them worse."""
    if confidence < policy.min_confidence:
        return Decision(
            True,
            f"nothing in the expert library is close to this description (best similarity "
            f"{confidence:.2f}, below {policy.min_confidence:.2f})",
        )
    if check is not None and check.gain <= policy.min_gain:
        return Decision(
            True,
            f"on the {check.n} solved examples the minted adapter did not beat the base model "
            f"({_what(check)})",
        )
    if check is not None and check.answers_worse:
        return Decision(
            True,
            f"on the {check.n} solved examples the minted adapter's answers scored below the base model's "
            f"(ROUGE-L {check.minted_answers:.3f} vs {check.base_answers:.3f})",
        )
    return Decision(False)


def _what(check: Check) -> str:
    if check.contrastive:
        return (
            f"margin of the right output over the others {check.minted_margin:.3f} vs "
            f"{check.base_margin:.3f} nats per token; right on {check.minted_correct} vs {check.base_correct}"
        )
    return f"answer loss {check.minted_nll:.3f} vs {check.base_nll:.3f} nats per token"


def solved_task(description: str, pairs: Sequence[tuple[str, str]]) -> Task:
    """A throwaway task holding a request's solved examples, so they are formatted like training data."""
    from loramint.tasks import Example, Task

    return Task(
        name="request",
        family="request",
        description=description,
        examples=[Example(input=i, target=o) for i, o in pairs],
    )


def check_examples(
    tokenizer,
    score: Scorer,
    description: str,
    pairs: Sequence[tuple[str, str]],
    max_length: int = 256,
    answer: Answerer | None = None,
) -> Check:
    """Score the solved examples (input, expected output) with the base model and with the minted adapter,
    each output against the other examples' outputs when there are different ones (`Check`); with `answer`,
    also both models' greedy answers to them."""
    import numpy as np

    from loramint.tasks import Example
    from loramint.training.data import encode_example

    if not pairs:
        raise ValueError("the check needs at least one solved example")
    task = solved_task(description, pairs)
    outputs = list(dict.fromkeys(o for _, o in pairs))
    contrastive = len(outputs) > 1
    # per example: its own output first, then every other distinct output as a distractor
    cands = [[o, *(c for c in outputs if c != o)] if contrastive else [o] for _, o in pairs]
    items, spans = [], []
    for (text, _), options in zip(pairs, cands, strict=True):
        spans.append((len(items), len(options)))
        items += [encode_example(tokenizer, task, Example(input=text, target=c), max_length) for c in options]
    nll = np.asarray(score(items + items, [False] * len(items) + [True] * len(items)), dtype=np.float64)
    base, minted = nll[: len(items)], nll[len(items) :]
    own = [start for start, _ in spans]
    answers = {} if answer is None else _answer_scores(tokenizer, answer, task, pairs)
    if not contrastive:
        return Check(len(pairs), float(base[own].mean()), float(minted[own].mean()), False, **answers)

    def margins(values: np.ndarray) -> np.ndarray:  # own output's log-prob minus the best distractor's
        return np.array([values[s + 1 : s + k].min() - values[s] for s, k in spans])

    b, m = margins(base), margins(minted)
    return Check(
        len(pairs),
        float(base[own].mean()),
        float(minted[own].mean()),
        True,
        float(b.mean()),
        float(m.mean()),
        int((b > 0).sum()),
        int((m > 0).sum()),
        **answers,
    )


def _answer_scores(tokenizer, answer: Answerer, task: Task, pairs: Sequence[tuple[str, str]]) -> dict:
    """{"base_answers", "minted_answers"}: mean ROUGE-L of each model's greedy answers to the examples."""
    from loramint.tasks import Example
    from loramint.training.metrics import rouge_l

    prompts = [task.prompt(Example(input=text, target=out)) for text, out in pairs]
    lengths = [len(ids) for ids in tokenizer([o for _, o in pairs], add_special_tokens=False).input_ids]
    limits = [min(MAX_ANSWER_TOKENS, n + ANSWER_MARGIN) for n in lengths]
    n = len(pairs)
    got = list(answer(prompts + prompts, [False] * n + [True] * n, limits + limits))
    scores = [rouge_l(a, [o]) for a, (_, o) in zip(got, [*pairs, *pairs], strict=True)]
    return {"base_answers": sum(scores[:n]) / n, "minted_answers": sum(scores[n:]) / n}
