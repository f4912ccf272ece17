"""Build an expert library: train one expert per task and add it with its description and metrics.

Resumable: an expert whose task and training config are unchanged (same `config_hash`) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from loramint.index import ExpertLibrary
from loramint.models import BaseModel
from loramint.paths import validate_id
from loramint.tasks import Task
from loramint.training.experts import ExpertTrainConfig, train_expert


def config_hash(task: Task, base: BaseModel, config: ExpertTrainConfig) -> str:
    """Identifies one training run: same task data, base model and hyper-parameters -> same hash."""
    body = {"task": task.to_dict(), "base": base.name, "config": asdict(config)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def expert_id(task: Task) -> str:
    return validate_id(f"expert-{task.name}"[:128], "expert id")


@dataclass
class BuildReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def build_library(
    library: ExpertLibrary, tasks: Sequence[Task], base: BaseModel, config: ExpertTrainConfig | None = None
) -> BuildReport:
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
