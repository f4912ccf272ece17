"""Out-of-domain requests: how often a mint is worse than the base model, without and with the fallback.

For tasks the generator's library does not cover, each task's own description, with `--shots` solved
examples from the task's training split (as a user would send them), is minted with a generator and scored
against the base model on the task's test split in the task's metric (paired 95% bootstrap CI of the
difference). A result is "worse than base" when that CI lies below 0. Two results per task:

- `minted`: the adapter as minted;
- `served`: what the service answers (`loramint.fallback`, the service's default policy): the adapter, or the
  base model when its check on the solved examples (answer likelihood and greedy answers against the base
  model's) fails or nothing in the library is near. `worse_than_base` counts the served results.

Each mint's confidence (`Minter.provenance`) and check are recorded next to it.

    python benchmarks/ood.py [--generator data/generator/corpus] [--n-tasks 24] [--max-examples 60]
    python benchmarks/ood.py --generator data/generator/corpus --suite configs/suites/corpus.yaml

Tasks, smallest prompts first, one per family before a second: without `--suite`, the corpus's multiple-
choice tasks of human-written sources (for a generator whose library holds none of them; base accuracy is
above 0, so a harmful adapter shows); with `--suite`, the held-out tasks of the suite's held-out families
(families with no seen task: the generator and its library never saw them), in each task's own metric.
Writes benchmarks/results/ood.json (`--out`). Resumable and shardable: each task's row is cached under the
user cache (keyed by the generator's files, the base model, the task and the settings), so a run goes on where
the last one stopped, and one process per core fills the cache before a plain run writes the result:

    for i in 0 1; do OMP_NUM_THREADS=1 python benchmarks/ood.py --suite ... --shard $i/2 & done; wait
    python benchmarks/ood.py --suite ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
from common import machine, markdown_table, write_result

from loramint.adapters import apply_lora
from loramint.corpus import Corpus
from loramint.fallback import FallbackPolicy, check_examples, decide, solved_task
from loramint.gen.minter import Minter
from loramint.models import load_base_model
from loramint.paths import DEFAULT_GENERATOR, atomic_write_bytes, cache_dir, json_digest, sha256_file
from loramint.service.config import ServiceConfig
from loramint.training.build import interleave_families, prompt_chars
from loramint.training.data import answer_logprob_sums
from loramint.training.evaluate import ScoringConfig, cached_score, generate_answers
from loramint.training.methods import Intervention
from loramint.training.metrics import bootstrap_ci
from loramint.training.suites import load_suite


def pick_tasks(n: int, min_test: int, suite: str | None = None) -> list:
    if suite is None:
        corpus = Corpus()
        sources = [s for s, e in corpus.sources.items() if e.shipped and s != "procedural"]
        tasks = [t for t in corpus.tasks(sources) if t.metric == "accuracy"]
    else:
        fixed = load_suite(suite)
        by_name = fixed.tasks()
        seen_families = {by_name[name].family for name in fixed.seen}
        tasks = [by_name[name] for name in fixed.unseen if by_name[name].family not in seen_families]
    tasks = sorted((t for t in tasks if t.splits["test"] >= min_test), key=prompt_chars)
    return interleave_families(tasks)[:n]


def solved_pairs(task, n: int) -> list[tuple[str, str]]:
    """The first `n` training examples as a user would send them: what the model reads, and the answer."""
    return [(task.prompt(ex), ex.output) for ex in task.part("train")[:n]]


ROWS_VERSION = 1
"""Bump when a row's computation changes: cached rows of an older version are not reused."""


def generator_digest(path: str) -> str:
    """Over a generator checkpoint's files (names and sha256s): a changed bank or model is a new key."""
    files = sorted(f for f in Path(path).rglob("*") if f.is_file())
    return json_digest([[str(f.relative_to(path)), sha256_file(f)] for f in files])


def row_file(key: dict) -> Path:
    return cache_dir("ood-rows") / f"{json_digest(key)}.json"


def compare(before: np.ndarray, after: np.ndarray) -> dict:
    diff = bootstrap_ci(after - before)
    return {
        "score": round(float(np.mean(after)), 4),
        "diff": [round(diff["mean"], 4), round(diff["ci_low"], 4), round(diff["ci_high"], 4)],
        "worse_than_base": diff["ci_high"] < 0,
        "better_than_base": diff["ci_low"] > 0,
    }


def scorer(base, adapter):
    """The check's scorer on a plain model: each row's mean answer NLL, with the adapter applied or not
    (what the service's runtime computes in one mixed pass)."""

    def score(items, minted):
        out = np.zeros(len(items))
        for flag in (False, True):
            rows = [i for i, m in enumerate(minted) if m == flag]
            if rows:
                with apply_lora(base.model, adapter) if flag else contextlib.nullcontext():
                    sums, counts = answer_logprob_sums(base.model, [items[i] for i in rows], base.pad_id)
                out[rows] = -sums / np.maximum(counts, 1)
        return out

    return score


def answerer(base, adapter):
    """The check's greedy answers on a plain model, with the adapter applied or not (what the service's
    runtime generates in one mixed pass)."""

    def answer(prompts, minted, limits):
        task = solved_task("answer", [(p, "-") for p in prompts])  # only the inputs are read
        out = []
        for example, flag, limit in zip(task.examples, minted, limits, strict=True):
            with apply_lora(base.model, adapter) if flag else contextlib.nullcontext():
                out += generate_answers(base, task, [example], limit, max_length=2048)
        return out

    return answer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generator", default=DEFAULT_GENERATOR)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--n-tasks", type=int, default=24)
    parser.add_argument("--max-examples", type=int, default=60, help="test examples scored per task")
    parser.add_argument("--shots", type=int, default=5, help="solved examples sent with each description")
    parser.add_argument("--suite", default=None, help="take the held-out families of this suite")
    parser.add_argument("--out", default="ood")
    parser.add_argument(
        "--shard", default=None, help="i/n: score only every n-th task from the i-th (cached)"
    )
    args = parser.parse_args()

    defaults = ServiceConfig()
    policy = FallbackPolicy(defaults.fallback_min_confidence, defaults.fallback_min_gain)
    base = load_base_model(args.base_model)
    minter = Minter.from_pretrained(args.generator)
    scoring = ScoringConfig(
        max_examples=args.max_examples, batch_size=8, cache_dir=cache_dir("scores", "ood")
    )
    tasks = pick_tasks(args.n_tasks, min_test=30, suite=args.suite)
    shard, shards = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    if not 0 <= shard < shards:
        parser.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    settings = {
        "generator": generator_digest(args.generator),
        "base": base.name,
        "policy": [policy.min_confidence, policy.min_gain],
        "shots": args.shots,
        "max_examples": args.max_examples,
        "version": ROWS_VERSION,
    }
    rows = []
    for i, task in enumerate(tasks):
        if i % shards != shard:
            continue
        cached = row_file({**settings, "task": task.to_dict()})
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        started = time.perf_counter()
        pairs = solved_pairs(task, args.shots)
        texts = [f"{i}\n{o}" for i, o in pairs]
        adapter = minter.mint(task.description, texts).compact()  # as the service serves it
        (drawn,) = minter.provenance([task.description], [texts])

        check = check_examples(
            base.tokenizer, scorer(base, adapter), task.description, pairs, answer=answerer(base, adapter)
        )
        decision = decide(policy, drawn["confidence"], check)
        metric = task.metric
        before = cached_score(base, task, Intervention(), scoring).values[metric]
        after = cached_score(base, task, Intervention(mixture=[(adapter, 1.0)]), scoring)
        minted = compare(before, after.values[metric])
        served = compare(before, before if decision.fell_back else after.values[metric])
        rows.append({
            "task": task.name,
            "family": task.family,
            "metric": metric,
            "n": int(len(before)),
            "confidence": drawn["confidence"],
            "nearest": drawn["experts"][0]["id"],
            "check": check.as_dict(),
            "fell_back": decision.fell_back,
            "base": round(float(np.mean(before)), 4),
            "minted": minted,
            "served": served,
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        atomic_write_bytes(cached, json.dumps(rows[-1]).encode())
        print(rows[-1], flush=True)
    if args.shard:
        print(f"shard {args.shard}: {len(rows)} tasks cached; run without --shard for the result")
        return
    result = {
        "n": len(rows),
        "worse_than_base": sum(r["served"]["worse_than_base"] for r in rows),
        "better_than_base": sum(r["served"]["better_than_base"] for r in rows),
        "fell_back": sum(r["fell_back"] for r in rows),
        "minted_worse_than_base": sum(r["minted"]["worse_than_base"] for r in rows),
        "minted_better_than_base": sum(r["minted"]["better_than_base"] for r in rows),
        "policy": {"min_confidence": policy.min_confidence, "min_gain": policy.min_gain},
        "definition": "each task's description with its solved examples minted and scored against the base "
        "model on the task's test split in its own metric; worse/better: the paired 95% bootstrap CI of the "
        "difference lies below/above 0; `served` is the service's answer with the fallback, `minted` the "
        "adapter as minted",
        "generator": args.generator,
        "tasks_from": f"held-out families of {args.suite}" if args.suite else "human-written corpus MC tasks",
        "scoring": {"max_examples": args.max_examples, "shots": args.shots},
        "tasks": rows,
        "machine": machine(),
    }
    path = write_result(args.out, result)
    table = [
        {
            "task": r["task"],
            "confidence": r["confidence"],
            "check gain": r["check"]["gain"],
            "base": r["base"],
            "metric": r["metric"],
            "minted": r["minted"]["score"],
            "served": r["served"]["score"],
            "fell back": r["fell_back"],
        }
        for r in rows
    ]
    print(markdown_table(table))
    print(
        f"served: {result['worse_than_base']} of {len(rows)} worse than base ({result['fell_back']} fell back); "
        f"as minted: {result['minted_worse_than_base']} worse -> {path}"
    )


if __name__ == "__main__":
    main()
