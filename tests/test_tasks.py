"""Tests for loramint.tasks (the Task spec, JSONL files, synthetic suite) and loramint.bigbench (importer)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from loramint import bigbench, paths
from loramint.errors import InvalidIdError, NotFoundError, TaskError
from loramint.paths import sha256_file
from loramint.tasks import Example, Task, load_tasks, save_tasks, synthetic_suite


def free_task(name: str = "t", **kwargs) -> Task:
    fields = {"description": "Answer.", "family": "fam", "examples": [Example("q", target="a")]} | kwargs
    return Task(name=name, **fields)


# ------------------------------------------------------------------------------------------------ Example

BAD_EXAMPLES = [
    ({"input": "", "target": "a"}, "input must be a non-empty string"),
    ({"input": "   ", "target": "a"}, "input must be a non-empty string"),
    ({"input": 3, "target": "a"}, "input must be a non-empty string"),
    ({"input": "q"}, "neither a target nor choices"),
    ({"input": "q", "target": "a", "choices": ["a", "b"], "answer": 0}, "both a target and choices"),
    ({"input": "q", "target": ""}, "target must be a non-empty string"),
    ({"input": "q", "targets": ["a", ""]}, "targets must be non-empty strings"),
    ({"input": "q", "target": "a", "targets": ["b", "a"]}, "must be the first of its targets"),
    ({"input": "q", "choices": ["a", "b"]}, "no answer index"),
    ({"input": "q", "answer": 0}, "at least 2 choices, got 0"),
    ({"input": "q", "choices": ["a"], "answer": 0}, "at least 2 choices, got 1"),
    ({"input": "q", "choices": ["a", ""], "answer": 0}, "choices must be non-empty strings"),
    ({"input": "q", "choices": ["a", "b", "a"], "answer": 0}, "'a' appears more than once"),
    ({"input": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
    ({"input": "q", "choices": ["a", "b"], "answer": -1}, "answer -1 is out of range"),
    ({"input": "q", "choices": ["a", "b"], "answer": True}, "answer must be an integer"),
    ({"input": "q", "choices": ["a", "b"], "answer": "0"}, "answer must be an integer"),
]


@pytest.mark.parametrize(("kwargs", "problem"), BAD_EXAMPLES)
def test_example_rejects(kwargs, problem):
    with pytest.raises(TaskError, match=problem):
        Example(**kwargs)


def test_example_fills_target_and_targets():
    assert Example("q", target="a").targets == ["a"]
    both = Example("q", targets=["a", "b"])
    assert both.target == "a"
    assert both.output == "a"
    choice = Example("q", choices=["x", "y"], answer=1)
    assert choice.is_multiple_choice
    assert choice.output == "y"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"input": "q", "target": "a", "label": 1}, "unknown keys \\['label'\\]"),
        ({"target": "a"}, "no 'input'"),
        ({"input": "q", "choices": "ab", "answer": 0}, "choices must be a list"),
        (["q", "a"], "must be a JSON object"),
    ],
)
def test_example_from_dict_rejects(data, problem):
    with pytest.raises(TaskError, match=problem):
        Example.from_dict(data)


# --------------------------------------------------------------------------------------------------- Task

MC = [Example("q", choices=["a", "b"], answer=0)]
BAD_TASKS = [
    ({"name": "../x"}, InvalidIdError, "invalid task name"),
    ({"name": ""}, InvalidIdError, "invalid task name"),
    ({"description": " "}, TaskError, "description must be a non-empty string"),
    ({"family": ""}, InvalidIdError, "invalid family"),
    ({"examples": []}, TaskError, "has no examples"),
    ({"examples": [{"input": "q", "target": "a"}]}, TaskError, "expected an Example, got dict"),
    ({"examples": [Example("q", target="a"), *MC]}, TaskError, "mixes free-text and multiple-choice"),
    ({"metric": "bleu"}, TaskError, "unknown metric 'bleu'"),
    ({"metric": "accuracy"}, TaskError, "metric 'accuracy' does not fit free text"),
    ({"metric": "rougeL", "examples": MC}, TaskError, "metric 'rougeL' does not fit multiple choice"),
    ({"descriptions": ["ok", ""]}, TaskError, "descriptions must be a list of non-empty strings"),
    ({"source": ""}, TaskError, "source must be a non-empty string"),
    ({"prefix": None}, TaskError, "prefix must be a string"),
]


@pytest.mark.parametrize(("kwargs", "error", "problem"), BAD_TASKS)
def test_task_rejects(kwargs, error, problem):
    with pytest.raises(error, match=problem):
        free_task(**kwargs)


@pytest.mark.parametrize(
    ("examples", "metric", "expected"),
    [
        ([Example("q", target="a")], "", "rougeL"),
        ([Example("q", target="a")], "exact_match", "exact_match"),
        (MC, "", "accuracy"),
    ],
)
def test_task_metric(examples, metric, expected):
    task = free_task(examples=examples, metric=metric)
    assert task.metric == expected
    assert task.is_multiple_choice == (expected == "accuracy")


def test_prompt_is_prefix_input_output_prefix_and_never_the_description():
    task = free_task(description="SECRET", prefix="Q: ", output_prefix="\nA: ")
    assert task.prompt(task.examples[0]) == "Q: q\nA: "


# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete():
    task = synthetic_suite(n_examples=50)[0]
    train, held = task.split(12, seed=3)
    assert (train, held) == task.split(12, seed=3)
    assert len(held) == 12 and len(train) == 38
    ids_train, ids_held = {id(e) for e in train}, {id(e) for e in held}
    assert not ids_train & ids_held
    assert ids_train | ids_held == {id(e) for e in task.examples}
    assert task.split(12, seed=4)[1] != held
    order = [task.examples.index(e) for e in held]
    assert order == sorted(order)  # both halves keep the file order


@pytest.mark.parametrize("n_eval", [-1, 51, True, 1.5])
def test_split_rejects_bad_sizes(n_eval):
    task = synthetic_suite(n_examples=50)[0]
    with pytest.raises(TaskError, match="cannot hold out"):
        task.split(n_eval)


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip_is_exact(tmp_path):
    odd = free_task(
        "odd.name-1",
        description="Übersetze\nmit Zeilenumbruch",
        examples=[Example('line\u2028sep\r\n"quoted"', targets=["x", "y"]), Example("ü", target="z")],
        descriptions=["alt"],
        prefix="\nQ: ",
        output_prefix=" ->",
        metric="exact_match",
        source="user",
    )
    tasks = [*synthetic_suite(n_examples=8), odd]
    path = tmp_path / "tasks.jsonl"
    save_tasks(tasks, path)
    assert load_tasks(path) == tasks
    assert len(path.read_text(encoding="utf-8").split("\n")) == len(tasks) + 1  # one line each, final newline
    assert [Task.from_dict(t.to_dict()) for t in tasks] == tasks


def test_save_rejects_duplicate_names(tmp_path):
    with pytest.raises(TaskError, match="'t' appears more than once"):
        save_tasks([free_task(), free_task()], tmp_path / "x.jsonl")


GOOD_LINE = json.dumps(free_task("first").to_dict())


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"name": "x", ', "line 3: invalid JSON"),
        ("[1, 2]", "line 3: a task must be a JSON object"),
        ('{"name": "x", "description": "d", "family": "f"}', "line 3: task 'x' lacks examples"),
        (
            '{"name": "x", "description": "d", "family": "f", "examples": [{"input": "q"}]}',
            "line 3: task 'x', example 0: .*neither a target nor choices",
        ),
        (
            '{"name": "x", "description": "d", "family": "f", "examples": [], "colour": 1}',
            "line 3: task 'x' has unknown keys \\['colour'\\]",
        ),
        ('{"name": "../x", "description": "d", "family": "f", "examples": []}', "line 3: invalid task name"),
        (GOOD_LINE, "line 3: task 'first' already defined on line 1"),
    ],
)
def test_load_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(TaskError, match=f"tasks.jsonl, {problem}"):
        load_tasks(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_tasks(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_suite_is_deterministic_and_valid():
    suite = synthetic_suite()
    assert suite == synthetic_suite()
    assert suite != synthetic_suite(seed=1)
    assert len(suite) == 6
    families = {}
    for task in suite:
        families.setdefault(task.family, []).append(task.name)
        assert len(task.examples) == 64
        assert len({e.input for e in task.examples}) == 64  # no input repeats within a task
        assert task.source == "synthetic" and task.descriptions
    assert {f: len(names) for f, names in families.items()} == {"copy": 2, "arith": 2, "classify": 2}
    assert [len(t.examples) for t in synthetic_suite(n_examples=300)] == [300] * 6


def test_synthetic_suite_answers_are_right():
    tasks = {t.name: t for t in synthetic_suite()}
    for e in tasks["copy_repeat"].examples:
        assert e.target == f"{e.input} {e.input}"
    for e in tasks["copy_reverse"].examples:
        assert e.target == e.input[::-1]
    for e in tasks["arith_add"].examples:
        a, b = map(int, e.input.split())
        assert int(e.target) == a + b
    for e in tasks["arith_double"].examples:
        assert int(e.target) == 2 * int(e.input)
    for e in tasks["classify_parity"].examples:
        assert e.output == ("even" if int(e.input) % 2 == 0 else "odd")
    labels = {e.output for e in tasks["classify_fruit_animal"].examples}
    assert labels == {"fruit", "animal"}
    assert all(e.input[0].isalpha() for e in tasks["classify_fruit_animal"].examples)


# ------------------------------------------------------------------------------------- BIG-bench importer

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
NI_DEF = (
    "Definition: In this task we ask you to write answer to a question that involves event duration.  "
    "Things to Avoid: - Emphasis/Caution: Keep it short.   Prompt: Write an answer to the given question."
)
FAKE_TASKS = {
    "natural_instructions": {"name": "natural_instructions", "description": "61 tasks"},
    "natural_instructions/subtask004_mctaco_answer_generation_event_duration": {
        "name": "subtask004_mctaco_answer_generation_event_duration",
        "description": NI_DEF.split("Prompt:")[0],
        "task_prefix": NI_DEF,
        "examples": [
            {"input": "Sentence: He slept.\nQuestion: How long?", "target": ["8 hours.", "all night."]},
            {"input": "Sentence: She ran.\nQuestion: How long?", "target": "an hour."},
            {"input": "Sentence: Empty.", "target": []},
        ],
    },
    "natural_instructions/subtask046_miscellaenous_question_typing": {
        "name": "subtask046_miscellaenous_question_typing",
        "task_prefix": "Definition: Label the question type. Prompt: Type it.",
        "examples": [{"input": "Who?", "target": ["person"]}],
    },
    "sports_understanding": {
        "name": "sports_understanding",
        "description": "Determine whether a sentence relating to sports is plausible",
        "task_prefix": "Determine whether the following statement is plausible:",
        "example_input_prefix": "\nStatement: ",
        "example_output_prefix": "\nPlausible/implausible? ",
        "preferred_score": "multiple_choice_grade",
        "examples": [
            {"input": "Messi scored a goal", "target_scores": {"plausible": 1, "implausible": 0}},
            {"input": "Messi threw a touchdown", "target_scores": {"plausible": 0, "implausible": 1}},
            {"input": "Nobody is right", "target_scores": {"plausible": 0, "implausible": 0}},
            {"input": "How many?", "target_scores": {"2": 0, "3": 1, "three": 1, "4": 0}},
        ],
    },
    "arithmetic": {"name": "arithmetic", "description": "Perform arithmetic"},
    "arithmetic/2_digit_multiplication": {
        "name": "2_digit_multiplication",
        "description": "2-digit multiplication.",
        "preferred_score": "exact_str_match",
        "examples": [
            {"input": f"What is {a} times 3?", "target": str(3 * a), "target_scores": {str(3 * a): 1, "0": 0}}
            for a in range(10, 20)
        ],
    },
}


def make_sdist(path: Path, tasks: dict = FAKE_TASKS, extra: dict[str, bytes] | None = None) -> Path:
    """A small stand-in for bigbench-1.0.0.tar.gz with the real member layout."""
    members = {f"{ROOT}/{name}/task.json": json.dumps(data).encode() for name, data in tasks.items()}
    members |= {
        "bigbench-1.0.0/PKG-INFO": b"Name: bigbench\n",
        f"{ROOT}/simple_arithmetic/task.py": b"# programmatic\n",
        f"{ROOT}/../evil/task.json": json.dumps(FAKE_TASKS["sports_understanding"]).encode(),
        f"{ROOT}/a/b/c/task.json": b"{}",
    } | (extra or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(f"{ROOT}/linked/task.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "sdist").mkdir()
    path = make_sdist(tmp_path / "sdist" / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv(bigbench.SDIST_ENV, str(path))
    return path


def count_tar_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        opened.append(str(args or kwargs))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(bigbench.tarfile, "open", spy)
    return opened


def test_import_natural_instructions(sdist):
    tasks = bigbench.import_tasks("natural_instructions")
    assert [t.name for t in tasks] == [
        "ni_subtask004_mctaco_answer_generation_event_duration",
        "ni_subtask046_miscellaenous_question_typing",
    ]
    mctaco, misc = tasks
    assert (mctaco.family, misc.family) == ("mctaco", "misc")
    assert mctaco.source == "bigbench:natural_instructions/subtask004_mctaco_answer_generation_event_duration"
    assert mctaco.metric == "rougeL"
    assert len(mctaco.examples) == 2  # the example without a target is skipped
    assert mctaco.examples[0].targets == ["8 hours.", "all night."]
    assert mctaco.examples[0].target == "8 hours."
    assert mctaco.description == (
        "In this task we ask you to write answer to a question that involves event duration."
    )
    assert mctaco.descriptions == ["Write an answer to the given question.", NI_DEF]
    assert all(mctaco.description not in mctaco.prompt(e) for e in mctaco.examples)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("subtask004", ["ni_subtask004_mctaco_answer_generation_event_duration"]),
        ("subtask046_miscellaenous_question_typing", ["ni_subtask046_miscellaenous_question_typing"]),
        ("ni_subtask046_miscellaenous_question_typing", ["ni_subtask046_miscellaenous_question_typing"]),
        ("natural_instructions/subtask004_mctaco_answer_generation_event_duration", ["ni_subtask004_mctaco_answer_generation_event_duration"]),
        ("arithmetic", ["arithmetic.2_digit_multiplication"]),
        ("arithmetic.2_digit_multiplication", ["arithmetic.2_digit_multiplication"]),
        (["sports_understanding", "sports_understanding", "subtask004"], ["sports_understanding", "ni_subtask004_mctaco_answer_generation_event_duration"]),
    ],
)  # fmt: skip
def test_selectors(sdist, selector, expected):
    assert [t.name for t in bigbench.import_tasks(selector)] == expected


def test_json_multiple_choice_task(sdist):
    (task,) = bigbench.import_tasks(["sports_understanding"])
    assert task.is_multiple_choice and task.metric == "accuracy" and task.family == "sports_understanding"
    assert len(task.examples) == 3  # the one with no positive score is skipped
    assert [(e.choices, e.answer) for e in task.examples] == [
        (["plausible", "implausible"], 0),
        (["plausible", "implausible"], 1),
        (["2", "3", "4"], 1),  # "three" tied with the answer "3": dropped so one choice is right
    ]
    assert task.prefix == "Statement: " and task.output_prefix == "\nPlausible/implausible? "
    assert task.description == "Determine whether a sentence relating to sports is plausible"
    assert task.descriptions == ["Determine whether the following statement is plausible:"]
    assert task.prompt(task.examples[0]) == "Statement: Messi scored a goal\nPlausible/implausible? "


def test_json_task_with_targets_and_scores_follows_preferred_metric(sdist):
    (task,) = bigbench.import_tasks("arithmetic/2_digit_multiplication")
    assert not task.is_multiple_choice and task.metric == "exact_match"
    assert task.examples[0].target == "30"
    assert (task.prefix, task.output_prefix) == ("Q: ", "\nA: ")  # BIG-bench's defaults
    assert task.family == "arithmetic" and task.source == "bigbench:arithmetic/2_digit_multiplication"


def test_max_examples_is_a_seeded_ordered_subset(sdist):
    (full,) = bigbench.import_tasks("arithmetic")
    (a,) = bigbench.import_tasks("arithmetic", max_examples=4)
    (b,) = bigbench.import_tasks("arithmetic", max_examples=4)
    assert a == b and len(a.examples) == 4
    positions = [full.examples.index(e) for e in a.examples]
    assert positions == sorted(positions)
    assert bigbench.import_tasks("arithmetic", max_examples=4, seed=1)[0] != a


def test_second_import_reads_the_cache_not_the_tar(sdist, monkeypatch):
    opened = count_tar_opens(monkeypatch)
    first = bigbench.import_tasks(["natural_instructions", "sports_understanding"])
    assert len(opened) == 1  # one pass lists the sdist and extracts what was asked for
    assert bigbench.import_tasks(["natural_instructions", "sports_understanding"]) == first
    assert bigbench.list_tasks()
    assert len(opened) == 1
    bigbench.import_tasks("arithmetic")  # not cached yet: one more pass, for it alone
    assert len(opened) == 2
    monkeypatch.delenv(bigbench.SDIST_ENV)  # with everything cached, the sdist is not even needed
    assert bigbench.import_tasks("arithmetic")[0].name == "arithmetic.2_digit_multiplication"
    assert len(opened) == 2


def test_listing_is_rebuilt_for_a_different_sdist(sdist, tmp_path):
    assert "new_task" not in bigbench.list_tasks()
    tasks = FAKE_TASKS | {"new_task": FAKE_TASKS["sports_understanding"]}
    make_sdist(sdist, tasks)  # same path, new content and size
    assert "new_task" in bigbench.list_tasks()


def test_traversal_and_links_are_never_extracted(sdist, tmp_path):
    names = bigbench.list_tasks()
    assert names == [
        "arithmetic/2_digit_multiplication",
        "natural_instructions/subtask004_mctaco_answer_generation_event_duration",
        "natural_instructions/subtask046_miscellaenous_question_typing",
        "sports_understanding",
    ]
    bigbench.import_tasks(["natural_instructions", "sports_understanding", "arithmetic"])
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if "evil" in str(p) or "linked" in str(p) or "passwd" in str(p)]
    assert all(p.parts[0] in ("cache", "sdist") for p in written)


@pytest.mark.parametrize(
    ("member", "parsed"),
    [
        (f"{ROOT}/sports_understanding/task.json", ("sports_understanding", "task.json")),
        (f"{ROOT}/arithmetic/2_digit_multiplication/task.json", ("arithmetic/2_digit_multiplication", "task.json")),
        (f"{ROOT}/simple_arithmetic/task.py", ("simple_arithmetic", "task.py")),
        (f"{ROOT}/../evil/task.json", None),
        (f"{ROOT}/ok/../../evil/task.json", None),
        (f"{ROOT}/a/b/c/task.json", None),
        (f"/{ROOT}/x/task.json", None),
        (f"{ROOT}/.hidden/task.json", None),
        (f"{ROOT}/x/README.md", None),
        ("bigbench-1.0.0/setup.py", None),
    ],
)  # fmt: skip
def test_member_names(member, parsed):
    assert bigbench._parse_member(member) == parsed


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        (
            "sports_understandin",
            "unknown BIG-bench task 'sports_understandin'; did you mean sports_understanding",
        ),
        ("nothing_like_it_at_all", "unknown BIG-bench task .*see loramint.bigbench.list_tasks"),
        ("simple_arithmetic", "'simple_arithmetic' is programmatic"),
        ("evil", "unknown BIG-bench task 'evil'"),
        ("../evil", "unknown BIG-bench task '../evil'"),
    ],
)
def test_unknown_and_programmatic_tasks(sdist, selector, problem):
    with pytest.raises(TaskError, match=problem):
        bigbench.import_tasks([selector])


def test_task_without_usable_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMINT_CACHE", str(tmp_path / "cache"))
    empty = {
        "empty_inputs": {"description": "d", "examples": [{"input": "", "target_scores": {"a": 1, "b": 0}}]}
    }
    monkeypatch.setenv(bigbench.SDIST_ENV, str(make_sdist(tmp_path / "bigbench-1.0.0.tar.gz", empty)))
    with pytest.raises(TaskError, match="'empty_inputs' has no usable examples .*input must be a non-empty"):
        bigbench.import_tasks("empty_inputs")


def test_fetch_sdist_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv(bigbench.SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(NotFoundError, match="LORAMINT_BIGBENCH_SDIST=.*is not a file"):
        bigbench.fetch_sdist()


def test_fetch_sdist_never_downloads(tmp_path, monkeypatch):
    monkeypatch.delenv(bigbench.SDIST_ENV, raising=False)
    monkeypatch.setattr(paths.subprocess, "run", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    with pytest.raises(NotFoundError, match="no longer serves bigbench==1.0.0.*loramint data tasks"):
        bigbench.fetch_sdist(tmp_path)
    fake = make_sdist(tmp_path / bigbench.SDIST_NAME)
    with pytest.raises(TaskError, match="sha256 differs"):
        bigbench.fetch_sdist(tmp_path)
    monkeypatch.setattr(bigbench, "SDIST_SHA256", sha256_file(fake))
    assert bigbench.fetch_sdist(tmp_path) == fake


# ----------------------------------------------------------------------------------------- end to end


def _real_sdist() -> Path | None:
    try:
        return bigbench.fetch_sdist()
    except (NotFoundError, TaskError):
        return None


@pytest.mark.e2e
@pytest.mark.skipif(
    _real_sdist() is None,
    reason=f"optional importer: no local {bigbench.SDIST_NAME} (PyPI no longer serves it; set "
    f"{bigbench.SDIST_ENV} to a copy to run this test)",
)
def test_real_bigbench_import():
    """The real sdist, where a user has a copy (LORAMINT_BIGBENCH_SDIST or the user cache)."""
    tasks = bigbench.import_tasks(
        ["subtask004", "sports_understanding", "arithmetic/2_digit_multiplication"], max_examples=300
    )
    ni, sports, arith = tasks
    assert ni.family == "mctaco" and not ni.is_multiple_choice and len(ni.examples) == 300
    assert any(len(e.targets) > 1 for e in ni.examples)
    assert sports.is_multiple_choice and len(sports.examples) == 300
    assert {e.output for e in sports.examples} == {"plausible", "implausible"}
    assert arith.metric == "exact_match" and arith.examples[0].target.isdigit()
    assert len([t for t in bigbench.list_tasks() if t.startswith("natural_instructions/")]) == 61
