"""The evaluation harness: score methods on tasks' held-out examples, with bootstrap CIs; JSON, Markdown, plots.

Each task is scored on its evaluation split (`eval_split(task)[1]`) with the model reading only the chat-
formatted `task.prompt(example)`:
- `answer_nll` (primary): mean over examples of the reference answer's negative log-likelihood per token
  (answer tokens + end-of-turn, as in training); every example weighs the same, whatever its length.
- multiple choice: `accuracy`, the choice with the highest mean log-probability per token (same tokens) wins.
- free text: greedy generation on the first `n_generate` examples -> `exact_match` and `rougeL`.
Gains are `base_nll - method_nll` (positive: better than the base model), with paired bootstrap intervals.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from loramint.adapters import LoraAdapter, apply_mixture
from loramint.errors import TaskError
from loramint.index.library import ExpertLibrary
from loramint.models import BaseModel, left_pad
from loramint.paths import atomic_write_bytes, json_digest
from loramint.sysinfo import machine
from loramint.tasks import Example, Task, load_tasks
from loramint.training.data import (
    ENCODING_VERSION,
    answer_logprob_sums,
    encode_example,
    eval_split,
    prompt_ids,
)
from loramint.training.methods import (
    Intervention,
    Method,
    MethodConfig,
    MethodContext,
    build_methods,
)
from loramint.training.metrics import (
    bootstrap_ci,
    bootstrap_task_means,
    exact_match,
    format_ci,
    hierarchical_ci,
    interval,
    rouge_l,
)

METRIC = "answer_nll"
BASELINES = ("base", "base+description", "few-shot", "top1", "topk", "uniform", "multitask", "oracle")
MINTED = (
    "minted",
    "minted+examples",
    "minted-user",
    "minted+topk",
    "minted-unrelated",
    "minted-shuffled",
)
CHALLENGERS = (*MINTED, "reconstructed")
"""Methods compared pairwise with every other method of the run (`comparisons` in the result)."""
ALL_METHODS = BASELINES
SECONDARY = ("accuracy", "exact_match", "rougeL")
N_SAMPLES = 3
"""Generated answers kept per task in the JSON, to eyeball."""
SCORES_VERSION = 1
"""Part of every cache key (ScoringConfig.cache_dir): bump it when a change to the scoring code changes scores."""


@dataclass
class ScoringConfig:
    """How each task is scored."""

    max_length: int = 512
    """Tokens per scored sequence (the prompt is cut from the left, the answer kept)."""
    batch_size: int = 8
    n_generate: int = 32
    """Free-text tasks: greedy answers generated for the first this-many evaluation examples (0: none)."""
    max_examples: int | None = None
    """Score only the first this-many examples of each task's evaluation split (None: all, i.e. up to 200).
    For cheap secondary tables (the seen split); headline tables use every evaluation example."""
    max_new_tokens: int = 32
    """Longest generated answer."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for every confidence interval."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    split_layer: int | None = None
    """Score answer likelihoods in two halves at this decoder layer and keep the lower half's states of the
    task last scored: methods that change only layers from here on (LoRAs on the top layers) and show the
    same prompts then run only the upper layers. Same scores (to float rounding); None: whole passes."""
    cache_dir: Path | None = None
    """Keep each (task, intervention)'s per-example scores here, so a rerun (after a crash, or with a method
    added) scores only what is new. Keyed by the task's content, the adapters' content hashes, the
    instruction, the base model and these settings. None: no cache."""

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else None
        checks = {
            "max_length": self.max_length >= 16,
            "batch_size": self.batch_size >= 1,
            "n_generate": self.n_generate >= 0,
            "max_examples": self.max_examples is None or self.max_examples >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "split_layer": self.split_layer is None or self.split_layer >= 1,
            "n_bootstrap": self.n_bootstrap >= 10,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ValueError(f"invalid ScoringConfig field(s) {bad}: {self}")


@dataclass
class TaskScores:
    """One method on one task: per-example values of each metric, what the method chose, and timings."""

    values: dict[str, np.ndarray]
    """metric -> [n] (answer_nll, accuracy: every evaluation example; exact_match, rougeL: the generated ones)."""
    info: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    key: str | None = None
    """The score cache entry it was read from or written to (`<cache_dir>/<task>-<key>.json`), None without a
    cache; recorded as `score_key` per task in the result, so `training.assemble` can find it again."""

    def to_dict(self) -> dict[str, Any]:
        values = {k: v.tolist() for k, v in self.values.items()}
        return {"values": values, "info": self.info, "samples": self.samples, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScores:
        values = {k: np.asarray(v, dtype=np.float64) for k, v in data["values"].items()}
        return cls(values, data["info"], data["samples"], data["seconds"])


# ---- scoring one task ----------------------------------------------------------------------------------------


def answer_logprobs(
    base: BaseModel,
    task: Task,
    items: Sequence[tuple[Example, str | None]],
    max_length: int = 512,
    batch_size: int = 8,
    split: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities [n], token count [n]) of each answer (None: the reference) after its prompt.

    Logits are computed only where answer tokens are predicted (`data.answer_logits`): the vocabulary
    projection of every prompt position would dominate the cost. `split`: run the layers below it once per
    set of sequences (`lower_states`, kept for the next call on the same sequences) and the rest here; only
    for a model whose layers below `split` are the base model's.
    """
    encoded = [encode_example(base.tokenizer, task, ex, max_length, answer) for ex, answer in items]
    if split is None:
        return answer_logprob_sums(base.model, encoded, base.tokenizer.pad_token_id, batch_size)
    from loramint.training.fast import cache, cached_nll_sums

    digest = hashlib.sha256(json.dumps([[e.input_ids, e.labels] for e in encoded]).encode()).hexdigest()
    kept = _LOWER.get(base.model)
    if kept is None or kept[0] != (split, digest):
        kept = (split, digest), cache(base.model, encoded, split, base.tokenizer.pad_token_id)
        _LOWER[base.model] = kept  # one set per model: the task scored last
    sums, counts = cached_nll_sums(base.model, kept[1], split, batch_size)
    return -sums, counts


_LOWER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> ((split layer, digest of the scored sequences), their states entering that layer)."""
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lowest_layer(adapter: LoraAdapter) -> int | None:
    """The lowest decoder layer an adapter changes (None: it changes a module outside the decoder layers)."""
    layers = [_LAYER.search(module) for module in adapter.weights]
    return None if not layers or None in layers else min(int(m.group(1)) for m in layers)


def split_layer(intervention: Intervention, config: ScoringConfig) -> int | None:
    """`config.split_layer` when the intervention changes no layer below it (a mixture of LoRAs on layers
    from there on, or nothing), else None (per-token routing attaches to the whole model: whole passes)."""
    split = config.split_layer
    if split is None or intervention.routing is not None:
        return None
    for adapter, _ in intervention.mixture:
        lowest = lowest_layer(adapter)
        if lowest is None or lowest < split:
            return None
    return split


ANSWER_MARGIN = 8
"""Greedy answers stop this many tokens past the task's longest training answer (or at `max_new_tokens`):
a longer answer cannot be an exact match, and ROUGE-L only loses precision on text past the references'
length. A model that does not stop costs those tokens instead of the full `max_new_tokens`."""


def answer_budget(tokenizer, task: Task, cap: int) -> int:
    """New tokens a greedy answer of `task` may take: its longest training answer + ANSWER_MARGIN, at most
    `cap` (the training split only: nothing is read from the examples being scored)."""
    answers = {t for ex in eval_split(task)[0] for t in (ex.targets or [ex.output])}
    if not answers:
        return cap
    longest = max(len(ids) for ids in tokenizer(sorted(answers), add_special_tokens=False).input_ids)
    return min(cap, longest + ANSWER_MARGIN)


@torch.no_grad()
def generate_answers(
    base: BaseModel,
    task: Task,
    examples: Sequence[Example],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[str]:
    """Greedy answers (KV cache, left-padded batches), decoded without special tokens and stripped."""
    from transformers import GenerationConfig

    model, tok = base.model, base.tokenizer
    prompts = [prompt_ids(tok, task, ex, max_length - max_new_tokens) for ex in examples]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], tok.pad_token_id)  # [B, T]
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(base.device), attention_mask=mask.to(base.device), generation_config=config
        )  # [B, T + new]
        for r, text in zip(rows, tok.batch_decode(out[:, width:], skip_special_tokens=True), strict=True):
            answers[r] = text.strip()
    return answers


def score_task(base: BaseModel, task: Task, intervention: Intervention, config: ScoringConfig) -> TaskScores:
    """Every metric of `task` with the method's intervention in place (the base model is restored after)."""
    examples = eval_split(task)[1][: config.max_examples]
    score = _score_choices if task.is_multiple_choice else _score_free_text
    started = time.perf_counter()
    applied = (
        intervention.routing.apply(base.model)
        if intervention.routing
        else apply_mixture(base.model, intervention.mixture)
    )
    with applied:
        values, samples = score(
            base, intervention.shown(task), examples, config, split_layer(intervention, config)
        )
    seconds = {"score_s": round(time.perf_counter() - started, 3)}
    return TaskScores(values, dict(intervention.info), samples, seconds)


def _score_choices(
    base: BaseModel, task: Task, examples: Sequence[Example], config: ScoringConfig, split: int | None
) -> tuple[dict[str, np.ndarray], list]:
    """answer_nll of the correct choice and accuracy of the best choice by mean log-probability per token."""
    items = [(ex, choice) for ex in examples for choice in ex.choices]
    sums, counts = answer_logprobs(base, task, items, config.max_length, config.batch_size, split)
    nll, correct, at = [], [], 0
    for ex in examples:
        mean_logp = sums[at : at + len(ex.choices)] / counts[at : at + len(ex.choices)]  # [n choices]
        nll.append(-mean_logp[ex.answer])
        correct.append(float(np.argmax(mean_logp) == ex.answer))
        at += len(ex.choices)
    return {"answer_nll": np.array(nll), "accuracy": np.array(correct)}, []


def _score_free_text(
    base: BaseModel, task: Task, examples: Sequence[Example], config: ScoringConfig, split: int | None
) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """answer_nll of the reference on every example; exact match and ROUGE-L of greedy answers on a prefix."""
    sums, counts = answer_logprobs(
        base, task, [(ex, None) for ex in examples], config.max_length, config.batch_size, split
    )
    values = {"answer_nll": -sums / counts}
    generated = examples[: config.n_generate]
    budget = answer_budget(base.tokenizer, task, config.max_new_tokens)
    answers = generate_answers(base, task, generated, budget, config.batch_size, config.max_length)
    pairs = list(zip(answers, generated, strict=True))
    if pairs:
        values["exact_match"] = np.array([exact_match(a, ex.targets) for a, ex in pairs])
        values["rougeL"] = np.array([rouge_l(a, ex.targets) for a, ex in pairs])
    samples = [
        {"input": ex.input[:200], "target": ex.target or "", "output": a} for a, ex in pairs[:N_SAMPLES]
    ]
    return values, samples


# ---- the run -------------------------------------------------------------------------------------------------


def select_tasks(
    suite: str | Path | None = None,
    tasks: str | Path | None = None,
    seen: Sequence[str] | None = None,
    unseen: Sequence[str] | None = None,
) -> tuple[dict[str, Task], dict[str, list[str]]]:
    """({name: Task}, {"seen": names, "unseen": names}) from a suite file, or a task file plus either list
    (the other one is then every remaining task)."""
    if suite is not None:
        from loramint.training.suites import load_suite

        fixed = load_suite(suite)
        by_name, seen, unseen = fixed.tasks(), fixed.seen, fixed.unseen
    elif tasks is not None:
        by_name = {t.name: t for t in load_tasks(tasks)}
        if seen is None and unseen is None:
            raise TaskError("name the held-out tasks: give a suite, or `unseen` (or `seen`) task names")
        seen = list(seen) if seen is not None else [n for n in by_name if n not in set(unseen or ())]
        unseen = list(unseen) if unseen is not None else [n for n in by_name if n not in set(seen)]
    else:
        raise TaskError("give a suite file (`suite`) or a task file (`tasks`) with seen/unseen names")
    if missing := [n for n in [*seen, *unseen] if n not in by_name]:
        raise TaskError(f"tasks {missing[:5]} are not in the task file")
    if both := set(seen) & set(unseen):
        raise TaskError(f"tasks {sorted(both)[:5]} are both seen and unseen")
    return by_name, {"seen": list(seen), "unseen": list(unseen)}


def pick_scored(tasks: Sequence[Task], min_test: int = 0, max_per_family: int | None = None) -> list[Task]:
    """The tasks to score, in their order: those with at least `min_test` evaluation examples (a task with
    10 gives a confidence interval as wide as the effects it should show), then at most `max_per_family` of
    each family (the first ones), so that no family dominates the mean over tasks."""
    kept, per_family = [], collections.Counter()
    for task in tasks:
        if min_test and len(eval_split(task)[1]) < min_test:
            continue
        if max_per_family is not None and per_family[task.family] >= max_per_family:
            continue
        per_family[task.family] += 1
        kept.append(task)
    return kept


def evaluate(
    base: BaseModel,
    tasks: Sequence[Task],
    methods: Sequence[str] = ALL_METHODS,
    *,
    library: ExpertLibrary | None = None,
    seen: Sequence[Task] = (),
    scoring: ScoringConfig | None = None,
    method_config: MethodConfig | None = None,
    out: str | Path | None = None,
    split: str = "unseen",
    extra_config: dict[str, Any] | None = None,
    attach: dict[str, Any] | None = None,
    report: str | None = None,
    headline: str = METRIC,
) -> dict[str, Any]:
    """Score every method on every task; write `<out>/eval_<split>.json|.md|_*.png` if `out` is given.

    `seen` are the tasks that have experts in `library` (retrieval candidates, multi-task training data).
    `base` is always scored: every gain is measured against it. `attach`: entries put at the top level of
    the result as they are (e.g. `ood`, the out-of-domain benchmark's summary). `report`: the files' name
    (`eval_<report>.*`; default: the split). `headline`: `answer_nll`, or `task_metric` for a result led by
    each task's own metric (`task_metric_headline`; its held-out families are the tasks' families that no
    `seen` task has), with the same summary on those families' tasks and on the rest under `groups`.
    """
    if headline not in (METRIC, "task_metric"):
        raise ValueError(f"headline must be {METRIC!r} or 'task_metric', got {headline!r}")
    scoring = scoring or ScoringConfig()
    method_config = method_config or MethodConfig()
    if not tasks:
        raise ValueError("no tasks to evaluate")
    names = ["base", *[m for m in dict.fromkeys(methods) if m != "base"]]
    context = MethodContext(base, library, list(seen), method_config)
    try:
        raw = score_methods(base, tasks, build_methods(names, context), scoring, split)
        train_config = context.train_config() if {"multitask", "oracle"} & set(names) else None
    finally:
        context.close()
    task_metrics = {t.name: t.metric for t in tasks}
    result = summarize(raw, [t.name for t in tasks], scoring, task_metrics)
    result["task_metrics"] = task_metrics
    result["split"] = split
    result["machine"] = machine()
    result["config"] = {
        "base_model": base.name,
        "library": str(library.root) if library is not None else None,
        "seen": [t.name for t in seen],
        "methods": names,
        "scoring": asdict(scoring),
        "method_config": _jsonable(asdict(method_config)),
        "train_config": asdict(train_config) if train_config else None,
        "eval_examples": "training.data.eval_split(task)[1] (seed 0)",
        **(extra_config or {}),
    }
    result.update(attach or {})
    if headline == "task_metric":
        heldout = sorted({t.family for t in tasks} - {t.family for t in seen})
        result = task_metric_headline(result, heldout)
        groups = {
            "heldout_families": [t.name for t in tasks if t.family in heldout],
            "seen_families": [t.name for t in tasks if t.family not in heldout],
        }
        result["groups"] = task_metric_groups(raw, groups, task_metrics, scoring)
    if out is not None:
        write_report(result, Path(out), report or split)
    return result


def task_metric_headline(result: dict[str, Any], heldout_families: Sequence[str]) -> dict[str, Any]:
    """`result` led by each task's own metric: `metric` is `task_metric`; each method's `mean`, `ci_low`,
    `ci_high` are its mean over tasks of the task's metric (accuracy, exact match or ROUGE-L; 95% CI), its
    answer-NLL numbers move under `answer_nll`; `recovered` gives each method's fraction of the oracle's
    task-metric gain over base (None where the oracle gains nothing on average); `n_tasks`, `n_families_heldout` and `families_heldout` say what was scored."""
    methods, recovered = {}, {}
    for name, m in result["methods"].items():
        if "task_metric" not in m:
            raise ValueError(f"{name} has no task-metric scores (free-text tasks need n_generate > 0)")
        nll = {k: m[k] for k in ("mean", "ci_low", "ci_high")}
        rest = {k: v for k, v in m.items() if k not in nll and k != "task_metric"}
        methods[name] = {**m["task_metric"], "answer_nll": nll, **rest}
        if name not in ("base", "oracle") and "recovered" in m:  # None: the oracle gains nothing
            recovered[name] = m["recovered"]
    families = sorted(set(heldout_families))
    return {
        **result,
        "metric": "task_metric",
        "metric_definition": "each task's own metric (task_metrics: accuracy for multiple choice, exact match "
        "or ROUGE-L for free text), mean over tasks; 95% CI by bootstrap over each task's examples",
        "n_tasks": len(result["tasks"]),
        "n_families_heldout": len(families),
        "families_heldout": families,
        "methods": methods,
        "recovered": recovered,
    }


def task_metric_groups(
    raw: dict[str, dict[str, TaskScores]],
    groups: dict[str, Sequence[str]],
    metrics: dict[str, str],
    scoring: ScoringConfig,
) -> dict[str, Any]:
    """Each method's task-metric summary on each named subset of the tasks (empty subsets left out), e.g.
    the tasks of held-out families apart from the unseen tasks of families the library has."""
    boot = {"n_resamples": scoring.n_bootstrap, "seed": scoring.seed}
    out: dict[str, Any] = {}
    for group, names in groups.items():
        if not names:
            continue
        methods = {}
        for name in raw:
            summary = _task_metric_summary(raw, name, names, metrics, boot)
            if summary:
                methods[name] = {
                    **summary["task_metric"],
                    "vs_base": summary["task_metric_vs_base"],
                    **({"recovered": summary["recovered"]} if "recovered" in summary else {}),
                }
        out[group] = {"n_tasks": len(names), "tasks": list(names), "methods": methods}
    return out


def score_methods(
    base: BaseModel,
    tasks: Sequence[Task],
    methods: dict[str, Method],
    scoring: ScoringConfig,
    split: str = "",
) -> dict[str, dict[str, TaskScores]]:
    """{method: {task: scores}}; `setup_s` times the method itself (retrieval, training), `score_s` the scoring."""
    raw: dict[str, dict[str, TaskScores]] = {name: {} for name in methods}
    # task by task, every method on each: a task's lower-layer states (ScoringConfig.split_layer) are
    # computed once for all the methods that can share them
    with tqdm(total=len(methods) * len(tasks), desc=f"eval {split}".strip(), unit="task") as bar:
        for task in tasks:
            for name, method in methods.items():
                bar.set_postfix_str(f"{name} · {task.name[:40]}")
                started = time.perf_counter()
                intervention = method(task)
                setup_s = round(time.perf_counter() - started, 3)
                raw[name][task.name] = cached_score(base, task, intervention, scoring)
                raw[name][task.name].seconds["setup_s"] = setup_s
                bar.update()
    return raw


def cached_score(
    base: BaseModel, task: Task, intervention: Intervention, scoring: ScoringConfig
) -> TaskScores:
    """`score_task`, read from / written to `scoring.cache_dir` when there is one. Each adapter is keyed by its
    content hash (which it remembers itself), never by the Python object: a freed adapter's id is reused."""
    if scoring.cache_dir is None:
        return score_task(base, task, intervention, scoring)
    settings = asdict(scoring)
    key = {
        "version": SCORES_VERSION,
        "encoding": ENCODING_VERSION,
        "base": base.name,
        "task": task.to_dict(),
        "instruction": intervention.instruction,
        "mixture": [(a.content_hash(), float(w)) for a, w in intervention.mixture],
        **({"routing": intervention.routing.key} if intervention.routing else {}),
        "scoring": {
            k: settings[k]
            for k in ("max_length", "batch_size", "n_generate", "max_new_tokens", "max_examples")
        },
        # free text: answers stop at the task's answer budget (multiple-choice scores are unaffected)
        **({} if task.is_multiple_choice else {"answer_margin": ANSWER_MARGIN}),
    }
    digest = json_digest(key)
    path = scoring.cache_dir / f"{task.name}-{digest}.json"
    if path.is_file():
        scores = TaskScores.from_dict({**json.loads(path.read_text()), "info": dict(intervention.info)})
    else:
        scores = score_task(base, task, intervention, scoring)
        atomic_write_bytes(path, json.dumps(scores.to_dict()).encode())
    scores.key = digest
    return scores


def summarize(
    raw: dict[str, dict[str, TaskScores]],
    tasks: Sequence[str],
    config: ScoringConfig,
    task_metrics: dict[str, str] | None = None,
) -> dict:
    """The result dict: per method the mean NLL over tasks, its gain over `base`, and per-task detail; with
    `task_metrics` ({task: its metric}) also each method's mean over tasks of the task's own metric
    (`task_metric`), its gain over base and the fraction of the oracle's gain it recovers (`recovered`)."""
    boot = {"n_resamples": config.n_bootstrap, "seed": config.seed}
    base_nll = [raw["base"][t].values[METRIC] for t in tasks]
    oracle_gain = None
    if "oracle" in raw:
        oracle_gain = [b - raw["oracle"][t].values[METRIC] for b, t in zip(base_nll, tasks, strict=True)]
    methods = {}
    for name, by_task in raw.items():
        nll = [by_task[t].values[METRIC] for t in tasks]
        gain = [b - m for b, m in zip(base_nll, nll, strict=True)]
        per_task = {}
        for t, task_nll, task_gain in zip(tasks, nll, gain, strict=True):
            scores = by_task[t]
            entry: dict[str, Any] = {**bootstrap_ci(task_nll, **boot), "n_examples": len(task_nll)}
            entry["vs_base"] = bootstrap_ci(task_gain, **boot)
            for metric in SECONDARY:
                if metric in scores.values:
                    entry[metric] = {
                        **bootstrap_ci(scores.values[metric], **boot),
                        "n": len(scores.values[metric]),
                    }
            entry.update(info=scores.info, seconds=scores.seconds)
            if scores.key is not None:
                entry["score_key"] = scores.key
            if scores.samples:
                entry["samples"] = scores.samples
            per_task[t] = entry
        summary: dict[str, Any] = {**hierarchical_ci(nll, **boot), "per_task": per_task}
        summary["vs_base"] = {
            **hierarchical_ci(gain, **boot),
            "definition": "base_nll - method_nll, paired (positive: better than base)",
            "n_tasks_better": sum(e["vs_base"]["ci_low"] > 0 for e in per_task.values()),
            "n_tasks_worse": sum(e["vs_base"]["ci_high"] < 0 for e in per_task.values()),
        }
        for metric in SECONDARY:
            have = [by_task[t].values[metric] for t in tasks if metric in by_task[t].values]
            if have:
                summary[metric] = {**hierarchical_ci(have, **boot), "n_tasks": len(have)}
        if oracle_gain is not None:
            summary["frac_oracle_gain"] = oracle_fraction(gain, oracle_gain, **boot)
        if task_metrics is not None:
            summary.update(_task_metric_summary(raw, name, tasks, task_metrics, boot))
        summary["seconds"] = round(sum(sum(s.seconds.values()) for s in by_task.values()), 2)
        methods[name] = summary
    comparisons = {
        name: {
            other: {
                **hierarchical_ci(
                    [raw[other][t].values[METRIC] - raw[name][t].values[METRIC] for t in tasks], **boot
                ),
                "definition": f"{other}_nll - {name}_nll, paired (positive: {name} is better)",
            }
            for other in raw
            if other != name and other not in CHALLENGERS
        }
        for name in raw
        if name in CHALLENGERS
    }
    result = {"metric": METRIC, "tasks": list(tasks), "methods": methods}
    if comparisons:
        result["comparisons"] = comparisons
    if "minted" in methods and "minted-user" in methods:
        full, short = methods["minted"]["vs_base"]["mean"], methods["minted-user"]["vs_base"]["mean"]
        result["short_description_gain_loss"] = {
            "value": (1 - short / full) if full > 0 else None,
            "definition": "1 - gain(minted-user) / gain(minted), gains over base (target <= 0.25)",
        }
    return result


def _task_metric_summary(
    raw: dict[str, dict[str, TaskScores]],
    name: str,
    tasks: Sequence[str],
    metrics: dict[str, str],
    boot: dict,
) -> dict:
    """Method `name` on each task's own metric (higher is better): mean over tasks, paired gain over base and
    the fraction of the oracle's gain, on the examples every method scored (generated ones for free text)."""
    runs = [raw[name], raw["base"], *([raw["oracle"]] if "oracle" in raw else [])]
    if any(metrics[t] not in run[t].values for run in runs for t in tasks):
        return {}  # free-text tasks scored without generating (n_generate 0) have no exact match / ROUGE-L
    values = [raw[name][t].values[metrics[t]] for t in tasks]
    base = [raw["base"][t].values[metrics[t]] for t in tasks]
    gain = [v - b for v, b in zip(values, base, strict=True)]
    out: dict[str, Any] = {
        "task_metric": hierarchical_ci(values, **boot),
        "task_metric_vs_base": {
            **hierarchical_ci(gain, **boot),
            "definition": "method - base on each task's own metric, paired (positive: better than base)",
        },
    }
    if "oracle" in raw:
        oracle = [raw["oracle"][t].values[metrics[t]] - b for t, b in zip(tasks, base, strict=True)]
        out["recovered"] = oracle_fraction(gain, oracle, **boot)
    return out


def oracle_fraction(
    gain: Sequence[np.ndarray], oracle_gain: Sequence[np.ndarray], n_resamples: int = 1000, seed: int = 0
) -> dict[str, float | None] | None:
    """mean gain / mean oracle gain (means over tasks) with a paired 95% interval; None when the oracle gains
    nothing on average (no ratio then), and no interval when some resample has the oracle gaining nothing."""
    oracle_mean = float(np.mean([g.mean() for g in oracle_gain]))
    if oracle_mean <= 0:
        return None
    point = float(np.mean([g.mean() for g in gain])) / oracle_mean
    # same seed and task sizes: both draw the same resampled examples
    num = bootstrap_task_means(gain, n_resamples, seed).mean(axis=1)  # [R]
    den = bootstrap_task_means(oracle_gain, n_resamples, seed).mean(axis=1)  # [R]
    if (den <= 0).any():
        return {"mean": point, "ci_low": None, "ci_high": None}
    return interval(point, num / den)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ---- report --------------------------------------------------------------------------------------------------


def write_report(result: dict, out: Path, split: str) -> list[Path]:
    """eval_<split>.json, .md, _tasks.png (per-task gains) and _oracle_gain.png (the headline)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval_{split}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    atomic_write_bytes(paths[0], (json.dumps(_jsonable(result), indent=2) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(result).encode())
    paths += plot(result, stem)
    return paths


def markdown(result: dict) -> str:
    methods = result["methods"]
    lines = []
    if result["metric"] == "task_metric":
        lines += [
            f"## {len(result['tasks'])} {result.get('split', '')} tasks ({result['n_families_heldout']} held-out "
            "families) · metric: each task's own (accuracy, exact match or ROUGE-L; higher is better)",
            "",
            "| method | task metric [95% CI] | gain vs base [95% CI] | fraction of oracle gain [95% CI] |",
            "|---|---|---|---|",
        ]
        for name, m in methods.items():
            gain, rec = format_ci(m.get("task_metric_vs_base")), format_ci(m.get("recovered"), 2)
            lines.append(f"| {name} | {format_ci(m)} | {gain} | {rec} |")
        lines.append("")
        groups = result.get("groups") or {}
        if groups:
            heads = [
                f"{g.replace('_', ' ')} ({v['n_tasks']} tasks): task metric / fraction of oracle gain"
                for g, v in groups.items()
            ]
            lines += [
                "By task group:",
                "",
                "| method | " + " | ".join(heads) + " |",
                "|---" * (len(heads) + 1) + "|",
            ]
            for name in methods:
                cells = [g["methods"].get(name) for g in groups.values()]
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        f"{format_ci(c)} / {format_ci((c or {}).get('recovered'), 2)}" for c in cells
                    )
                    + " |"
                )
            lines.append("")
    lines += [
        f"## {len(result['tasks'])} {result.get('split', '')} tasks · metric: answer NLL per token (lower is better)",
        "",
        "| method | answer NLL [95% CI] | gain vs base [95% CI] | tasks better / worse | accuracy (MC) "
        "| ROUGE-L (free text) | fraction of oracle gain [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        vs = m["vs_base"]
        cells = [
            name,
            format_ci(m.get("answer_nll", m)),
            format_ci(vs),
            f"{vs['n_tasks_better']} / {vs['n_tasks_worse']}",
            format_ci(m.get("accuracy")),
            format_ci(m.get("rougeL")),
            format_ci(m.get("frac_oracle_gain"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per task: answer NLL (lower is better)", ""]
    lines.append("| task | " + " | ".join(methods) + " |")
    lines.append("|---" * (len(methods) + 1) + "|")
    for t in result["tasks"]:
        lines.append(
            f"| {t} | " + " | ".join(f"{m['per_task'][t]['mean']:.3f}" for m in methods.values()) + " |"
        )
    for name, versus in result.get("comparisons", {}).items():
        lines += ["", f"`{name}` against each method: paired NLL gain (positive: {name} is better)", ""]
        lines += ["| vs | gain [95% CI] | outside the CI |", "|---|---|---|"]
        for other, c in versus.items():
            lines.append(f"| {other} | {format_ci(c)} | {'yes' if c['ci_low'] > 0 else 'no'} |")
    lines += [
        "",
        "CIs: 95% percentile bootstrap over evaluation examples (within each task; the task set is fixed); "
        "gains are paired (base_nll - method_nll on the same resampled examples). A task is better/worse when "
        "its own gain CI excludes 0.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: Path) -> list[Path]:
    """Grouped per-task gain bars, and the fraction of oracle gain each method recovers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods = result["tasks"], {k: v for k, v in result["methods"].items() if k != "base"}
    paths = []
    if methods:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(tasks) * max(1, len(methods)) ** 0.5 + 3), 4.5))
        width = 0.8 / len(methods)
        x = np.arange(len(tasks))
        for i, (name, m) in enumerate(methods.items()):
            cells = [m["per_task"][t]["vs_base"] for t in tasks]
            mean = np.array([c["mean"] for c in cells])
            err = np.array(
                [[c["mean"] - c["ci_low"] for c in cells], [c["ci_high"] - c["mean"] for c in cells]]
            )
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=err, label=name, capsize=1.5)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [t.removeprefix("ni_")[:28] for t in tasks], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("answer NLL gain over base (nats/token)")
        ax.set_title(f"Per-task gain over the base model ({result.get('split', '')} tasks, 95% CI)")
        ax.legend(fontsize=7, ncol=min(4, len(methods)))
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "_tasks.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    task_metric = result["metric"] == "task_metric"
    key = "recovered" if task_metric else "frac_oracle_gain"
    fractions = {k: v[key] for k, v in methods.items() if v.get(key) and k != "oracle"}
    if fractions:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.0 * len(fractions) + 1.5), 4))
        mean = np.array([f["mean"] for f in fractions.values()])
        low = np.array([f["mean"] if f["ci_low"] is None else f["ci_low"] for f in fractions.values()])
        high = np.array([f["mean"] if f["ci_high"] is None else f["ci_high"] for f in fractions.values()])
        ax.bar(list(fractions), mean, yerr=[mean - low, high - mean], capsize=3, color="tab:blue")
        ax.axhline(1, color="tab:green", linestyle="--", linewidth=1, label="oracle")
        ax.axhline(0, color="black", linewidth=0.8, label="base")
        ax.set_ylabel("fraction of oracle gain recovered")
        what = "Task-metric" if task_metric else "Answer NLL"
        ax.set_title(f"{what} gain / oracle gain ({result.get('split', '')} tasks)")
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "_oracle_gain.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if task_metric:
        every = result["methods"]
        sets = {f"all {result['n_tasks']} tasks": every}
        for group, g in (result.get("groups") or {}).items():
            sets[f"{group.replace('_', ' ')} ({g['n_tasks']})"] = g["methods"]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(every) * len(sets) + 1.5), 4.5))
        x, width = np.arange(len(every)), 0.8 / len(sets)
        for i, (label, by_method) in enumerate(sets.items()):
            cells = [by_method.get(k) or {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan} for k in every]
            mean = np.array([c["mean"] for c in cells])
            err = [mean - [c["ci_low"] for c in cells], [c["ci_high"] for c in cells] - mean]
            ax.bar(x + (i - (len(sets) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, list(every), rotation=45, ha="right")
        ax.legend(fontsize=7)
        ax.set_ylabel("task metric, mean over tasks (95% CI)")
        ax.set_title(f"{result['n_tasks']} tasks, {result['n_families_heldout']} held-out families")
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "_task_metric.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
