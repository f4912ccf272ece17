"""Build an expert library: train one expert per task and add it with its description and metrics.

Resumable: an expert whose task and training config are unchanged (same `config_hash`) is skipped.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from loramint.adapters import LoraAdapter
from loramint.index import ExpertLibrary
from loramint.models import BaseModel
from loramint.paths import atomic_write_bytes, json_digest, validate_id
from loramint.tasks import Task
from loramint.training.data import ENCODING_VERSION
from loramint.training.experts import ExpertTrainConfig, train_expert

if TYPE_CHECKING:  # evaluate imports methods, which imports this module
    from loramint.training.evaluate import ScoringConfig


def config_hash(task: Task, base: BaseModel, config: ExpertTrainConfig) -> str:
    """Identifies one training run: same task data, base model and hyper-parameters -> same hash."""
    body = {"task": task.to_dict(), "base": base.name, "config": asdict(config), "encoding": ENCODING_VERSION}
    return json_digest(body)


def expert_id(task: Task) -> str:
    return validate_id(f"expert-{task.name}"[:128], "expert id")


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def prompt_chars(task: Task) -> float:
    """Mean characters of a task's inputs: what one of its training steps or scored examples costs, roughly."""
    return sum(len(ex.input) for ex in task.examples) / len(task.examples)


def interleave_families(tasks: Sequence[Task]) -> list[Task]:
    """Tasks reordered round-robin over their families (each family's tasks in their given order), so that
    a build stopped part-way has covered as many families as it could."""
    by_family: dict[str, list[Task]] = {}
    for task in tasks:
        by_family.setdefault(task.family, []).append(task)
    queues = list(by_family.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def quality_card(base: BaseModel, task: Task, adapter: LoraAdapter, scoring: ScoringConfig) -> dict:
    """Base vs expert on the task's evaluation (test) split: the task's own metric and the answer NLL, with
    the paired 95% bootstrap CI of the metric's gain. `beats_base`: that CI lies above 0."""
    import numpy as np

    from loramint.training.evaluate import cached_score, lowest_layer
    from loramint.training.methods import Intervention
    from loramint.training.metrics import bootstrap_ci

    longest = max(len(base.tokenizer(ex.output)["input_ids"]) for ex in task.examples)
    # the expert's likelihood pass reuses the base pass's states below the expert's lowest layer
    scoring = replace(
        scoring, max_new_tokens=min(scoring.max_new_tokens, longest + 2), split_layer=lowest_layer(adapter)
    )
    started = time.perf_counter()
    before = cached_score(base, task, Intervention(), scoring)
    after = cached_score(base, task, Intervention(mixture=[(adapter, 1.0)]), scoring)
    b, a = before.values[task.metric], after.values[task.metric]  # [n] per example
    gain = bootstrap_ci(a - b, scoring.n_bootstrap, scoring.seed)
    return {
        "metric": task.metric,
        "n": len(b),
        "base": round(float(np.mean(b)), 4),
        "expert": round(float(np.mean(a)), 4),
        "gain": round(gain["mean"], 4),
        "gain_ci": [round(gain["ci_low"], 4), round(gain["ci_high"], 4)],
        "nll_base": round(float(np.mean(before.values["answer_nll"])), 4),
        "nll_expert": round(float(np.mean(after.values["answer_nll"])), 4),
        "beats_base": gain["ci_low"] > 0,
        "seconds": round(time.perf_counter() - started, 2),
    }


def build_library(
    library: ExpertLibrary,
    tasks: Sequence[Task],
    base: BaseModel,
    config: ExpertTrainConfig | None = None,
    cards: ScoringConfig | None = None,
) -> BuildReport:
    """Train and add an expert per task, skipping those already built with the same task and config.

    `cards` (a ScoringConfig): give each expert a quality card (`quality_card`) in its metrics; an expert
    that does not beat the base model gets `retrievable: false` and retrieval leaves it out. An interrupted
    build loses at most the expert in progress (each is added whole, after its card)."""
    config = config or ExpertTrainConfig()
    report = BuildReport()
    started = time.perf_counter()
    with tqdm(total=len(tasks), desc="experts", unit="expert") as overall:
        for task in tasks:
            eid, chash = expert_id(task), config_hash(task, base, config)
            if eid in library and library.get(eid).metrics.get("config_hash") == chash:
                report.skipped.append(eid)
                overall.update()
                continue
            t0 = time.perf_counter()
            adapter, metrics = train_expert(base, task, config)
            metrics["config_hash"] = chash
            if cards is not None:
                metrics["quality"] = quality_card(base, task, adapter, cards)
                metrics["retrievable"] = metrics["quality"]["beats_base"]
            library.add(
                adapter,
                id=eid,
                name=task.name,
                description=task.description,
                family=task.family,
                metrics=metrics,
                overwrite=True,
            )
            report.trained.append(eid)
            report.seconds[eid] = round(time.perf_counter() - t0, 2)
            overall.update()
    report.wall_s = round(time.perf_counter() - started, 2)
    return report


def write_report(
    path: str | Path, report: BuildReport, library: ExpertLibrary, base: BaseModel, config: ExpertTrainConfig
) -> dict:
    """Write one build's JSON report: sizes and times of this run, and each expert's held-out answer NLL.

    `wall_s` and `per_expert_s` time this run only (experts trained now, skipped ones cost ~0); each expert's
    own `train_seconds` / `wall_seconds` are as recorded when it was trained.
    """
    import numpy as np

    from loramint.sysinfo import machine
    from loramint.training.metrics import bootstrap_ci

    ids = report.trained + report.skipped
    experts = {}
    for eid in ids:
        m = library.get(eid).metrics
        experts[eid] = {
            "family": library.get(eid).family,
            "answer_nll_before": m["answer_nll_before"],
            "answer_nll_after": m["answer_nll_after"],
            "train_seconds": m["train_seconds"],
            "wall_seconds": m["wall_seconds"],
            "trained_now": eid in report.seconds,
            **{k: m[k] for k in ("steps_run", "best_step", "converged", "val_curve", "quality") if k in m},
        }
        if "answer_nll_before_examples" in m:  # paired per-example gains: before - after (> 0 is better)
            gain = np.subtract(m["answer_nll_before_examples"], m["answer_nll_after_examples"])
            experts[eid]["gain_ci"] = {k: round(v, 4) for k, v in bootstrap_ci(gain).items()}
    gains = [e["answer_nll_before"] - e["answer_nll_after"] for e in experts.values()]
    with_ci = [e for e in experts.values() if "gain_ci" in e]
    summary = library_summary(library, ids)  # across resumed runs, from what each expert recorded
    trained = list(report.seconds.values())
    result = {
        "n_experts": len(ids),
        "n_trained": len(report.trained),
        "n_skipped": len(report.skipped),
        "wall_s": report.wall_s,
        "per_expert_s": round(statistics.fmean(trained), 2) if trained else None,
        "per_expert_s_max": max(trained) if trained else None,
        # across resumed runs: every expert's own recorded training wall time (library adds not included)
        "experts_wall_s_sum": round(sum(e["wall_seconds"] for e in experts.values()), 2),
        "base_model": base.name,
        "config": asdict(config),
        "held_out_metric": f"answer NLL per token on the first {config.n_metric_eval} evaluation examples",
        "mean_nll_gain": round(statistics.fmean(gains), 4) if gains else None,
        "n_improved": sum(g > 0 for g in gains),
        "n_improved_significantly": sum(e["gain_ci"]["ci_low"] > 0 for e in with_ci),
        "n_worse_significantly": sum(e["gain_ci"]["ci_high"] < 0 for e in with_ci),
        "significance": "paired 95% bootstrap CI of the per-example NLL gain over the metric examples excludes 0",
        **{k: summary[k] for k in ("experts_per_hour", "families", "converged", "with_quality_card")},
        "beats_base": summary["beat_base"],
        "experts": experts,
        "machine": machine(),
    }
    atomic_write_bytes(Path(path), (json.dumps(result, indent=2) + "\n").encode())
    return result


def library_summary(library: ExpertLibrary, ids: Sequence[str] | None = None) -> dict:
    """What a built library holds (or its experts `ids`), from what each expert recorded when it was
    trained: how many experts and families, how many stopped by early stopping (`converged`), how many beat
    the base model on their task (`retrievable`, from the quality cards), and the build rate over the
    recorded training and card times (across resumed runs)."""
    experts = library.list() if ids is None else [library.get(i) for i in ids]
    metrics = [e.metrics for e in experts]
    each = [m.get("wall_seconds", 0.0) + m.get("quality", {}).get("seconds", 0.0) for m in metrics]
    spent = sum(each)
    families: dict[str, int] = {}
    for e in experts:
        families[e.family] = families.get(e.family, 0) + 1
    steps = [m["steps_run"] for m in metrics if "steps_run" in m]
    carded = [m["quality"] for m in metrics if "quality" in m]
    by_metric: dict[str, dict[str, int]] = {}
    for q in carded:
        row = by_metric.setdefault(q["metric"], {"experts": 0, "beat_base": 0})
        row["experts"] += 1
        row["beat_base"] += bool(q["beats_base"])
    n = len(experts)
    converged = sum(bool(m.get("converged")) for m in metrics)
    return {
        "experts": n,
        "families": len(families),
        "converged": converged,
        "converged_fraction": round(converged / n, 4) if n else None,
        "with_quality_card": len(carded),
        "beat_base": sum(bool(q["beats_base"]) for q in carded),
        "retrievable": sum(m.get("retrievable", True) is not False for m in metrics),
        "experts_per_hour": round(3600 * n / spent, 2) if spent else None,
        "experts_per_hour_typical": round(3600 / statistics.median(each), 2) if spent else None,
        "hours": round(spent / 3600, 2),
        "steps": {"median": statistics.median(steps), "max": max(steps)} if steps else None,
        "by_metric": by_metric,
        "per_family": dict(sorted(families.items())),
        "definitions": {
            "converged": "training stopped because the validation answer loss stopped improving (early "
            "stopping), not at the step limit",
            "beat_base": "the quality card's paired 95% bootstrap CI of expert minus base on the task's test "
            "split, in the task's metric, lies above 0; only those experts are retrieved",
            "experts_per_hour": "experts over the sum of their recorded training and quality-card seconds "
            "(wall time: it includes whatever else the machine ran meanwhile)",
            "experts_per_hour_typical": "3600 over the median expert's training and quality-card seconds",
        },
    }
