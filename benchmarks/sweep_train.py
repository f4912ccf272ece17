"""The sweep that chose the default expert training config (run once on 2026-11-23, 2-core CPU).

Five configs per task on three natural-instructions tasks of different families: held-out answer NLL per
token (first 48 evaluation examples, max_length 384) and training seconds. `benchmarks/bench_train.py`
is the maintained benchmark; this file keeps the exact code behind results/sweep_train.json.

    python benchmarks/sweep_train.py      # ~17 min; prints one JSON row per task
"""

import json
import logging
import warnings
from dataclasses import replace

from loramint.adapters import apply_lora
from loramint.models import load_base_model
from loramint.tasks import load_tasks
from loramint.training.config import ExpertTrainConfig
from loramint.training.data import answer_nll, eval_split
from loramint.training.experts import train_expert

TASKS = [
    "ni_subtask024_cosmosqa_answer_generation",
    "ni_subtask040_qasc_question_generation",
    "ni_subtask019_mctaco_temporal_reasoning_category",
]


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    base = load_base_model("smollm2-135m")
    tasks = {t.name: t for t in load_tasks("data/tasks/ni-family.jsonl")}
    fast = ExpertTrainConfig(steps=15, lr=1e-3, n_metric_eval=8)
    configs = [
        ("A plain s15 lr1e-3", fast.reference()),
        ("B fast-all s15 lr1e-3", replace(fast, trained_layers=0)),
        ("C top15 cache ex64 s15 lr2e-3", replace(fast, trained_layers=15, train_examples=64, lr=2e-3)),
        ("D fast-all s10 lr2e-3", replace(fast, trained_layers=0, steps=10, lr=2e-3)),
        ("E top15 s15 lr2e-3", replace(fast, trained_layers=15, lr=2e-3)),
    ]
    for name in TASKS:
        task = tasks[name]
        examples = eval_split(task)[1][:48]
        row = {
            "task": name,
            "base": round(answer_nll(base.model, base.tokenizer, task, examples, max_length=384), 4),
        }
        for label, config in configs:
            adapter, m = train_expert(base, task, config)
            with apply_lora(base.model, adapter):
                nll = answer_nll(base.model, base.tokenizer, task, examples, max_length=384)
            row[label] = (
                round(nll, 4),
                m["train_seconds"],
                m["wall_seconds"],
            )  # (held-out NLL, train s, wall s)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
