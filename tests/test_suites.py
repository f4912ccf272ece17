"""loramint.training.suites: the family-aware split rule, fixed in a file before training."""

from __future__ import annotations

import json

import pytest

from loramint.errors import TaskError
from loramint.tasks import Example, Task, synthetic_suite
from loramint.training.suites import Suite, SuiteConfig, make_split, prepare_suite


def _task(name: str, family: str) -> Task:
    return Task(name=name, description=f"do {name}", family=family, examples=[Example(input="x", target="y")])


FAMILIES = {"big": 6, "mid": 4, "small": 2, "whole": 3, "one_a": 1, "one_b": 1, "one_c": 1, "one_d": 1}
TASKS = [_task(f"{fam}_{i}", fam) for fam, n in FAMILIES.items() for i in range(n)]


def _config(tmp_path, **overrides) -> SuiteConfig:
    fields = dict(
        name="t",
        source="synthetic",
        tasks_file=tmp_path / "tasks.jsonl",
        split_file=tmp_path / "split.json",
        holdout_families=["whole"],
        large_family_min=4,
        holdout_per_large_family=1,
        singleton_holdout_fraction=0.5,
    )
    return SuiteConfig(**{**fields, **overrides})


def test_rule_holds_out_whole_families_large_family_members_and_singletons(tmp_path):
    split = make_split(TASKS, _config(tmp_path))
    unseen = set(split["unseen"])
    assert {"whole_0", "whole_1", "whole_2"} <= unseen
    for fam in ("big", "mid"):
        assert sum(n.startswith(fam) for n in unseen) == 1
    assert not any(n.startswith("small") for n in unseen)
    assert sum(n.startswith("one_") for n in unseen) == 2
    assert set(split["seen"]) | unseen == {t.name for t in TASKS} and not set(split["seen"]) & unseen
    assert make_split(list(reversed(TASKS)), _config(tmp_path)) == split, "order of tasks must not matter"
    assert make_split(TASKS, _config(tmp_path, seed=1))["unseen"] != split["unseen"]


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(holdout_families=["nope"]), TaskError, "not families"),
        (dict(holdout_families=list(FAMILIES)), TaskError, "every task"),
        (dict(singleton_holdout_fraction=2.0), ValueError, "singleton_holdout_fraction"),
        (dict(source="web"), ValueError, "source"),
    ],
)
def test_bad_rules_are_clear_errors(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        make_split(TASKS, _config(tmp_path, **overrides))


def test_split_file_is_written_once_and_then_enforced(tmp_path):
    config = _config(tmp_path, holdout_families=["copy"], singleton_holdout_fraction=0.0)
    suite = prepare_suite(config)
    assert isinstance(suite, Suite) and set(suite.unseen) == {"copy_repeat", "copy_reverse"}
    assert set(suite.tasks()) == {t.name for t in synthetic_suite()}
    fixed = json.loads(config.split_file.read_text())
    assert prepare_suite(config).seen == fixed["seen"]
    changed = _config(tmp_path, holdout_families=["arith"], singleton_holdout_fraction=0.0)
    with pytest.raises(TaskError, match="disagrees"):
        prepare_suite(changed)
    assert json.loads(config.split_file.read_text()) == fixed, "a rejected rule must not touch the split"


def test_committed_splits_match_their_rules():
    """configs/suites/*.split.json are what the rule gives (checked offline for the synthetic suite)."""
    from pathlib import Path

    config = SuiteConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs/suites/tiny.yaml")
    fixed = json.loads(config.split_file.read_text())
    assert make_split(synthetic_suite(), config)["unseen"] == fixed["unseen"]


def test_hashed_whole_families_and_seen_only_sources(tmp_path):
    tasks = TASKS + [
        Task(
            name=f"gen_{i}",
            description="d",
            family="generated",
            examples=[Example("x", target="y")],
            source="proc",
        )
        for i in range(5)
    ]
    config = _config(tmp_path, holdout_families=[], n_holdout_families=2, seen_only_sources=["proc"])
    split = make_split(tasks, config)
    assert len(split["holdout_families"]) == 2 and "generated" not in split["holdout_families"]
    assert not any(name.startswith("gen_") for name in split["unseen"])  # never held out, though large
    for family in split["holdout_families"]:
        assert {t.name for t in tasks if t.family == family} <= set(split["unseen"])
    assert make_split(tasks, config) == split  # picked by hash, not by chance


def test_default_corpus_suite_matches_its_committed_split(tmp_path):
    config = SuiteConfig.from_yaml("configs/suites/corpus.yaml")
    config.tasks_file = tmp_path / "corpus.jsonl"
    suite = prepare_suite(config)  # raises if the rule applied to the shipped corpus disagrees with the file
    fixed = json.loads(config.split_file.read_text())
    assert len(fixed["holdout_families"]) == 4 and len(suite.unseen) >= 30
    tasks = suite.tasks()
    assert all(tasks[name].source != "procedural" for name in suite.unseen)
