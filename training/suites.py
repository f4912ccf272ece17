"""Task suites and their seen/unseen split, fixed in a file before any training.

A suite is a YAML file (configs/suites/) naming where its tasks come from and the rule that splits them:
hold out whole families, and also single members of large families (chosen by a seeded hash of the task
name, so nobody picks them by hand). Seen tasks get experts and train the generator; unseen tasks are only
ever described to loramint. The split is written once to a JSON file that is committed with the suite.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from loramint.errors import TaskError
from loramint.paths import atomic_write_bytes
from loramint.tasks import Task, load_tasks, save_tasks, synthetic_suite


@dataclass
class SuiteConfig:
    """One suite; configs/suites/<name>.yaml mirrors these fields."""

    name: str
    tasks_file: Path
    """JSONL of the suite's tasks (written by `prepare_suite` when missing; not committed)."""
    split_file: Path
    """JSON with the seen/unseen task names (committed: the split is fixed before any training)."""
    source: str = "corpus"
    """`corpus` (tasks of the shipped corpus, loramint.corpus), `synthetic` (built in code) or `bigbench`
    (import `bigbench` selectors from a local BIG-bench sdist, which PyPI no longer serves)."""
    corpus_sources: list[str] = field(default_factory=list)
    """Corpus sources to take tasks from (empty: the sources the repository ships)."""
    corpus_families: list[str] = field(default_factory=list)
    """Only these corpus families (empty: all)."""
    seen_only_sources: list[str] = field(default_factory=list)
    """Sources whose tasks are never held out (e.g. procedural: held-out evaluation stays human-written)."""
    n_holdout_families: int = 0
    """Families held out whole, picked by the seeded hash among families outside `seen_only_sources`."""
    bigbench: list[str] = field(default_factory=list)
    """BIG-bench selectors, e.g. natural_instructions, sports_understanding."""
    max_examples: int = 1000
    """Examples kept per task at import (a seeded sample when a task has more)."""
    holdout_families: list[str] = field(default_factory=list)
    """Families held out whole."""
    large_family_min: int = 4
    """A family with at least this many tasks also gives up `holdout_per_large_family` members."""
    holdout_per_large_family: int = 1
    singleton_holdout_fraction: float = 0.0
    """Fraction of one-task families (e.g. BIG-bench JSON tasks) held out, by hash order."""
    seed: int = 0
    """Seed of the hash that picks held-out members."""

    def __post_init__(self) -> None:
        self.tasks_file, self.split_file = Path(self.tasks_file), Path(self.split_file)
        if self.source not in ("corpus", "bigbench", "synthetic"):
            raise ValueError(f"source must be 'corpus', 'bigbench' or 'synthetic', got {self.source!r}")
        if self.n_holdout_families < 0:
            raise ValueError(f"n_holdout_families must be >= 0, got {self.n_holdout_families}")
        if self.source == "bigbench" and not self.bigbench:
            raise ValueError("source 'bigbench' needs at least one selector in `bigbench`")
        if self.max_examples < 2 or self.large_family_min < 2 or self.holdout_per_large_family < 0:
            raise ValueError("max_examples and large_family_min must be >= 2, holdout_per_large_family >= 0")
        if not 0.0 <= self.singleton_holdout_fraction <= 1.0:
            raise ValueError(
                f"singleton_holdout_fraction must be in [0, 1], got {self.singleton_holdout_fraction}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SuiteConfig:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a suite file holds a mapping of SuiteConfig fields")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown suite field(s) {sorted(unknown)}")
        return cls(**data)


@dataclass
class Suite:
    name: str
    tasks_file: Path
    seen: list[str]
    unseen: list[str]

    def tasks(self) -> dict[str, Task]:
        by_name = {t.name: t for t in load_tasks(self.tasks_file)}
        missing = [n for n in self.seen + self.unseen if n not in by_name]
        if missing:
            raise TaskError(
                f"{self.tasks_file} lacks split tasks {missing[:5]}: re-run `loramint suite prepare`"
            )
        return by_name


def _rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def make_split(tasks: list[Task], config: SuiteConfig) -> dict:
    """The family-aware rule: {"seen": [...], "unseen": [...], "rule": {...}} (names sorted)."""
    families: dict[str, list[str]] = defaultdict(list)
    seen_only = {t.family for t in tasks if t.source in config.seen_only_sources}
    for task in tasks:
        if task.family not in seen_only:
            families[task.family].append(task.name)
    unknown = set(config.holdout_families) - set(families)
    if unknown:
        raise TaskError(
            f"holdout_families {sorted(unknown)} are not families of suite {config.name!r} that may be held out"
        )
    picked = sorted(set(families) - set(config.holdout_families), key=lambda f: _rank(f, config.seed))
    holdout = set(config.holdout_families) | set(picked[: config.n_holdout_families])
    unseen: set[str] = set()
    singletons = sorted(
        (names[0] for names in families.values() if len(names) == 1), key=lambda n: _rank(n, config.seed)
    )
    unseen.update(singletons[: round(config.singleton_holdout_fraction * len(singletons))])
    for family, names in families.items():
        if family in holdout:
            unseen.update(names)
        elif len(names) >= config.large_family_min:
            unseen.update(
                sorted(names, key=lambda n: _rank(n, config.seed))[: config.holdout_per_large_family]
            )
    seen = sorted(t.name for t in tasks if t.name not in unseen)
    if not seen:
        raise TaskError(f"suite {config.name!r}: the rule holds out every task")
    rule = {k: v for k, v in asdict(config).items() if k not in ("name", "tasks_file", "split_file")}
    return {
        "suite": config.name,
        "holdout_families": sorted(holdout),
        "seen": seen,
        "unseen": sorted(unseen),
        "rule": rule,
    }


def prepare_suite(config: SuiteConfig, force_split: bool = False) -> Suite:
    """Import the suite's tasks if needed; write the split file if absent (never silently rewrite it)."""
    if config.tasks_file.exists():
        tasks = load_tasks(config.tasks_file)
    else:
        if config.source == "synthetic":
            tasks = synthetic_suite()
        elif config.source == "corpus":
            from loramint.corpus import Corpus

            corpus = Corpus()
            sources = config.corpus_sources or [n for n, s in corpus.sources.items() if s.shipped]
            tasks = corpus.tasks(sources, config.corpus_families or None)
        else:
            from loramint.bigbench import import_tasks

            tasks = import_tasks(config.bigbench, max_examples=config.max_examples, seed=config.seed)
        save_tasks(tasks, config.tasks_file)
    split = make_split(tasks, config)
    if config.split_file.exists() and not force_split:
        fixed = json.loads(config.split_file.read_text())
        if (fixed["seen"], fixed["unseen"]) != (split["seen"], split["unseen"]):
            raise TaskError(
                f"{config.split_file} disagrees with the rule applied to {config.tasks_file}: the task set or the "
                "rule changed. The split is fixed before training; pass force_split=True only for a new study"
            )
        split = fixed
    else:
        atomic_write_bytes(config.split_file, (json.dumps(split, indent=2) + "\n").encode())
    return Suite(config.name, config.tasks_file, split["seen"], split["unseen"])


def load_suite(path: str | Path) -> Suite:
    """A prepared suite from its YAML file (tasks imported and split fixed on first use)."""
    return prepare_suite(SuiteConfig.from_yaml(path))
