"""loramint.training: answer-only labels, an expert that learns its task, resumable library builds."""

from __future__ import annotations

import pytest
import torch

from loramint.tasks import synthetic_suite
from loramint.training.data import IGNORE, collate, encode_example
from loramint.training.experts import ExpertTrainConfig, train_expert

FAST = ExpertTrainConfig(
    rank=4,
    alpha=8.0,
    steps=30,
    lr=3e-3,
    batch_size=8,
    max_length=64,
    n_metric_eval=16,
    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
)


@pytest.fixture(scope="module")
def suite():
    return synthetic_suite()


def test_labels_cover_only_the_answer(tiny, suite):
    task = suite[0]
    ex = task.examples[0]
    enc = encode_example(tiny.tokenizer, task, ex, max_length=64)
    answer_ids = [t for t in enc.labels if t != IGNORE]
    assert tiny.tokenizer.decode(answer_ids) == ex.output + tiny.tokenizer.eos_token
    assert enc.input_ids[-len(answer_ids) :] == answer_ids
    batch = collate(
        [enc, encode_example(tiny.tokenizer, task, task.examples[1], 64)], tiny.tokenizer.pad_token_id
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE)).all()


def test_trained_expert_lowers_its_task_loss_and_leaves_the_base_alone(tiny, suite):
    before = [p.clone() for p in tiny.model.parameters()]
    adapter, metrics = train_expert(tiny, suite[2], FAST)
    assert metrics["answer_nll_after"] < metrics["answer_nll_before"] - 0.1
    assert all(torch.equal(p, q) for p, q in zip(before, tiny.model.parameters(), strict=True))
    assert not any("lora" in n for n, _ in tiny.model.named_modules())
    adapter.validate("tiny-llama")
    assert set(adapter.config.target_modules) == set(FAST.target_modules)


@pytest.mark.parametrize("field,value", [("rank", 0), ("steps", 0), ("lr", -1.0), ("target_modules", [])])
def test_bad_training_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ExpertTrainConfig(**{field: value})


def test_multitask_lora_trains_on_every_task_but_never_on_eval_examples(tiny, suite, monkeypatch):
    from loramint.training import data, experts

    seen_inputs = []
    original = experts.encode_example

    def spy(tok, task, ex, max_length, answer=None):
        seen_inputs.append((task.name, ex.input))
        return original(tok, task, ex, max_length, answer)

    monkeypatch.setattr(experts, "encode_example", spy)
    tasks = suite[2:4]
    adapter, metrics = experts.train_lora(tiny, tasks, FAST)
    assert metrics["tasks"] == [t.name for t in tasks]
    assert metrics["answer_nll_after"] < metrics["answer_nll_before"] - 0.1
    assert {name for name, _ in seen_inputs} == {t.name for t in tasks}
    for task in tasks:
        held_out = {ex.input for ex in data.eval_split(task)[1]}
        assert not held_out & {inp for name, inp in seen_inputs if name == task.name}
