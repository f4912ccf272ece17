"""Out-of-domain requests: how often a minted adapter is worse than the base model, and what confidence says.

For tasks the generator's library does not cover, each task's own description is minted with the default
generator and scored against the base model on the task's test split in the task's metric (paired 95%
bootstrap CI of the difference). A result is "worse than base" when that CI lies below 0. Each mint's
confidence (`Minter.provenance`: the best similarity between the request and a library expert's
description) is recorded next to it, so a fallback threshold can be read off the table: below it, returning
no adapter would have been the safe answer.

    python benchmarks/ood.py [--generator data/generator/ni-family] [--n-tasks 24] [--max-examples 60]

Tasks: the corpus's multiple-choice tasks of human-written sources (base accuracy is above 0, so a harmful
adapter shows), smallest prompts first, one per family before a second. Writes benchmarks/results/ood.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import machine, markdown_table, write_result

from loramint.corpus import Corpus
from loramint.gen.minter import Minter
from loramint.models import load_base_model
from loramint.paths import cache_dir
from loramint.training.build import interleave_families, prompt_chars
from loramint.training.evaluate import ScoringConfig, cached_score
from loramint.training.methods import Intervention
from loramint.training.metrics import bootstrap_ci


def pick_tasks(corpus: Corpus, n: int, min_test: int) -> list:
    tasks = [
        t
        for t in corpus.tasks([s for s, e in corpus.sources.items() if e.shipped and s != "procedural"])
        if t.metric == "accuracy" and t.splits["test"] >= min_test
    ]
    tasks.sort(key=prompt_chars)
    return interleave_families(tasks)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generator", default="data/generator/ni-family")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--n-tasks", type=int, default=24)
    parser.add_argument("--max-examples", type=int, default=60, help="test examples scored per task")
    parser.add_argument("--out", default="ood")
    args = parser.parse_args()

    base = load_base_model(args.base_model)
    minter = Minter.from_pretrained(args.generator)
    scoring = ScoringConfig(
        max_examples=args.max_examples, batch_size=8, cache_dir=cache_dir("scores", "ood")
    )
    tasks = pick_tasks(Corpus(), args.n_tasks, min_test=30)
    rows, hashes = [], {}
    for task in tasks:
        started = time.perf_counter()
        adapter = minter.mint(task.description)
        (drawn,) = minter.provenance([task.description])
        before = cached_score(base, task, Intervention(), scoring, hashes)
        after = cached_score(base, task, Intervention(mixture=[(adapter, 1.0)]), scoring, hashes)
        diff = bootstrap_ci(after.values["accuracy"] - before.values["accuracy"])
        rows.append({
            "task": task.name,
            "family": task.family,
            "n": int(len(before.values["accuracy"])),
            "confidence": drawn["confidence"],
            "nearest": drawn["experts"][0]["id"],
            "base": round(float(np.mean(before.values["accuracy"])), 4),
            "minted": round(float(np.mean(after.values["accuracy"])), 4),
            "diff": [round(diff["mean"], 4), round(diff["ci_low"], 4), round(diff["ci_high"], 4)],
            "worse_than_base": diff["ci_high"] < 0,
            "better_than_base": diff["ci_low"] > 0,
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(rows[-1], flush=True)
    worse = [r for r in rows if r["worse_than_base"]]
    result = {
        "n": len(rows),
        "worse_than_base": len(worse),
        "better_than_base": sum(r["better_than_base"] for r in rows),
        "max_confidence_of_a_worse_result": max((r["confidence"] for r in worse), default=None),
        "definition": "minted from the task's own description vs base on the task's test split (accuracy); "
        "worse/better: the paired 95% bootstrap CI of the difference lies below/above 0",
        "generator": args.generator,
        "scoring": {"max_examples": args.max_examples},
        "tasks": rows,
        "machine": machine(),
    }
    path = write_result(args.out, result)
    print(
        markdown_table(
            [{k: r[k] for k in ("task", "confidence", "base", "minted", "worse_than_base")} for r in rows]
        )
    )
    print(f"{len(worse)} of {len(rows)} worse than base, {result['better_than_base']} better -> {path}")


if __name__ == "__main__":
    main()
