"""Expert training on CPU: what each speed-up buys, and held-out quality of the default vs plain PEFT.

1. Speed (`stages`): per-step time of the same expert (same task, examples, seed) on the plain PEFT path and
   with one speed-up more per row: answer-only logits, length buckets, LoRA on the upper layers only, and
   the frozen lower layers' activations cached; plus 1 vs 2 intra-op threads and torch.compile.
2. Quality (`quality`): on corpus tasks of different families, the held-out answer NLL
   (evaluation split, full prompts up to 384 tokens, never trained on) of base, plain PEFT with the
   previous default (15 steps, lr 1e-3: ~90 s per expert), the new default and its alternatives, with
   each run's training time.

    python benchmarks/bench_train.py [--quick]

Writes benchmarks/results/bench_train.json. Runs ~25 min on a 2-core CPU (--quick: ~8 min).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from dataclasses import asdict, replace

import torch
from common import machine, markdown_table, write_result

from loramint.adapters import apply_lora
from loramint.corpus import Corpus
from loramint.models import load_base_model
from loramint.training.config import ExpertTrainConfig
from loramint.training.data import answer_nll, eval_split
from loramint.training.experts import train_expert

TIMING_TASK = "evals.abstract-causal-reasoning-text"  # long prompts: every example fills max_length
QUALITY_TASKS = ["evals.anagrams", "evals.bias_detection", "proc.sort_words"]


def load() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def stages(default: ExpertTrainConfig, steps: int) -> list[tuple[str, ExpertTrainConfig]]:
    """Plain PEFT, then one speed-up more per row (same steps, examples and learning rate throughout)."""
    plain = replace(default.reference(), steps=steps, train_examples=0)
    answer_only = replace(plain, answer_only_logits=True)
    bucketed = replace(answer_only, length_buckets=True)
    top = replace(bucketed, trained_layers=15)
    cached = replace(top, cache_lower=True)
    return [
        ("plain PEFT (logits everywhere)", plain),
        ("+ answer-only logits", answer_only),
        ("+ length buckets", bucketed),
        ("+ LoRA on the top 15 of 30 layers", top),
        ("+ lower 15 layers cached", cached),
    ]


def timed(base, task, config: ExpertTrainConfig) -> dict:
    before = load()
    _, m = train_expert(base, task, config)
    return {
        "per_step_s": round((m["train_seconds"] - m["cache_seconds"]) / config.steps, 3),
        "cache_s": m["cache_seconds"],
        "train_s": m["train_seconds"],
        "loadavg": [before, load()],
    }


def speed(base, default: ExpertTrainConfig, steps: int) -> tuple[list[dict], list[dict]]:
    task = Corpus().task(TIMING_TASK)
    rows = [{"stage": name, **timed(base, task, config)} for name, config in stages(default, steps)]
    for r in rows:
        r["step_speedup"] = round(rows[0]["per_step_s"] / r["per_step_s"], 2)
        print(r, flush=True)
    threads, initial = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            threads.append({"threads": n, **timed(base, task, replace(default, steps=steps))})
            print(threads[-1], flush=True)
    finally:
        torch.set_num_threads(initial)
    return rows, threads


def held_out(base, task, examples, adapter=None) -> float:
    with apply_lora(base.model, adapter) if adapter is not None else contextlib.nullcontext():
        return round(answer_nll(base.model, base.tokenizer, task, examples, max_length=384), 4)


def candidates(default: ExpertTrainConfig) -> list[tuple[str, ExpertTrainConfig]]:
    plain = replace(default.reference(), steps=15, lr=1e-3, train_examples=0)
    return [
        ("plain PEFT, 15 steps, lr 1e-3 (previous default)", plain),
        ("fast path, same run as plain", replace(plain, answer_only_logits=True, length_buckets=True)),
        ("default", default),
        (
            "top 15 layers, 64 examples cached, 15 steps, lr 2e-3",
            replace(default, trained_layers=15, cache_lower=True, train_examples=64, steps=15),
        ),
    ]


def quality(base, default: ExpertTrainConfig, names: list[str], n_eval: int) -> list[dict]:
    rows = []
    for task in Corpus().tasks(names=names):
        examples = eval_split(task)[1][:n_eval]
        row = {"task": task.name, "eval_examples": len(examples), "base": held_out(base, task, examples)}
        for name, config in candidates(default):
            adapter, m = train_expert(base, task, config)
            row[name] = {"nll": held_out(base, task, examples, adapter), "train_s": m["train_seconds"]}
        row["loadavg"] = load()
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-eval", type=int, default=48)
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one quality task")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    default = ExpertTrainConfig()
    base = load_base_model("smollm2-135m")
    started = time.perf_counter()
    stage_rows, thread_rows = speed(base, default, args.timing_steps)
    quality_rows = quality(base, default, QUALITY_TASKS[:1] if args.quick else QUALITY_TASKS, args.n_eval)
    result = {
        "base_model": "smollm2-135m",
        "default_config": asdict(default),
        "timing_task": TIMING_TASK,
        "stages": stage_rows,
        "threads": thread_rows,
        "quality": quality_rows,
        "quality_metric": "held-out answer NLL per token (lower is better), eval split, max_length 384",
        "bench_seconds": round(time.perf_counter() - started),
        "machine": machine(),
    }
    write_result("bench_train", result)
    print(markdown_table(stage_rows))
    print(markdown_table(thread_rows))
    names = [name for name, _ in candidates(default)]
    print(
        markdown_table(
            [
                {
                    "task": r["task"],
                    "base": r["base"],
                    **{n: f"{r[n]['nll']} ({r[n]['train_s']:.0f} s)" for n in names},
                }
                for r in quality_rows
            ]
        )
    )


if __name__ == "__main__":
    main()
