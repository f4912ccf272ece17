"""Which BIG-bench JSON tasks join the ni-family suite: those where a LoRA measurably helps SmolLM2.

For each candidate: train one expert with the default training config (the one the library uses) on the
task's training split, then score base and expert on the task's evaluation split exactly like the harness
(`loramint eval`: answer NLL, multiple-choice accuracy; <= 200 held-out examples, never trained on).
A candidate passes when the paired 95% bootstrap interval of the gain on its headline metric excludes 0:
accuracy for multiple-choice tasks (a lower NLL from merely learning the answer format is not "helps"),
answer NLL for free-text tasks. Screening happens before the split is drawn; the split rule hashes names,
so passing the screen does not decide whether a task is seen or unseen.

    python benchmarks/screen_bigbench.py [--tasks a b ...]

Writes benchmarks/results/screen_bigbench.json; passing tasks go into configs/suites/ni-family.yaml by hand
(with the date of the screen), which is what fixes the suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict

from common import RESULTS, machine, markdown_table, write_result

from loramint.bigbench import import_tasks
from loramint.models import load_base_model
from loramint.training.config import ExpertTrainConfig
from loramint.training.evaluate import ScoringConfig, score_task
from loramint.training.experts import train_expert
from loramint.training.methods import Intervention
from loramint.training.metrics import bootstrap_ci

CANDIDATES = [
    "sports_understanding",
    "navigate",
    "strategyqa",
    "winowhy",
    "epistemic_reasoning",
    "implicatures",
    "metaphor_boolean",
    "logical_deduction/three_objects",
    "presuppositions_as_nli",
    "date_understanding",
    "timedial",
    "intent_recognition",
    "temporal_sequences",
    "disambiguation_qa",
    "goal_step_wikihow/goal_inference",
    "hyperbaton",
]


def screen(base, name: str, config: ExpertTrainConfig, scoring: ScoringConfig, max_examples: int) -> dict:
    task = import_tasks(name, max_examples=max_examples)[0]
    started = time.perf_counter()
    adapter, metrics = train_expert(base, task, config)
    before = score_task(base, task, Intervention(), scoring).values
    after = score_task(base, task, Intervention(mixture=[(adapter, 1.0)]), scoring).values
    headline = "accuracy" if task.is_multiple_choice else "answer_nll"
    sign = 1.0 if headline == "accuracy" else -1.0  # gain > 0 means the expert is better
    row = {
        "task": task.name,
        "bigbench": name,
        "kind": "multiple_choice" if task.is_multiple_choice else "free_text",
        "n_examples": len(task.examples),
        "n_eval": len(before["answer_nll"]),
        "headline": headline,
    }
    for metric in before:
        gain = (
            sign * (after[metric] - before[metric]) if metric == headline else after[metric] - before[metric]
        )
        row[metric] = {
            "base": round(float(before[metric].mean()), 4),
            "expert": round(float(after[metric].mean()), 4),
            "gain_ci": {k: round(v, 4) for k, v in bootstrap_ci(gain, scoring.n_bootstrap).items()}
            if metric == headline
            else None,
        }
    row["passes"] = row[headline]["gain_ci"]["ci_low"] > 0
    row["train_s"], row["wall_s"] = metrics["train_seconds"], round(time.perf_counter() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=CANDIDATES)
    parser.add_argument("--max-examples", type=int, default=1000, help="as in the suite (max_examples)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    base = load_base_model("smollm2-135m")
    config, scoring = ExpertTrainConfig(), ScoringConfig(n_generate=0)
    path = RESULTS / "screen_bigbench.json"
    # earlier screens' rows are kept (a candidate screened again replaces its row); written after each task
    rows = {r["task"]: r for r in json.loads(path.read_text())["tasks"]} if path.is_file() else {}
    for name in args.tasks:
        row = screen(base, name, config, scoring, args.max_examples)
        rows[row["task"]] = row
        print(row, flush=True)
        result = {
            "rule": "paired 95% bootstrap CI of the expert's gain over base on the headline metric excludes 0 "
            "(accuracy for multiple choice, answer NLL per token for free text), on the evaluation split",
            "passed": [r["task"] for r in rows.values() if r["passes"]],
            "tasks": list(rows.values()),
            "train_config": asdict(config),
            "machine": machine(),
        }
        write_result("screen_bigbench", result)
    table = [
        {
            "task": r["task"],
            "headline": r["headline"],
            "base": r[r["headline"]]["base"],
            "expert": r[r["headline"]]["expert"],
            "gain CI": f"[{r[r['headline']]['gain_ci']['ci_low']:.3f}, {r[r['headline']]['gain_ci']['ci_high']:.3f}]",
            "passes": r["passes"],
        }
        for r in rows.values()
    ]
    print(markdown_table(table))
    print(f"passed {len(result['passed'])} of {len(rows)}:", result["passed"])


if __name__ == "__main__":
    main()
