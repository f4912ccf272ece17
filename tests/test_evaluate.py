"""loramint.training.evaluate/methods/metrics: answer metrics against hand-computed values, bootstrap CIs,
multiple-choice scoring, mixtures equal to the weighted sum of deltas, and every baseline end to end on a
tiny library (4 seen synthetic tasks, 2 unseen)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from loramint.adapters import LoraAdapter, apply_lora, apply_mixture
from loramint.cli import main
from loramint.index import ExpertLibrary
from loramint.tasks import Example, Task, save_tasks, synthetic_suite
from loramint.training import data, methods
from loramint.training.build import build_library
from loramint.training.evaluate import (
    ALL_METHODS,
    ScoringConfig,
    answer_logprobs,
    evaluate,
    generate_answers,
    score_task,
)
from loramint.training.methods import Intervention, MethodConfig, MethodContext, build_methods
from loramint.training.metrics import (
    bootstrap_ci,
    bootstrap_task_means,
    exact_match,
    hierarchical_ci,
    lcs_length,
    rouge_l,
)

ROOT = Path(__file__).resolve().parents[1]
UNSEEN = ["arith_double", "classify_parity"]  # one free-text, one multiple-choice task
FAST = replace(TINY_TRAIN, steps=20, n_metric_eval=8)
SCORING = ScoringConfig(max_length=64, batch_size=16, n_generate=8, max_new_tokens=6, n_bootstrap=200)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread, and does not slow to a crawl when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- answer metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,targets,expected",
    [
        ("the cat sat on the mat", ["the cat is on the mat"], 5 / 6),  # LCS 5 of 6 and 6 words
        ("a b c d", ["a c"], 2 * 0.5 * 1.0 / 1.5),  # LCS 2: precision 2/4, recall 2/2
        ("x y z", ["z y x"], 1 / 3),  # order matters: LCS 1
        ("Hello, World!", ["hello world"], 1.0),  # lowercased, punctuation is not a word
        ("red apple", ["green pear", "red apple pie"], 0.8),  # best target: precision 1, recall 2/3
        ("", ["anything"], 0.0),
        ("completely different", ["nothing shared"], 0.0),
    ],
)
def test_rouge_l_matches_hand_computed_f1(prediction, targets, expected):
    assert rouge_l(prediction, targets) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction,targets,expected",
    [
        ("The Cat.", ["cat"], 1.0),  # case, punctuation and articles are normalised away
        ("  an apple ", ["apple"], 1.0),
        ("cats", ["cat"], 0.0),
        ("yes", ["no", "Yes!"], 1.0),  # any acceptable target
        ("blue sky", ["sky blue"], 0.0),
    ],
)
def test_exact_match_normalises(prediction, targets, expected):
    assert exact_match(prediction, targets) == expected


def test_lcs_length_classic_case():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("abc")) == 0


# ---- bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        values = rng.normal(1.0, 1.0, size=n)
        ci = bootstrap_ci(values, n_resamples=500, seed=0)
        assert ci["mean"] == pytest.approx(values.mean())
        assert ci["ci_low"] < ci["mean"] < ci["ci_high"]
        widths.append(ci["ci_high"] - ci["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert bootstrap_ci(values, 500, seed=3) == bootstrap_ci(values, 500, seed=3)  # seeded


def test_hierarchical_and_paired_intervals():
    rng = np.random.default_rng(1)
    tasks = [rng.normal(mu, 1.0, size=n) for mu, n in ((1.0, 50), (3.0, 80))]
    ci = hierarchical_ci(tasks, n_resamples=500)
    assert ci["mean"] == pytest.approx((tasks[0].mean() + tasks[1].mean()) / 2)
    assert ci["ci_low"] < ci["mean"] < ci["ci_high"]
    # Same sizes and seed -> same resampled examples: a method compared with a copy of itself is exactly 0.
    assert np.array_equal(bootstrap_task_means(tasks, 100, seed=5), bootstrap_task_means(tasks, 100, seed=5))
    # Pairing removes the between-example spread: a consistent small gain is significant when paired,
    # though each method's own interval is much wider than the gain.
    better = [t - 0.1 + rng.normal(0, 0.01, size=t.size) for t in tasks]
    gain = hierarchical_ci([b - m for b, m in zip(tasks, better, strict=True)], n_resamples=500)
    assert 0 < gain["ci_low"] < gain["mean"] < gain["ci_high"] < 0.12
    assert hierarchical_ci(better, n_resamples=500)["ci_high"] > ci["ci_low"]


# ---- scoring on the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite():
    return {t.name: t for t in synthetic_suite(n_examples=48)}


def test_scored_tasks_have_enough_examples_and_no_family_dominates(suite):
    from loramint.training.evaluate import pick_scored

    tasks = list(suite.values())  # 3 families of 2 tasks, 24 evaluation examples each
    assert pick_scored(tasks) == tasks
    assert [t.name for t in pick_scored(tasks, max_per_family=1)] == [
        "copy_repeat",
        "arith_add",
        "classify_parity",
    ]
    small = synthetic_suite(n_examples=20)[:2]  # 10 evaluation examples each
    assert pick_scored([*small, suite["arith_add"]], min_test=11) == [suite["arith_add"]]
    assert pick_scored([*small, suite["copy_reverse"]], min_test=11, max_per_family=1) == [
        suite["copy_reverse"]
    ]


def test_answer_logprobs_agree_with_the_training_nll(tiny, suite):
    task = suite["arith_add"]
    examples = data.eval_split(task)[1][:5]
    sums, counts = answer_logprobs(tiny, task, [(ex, None) for ex in examples], max_length=64, batch_size=3)
    for ex, s, n in zip(examples, sums, counts, strict=True):  # the reference: full logits, one example
        assert -s / n == pytest.approx(data.answer_nll(tiny.model, tiny.tokenizer, task, [ex], 64), rel=1e-4)


@pytest.mark.parametrize("boosted", [0, 1])
def test_multiple_choice_picks_the_choice_the_model_is_biased_to(tiny, boosted):
    choices = ["zebra", "apple"]
    examples = [Example(f"item {i}", choices=choices, answer=i % 2) for i in range(12)]
    task = Task("mc_probe", "Pick one.", "probe", examples, prefix="Input: ", output_prefix="\nOutput: ")
    first = tiny.tokenizer(choices[boosted], add_special_tokens=False).input_ids[0]

    def bias(_module, _inputs, logits):
        logits[..., first] += 30.0  # every position now strongly predicts the boosted choice's first token
        return logits

    handle = tiny.model.get_output_embeddings().register_forward_hook(bias)
    try:
        scores = score_task(tiny, task, Intervention(), SCORING)
    finally:
        handle.remove()
    answers = np.array([ex.answer for ex in data.eval_split(task)[1]])
    assert 0 < answers.sum() < len(answers)  # both choices are right somewhere
    assert np.array_equal(scores.values["accuracy"], (answers == boosted).astype(float))


def test_batched_left_padded_generation_equals_one_at_a_time(tiny, suite):
    task = suite["copy_reverse"]
    examples = list(task.examples[:6])
    examples[0] = Example("a much longer input than the others here", target="x")  # forces left padding
    batched = generate_answers(tiny, task, examples, max_new_tokens=5, batch_size=6)
    single = [generate_answers(tiny, task, [ex], max_new_tokens=5, batch_size=1)[0] for ex in examples]
    assert batched == single


def test_answers_stop_a_margin_past_the_longest_training_answer(tiny, monkeypatch):
    from loramint.training import evaluate as harness

    tok = tiny.tokenizer
    train = [Example(f"q{i}", targets=[t]) for i, t in enumerate(["a b", "a b c d e f", "x"] * 4)]
    test = [Example(f"t{i}", target="a very very very very very very long answer here") for i in range(4)]
    task = Task("budget", "f", "Answer.", train + test, splits={"train": 12, "val": 0, "test": 4})
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in ["a b", "a b c d e f", "x"])
    assert harness.answer_budget(tok, task, cap=64) == longest + harness.ANSWER_MARGIN  # test answers unread
    assert harness.answer_budget(tok, task, cap=3) == 3
    seen = {}

    def fake_generate(base, task, examples, max_new_tokens, *rest):
        seen["max_new_tokens"] = max_new_tokens
        return ["x"] * len(examples)

    monkeypatch.setattr(harness, "generate_answers", fake_generate)
    score_task(tiny, task, Intervention(), replace(SCORING, max_new_tokens=64))
    assert seen["max_new_tokens"] == longest + harness.ANSWER_MARGIN


def test_score_cache_is_reused_and_keyed_by_the_intervention(tiny, suite, tmp_path, monkeypatch):
    from loramint.training import evaluate as harness

    task, scoring = suite["copy_repeat"], replace(SCORING, cache_dir=tmp_path)
    adapter = LoraAdapter.random("tiny-llama", r=2, seed=3)
    interventions = {
        "base": lambda t: Intervention(),
        "adapter": lambda t: Intervention(mixture=[(adapter, 1.0)]),
    }
    first = harness.score_methods(tiny, [task], interventions, scoring)
    assert len(list(tmp_path.glob("copy_repeat-*.json"))) == 2  # one entry per distinct intervention
    monkeypatch.setattr(harness, "score_task", lambda *a: pytest.fail("a cached score was recomputed"))
    again = harness.score_methods(tiny, [task], interventions, scoring)
    for name in interventions:
        for metric, values in first[name][task.name].values.items():
            assert np.array_equal(again[name][task.name].values[metric], values)
    monkeypatch.undo()
    capped = harness.score_methods(tiny, [task], interventions, replace(scoring, max_examples=5))
    assert len(list(tmp_path.glob("copy_repeat-*.json"))) == 4, "max_examples is part of the cache key"
    for name in interventions:
        assert len(capped[name][task.name].values["answer_nll"]) == 5
        np.testing.assert_allclose(
            capped[name][task.name].values["answer_nll"],
            first[name][task.name].values["answer_nll"][:5],
            rtol=1e-5,
        )


def test_score_cache_keys_an_adapter_by_its_content_not_by_the_object(tiny, suite, tmp_path):
    """A freed adapter's id comes back for the next one; the cache must still tell them apart."""
    import torch

    from loramint.training import evaluate as harness

    task, scoring = suite["copy_repeat"], replace(SCORING, cache_dir=tmp_path)
    adapter = LoraAdapter.random("tiny-llama", r=2, seed=3)
    other = LoraAdapter.random("tiny-llama", r=2, seed=4)

    def now_other(t):  # the same object holding other weights, as a new adapter at a reused id would
        with torch.no_grad():
            for module, (a, b) in adapter.weights.items():
                a.copy_(other.weights[module][0])
                b.copy_(other.weights[module][1])
        return Intervention(mixture=[(adapter, 1.0)])

    methods = {"first": lambda t: Intervention(mixture=[(adapter, 1.0)]), "second": now_other}
    raw = harness.score_methods(tiny, [task], methods, scoring)
    alone = harness.score_task(
        tiny, task, Intervention(mixture=[(other, 1.0)]), replace(scoring, cache_dir=None)
    )
    np.testing.assert_allclose(
        raw["second"][task.name].values["answer_nll"], alone.values["answer_nll"], rtol=1e-5
    )
    assert not np.allclose(raw["first"][task.name].values["answer_nll"], alone.values["answer_nll"])
    assert len(list(tmp_path.glob("copy_repeat-*.json"))) == 2


def test_split_scoring_reuses_the_lower_layers_and_gives_the_same_scores(tiny, suite, monkeypatch):
    """With `split_layer`, base and top-layer LoRAs share one computation of a task's lower-layer states and
    score as whole passes do; a LoRA on a lower layer gets whole passes."""
    from loramint.training import evaluate as harness
    from loramint.training import fast

    calls = []
    real_cache = fast.cache
    monkeypatch.setattr(fast, "cache", lambda *a, **k: calls.append(1) or real_cache(*a, **k))
    full = LoraAdapter.random("tiny-llama", r=2, seed=3, std=0.05)
    top = LoraAdapter(full.config, {m: w for m, w in full.weights.items() if ".layers.1." in m})
    split = replace(SCORING, split_layer=1)
    for name in UNSEEN:  # free text and multiple choice
        task = suite[name]
        for intervention in (Intervention(), Intervention(mixture=[(top, 1.0)])):
            whole = score_task(tiny, task, intervention, SCORING)
            halves = score_task(tiny, task, intervention, split)
            assert whole.values.keys() == halves.values.keys()
            for metric, values in whole.values.items():
                np.testing.assert_allclose(halves.values[metric], values, rtol=1e-4, atol=1e-5)
    assert len(calls) == len(UNSEEN), "one lower-layer pass per task, shared by base and the top-layer LoRA"
    assert harness.split_layer(Intervention(mixture=[(full, 1.0)]), split) is None  # changes layer 0
    assert harness.split_layer(Intervention(mixture=[(top, 0.5)]), split) == 1
    assert harness.split_layer(Intervention(mixture=[(top, 0.5)]), SCORING) is None


def test_mixture_equals_the_weighted_sum_of_deltas_and_the_base_comes_back_exactly(tiny):
    adapters = [
        LoraAdapter.random("tiny-llama", r=4, seed=1, std=0.05),
        LoraAdapter.random("tiny-llama", r=2, seed=2, std=0.05, target_modules=("v_proj", "down_proj")),
    ]
    weights = [0.7, 0.3]
    before = {n: p.clone() for n, p in tiny.model.named_parameters()}
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with apply_mixture(tiny.model, list(zip(adapters, weights, strict=True))):
        merged = {n: p.clone() for n, p in tiny.model.named_parameters()}
        logits = tiny.model(ids).logits
    for name, weight in before.items():
        module = name.removesuffix(".weight")
        expected = weight + sum(
            (w * a.delta(module) for a, w in zip(adapters, weights, strict=True) if module in a.weights),
            torch.zeros_like(weight),
        )
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    with (
        apply_lora(tiny.model, adapters[0], scale=weights[0]),
        apply_lora(tiny.model, adapters[1], weights[1]),
    ):
        hooked = tiny.model(ids).logits  # the unmerged path: base output + each expert's scaled delta
    torch.testing.assert_close(logits, hooked, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


# ---- every method end to end on a tiny library -----------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny, suite, tmp_path_factory):
    """A 4-expert library on the seen tasks, then every method on the 2 unseen ones (train_lora spied on)."""
    from loramint.encoders.text import Encoder

    root = tmp_path_factory.mktemp("eval")
    seen = [t for name, t in suite.items() if name not in UNSEEN]
    unseen = [suite[name] for name in UNSEEN]
    library = ExpertLibrary.open(root / "library", encoder=Encoder())
    build_library(library, seen, tiny, FAST)
    config = MethodConfig(
        multitask_steps=20, multitask_dir=root / "multitask", oracle_library=root / "oracles"
    )
    calls = []
    original = methods.train_lora

    def spy(base, tasks, cfg, **kwargs):
        calls.append((tasks, cfg))
        return original(base, tasks, cfg, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods, "train_lora", spy)
        result = evaluate(
            tiny,
            unseen,
            ALL_METHODS,
            library=library,
            seen=seen,
            scoring=SCORING,
            method_config=config,
            out=root / "out",
        )
    yield {
        "result": result,
        "library": library,
        "seen": seen,
        "unseen": unseen,
        "config": config,
        "root": root,
        "multitask_calls": calls,
    }
    library.close()


def per_task(run, method):
    return run["result"]["methods"][method]["per_task"]


def test_result_json_has_the_required_shape(run):
    path = run["root"] / "out" / "eval_unseen.json"
    result = json.loads(path.read_text())
    assert {"metric", "tasks", "methods", "machine", "config"} <= set(result)
    assert result["metric"] == "answer_nll" and result["tasks"] == UNSEEN
    assert list(result["methods"]) == list(ALL_METHODS)
    for method in result["methods"].values():
        assert {"mean", "ci_low", "ci_high", "per_task", "vs_base"} <= set(method)
        assert method["ci_low"] <= method["mean"] <= method["ci_high"]
        assert {"mean", "ci_low", "ci_high"} <= set(method["vs_base"])
        for name, cell in method["per_task"].items():
            assert {"mean", "ci_low", "ci_high"} <= set(cell)
            assert ("accuracy" in cell) == (name == "classify_parity")
            assert ("rougeL" in cell and "exact_match" in cell) == (name == "arith_double")
    assert result["methods"]["base"]["vs_base"]["mean"] == 0.0
    assert result["methods"]["oracle"]["frac_oracle_gain"]["mean"] == pytest.approx(1.0)
    # the task's own metric: accuracy for the multiple-choice task, exact match for the free-text one
    assert result["task_metrics"] == {"arith_double": "exact_match", "classify_parity": "accuracy"}
    for name, method in result["methods"].items():
        cell = method["task_metric"]
        expected = sum(method["per_task"][t][result["task_metrics"][t]]["mean"] for t in UNSEEN) / len(UNSEEN)
        assert cell["mean"] == pytest.approx(expected) and cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
        assert "recovered" in method, name
    assert result["methods"]["base"]["task_metric_vs_base"]["mean"] == 0.0
    for suffix in (".md", "_tasks.png", "_oracle_gain.png"):
        assert (run["root"] / "out" / f"eval_unseen{suffix}").stat().st_size > 0
    assert "| oracle |" in (run["root"] / "out" / "eval_unseen.md").read_text()


def test_a_task_metric_headline_leads_with_each_tasks_own_metric(run, tmp_path):
    from loramint.training.evaluate import task_metric_headline, write_report

    result = run["result"]
    led = task_metric_headline(result, ["arith", "classify"])
    assert led["metric"] == "task_metric" and led["n_tasks"] == len(UNSEEN)
    assert (led["n_families_heldout"], led["families_heldout"]) == (2, ["arith", "classify"])
    for name, method in led["methods"].items():
        before = result["methods"][name]
        assert {k: method[k] for k in ("mean", "ci_low", "ci_high")} == {
            k: before["task_metric"][k] for k in ("mean", "ci_low", "ci_high")
        }
        assert method["answer_nll"] == {k: before[k] for k in ("mean", "ci_low", "ci_high")}
        assert method["per_task"] == before["per_task"]
    assert set(led["recovered"]) == set(ALL_METHODS) - {"base", "oracle"}
    assert led["recovered"]["top1"] == result["methods"]["top1"]["recovered"]
    paths = write_report(led, tmp_path, "heldout")
    assert {p.name for p in paths} >= {"eval_heldout.md", "eval_heldout_task_metric.png"}
    table = (tmp_path / "eval_heldout.md").read_text()
    assert "2 held-out families" in table and "| task metric [95% CI] |" in table
    with pytest.raises(ValueError, match="no task-metric"):
        task_metric_headline({**result, "methods": {"base": {"mean": 1.0}}}, [])


def test_oracle_lowers_the_unseen_tasks_nll(run):
    base, oracle = per_task(run, "base"), per_task(run, "oracle")
    for name in UNSEEN:
        assert oracle[name]["mean"] < base[name]["mean"] - 0.1
        assert oracle[name]["vs_base"]["ci_low"] > 0
        assert oracle[name]["info"] == {"experts": [f"expert-{name}"], "source": "trained"}


def test_top1_and_topk_follow_description_similarity(run):
    library, seen = run["library"], run["seen"]
    experts = [e for e in library.list() if e.name in {t.name for t in seen}]
    for task in run["unseen"]:
        cos = library.encoder.encode([e.description for e in experts]) @ library.encoder.encode(
            task.description
        )
        ranked = [experts[i].id for i in np.argsort(-cos)]
        top1, topk = per_task(run, "top1")[task.name]["info"], per_task(run, "topk")[task.name]["info"]
        assert top1["experts"] == ranked[:1] and top1["weights"] == [1.0]
        assert topk["experts"] == ranked[:3]
        expected = np.sort(cos)[::-1][:3]
        assert topk["weights"] == pytest.approx(expected / expected.sum(), abs=1e-5)


def test_topk_mixture_output_equals_the_weighted_sum_of_deltas(run, tiny):
    context = MethodContext(tiny, run["library"], run["seen"], run["config"])
    intervention = build_methods(["topk"], context)["topk"](run["unseen"][0])
    assert len(intervention.mixture) == 3 and sum(w for _, w in intervention.mixture) == pytest.approx(1.0)
    module = "model.layers.1.mlp.down_proj"
    weight = tiny.model.get_submodule(module).weight
    before = weight.clone()
    with apply_mixture(tiny.model, intervention.mixture):
        expected = before + sum(w * a.delta(module) for a, w in intervention.mixture)
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(weight, before)


def test_uniform_uses_every_seen_expert_with_equal_weights(run):
    seen_ids = sorted(f"expert-{t.name}" for t in run["seen"])
    for info in (cell["info"] for cell in per_task(run, "uniform").values()):
        assert sorted(info["experts"]) == seen_ids
        assert info["weights"] == [0.25] * 4


def test_only_base_plus_description_changes_the_prompt(run, tiny):
    context = MethodContext(tiny, run["library"], run["seen"], run["config"])
    built = build_methods(ALL_METHODS, context)
    task = run["unseen"][0]
    example = task.examples[0]
    demos = data.eval_split(task)[0][:3]
    for name, method in built.items():
        prompt = method(task).shown(task).prompt(example)
        assert (task.description in prompt) == (name == "base+description"), name
        assert prompt.endswith(task.prompt(example))
        shown = all(f"{task.prompt(ex)}\n{ex.output}" in prompt for ex in demos)
        assert shown == (name == "few-shot"), name  # three solved training examples, never evaluation ones
    base, described = per_task(run, "base"), per_task(run, "base+description")
    assert all(base[n]["mean"] != described[n]["mean"] for n in UNSEEN)  # the model did read it
    assert all(not cell["info"] for cell in described.values())  # and no adapter was used
    assert all(cell["info"] == {"n_demos": 3} for cell in per_task(run, "few-shot").values())


def test_multitask_trains_once_on_all_seen_tasks_and_is_reused_from_its_cache(run, tiny, monkeypatch):
    ((tasks, config),) = run["multitask_calls"]  # one training run for both unseen tasks
    assert sorted(t.name for t in tasks) == sorted(t.name for t in run["seen"])
    assert config.steps == 20 and config.rank == FAST.rank  # same rank as the library's experts
    first = per_task(run, "multitask")
    assert not first[UNSEEN[0]]["info"]["cached"]
    monkeypatch.setattr(
        methods, "train_lora", lambda *a: pytest.fail("the cached multi-task LoRA was retrained")
    )
    context = MethodContext(tiny, run["library"], run["seen"], run["config"])
    again = build_methods(["multitask"], context)["multitask"](run["unseen"][1])
    assert again.info["cached"] and again.info["key"] == first[UNSEEN[1]]["info"]["key"]


def test_oracle_is_reused_from_the_oracle_library(run, tiny, monkeypatch):
    from loramint.training import build

    monkeypatch.setattr(build, "train_expert", lambda *a: pytest.fail("the cached oracle was retrained"))
    context = MethodContext(tiny, run["library"], run["seen"], run["config"])
    oracle = build_methods(["oracle"], context)["oracle"]
    assert oracle(run["unseen"][0]).info["source"] == "oracle_library"
    assert oracle(run["seen"][0]).info["source"] == "library"  # a seen task's expert is its oracle
    explicit = MethodContext(tiny, run["library"], run["seen"], replace(run["config"], train=FAST))
    assert build_methods(["oracle"], explicit)["oracle"](run["seen"][0]).info["source"] == "library"


def test_training_config_from_an_experts_preset():
    config = methods.train_config_from_yaml(ROOT / "configs" / "experts" / "tiny.yaml")
    assert (config.rank, config.steps, config.target_modules) == (
        4,
        30,
        ["q_proj", "v_proj", "up_proj", "down_proj"],
    )


def test_unknown_method_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(["base", "nope"], MethodContext(tiny, None, []))


# ---- CLI -------------------------------------------------------------------------------------------------


def eval_args(run, suite, tmp_path: Path, methods_: list[str]) -> list[str]:
    """`loramint eval` on the tiny suite's unseen tasks with small scoring settings, out to tmp_path."""
    tasks = tmp_path / "tasks.jsonl"
    save_tasks(suite.values(), tasks)
    args = [
        "eval",
        "--tasks",
        str(tasks),
        "--unseen",
        json.dumps(UNSEEN),
        "--library",
        str(run["library"].root),
    ]
    args += ["--base_model", "tiny-llama", "--methods", json.dumps(methods_), "--out", str(tmp_path)]
    return args + ["--max_length", "64", "--n_generate", "4", "--max_new_tokens", "4", "--n_bootstrap", "100"]


def test_cli_writes_the_table_from_the_cached_run(run, suite, tmp_path, capsys):
    args = eval_args(run, suite, tmp_path, ["base", "top1", "oracle"])
    args += ["--oracle_library", str(run["config"].oracle_library)]
    ood = tmp_path / "ood.json"  # benchmarks/ood.py's summary goes into the report
    summary = {
        "n": 20,
        "worse_than_base": 0,
        "better_than_base": 3,
        "fell_back": 9,
        "minted_worse_than_base": 2,
    }
    ood.write_text(json.dumps({**summary, "tasks": []}))
    assert main([*args, "--ood", str(ood)]) == 0
    out = json.loads((tmp_path / "eval_unseen.json").read_text())
    assert list(out["methods"]) == ["base", "top1", "oracle"] and out["tasks"] == UNSEEN
    assert out["ood"] == {**summary, "file": str(ood)}
    assert "fraction of oracle gain" in capsys.readouterr().out
    # the library's tasks are the seen ones: what retrieval and the multi-task LoRA draw on
    assert out["config"]["seen"] == [n for n in suite if n not in UNSEEN and f"expert-{n}" in run["library"]]
    assert main([*args, "--headline", "task_metric", "--report", "heldout"]) == 0
    led = json.loads((tmp_path / "eval_heldout.json").read_text())
    assert led["metric"] == "task_metric" and led["n_tasks"] == len(UNSEEN) and "recovered" in led
    assert (tmp_path / "eval_heldout_task_metric.png").stat().st_size > 0
    # the tasks split by whether the library has their family; a group of every task repeats the headline
    groups = led["groups"]
    assert sorted(t for g in groups.values() for t in g["tasks"]) == sorted(UNSEEN)
    assert sum(g["n_tasks"] for g in groups.values()) == len(UNSEEN)
    heldout = [t for t in UNSEEN if suite[t].family in led["families_heldout"]]
    assert groups.get("heldout_families", {}).get("tasks", []) == heldout
    for group in groups.values():
        assert set(group["methods"]) == {"base", "top1", "oracle"}
        assert group["methods"]["base"]["vs_base"]["mean"] == 0.0
        if group["n_tasks"] == len(UNSEEN):
            for name, m in group["methods"].items():
                assert m["mean"] == pytest.approx(led["methods"][name]["mean"])
                assert (m.get("recovered") or {}).get("mean") == (led["recovered"].get(name) or {}).get(
                    "mean"
                )
    assert "By task group:" in (tmp_path / "eval_heldout.md").read_text()
    assert main([*args, "--headline", "accuracy"]) != 0
    assert "headline must be 'answer_nll' or 'task_metric'" in capsys.readouterr().out
    assert main([*args, "--max_per_family", "0"]) != 0
    assert "max_per_family must be >= 1" in capsys.readouterr().out
    ood.write_text("{}")
    assert main([*args, "--ood", str(ood)]) != 0
    assert "is not a result of benchmarks/ood.py (no 'n')" in capsys.readouterr().out


def test_cli_shards_score_their_tasks_and_a_final_run_only_writes_the_table(
    run, suite, tmp_path, capsys, monkeypatch
):
    from loramint.training import evaluate as harness

    args = eval_args(run, suite, tmp_path, ["base", "top1", "multitask"])
    args += ["--cache_dir", str(tmp_path / "cache"), "--multitask_dir", str(tmp_path / "multitask")]
    args += ["--multitask_steps", "4", "--split_layer", "1"]
    for shard in ("0/2", "1/2"):  # the out-of-domain summary is read for the report only
        assert main([*args, "--shard", shard, "--ood", str(tmp_path / "not-yet.json")]) == 0
    assert not (tmp_path / "eval_unseen.json").exists(), "a shard writes no report"
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.json"))
    # shard 0 scored the first task with every method, shard 1 the second without the multi-task LoRA
    assert cached == sorted([UNSEEN[0]] * 3 + [UNSEEN[1]] * 2)
    scored = []
    real = harness.score_task
    monkeypatch.setattr(harness, "score_task", lambda *a: scored.append(a[1].name) or real(*a))
    assert main([*args, "--report", "heldout"]) == 0
    assert scored == [UNSEEN[1]], "the final run scores only the multi-task LoRA on shard 1's task"
    out = json.loads((tmp_path / "eval_heldout.json").read_text())
    assert list(out["methods"]) == ["base", "top1", "multitask"] and out["tasks"] == UNSEEN


# ---- one table from several runs (training.assemble) ---------------------------------------------------------


@pytest.fixture(scope="module")
def cached_runs(run, tiny, tmp_path_factory):
    """Two cached runs with different methods, and one run of all of them (every score a cache hit)."""
    root = tmp_path_factory.mktemp("assemble")
    scoring = replace(SCORING, cache_dir=root / "cache")

    def one(methods_, name):
        evaluate(
            tiny,
            run["unseen"],
            methods_,
            library=run["library"],
            seen=run["seen"],
            scoring=scoring,
            method_config=run["config"],
            out=root / name,
        )
        return root / name / "eval_unseen.json"

    a = one(["base", "top1", "oracle"], "a")
    b = one(["base", "topk", "uniform"], "b")
    whole = one(["base", "top1", "oracle", "topk", "uniform"], "whole")
    return {"a": a, "b": b, "whole": whole, "root": root, "cache": scoring.cache_dir}


def same_table(left: dict, right: dict) -> None:
    assert list(left["methods"]) == list(right["methods"]) and left["tasks"] == right["tasks"]
    for name, m in left["methods"].items():
        other = right["methods"][name]
        for key in ("mean", "ci_low", "ci_high"):
            assert m[key] == pytest.approx(other[key], abs=1e-12), (name, key)
            assert m["vs_base"][key] == pytest.approx(other["vs_base"][key], abs=1e-12), (name, key)
            assert m["frac_oracle_gain"][key] == pytest.approx(other["frac_oracle_gain"][key], abs=1e-12)
        for task, cell in m["per_task"].items():
            assert cell["score_key"] == other["per_task"][task]["score_key"]
            assert cell["mean"] == pytest.approx(other["per_task"][task]["mean"], abs=1e-12)


def test_assembled_runs_equal_one_run_of_all_their_methods(cached_runs):
    from loramint.training.assemble import assemble

    out = cached_runs["root"] / "assembled"
    result = assemble([cached_runs["a"], cached_runs["b"]], out=out)
    whole = json.loads(cached_runs["whole"].read_text())
    same_table(json.loads((out / "eval_unseen.json").read_text()), whole)
    assert result["config"]["assembled_from"]["topk"] == str(cached_runs["b"])
    assert result["config"]["assembled_from"]["oracle"] == str(cached_runs["a"])
    assert "| uniform |" in (out / "eval_unseen.md").read_text()
    picked = assemble([cached_runs["b"], cached_runs["a"]], methods=["oracle", "topk"])
    assert list(picked["methods"]) == ["base", "oracle", "topk"]  # base always first, then as asked


def test_results_without_score_keys_are_matched_by_value(cached_runs, tmp_path):
    from loramint.training.assemble import assemble

    legacy = json.loads(cached_runs["a"].read_text())
    for method in legacy["methods"].values():
        for cell in method["per_task"].values():
            del cell["score_key"]
    path = tmp_path / "eval_unseen.json"
    path.write_text(json.dumps(legacy))
    result = assemble([path, cached_runs["b"]], cache_dir=cached_runs["cache"])
    same_table(result, json.loads(cached_runs["whole"].read_text()))


def test_assembly_refuses_runs_that_do_not_agree_or_scores_that_are_gone(cached_runs, tmp_path):
    from loramint.training.assemble import AssembleError, assemble

    def variant(change, name):
        body = json.loads(cached_runs["b"].read_text())
        change(body)
        path = tmp_path / name
        path.write_text(json.dumps(body))
        return path

    other_settings = variant(lambda r: r["config"]["scoring"].update(n_generate=99), "settings.json")
    with pytest.raises(AssembleError, match=r"differ in \['scoring.n_generate'\]"):
        assemble([cached_runs["a"], other_settings])
    other_tasks = variant(lambda r: r.update(tasks=r["tasks"][:1]), "tasks.json")
    with pytest.raises(AssembleError, match="differ in"):
        assemble([cached_runs["a"], other_tasks])
    with pytest.raises(AssembleError, match=r"methods \['multitask'\] are in none"):
        assemble([cached_runs["a"], cached_runs["b"]], methods=["multitask"])
    with pytest.raises(AssembleError, match="no evaluation result"):
        assemble([tmp_path / "missing.json"])
    task = UNSEEN[1]

    def shift_base(r):
        r["methods"]["base"]["per_task"][task]["mean"] += 0.5

    with pytest.raises(AssembleError, match="its cache entry holds other scores"):
        assemble([variant(shift_base, "shifted.json")])
    key = json.loads(cached_runs["b"].read_text())["methods"]["uniform"]["per_task"][task]["score_key"]
    entry = cached_runs["cache"] / f"{task}-{key}.json"
    saved = entry.read_bytes()
    entry.unlink()
    try:
        with pytest.raises(AssembleError, match=f"uniform on {task}: its cache entry .* is missing"):
            assemble([cached_runs["b"]])
    finally:
        entry.write_bytes(saved)
    assert assemble([cached_runs["b"]])["methods"]["uniform"]["mean"] > 0  # restored: assembles again


def test_cli_assembles_a_table(cached_runs, tmp_path, capsys):
    args = ["eval-assemble", "--results", json.dumps([str(cached_runs["a"]), str(cached_runs["b"])])]
    assert main([*args, "--methods", '["topk", "oracle"]', "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "eval_unseen.json").read_text())
    assert list(out["methods"]) == ["base", "topk", "oracle"]
    assert "fraction of oracle gain" in capsys.readouterr().out
    assert main(["eval-assemble", "--out", str(tmp_path)]) != 0  # no results named: a clear error


def test_the_multitask_budget_is_what_the_library_experts_took(monkeypatch):
    """Early-stopped experts record their steps: the multi-task LoRA gets their sum, not n x the step cap,
    and with early stopping it keeps the experts' data per task and a validation set of one task's size."""
    from types import SimpleNamespace

    from loramint.training.methods import library_budget, multitask_adapter

    seen = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    experts = [SimpleNamespace(name="a", metrics={"steps_run": 40}), SimpleNamespace(name="b", metrics={})]
    library = SimpleNamespace(list=lambda: experts)
    assert library_budget(SimpleNamespace(library=library, seen=seen), replace(FAST, steps=100)) == 240
    assert library_budget(SimpleNamespace(library=None, seen=seen), replace(FAST, steps=7)) == 21  # no record

    def fake_train(base, tasks, config, examples_per_task=None):
        raise RuntimeError(
            f"would train {config.steps} {config.train_examples} {config.n_val} {examples_per_task}"
        )

    monkeypatch.setattr(methods, "train_lora", fake_train)
    monkeypatch.setattr(methods, "_tasks_key", lambda *a: "key")
    config = replace(FAST, steps=100, val_every=10, n_val=50, train_examples=300)
    ctx = SimpleNamespace(
        library=library,
        seen=seen,
        base=SimpleNamespace(name="tiny-llama"),
        config=SimpleNamespace(multitask_steps=None, multitask_dir=Path("/nonexistent/multitask")),
        train_config=lambda: config,
    )
    with pytest.raises(RuntimeError, match="would train 240 48 16 16"):  # 16 a task: MULTITASK_EXAMPLES
        multitask_adapter(ctx)


def test_the_shuffled_control_changes_the_order_even_without_spaces():
    from loramint.training.methods import shuffled_words

    english = "Sort the words from shortest to longest please"
    out = shuffled_words(english, "shuffle:x")
    assert out != english and sorted(out.split()) == sorted(english.split())
    assert shuffled_words(english, "shuffle:x") == out  # seeded
    chinese = "猜字谜，根据我给的描述猜出一个字"  # one whitespace-separated "word"
    out = shuffled_words(chinese, "shuffle:y")
    assert out != chinese and sorted(out) == sorted(chinese)
    assert shuffled_words("ab", "shuffle:z") == "ba"  # a two-word/two-letter text is never left as it was
    assert shuffled_words("aaa", "shuffle:z") == "aaa"  # nothing to reorder


def test_minted_user_mints_from_the_hand_written_phrasing(tmp_path):
    from types import SimpleNamespace

    phrasings = tmp_path / "phrasings.json"
    phrasings.write_text(json.dumps({"_about": "test", "known": "Add the numbers."}))
    minted: list[str] = []
    adapter = LoraAdapter.random("tiny-llama", r=2, seed=0)
    minter = SimpleNamespace(mint=lambda text: minted.append(text) or adapter)
    ctx = SimpleNamespace(config=MethodConfig(user_phrasings=phrasings), minter=lambda: minter)
    method = methods.METHODS["minted-user"](ctx)
    got = method(SimpleNamespace(name="known"))
    assert minted == ["Add the numbers."] and got.info == {"description": "Add the numbers."}
    with pytest.raises(ValueError, match="no user phrasing for task 'other'"):
        method(SimpleNamespace(name="other"))


def test_the_corpus_eval_has_a_user_phrasing_for_every_task_it_scores():
    import yaml

    from loramint.training.evaluate import select_tasks

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs/eval/corpus.yaml").read_text())
    by_name, names = select_tasks(root / config["suite"], None, None, None)
    scored = {n for n in names["unseen"] if len(data.eval_split(by_name[n])[1]) >= config["min_test"]}
    phrasings = json.loads((root / config["user_phrasings"]).read_text())
    assert len(scored) >= 30 and set(phrasings) - {"_about"} == scored
    families = {by_name[n].family for n in scored}
    assert len(families & {"chinese", "knowledge", "law_finance", "rhyme"}) >= 3  # whole held-out families
    assert all(p != by_name[n].description and len(p) < 100 for n, p in phrasings.items() if n != "_about")
