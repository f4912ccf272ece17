"""One result table from the cached per-example scores of several evaluation runs.

The harness keeps every (task, intervention)'s per-example scores in its score cache
(`ScoringConfig.cache_dir`), keyed by the task, the adapters' contents, the instruction, the base model and
the scoring settings. Runs of the same tasks with the same scoring settings score the same evaluation
examples with the same code, so their methods can share one table, with paired intervals and the fraction
of the oracle's gain, exactly as if one run had scored them all: `assemble` rebuilds that table from the
cache entries each run's result names (`score_key` per task), and checks that the runs agree (same tasks,
metric, split, base model and scoring settings, and identical `base` scores).

Results written before `score_key` was recorded are matched by value: the one cache entry of that task whose
per-example answer NLLs have exactly the mean and count the result reports (several entries with identical
values are the same scores). Anything missing or ambiguous is an error naming the run, method and task.

    loramint eval-assemble --results '[benchmarks/results/eval_unseen.json, benchmarks/results/eval-x/eval_unseen.json]'
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loramint.errors import LoramintError
from loramint.training.evaluate import METRIC, ScoringConfig, TaskScores, summarize, write_report

AGREE = ("max_length", "batch_size", "n_generate", "max_new_tokens", "max_examples")
"""Scoring settings that decide the scores: every assembled run must have the same."""
MEAN_TOLERANCE = 1e-9
"""How far a cache entry's mean NLL may be from the mean its run reported (both are the same floats)."""


def same_mean(values: np.ndarray, mean: float) -> bool:
    """Whether per-example `values` have the reported `mean` (to MEAN_TOLERANCE, relative above 1)."""
    return abs(float(values.mean()) - mean) <= MEAN_TOLERANCE * max(1.0, abs(mean))


class AssembleError(LoramintError):
    """The runs cannot share one table (they disagree, or a score is missing from the cache)."""


def load_run(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AssembleError(f"no evaluation result at {path}")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AssembleError(f"{path} is not a JSON evaluation result: {err}") from None
    if not isinstance(run, dict) or not {"metric", "tasks", "methods", "config"} <= set(run):
        raise AssembleError(f"{path} is not an evaluation result (`loramint eval` writes eval_<split>.json)")
    return run


def check_agreement(runs: dict[Path, dict[str, Any]]) -> None:
    """Every run scored the same tasks with the same metric, split, base model and scoring settings."""
    (first_path, first), *others = runs.items()

    def facts(run: dict[str, Any]) -> dict[str, Any]:
        scoring = run["config"].get("scoring", {})
        return {
            "metric": run["metric"],
            "split": run.get("split"),
            "tasks": run["tasks"],
            "base_model": run["config"].get("base_model"),
            **{f"scoring.{k}": scoring.get(k) for k in AGREE},
        }

    want = facts(first)
    for path, run in others:
        if differ := [k for k, v in facts(run).items() if v != want[k]]:
            raise AssembleError(
                f"{path} and {first_path} differ in {differ}: only runs of the same tasks and scoring "
                "settings can share a table"
            )


def cache_entries(cache_dir: Path, task: str) -> list[Path]:
    pattern = re.compile(re.escape(task) + r"-[0-9a-f]{16}\.json")
    return sorted(p for p in cache_dir.glob(f"{task}-*.json") if pattern.fullmatch(p.name))


def find_scores(cache_dir: Path, path: Path, method: str, task: str, entry: dict[str, Any]) -> TaskScores:
    """The cached scores behind one cell of a run: by its `score_key`, else by value (older results)."""
    where = f"{path}: {method} on {task}"
    if entry.get("score_key"):
        file = cache_dir / f"{task}-{entry['score_key']}.json"
        if not file.is_file():
            raise AssembleError(f"{where}: its cache entry {file} is missing")
        candidates = [file]
    else:
        candidates = cache_entries(cache_dir, task)
    matches = []
    for file in candidates:
        try:
            scores = TaskScores.from_dict(json.loads(file.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise AssembleError(f"{where}: unreadable cache entry {file}: {err}") from None
        values = scores.values.get(METRIC)
        if values is not None and len(values) == entry["n_examples"] and same_mean(values, entry["mean"]):
            matches.append((file, scores))
    if not matches:
        how = (
            "its cache entry holds other scores"
            if entry.get("score_key")
            else "no cache entry has its scores"
        )
        raise AssembleError(f"{where}: {how} (cache {cache_dir})")
    file, scores = matches[0]
    if any(not np.array_equal(s.values[METRIC], scores.values[METRIC]) for _, s in matches[1:]):
        raise AssembleError(
            f"{where}: {len(matches)} cache entries match its mean with different scores: "
            f"{[f.name for f, _ in matches][:4]}"
        )
    scores.key = file.name.removeprefix(f"{task}-").removesuffix(".json")
    scores.info, scores.seconds = entry.get("info", {}), entry.get("seconds", {})
    return scores


def assemble(
    results: Sequence[str | Path],
    methods: Sequence[str] | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """One result dict (and `<out>/eval_<split>.json|.md|_*.png`) with `methods` (default: every method of
    the runs, in order of appearance) taken from the first run in `results` that has each. `cache_dir`: the
    score cache (default: the one each run recorded)."""
    if not results:
        raise AssembleError("name at least one evaluation result to assemble")
    runs = {Path(p): load_run(p) for p in results}
    check_agreement(runs)
    available: dict[str, Path] = {}
    for path, run in runs.items():
        for name in run["methods"]:
            available.setdefault(name, path)
    names = list(dict.fromkeys(["base", *(methods or available)]))
    if missing := [m for m in names if m not in available]:
        raise AssembleError(f"methods {missing} are in none of {[str(p) for p in runs]}")
    first = next(iter(runs.values()))
    tasks = first["tasks"]

    caches = {}
    for path in dict.fromkeys(available[name] for name in names):  # the runs that supply a method
        folder = cache_dir or runs[path]["config"].get("scoring", {}).get("cache_dir")
        if not folder or not Path(folder).is_dir():
            raise AssembleError(f"{path}: its score cache {folder!r} is not here (pass cache_dir)")
        caches[path] = Path(folder)
    raw = {
        name: {
            task: find_scores(
                caches[available[name]],
                available[name],
                name,
                task,
                runs[available[name]]["methods"][name]["per_task"][task],
            )
            for task in tasks
        }
        for name in names
    }
    for path, run in runs.items():  # the same evaluation examples: every run's base scored alike
        if "base" in run["methods"]:
            for task in tasks:
                mean, base = (
                    run["methods"]["base"]["per_task"][task]["mean"],
                    raw["base"][task].values[METRIC],
                )
                if not same_mean(base, mean):
                    raise AssembleError(
                        f"{path}: base scored {task} at {mean}, another run at {base.mean()}: "
                        "not the same evaluation examples"
                    )
    scoring = first["config"].get("scoring", {})
    config = ScoringConfig(n_bootstrap=scoring.get("n_bootstrap", 1000), seed=scoring.get("seed", 0))
    result = summarize(raw, tasks, config)
    result["split"] = first.get("split")
    result["machine"] = {str(p): run.get("machine") for p, run in runs.items()}
    result["config"] = {
        **first["config"],
        "methods": names,
        "assembled_from": {name: str(available[name]) for name in names},
        "run_configs": {str(p): run["config"] for p, run in runs.items()},
    }
    if out is not None:
        write_report(result, Path(out), result["split"] or "assembled")
    return result
