"""loramint.fallback: when a mint serves the base model instead, and the check on solved examples."""

from __future__ import annotations

import numpy as np
import pytest

from loramint.fallback import Check, FallbackPolicy, check_examples, decide
from loramint.models import load_base_model

PAIRS = [("2 plus 2", "4"), ("3 plus 5", "8"), ("1 plus 1", "2")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_base_model("tiny-llama").tokenizer


def table_scorer(base: dict, minted: dict):
    """A scorer from tables {(input text, candidate output): answer NLL}: it reads each encoded row back."""

    def score(items, flags):
        out = []
        for item, flag in zip(items, flags, strict=True):
            key = next(k for k in base if _encodes(item, *k))
            out.append((minted if flag else base)[key])
        return np.array(out)

    return score


_ENCODED: dict[tuple[str, str], list[int]] = {}


def _encodes(item, text, output) -> bool:
    return item.input_ids == _ENCODED[(text, output)]


def _encode_all(tokenizer, pairs):
    from loramint.fallback import solved_task
    from loramint.tasks import Example
    from loramint.training.data import encode_example

    task = solved_task("d", pairs)
    for text, _ in pairs:
        for _, out in pairs:
            _ENCODED[(text, out)] = encode_example(
                tokenizer, task, Example(input=text, target=out), 256
            ).input_ids


def test_the_check_scores_each_output_against_the_others(tokenizer):
    _encode_all(tokenizer, PAIRS)
    outs = [o for _, o in PAIRS]
    base = {(t, c): 2.0 for t, _ in PAIRS for c in outs}  # base: no preference at all
    base[("2 plus 2", "4")] = 1.5  # ... except here, right by 0.5
    minted = {k: v - 1.0 for k, v in base.items()}  # the adapter lowers every candidate alike ...
    minted[("3 plus 5", "8")] -= 0.9  # ... and prefers the right answer here by 0.9
    check = check_examples(tokenizer, table_scorer(base, minted), "add", PAIRS)
    assert check.contrastive and check.n == 3
    assert check.base_margin == pytest.approx((0.5 + 0 + 0) / 3)
    assert check.minted_margin == pytest.approx((0.5 + 0.9 + 0) / 3)
    assert check.gain == pytest.approx(0.3)
    assert (check.base_correct, check.minted_correct) == (1, 2)
    assert check.base_nll == pytest.approx((1.5 + 2 + 2) / 3)
    assert check.minted_nll == pytest.approx(check.base_nll - 1.0 - 0.3)


def test_learning_the_answer_format_alone_does_not_pass_the_check(tokenizer):
    _encode_all(tokenizer, PAIRS)
    base = {(t, c): 5.0 for t, _ in PAIRS for _, c in PAIRS}
    minted = {k: 0.5 for k in base}  # every candidate much likelier: the format, not the task
    check = check_examples(tokenizer, table_scorer(base, minted), "add", PAIRS)
    assert check.minted_nll < check.base_nll and check.gain == pytest.approx(0.0)
    assert decide(FallbackPolicy(), confidence=0.9, check=check).fell_back


def test_with_one_distinct_output_the_check_is_the_answer_loss(tokenizer):
    pairs = [("is 4 even", "yes"), ("is 8 even", "yes")]
    _encode_all(tokenizer, pairs)
    base = {(t, "yes"): 3.0 for t, _ in pairs}
    minted = {(t, "yes"): 2.5 for t, _ in pairs}
    check = check_examples(tokenizer, table_scorer(base, minted), "parity", pairs)
    assert not check.contrastive and check.gain == pytest.approx(0.5)
    assert set(check.as_dict()) == {"examples", "contrastive", "gain", "base_nll", "minted_nll"}


@pytest.mark.parametrize(
    ("policy", "confidence", "gain", "fell_back", "reason"),
    [
        (FallbackPolicy(), 0.05, None, False, None),  # the default policy never refuses on confidence
        (FallbackPolicy(min_confidence=0.3), 0.29, None, True, "best similarity 0.29"),
        (FallbackPolicy(min_confidence=0.3), 0.31, None, False, None),
        (FallbackPolicy(min_confidence=0.3), 0.9, 0.0, True, "did not beat the base model"),
        (FallbackPolicy(min_confidence=0.3), 0.9, 0.01, False, None),
        (FallbackPolicy(min_gain=0.1), 0.9, 0.05, True, "did not beat"),
    ],
)
def test_decide(policy, confidence, gain, fell_back, reason):
    check = None if gain is None else Check(3, 1.0, 1.0 - gain, False)
    decision = decide(policy, confidence, check)
    assert decision.fell_back is fell_back
    assert (reason is None and decision.reason is None) or reason in decision.reason


@pytest.mark.parametrize(
    "kwargs", [{"min_confidence": 1.5}, {"min_confidence": float("nan")}, {"min_gain": float("inf")}]
)
def test_a_bad_policy_is_refused(kwargs):
    with pytest.raises(ValueError, match="min_"):
        FallbackPolicy(**kwargs)


def test_the_check_needs_examples(tokenizer):
    with pytest.raises(ValueError, match="at least one solved example"):
        check_examples(tokenizer, lambda items, flags: np.zeros(len(items)), "d", [])


def test_an_adapter_whose_answers_are_worse_falls_back_whatever_its_likelihood_gain(tokenizer):
    _encode_all(tokenizer, PAIRS)
    outs = [o for _, o in PAIRS]
    base = {(t, c): 2.0 for t, _ in PAIRS for c in outs}
    minted = {(t, c): 2.0 if c != o else 1.0 for t, o in PAIRS for c in outs}  # right outputs likelier
    seen = []

    def answer(prompts, flags, limits):
        seen.append((list(prompts), list(flags), list(limits)))
        right = {t: o for t, o in PAIRS}
        return [f"it is {right[p]}" if not m else "no idea" for p, m in zip(prompts, flags, strict=True)]

    check = check_examples(tokenizer, table_scorer(base, minted), "add", PAIRS, answer=answer)
    assert check.gain == pytest.approx(1.0)  # the likelihood check alone would serve it
    ((prompts, flags, limits),) = seen
    assert prompts == [t for t, _ in PAIRS] * 2 and flags == [False] * 3 + [True] * 3
    assert all(8 < n <= 64 for n in limits)
    assert check.base_answers == pytest.approx(0.5) and check.minted_answers == 0.0  # "it is 4" vs "4"
    assert check.as_dict()["minted_answers"] == 0.0
    decision = decide(FallbackPolicy(), confidence=0.9, check=check)
    assert decision.fell_back and "answers scored below" in decision.reason


def test_answers_as_good_as_the_base_models_pass(tokenizer):
    _encode_all(tokenizer, PAIRS)
    outs = [o for _, o in PAIRS]
    base = {(t, c): 2.0 for t, _ in PAIRS for c in outs}
    minted = {(t, c): 2.0 if c != o else 1.0 for t, o in PAIRS for c in outs}
    right = dict(PAIRS)
    check = check_examples(
        tokenizer,
        table_scorer(base, minted),
        "add",
        PAIRS,
        answer=lambda prompts, flags, limits: [
            right[p] if m else "" for p, m in zip(prompts, flags, strict=True)
        ],
    )
    assert (check.base_answers, check.minted_answers) == (0.0, 1.0) and not check.answers_worse
    assert not decide(FallbackPolicy(), confidence=0.9, check=check).fell_back
