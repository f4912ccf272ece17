"""The shipped task corpus (loramint.corpus), its sources (loramint.sources, loramint.procedural) and
`loramint data`."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from loramint import corpus as corpus_mod
from loramint import sources
from loramint.cli import main
from loramint.corpus import Corpus, add_user_tasks, build_source, export_task, finalize, split_sizes
from loramint.errors import NotFoundError, TaskError
from loramint.paths import sha256_file
from loramint.procedural import procedural_tasks
from loramint.tasks import SPLITS, Example, Task, save_tasks

ROOT = Path(__file__).resolve().parents[1] / "corpus"


@pytest.fixture(scope="module")
def shipped() -> Corpus:
    return Corpus(ROOT, user_file=Path("/nonexistent/user.jsonl.gz"))


@pytest.fixture
def user_corpus(tmp_path, monkeypatch) -> Corpus:
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path / "cache"))
    return Corpus(ROOT, user_file=tmp_path / "user.jsonl.gz")


def _task(name: str, n: int = 10, family: str = "mine") -> Task:
    return Task(
        name, "Say the word twice.", family, [Example(f"w{i}", target=f"w{i} w{i}") for i in range(n)]
    )


# ------------------------------------------------------------------------------------------ the shipped one


def test_shipped_corpus_is_broad_and_verified(shipped):
    summary = shipped.summary()
    shipped_sources = [s for s in summary["sources"] if s["shipped"]]
    assert {s["name"] for s in shipped_sources} == {"openai-evals", "procedural"}
    assert sum(s["tasks"] for s in shipped_sources) >= 300
    families = {t.family for s in shipped_sources for t in shipped.load(s["name"])}
    assert len(families) >= 20
    assert all(s["license"] for s in summary["sources"])
    assert sum(s["bytes"] for s in shipped_sources) <= 40e6


def test_every_shipped_task_has_splits_license_and_fits(shipped):
    for name in ("openai-evals", "procedural"):
        for task in shipped.load(name):
            assert task.license and task.source == name
            assert set(task.splits) == set(SPLITS) and task.splits["test"] >= 6 and task.splits["train"] >= 8
            inputs = [ex.input for ex in task.examples]
            assert len(set(inputs)) == len(inputs), task.name  # no input in two splits
            assert len(task.examples) <= shipped.max_examples
            if task.is_multiple_choice:  # constant-answer tasks were dropped
                answers = [ex.answer for ex in task.examples]
                assert max(answers.count(a) for a in set(answers)) <= 0.8 * len(answers), task.name


def test_a_changed_file_is_refused(tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(ROOT, root)
    path = root / "procedural.jsonl.gz"
    data = gzip.decompress(path.read_bytes()).replace(b"Reverse the word.", b"Reverse the word!")
    path.write_bytes(gzip.compress(data))
    with pytest.raises(TaskError, match="does not match the manifest"):
        Corpus(root).load("procedural")


def test_procedural_source_rebuilds_byte_for_byte(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    shutil.copy(ROOT / "manifest.json", root / "manifest.json")
    entry = build_source("procedural", root=root)
    assert entry.sha256 == sha256_file(ROOT / "procedural.jsonl.gz")
    assert json.loads((root / "manifest.json").read_text()) == json.loads(
        (ROOT / "manifest.json").read_text()
    )


def test_filters(shipped):
    colors = shipped.tasks(["openai-evals"], families=["colors"])
    assert colors and {t.family for t in colors} == {"colors"}
    assert shipped.task("proc.sort_words").family == "proc_word_lists"
    with pytest.raises(NotFoundError, match="no corpus task"):
        shipped.task("no.such.task")
    with pytest.raises(NotFoundError, match="unknown corpus source"):
        shipped.load("nope")
    with pytest.raises(NotFoundError, match="no corpus family"):
        shipped.tasks(["procedural"], families=["colors"])


def test_unbuilt_source_says_how_to_build_it(tmp_path, monkeypatch, shipped):
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path))
    assert "bbh" not in Corpus(ROOT, user_file=tmp_path / "u.gz").available()
    with pytest.raises(NotFoundError, match="loramint data build bbh --input"):
        Corpus(ROOT).load("bbh")


# -------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("n", "expected"),
    [(20, (8, 2, 10)), (108, (43, 11, 54)), (300, (170, 30, 100)), (500, (300, 50, 150))],
)
def test_split_rule(n, expected):
    sizes = split_sizes(n)
    assert (sizes["train"], sizes["val"], sizes["test"]) == expected


def test_finalize_is_seeded_and_keeps_every_example():
    task = _task("t", n=40)
    a, b = finalize(task), finalize(task)
    assert a.to_dict() == b.to_dict()
    assert sorted(ex.input for ex in a.examples) == sorted(ex.input for ex in task.examples)
    assert [ex.input for ex in a.part("test")] != [ex.input for ex in finalize(task, seed=1).part("test")]
    capped = finalize(task, max_examples=25)
    assert len(capped.examples) == 25 and sum(capped.splits.values()) == 25


def test_task_splits_are_validated():
    examples = [Example(f"x{i}", target="y") for i in range(5)]
    with pytest.raises(TaskError, match="add up to 4"):
        Task("t", "d", "f", examples, splits={"train": 2, "val": 1, "test": 1})
    with pytest.raises(TaskError, match="splits must map"):
        Task("t", "d", "f", examples, splits={"train": 5})
    with pytest.raises(TaskError, match="at least one train and one test"):
        Task("t", "d", "f", examples, splits={"train": 5, "val": 0, "test": 0})
    task = Task("t", "d", "f", examples, splits={"train": 3, "val": 1, "test": 1})
    assert [ex.input for ex in task.part("val")] == ["x3"] and task.part("test")[0].input == "x4"
    assert Task.from_dict(task.to_dict()).splits == task.splits
    with pytest.raises(TaskError, match="no fixed splits"):
        Task("u", "d", "f", examples).part("train")


def test_eval_split_uses_the_fixed_splits():
    from loramint.training.data import eval_split

    task = finalize(_task("t", n=30))
    train, test = eval_split(task)
    assert train == task.part("train") and test == task.part("test")


# ------------------------------------------------------------------------------------------ user tasks


def test_add_user_tasks_validates_splits_and_persists(user_corpus):
    added = add_user_tasks([_task("mine.twice", n=30)], user_corpus)
    assert added[0].splits == split_sizes(30)
    again = Corpus(ROOT, user_file=user_corpus.user_file)
    assert "user" in again.available() and again.task("mine.twice").splits == split_sizes(30)
    before = user_corpus.user_file.read_bytes()
    with pytest.raises(TaskError, match="already in the corpus"):
        add_user_tasks([_task("mine.other"), _task("proc.sort_words")], again)
    with pytest.raises(TaskError, match="at least 3"):
        add_user_tasks([_task("mine.tiny", n=2)], again)
    assert user_corpus.user_file.read_bytes() == before  # nothing stored on error


def test_export_examples(shipped):
    task = shipped.task("proc.add")
    rows = [json.loads(line) for line in export_task(task).splitlines()]
    assert len(rows) == len(task.examples) and [r["split"] for r in rows].count("test") == task.splits["test"]
    test_only = [json.loads(line) for line in export_task(task, "test").splitlines()]
    assert [r["input"] for r in test_only] == [ex.input for ex in task.part("test")]


# ----------------------------------------------------------------------------------------------- CLI


def test_data_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAMINT_USER_TASKS", str(tmp_path / "user.jsonl.gz"))
    assert main(["data", "sources"]) == 0
    assert "openai-evals" in capsys.readouterr().out
    assert main(["data", "show", "proc.sort_words", "--n", "1"]) == 0
    assert "Sort the given words" in capsys.readouterr().out
    out = tmp_path / "tasks.jsonl"
    assert main(["data", "export", "proc.add,proc.even_odd", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2
    mine = tmp_path / "mine.jsonl"
    save_tasks([_task("mine.cli", n=12)], mine)
    assert main(["data", "add", str(mine)]) == 0
    assert "added mine.cli" in capsys.readouterr().out
    assert main(["data", "tasks", "--source", "user"]) == 0
    assert "mine.cli" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "description": "d", "family": "f", "examples": [{"input": "a"}]}\n')
    assert main(["data", "add", str(bad)]) == 2
    assert "line 1" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- importers


def _fake_evals_wheel(path: Path, evals: dict[str, tuple[str, list[dict]]], license_extra: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("evals-0.dist-info/LICENSE.md", "MIT License\n" + license_extra)
        for name, (kind, rows) in evals.items():
            spec = {
                name: {"id": f"{name}.dev.v0", "description": f"Test the model's ability to do {name}."},
                f"{name}.dev.v0": {"class": f"evals.elsuite.basic.x:{kind}", "args": {"samples_jsonl": f"{name}/s.jsonl"}},
            }  # fmt: skip
            wheel.writestr(f"evals/registry/evals/{name}.yaml", json.dumps(spec))
            wheel.writestr(f"evals/registry/data/{name}/s.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(system: str, user: str, ideal) -> dict:
    return {
        "input": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "ideal": ideal,
    }


def test_openai_evals_importer(tmp_path):
    labels = ["yes", "no"] * 15
    evals = {
        "echo": ("Match", [_chat("Repeat the word.", f"w{i}", [f"w{i}", f"W{i}"]) for i in range(25)]),
        "yesno": ("Includes", [_chat("Answer yes or no.", f"q{i}", lab) for i, lab in enumerate(labels)]),
        "constant": ("Match", [_chat("Say yes.", f"q{i}", "yes" if i else "no") for i in range(30)]),
        "tiny": ("Match", [_chat("Too few.", f"q{i}", "a") for i in range(5)]),
        "generic": (
            "FuzzyMatch",
            [_chat("You are a helpful assistant.", f"q{i}", f"a{i}") for i in range(25)],
        ),
        "licensed": ("Match", [_chat("Other license.", f"q{i}", f"a{i}") for i in range(25)]),
        "modelgraded": ("ModelBasedClassify", [_chat("x", f"q{i}", "a") for i in range(25)]),
    }
    wheel = _fake_evals_wheel(tmp_path / "e.whl", evals, "- **Location**: evals/registry/data/licensed\n")
    tasks, report = sources.openai_evals_tasks(wheel)
    by_name = {t.name: t for t in tasks}
    assert set(by_name) == {"evals.echo", "evals.yesno", "evals.generic"}
    echo = by_name["evals.echo"]
    assert echo.description == "Repeat the word." and echo.metric == "exact_match"
    assert echo.examples[0].targets == ["w0", "W0"] and echo.descriptions == ["Do echo."]
    yesno = by_name["evals.yesno"]
    assert yesno.is_multiple_choice and yesno.examples[0].choices == ["no", "yes"]
    generic = by_name["evals.generic"]  # a generic system prompt is no instruction: the summary is
    assert generic.description == "Do generic." and generic.metric == "rougeL"
    assert report["skipped"] == {
        "one label answers over 80% of examples": 1,
        "fewer than 20 usable examples": 1,
        "data under a license of its own": 1,
        "not a basic match/includes/fuzzy-match eval": 1,
    }


def test_bbh_importer(tmp_path):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    rows = [{"input": f"Is {i} even?", "target": "yes" if i % 2 == 0 else "no"} for i in range(30)]
    (tmp_path / "bbh" / "parity_three_objects.json").write_text(json.dumps({"examples": rows}))
    (tmp_path / "cot-prompts" / "parity_three_objects.txt").write_text(
        "BENCHMARK DATA SHOULD NEVER APPEAR. canary GUID x\n-----\nDecide whether numbers are even.\n\nQ: ..."
    )
    (task,) = sources.bbh_tasks(tmp_path)
    assert task.name == "bbh.parity_three_objects" and task.family == "bbh_parity"
    assert task.description == "Decide whether numbers are even." and len(task.examples) == 30
    with pytest.raises(TaskError, match="no bbh"):
        sources.bbh_tasks(tmp_path / "cot-prompts")


def test_procedural_tasks_are_exact_and_seeded():
    tasks = procedural_tasks(n_examples=50)
    assert [t.to_dict() for t in tasks] == [t.to_dict() for t in procedural_tasks(n_examples=50)]
    by_name = {t.name: t for t in tasks}
    for ex in by_name["proc.add"].examples:
        a, b = ex.input.split(" + ")
        assert int(ex.target) == int(a) + int(b)
    for ex in by_name["proc.sort_words"].examples:
        assert ex.target.split() == sorted(ex.input.split())
    assert all(t.descriptions and len(t.descriptions) == 2 for t in tasks)


@pytest.mark.e2e
def test_openai_evals_source_rebuilds_from_pypi(tmp_path, monkeypatch):
    """The shipped openai-evals file is exactly what the pinned wheel from PyPI converts to."""
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    shutil.copy(ROOT / "manifest.json", root / "manifest.json")
    entry = build_source("openai-evals", root=root)
    assert entry.sha256 == sha256_file(ROOT / "openai-evals.jsonl.gz")


def test_gzip_files_have_no_timestamp(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    digest = corpus_mod.write_tasks_gz([_task("a", 5)], path)
    assert io.BytesIO(path.read_bytes()).read()[4:8] == b"\0\0\0\0" and digest == sha256_file(path)
