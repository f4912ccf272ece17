"""loramint.training: answer-only labels, an expert that learns its task, resumable library builds."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN

from loramint.models import tiny_llama
from loramint.tasks import synthetic_suite
from loramint.training import fast
from loramint.training.data import IGNORE, answer_logits, answer_nll, answer_targets, collate, encode_example
from loramint.training.experts import ExpertTrainConfig, train_expert

FAST = replace(
    TINY_TRAIN, trained_layers=1
)  # of tiny-llama's 2: layer 0 runs once per example, layer 1 trains


@pytest.fixture(scope="module")
def suite():
    return synthetic_suite()


def test_a_long_prompt_loses_the_start_of_its_input_not_its_header_or_instruction(tiny):
    from loramint.tasks import Example, Task
    from loramint.training.data import prompt_ids, prompt_text

    tok = tiny.tokenizer
    words = " ".join(f"word{i}" for i in range(400))
    task = Task(
        name="long",
        description="d",
        family="f",
        examples=[Example(input=words + " Question: which word is last?", target="word399")] * 2,
        prefix="Read the passage, then answer.\n",
    )
    example = task.examples[0]
    full = tok(prompt_text(tok, task, example), add_special_tokens=False).input_ids
    assert prompt_ids(tok, task, example, len(full) + 5) == full, "a prompt that fits is untouched"
    cut = prompt_ids(tok, task, example, 120)
    assert len(cut) <= 120
    text = tok.decode(cut)
    assert text.startswith(tok.decode(full[:3])), "the chat template's header survives"
    assert "Read the passage, then answer." in text and "Question: which word is last?" in text
    assert "word399" in text and "word0 " not in text, "the input's start goes, its end stays"
    assert tok.decode(cut[-5:]) == tok.decode(full[-5:])
    enc = encode_example(tok, task, example, 128)
    assert len(enc.input_ids) <= 128 and tok.decode(enc.input_ids[: len(cut)]).startswith(
        tok.decode(full[:3])
    )
    tiny_budget = prompt_ids(tok, task, example, 8)  # not even the instruction fits: plain left cut
    assert tiny_budget == full[-8:]


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


def mixed_batch(tokenizer, suite, max_length=64):
    """Examples of several tasks, so rows differ in length and the batch has right padding."""
    encoded = [encode_example(tokenizer, t, ex, max_length) for t in suite[:4] for ex in t.examples[:3]]
    batch = collate(encoded, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    return encoded, batch


@pytest.mark.parametrize("first_layer", [0, 1, 3, 4])
def test_cached_lower_layers_then_upper_layers_give_the_full_forward_logits(suite, first_layer):
    model, tok = tiny_llama(num_layers=4)
    encoded, batch = mixed_batch(tok, suite)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        cached = fast.collate_cached(fast.cache(model, encoded, first_layer, tok.pad_token_id))
        core, head = fast.decoder_parts(model)
        h = fast.run_layers(core, cached["hidden"], cached["attention_mask"], core.layers[first_layer:])
        logits = head(core.norm(h))  # [B, T, V]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], full[real], atol=1e-5, rtol=1e-5)


def test_answer_only_loss_is_the_full_loss_on_answer_tokens(tiny, suite):
    encoded, batch = mixed_batch(tiny.tokenizer, suite)
    with torch.no_grad():
        full = tiny.model(**batch)  # transformers' shifted loss over non-IGNORE labels; logits [B, T, V]
        keep, targets = answer_targets(batch["labels"])
        logits, targets2 = answer_logits(tiny.model, batch)  # [N, V]
        hidden = tiny.model.model.embed_tokens(batch["input_ids"])
        loss = fast.answer_loss(tiny.model, hidden, batch["attention_mask"], batch["labels"], first_layer=0)
    n_answer = sum(len(e) - e.labels.count(IGNORE) for e in encoded)
    assert torch.equal(targets, targets2) and logits.shape == (n_answer, full.logits.shape[-1])
    torch.testing.assert_close(logits, full.logits[keep])
    torch.testing.assert_close(F.cross_entropy(logits, targets), full.loss)
    torch.testing.assert_close(loss, full.loss)


def test_answer_nll_matches_the_slow_reference(tiny, suite):
    task = suite[3]
    examples = task.examples[:10]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one example at a time, log-softmax over every position
            batch = collate([encode_example(tiny.tokenizer, task, ex, 64)], tiny.tokenizer.pad_token_id)
            logp = torch.log_softmax(tiny.model(input_ids=batch["input_ids"]).logits[0, :-1], dim=-1)
            labels = batch["labels"][0, 1:]
            total -= logp[labels != IGNORE].gather(-1, labels[labels != IGNORE, None]).sum().item()
            count += int((labels != IGNORE).sum())
    assert answer_nll(tiny.model, tiny.tokenizer, task, examples, 64, batch_size=4) == pytest.approx(
        total / count, rel=1e-5
    )


def test_length_buckets_visit_every_example_once_per_epoch_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 100) for _ in range(203)]
    sampler = fast.LengthBuckets(lengths, batch_size=8, seed=0)
    epochs = [list(sampler), list(sampler)]
    for epoch in epochs:
        assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))
        assert len(epoch) == len(sampler)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in epoch)
        assert padded < 1.1 * sum(lengths)
    assert epochs[0] != epochs[1], "each epoch is a fresh random order"
    assert list(fast.LengthBuckets(lengths, batch_size=8, seed=0)) == epochs[0]


@pytest.mark.parametrize("config", [FAST, FAST.reference()], ids=["fast", "plain-peft"])
def test_trained_expert_lowers_its_task_loss_and_leaves_the_base_alone(tiny, suite, config):
    before = [p.clone() for p in tiny.model.parameters()]
    adapter, metrics = train_expert(tiny, suite[2], config)
    assert metrics["answer_nll_after"] < metrics["answer_nll_before"] - 0.1
    assert all(torch.equal(p, q) for p, q in zip(before, tiny.model.parameters(), strict=True))
    assert not any("lora" in n for n, _ in tiny.model.named_modules())
    adapter.validate("tiny-llama")
    assert set(adapter.config.target_modules) == set(config.target_modules)
    layers = {int(m.split(".layers.")[1].split(".")[0]) for m in adapter.modules}
    assert layers == ({1} if config.trained_layers == 1 else {0, 1})


@pytest.mark.parametrize("trained_layers", [0, 1])
def test_fast_path_trains_the_same_adapter_as_the_full_forward(tiny, suite, trained_layers):
    """Same batches (no length buckets): cached lower layers + answer-only logits change nothing but speed."""
    config = replace(FAST, steps=6, trained_layers=trained_layers, length_buckets=False)
    full = replace(config, cache_lower=False, answer_only_logits=trained_layers > 0)
    if trained_layers == 0:
        full = config.reference()
    fast_adapter, fast_metrics = train_expert(tiny, suite[4], config)
    full_adapter, full_metrics = train_expert(tiny, suite[4], full)
    assert fast_adapter.modules == full_adapter.modules
    for module, (a, b) in fast_adapter.weights.items():
        torch.testing.assert_close(a, full_adapter.weights[module][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, full_adapter.weights[module][1], atol=1e-5, rtol=1e-4)
    for key in ("answer_nll_before", "answer_nll_after"):
        assert fast_metrics[key] == pytest.approx(full_metrics[key], abs=1e-4)
        per_example = fast_metrics[f"{key}_examples"]
        assert len(per_example) == config.n_metric_eval
        assert per_example == pytest.approx(full_metrics[f"{key}_examples"], abs=2e-4)
        assert fast_metrics[key] == pytest.approx(sum(per_example) / len(per_example), abs=1e-4)


def test_build_report_times_the_run_and_tests_each_gain(tiny, suite, tmp_path):
    """Resumed build: the report covers every expert, times only what ran, and a real expert's gain is
    significant (paired CI over its metric examples)."""
    import json

    from loramint.index import ExpertLibrary
    from loramint.training.build import build_library, write_report

    with ExpertLibrary.open(tmp_path / "lib") as library:
        build_library(library, suite[:1], tiny, FAST)
        build = build_library(library, suite[:2], tiny, FAST)
        assert build.skipped == [f"expert-{suite[0].name}"] and build.trained == [f"expert-{suite[1].name}"]
        result = write_report(tmp_path / "build.json", build, library, tiny, FAST)
    assert json.loads((tmp_path / "build.json").read_text()) == result
    assert result["n_experts"] == 2 and result["n_trained"] == 1 and result["n_skipped"] == 1
    assert result["per_expert_s"] == build.seconds[f"expert-{suite[1].name}"] > 0
    assert result["experts_wall_s_sum"] == pytest.approx(
        sum(e["wall_seconds"] for e in result["experts"].values()), abs=0.02
    )
    assert result["n_improved_significantly"] == 2 and result["n_worse_significantly"] == 0
    for entry in result["experts"].values():
        assert 0 < entry["gain_ci"]["ci_low"] <= entry["gain_ci"]["mean"] <= entry["gain_ci"]["ci_high"]
        assert entry["gain_ci"]["mean"] == pytest.approx(
            entry["answer_nll_before"] - entry["answer_nll_after"], abs=1e-3
        )


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"rank": 0}, "rank"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"target_modules": []}, "target_modules"),
        ({"trained_layers": -1}, "trained_layers"),
        ({"train_examples": -1}, "train_examples"),
        ({"answer_only_logits": False, "cache_lower": True}, "cache_lower"),
    ],
)
def test_bad_training_config_names_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        ExpertTrainConfig(**fields)


def spy_encoded(monkeypatch) -> list[tuple[str, str]]:
    """(task name, input) of every example the trainer encodes, in order."""
    from loramint.training import experts

    encoded = []
    original = experts.encode_example

    def spy(tok, task, ex, max_length, answer=None):
        encoded.append((task.name, ex.input))
        return original(tok, task, ex, max_length, answer)

    monkeypatch.setattr(experts, "encode_example", spy)
    return encoded


def test_multitask_lora_trains_on_every_task_but_never_on_eval_examples(tiny, suite, monkeypatch):
    from loramint.training import data, experts

    seen_inputs = spy_encoded(monkeypatch)
    tasks = suite[2:4]
    adapter, metrics = experts.train_lora(tiny, tasks, FAST)
    assert metrics["tasks"] == [t.name for t in tasks]
    assert metrics["answer_nll_after"] < metrics["answer_nll_before"] - 0.1
    assert {name for name, _ in seen_inputs} == {t.name for t in tasks}
    for task in tasks:
        held_out = {ex.input for ex in data.eval_split(task)[1]}
        assert not held_out & {inp for name, inp in seen_inputs if name == task.name}


def test_a_multitask_pool_takes_at_most_n_examples_from_every_task(tiny, suite, monkeypatch):
    from loramint.training import experts

    encoded = spy_encoded(monkeypatch)
    tasks = suite[:3]
    _, metrics = experts.train_lora(tiny, tasks, replace(FAST, steps=2, n_metric_eval=1), examples_per_task=4)
    pool = [name for name, _ in encoded[: metrics["train_examples"]]]  # the pool first, metric examples after
    assert metrics["train_examples"] == 12 and sorted(set(pool)) == sorted(t.name for t in tasks)
    assert all(pool.count(t.name) == 4 for t in tasks)


def test_trainers_run_where_the_base_model_is():
    """Lightning gets the base model's device, never "auto" (which would move a CPU model to a GPU)."""
    import torch

    from loramint.training.data import trainer_device

    assert trainer_device(torch.device("cpu")) == {"accelerator": "cpu", "devices": 1}
    assert trainer_device(torch.device("cuda", 1)) == {"accelerator": "gpu", "devices": [1]}
    assert trainer_device(torch.device("cuda")) == {"accelerator": "gpu", "devices": [0]}


def test_early_stopping_keeps_the_best_state_and_never_trains_on_validation(tiny, suite, monkeypatch):
    from loramint.corpus import finalize
    from loramint.training import experts

    task = finalize(suite[4])  # fixed train / val / test splits, as corpus tasks have
    encoded = spy_encoded(monkeypatch)
    config = replace(FAST, steps=200, val_every=5, patience=2, min_delta=0.0, train_examples=0)
    adapter, metrics = experts.train_expert(tiny, task, config)
    curve = metrics["val_curve"]
    assert curve[0][0] == 0 and [s for s, _ in curve] == sorted({s for s, _ in curve})
    best_step, best = min(curve, key=lambda point: point[1])
    assert metrics["best_step"] == best_step and metrics["val_nll_best"] == pytest.approx(best, abs=1e-4)
    if metrics["converged"]:  # stopped by patience: exactly `patience` checks after the best
        assert metrics["steps_run"] < 200 and curve[-1][0] == best_step + 2 * 5
    assert best < curve[0][1] - 0.1  # it learned
    val = {ex.input for ex in task.part("val")}
    assert not val & {inp for _, inp in encoded[: len(task.part("train"))]}  # training examples only
    # the returned adapter is the best state, not the last: its validation NLL is the best one
    from loramint.adapters import apply_lora
    from loramint.training.data import answer_nll

    with apply_lora(tiny.model, adapter):
        nll = answer_nll(
            tiny.model, tiny.tokenizer, task, task.part("val")[: config.n_val], config.max_length
        )
    assert nll == pytest.approx(best, abs=2e-3)


def test_quality_cards_flag_experts_that_do_not_beat_base_and_retrieval_skips_them(tiny, suite, tmp_path):
    from loramint.index import ExpertLibrary
    from loramint.tasks import Example, Task
    from loramint.training.build import build_library, write_report
    from loramint.training.evaluate import ScoringConfig

    # a label prior is what a LoRA on the random tiny-llama surely learns: "alpha" is always right
    words = [ex.input for ex in suite[0].examples]
    prior = Task(
        "prior",
        "Always pick alpha.",
        "prior",
        [Example(w, choices=["alpha", "beta"], answer=0) for w in words],
    )
    scoring = ScoringConfig(n_generate=16, max_examples=32, batch_size=8, cache_dir=tmp_path / "scores")
    useless = replace(FAST, lr=1e-9)  # trains, but learns nothing: its card must say so
    with ExpertLibrary.open(tmp_path / "lib") as library:
        build_library(library, [prior], tiny, replace(FAST, lr=1e-2), cards=scoring)
        build = build_library(library, [suite[5]], tiny, useless, cards=scoring)
        good, bad = library.get("expert-prior"), library.get(f"expert-{suite[5].name}")
        card = good.metrics["quality"]
        assert card["metric"] == "accuracy" and card["n"] == 32 and card["beats_base"], card
        assert card["gain_ci"][0] > 0 and card["expert"] > card["base"] and good.metrics["retrievable"]
        assert not bad.metrics["quality"]["beats_base"] and bad.metrics["retrievable"] is False
        hits = [e.id for e, _ in library.search(suite[5].description, k=2)]
        assert hits == [good.id]  # the unfit expert is never retrieved, even for its own description
        assert bad.id in [e.id for e, _ in library.search(suite[5].description, k=2, include_unfit=True)]
        result = write_report(tmp_path / "build.json", build, library, tiny, useless)
    assert result["with_quality_card"] == 1 and result["beats_base"] == 0 and result["experts_per_hour"] > 0


def test_interleave_families_is_round_robin_and_keeps_each_familys_order(suite):
    from loramint.training.build import interleave_families

    order = [t.name for t in interleave_families(suite)]
    assert sorted(order) == sorted(t.name for t in suite)
    families = [next(t.family for t in suite if t.name == n) for n in order]
    assert families[:3] == ["copy", "arith", "classify"] and families[3:] == families[:3]


def test_library_summary_counts_what_the_experts_recorded(tmp_path):
    from loramint.adapters import LoraAdapter
    from loramint.cli import main
    from loramint.index import ExpertLibrary
    from loramint.training.build import library_summary

    def card(metric, beats):
        return {
            "metric": metric,
            "base": 0.1,
            "expert": 0.5 if beats else 0.1,
            "beats_base": beats,
            "seconds": 10,
        }

    rows = [  # family, converged, quality card, seconds of training
        ("a", True, card("accuracy", True), 50.0),
        ("a", True, card("exact_match", False), 70.0),
        ("b", False, card("exact_match", True), 110.0),
        ("c", True, None, 20.0),
    ]
    with ExpertLibrary.open(tmp_path / "lib") as lib:
        for i, (family, converged, quality, seconds) in enumerate(rows):
            metrics = {"converged": converged, "steps_run": 10 * (i + 1), "wall_seconds": seconds}
            if quality:
                metrics |= {"quality": quality, "retrievable": quality["beats_base"]}
            adapter = LoraAdapter.random("tiny-llama", r=2, seed=i)
            lib.add(
                adapter, id=f"e{i}", name=f"e{i}", description=f"task {i}", family=family, metrics=metrics
            )
        summary = library_summary(lib)
    assert {k: summary[k] for k in ("experts", "families", "converged", "with_quality_card")} == {
        "experts": 4,
        "families": 3,
        "converged": 3,
        "with_quality_card": 3,
    }
    assert summary["beat_base"] == 2 and summary["retrievable"] == 3  # no card: not flagged, retrievable
    assert summary["converged_fraction"] == 0.75
    spent = 50 + 70 + 110 + 20 + 3 * 10
    assert summary["experts_per_hour"] == round(3600 * 4 / spent, 2)
    assert summary["experts_per_hour_typical"] == round(3600 / 70, 2)  # median of 60, 80, 120, 20 = 70
    assert summary["by_metric"] == {
        "accuracy": {"experts": 1, "beat_base": 1},
        "exact_match": {"experts": 2, "beat_base": 1},
    }
    assert summary["per_family"] == {"a": 2, "b": 1, "c": 1} and summary["steps"] == {
        "median": 25.0,
        "max": 40,
    }
    out = tmp_path / "library.json"
    assert main(["library", "summary", "--library", str(tmp_path / "lib"), "--out", str(out)]) in (0, None)
    assert json.loads(out.read_text())["experts"] == 4
