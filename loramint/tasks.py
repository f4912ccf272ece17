"""The Task spec (name, descriptions, family, examples) and the JSONL files tasks are kept in.

Also `synthetic_suite()`: a tiny deterministic suite built in code, for tests and smoke runs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramint.errors import NotFoundError, TaskError
from loramint.paths import atomic_write_bytes, validate_id

SPLITS = ("train", "val", "test")
"""The fixed splits of a corpus task, in the order its examples are stored."""
METRICS = ("accuracy", "exact_match", "rougeL")
"""accuracy: multiple choice; exact_match and rougeL: free text, scored against every acceptable target."""


@dataclass
class Example:
    """One input with either free-text target(s) or choices plus the index of the correct one."""

    input: str
    """What the model reads, after the task's `prefix`."""
    target: str | None = None
    """Free text: the reference answer, always `targets[0]` (filled from `targets` when not given)."""
    targets: list[str] = field(default_factory=list)
    """Free text: every acceptable answer, `target` first (filled from `target` when not given)."""
    choices: list[str] = field(default_factory=list)
    """Multiple choice: at least two different options."""
    answer: int | None = None
    """Multiple choice: index of the correct option in `choices`."""

    def __post_init__(self) -> None:
        if not isinstance(self.input, str) or not self.input.strip():
            raise TaskError(f"example input must be a non-empty string, got {self.input!r}")
        free_text = self.target is not None or bool(self.targets)
        multiple_choice = bool(self.choices) or self.answer is not None
        if free_text and multiple_choice:
            raise TaskError(
                "example has both a target and choices: give target/targets (free text) or choices + answer "
                "(multiple choice), not both"
            )
        if free_text:
            self._check_targets()
        elif multiple_choice:
            self._check_choices()
        else:
            raise TaskError(
                f"example {self.input[:40]!r} has neither a target nor choices: give target/targets (free "
                "text) or choices + answer (multiple choice)"
            )

    def _check_targets(self) -> None:
        targets = list(self.targets)
        if not all(_nonblank(t) for t in targets):
            raise TaskError(f"example targets must be non-empty strings, got {targets!r}")
        if self.target is None:
            self.target = targets[0]
        elif not _nonblank(self.target):
            raise TaskError(f"example target must be a non-empty string, got {self.target!r}")
        elif not targets:
            targets = [self.target]
        elif targets[0] != self.target:
            raise TaskError(f"example target {self.target!r} must be the first of its targets {targets!r}")
        self.targets = targets

    def _check_choices(self) -> None:
        choices = list(self.choices)
        if self.answer is None:
            raise TaskError(f"multiple-choice example has choices {choices!r} but no answer index")
        if len(choices) < 2:
            raise TaskError(
                f"multiple-choice example needs at least 2 choices, got {len(choices)}: {choices!r}"
            )
        if not all(_nonblank(c) for c in choices):
            raise TaskError(f"example choices must be non-empty strings, got {choices!r}")
        if len(set(choices)) != len(choices):
            twice = next(c for c in choices if choices.count(c) > 1)
            raise TaskError(f"example choices must all differ; {twice!r} appears more than once")
        if not isinstance(self.answer, int) or isinstance(self.answer, bool):
            raise TaskError(f"example answer must be an integer index into choices, got {self.answer!r}")
        if not 0 <= self.answer < len(choices):
            raise TaskError(
                f"example answer {self.answer} is out of range for {len(choices)} choices (0..{len(choices) - 1})"
            )
        self.choices = choices

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def output(self) -> str:
        """The text the model should produce: the target, or the correct choice."""
        return self.choices[self.answer] if self.is_multiple_choice else self.target  # type: ignore[index,return-value]

    def to_dict(self) -> dict[str, Any]:
        if self.is_multiple_choice:
            return {"input": self.input, "choices": list(self.choices), "answer": self.answer}
        data: dict[str, Any] = {"input": self.input, "target": self.target}
        if len(self.targets) > 1:
            data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        if not isinstance(data, dict):
            raise TaskError(f"an example must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _EXAMPLE_KEYS)
        if unknown:
            raise TaskError(f"example has unknown keys {unknown}; expected {sorted(_EXAMPLE_KEYS)}")
        if "input" not in data:
            raise TaskError("example has no 'input'")
        return cls(
            input=data["input"],
            target=data.get("target"),
            targets=_as_list(data.get("targets", []), "targets"),
            choices=_as_list(data.get("choices", []), "choices"),
            answer=data.get("answer"),
        )


_EXAMPLE_KEYS = {"input", "target", "targets", "choices", "answer"}


@dataclass
class Task:
    """A named task: what it asks for (descriptions), which family it belongs to, and its examples."""

    name: str
    """Unique id (letters, digits, '_', '.', '-'), e.g. `ni_subtask004_mctaco_answer_generation_event_duration`."""
    description: str
    """What the task asks for, in words. Goes to the generator (and the encoder), never into the prompt."""
    family: str
    """The dataset or skill the task belongs to; seen/unseen splits hold out whole families."""
    examples: list[Example]
    """At least one; all free text or all multiple choice."""
    source: str = "user"
    """Where the task came from, e.g. `bigbench:sports_understanding`, `synthetic`, `user`."""
    metric: str = ""
    """One of METRICS; empty: `accuracy` for multiple choice, `rougeL` for free text."""
    descriptions: list[str] = field(default_factory=list)
    """Other phrasings of the description (augmentation for the generator); may be empty."""
    prefix: str = ""
    """Text shown before each input in the prompt (BIG-bench's `example_input_prefix`)."""
    output_prefix: str = ""
    """Text shown after each input, before the answer (BIG-bench's `example_output_prefix`)."""
    license: str = ""
    """The license the task's data is under (SPDX id where there is one); empty for a user's own task."""
    splits: dict[str, int] = field(default_factory=dict)
    """Fixed split sizes {"train": n, "val": n, "test": n}: `examples` hold the train examples first, then
    val, then test. Empty: no fixed split (jobs hold out examples with `split`)."""

    def __post_init__(self) -> None:
        validate_id(self.name, "task name")
        where = f"task {self.name!r}"
        if not _nonblank(self.description):
            raise TaskError(f"{where}: description must be a non-empty string, got {self.description!r}")
        validate_id(self.family, f"family of {where}")
        if not _nonblank(self.source):
            raise TaskError(f"{where}: source must be a non-empty string, got {self.source!r}")
        if not isinstance(self.descriptions, list) or not all(_nonblank(d) for d in self.descriptions):
            raise TaskError(
                f"{where}: descriptions must be a list of non-empty strings, got {self.descriptions!r}"
            )
        for attr in ("prefix", "output_prefix"):
            if not isinstance(getattr(self, attr), str):
                raise TaskError(f"{where}: {attr} must be a string, got {getattr(self, attr)!r}")
        if not isinstance(self.license, str):
            raise TaskError(f"{where}: license must be a string, got {self.license!r}")
        self._check_examples(where)
        self._check_metric(where)
        self._check_splits(where)

    def _check_examples(self, where: str) -> None:
        if not isinstance(self.examples, list) or not self.examples:
            raise TaskError(f"{where} has no examples; a task needs at least one to be trained or evaluated")
        for i, example in enumerate(self.examples):
            if not isinstance(example, Example):
                raise TaskError(
                    f"{where}, example {i}: expected an Example, got {type(example).__name__} "
                    "(use Task.from_dict for plain dicts)"
                )
        kinds = [ex.is_multiple_choice for ex in self.examples]
        if len(set(kinds)) > 1:
            odd = kinds.index(not kinds[0])
            raise TaskError(
                f"{where} mixes free-text and multiple-choice examples (example 0 is "
                f"{_kind(kinds[0])}, example {odd} is {_kind(kinds[odd])}); split it into two tasks"
            )

    def _check_metric(self, where: str) -> None:
        if not self.metric:
            self.metric = "accuracy" if self.is_multiple_choice else "rougeL"
        if self.metric not in METRICS:
            raise TaskError(f"{where}: unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if (self.metric == "accuracy") != self.is_multiple_choice:
            raise TaskError(
                f"{where}: metric {self.metric!r} does not fit {_kind(self.is_multiple_choice)} examples "
                "(accuracy is for multiple choice; exact_match and rougeL for free text)"
            )

    def _check_splits(self, where: str) -> None:
        if not self.splits:
            return
        sizes = self.splits
        if not isinstance(sizes, dict) or set(sizes) != set(SPLITS):
            raise TaskError(f"{where}: splits must map each of {list(SPLITS)} to a count, got {sizes!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes.values()):
            raise TaskError(f"{where}: split sizes must be integers >= 0, got {sizes!r}")
        if sum(sizes.values()) != len(self.examples):
            raise TaskError(
                f"{where}: split sizes {sizes} add up to {sum(sizes.values())}, but the task has "
                f"{len(self.examples)} examples"
            )
        if sizes["train"] < 1 or sizes["test"] < 1:
            raise TaskError(
                f"{where}: a fixed split needs at least one train and one test example, got {sizes}"
            )
        self.splits = {name: sizes[name] for name in SPLITS}

    def part(self, name: str) -> list[Example]:
        """The examples of fixed split `name` (train, val or test)."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        if not self.splits:
            raise TaskError(f"task {self.name!r} has no fixed splits (tasks from the corpus have them)")
        start = sum(self.splits[s] for s in SPLITS[: SPLITS.index(name)])
        return self.examples[start : start + self.splits[name]]

    @property
    def is_multiple_choice(self) -> bool:
        return self.examples[0].is_multiple_choice

    def prompt(self, example: Example) -> str:
        """What the model reads for `example`: prefix + input + output prefix (never the description)."""
        return f"{self.prefix}{example.input}{self.output_prefix}"

    def split(self, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """(train, eval): `n_eval` examples held out at random, the same for the same seed and task name.

        Both lists keep the examples' original order.
        """
        n = len(self.examples)
        if isinstance(n_eval, bool) or not isinstance(n_eval, int) or not 0 <= n_eval <= n:
            raise TaskError(
                f"cannot hold out n_eval={n_eval!r} examples of task {self.name!r}, which has {n}"
            )
        order = list(range(n))
        random.Random(f"{seed}:{self.name}").shuffle(order)
        held_out = set(order[:n_eval])
        train = [ex for i, ex in enumerate(self.examples) if i not in held_out]
        evaluation = [ex for i, ex in enumerate(self.examples) if i in held_out]
        return train, evaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "source": self.source,
            "metric": self.metric,
            "descriptions": list(self.descriptions),
            "prefix": self.prefix,
            "output_prefix": self.output_prefix,
            **({"license": self.license} if self.license else {}),
            **({"splits": dict(self.splits)} if self.splits else {}),
            "examples": [ex.to_dict() for ex in self.examples],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        if not isinstance(data, dict):
            raise TaskError(f"a task must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("name", "description", "family", "examples") if key not in data]
        if missing:
            raise TaskError(f"task {data.get('name', '?')!r} lacks {', '.join(missing)}")
        unknown = sorted(set(data) - _TASK_KEYS)
        if unknown:
            raise TaskError(
                f"task {data['name']!r} has unknown keys {unknown}; expected {sorted(_TASK_KEYS)}"
            )
        examples = []
        for i, item in enumerate(_as_list(data["examples"], "examples")):
            try:
                examples.append(Example.from_dict(item))
            except TaskError as err:
                raise TaskError(f"task {data['name']!r}, example {i}: {err}") from None
        return cls(
            name=data["name"],
            description=data["description"],
            family=data["family"],
            examples=examples,
            source=data.get("source", "user"),
            metric=data.get("metric", ""),
            descriptions=_as_list(data.get("descriptions", []), "descriptions"),
            prefix=data.get("prefix", ""),
            output_prefix=data.get("output_prefix", ""),
            license=data.get("license", ""),
            splits=data.get("splits", {}),
        )


_TASK_KEYS = set(Task.__dataclass_fields__)


def save_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    """Write `tasks` to `path` as JSONL (one task per line), atomically."""
    tasks = list(tasks)
    _check_unique(tasks, where=f"tasks for {path}")
    # ensure_ascii=False keeps the file readable; json still escapes every newline inside strings.
    lines = [json.dumps(task.to_dict(), ensure_ascii=False) for task in tasks]
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


def load_tasks(path: str | Path) -> list[Task]:
    """Read a JSONL file of tasks; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"task file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8 text: {err}") from None
    tasks, first_line = [], {}
    # split on "\n" only: str.splitlines() would also split on U+2028, which JSON leaves unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(
                f"{path}, line {lineno}: invalid JSON ({err.msg} at column {err.colno})"
            ) from None
        try:
            task = Task.from_dict(data)
        except (TaskError, ValueError) as err:
            raise TaskError(f"{path}, line {lineno}: {err}") from None
        if task.name in first_line:
            raise TaskError(
                f"{path}, line {lineno}: task {task.name!r} already defined on line {first_line[task.name]}"
            )
        first_line[task.name] = lineno
        tasks.append(task)
    return tasks


def _check_unique(tasks: list[Task], where: str) -> None:
    seen: set[str] = set()
    for task in tasks:
        if not isinstance(task, Task):
            raise TaskError(f"{where}: expected Task objects, got {type(task).__name__}")
        if task.name in seen:
            raise TaskError(f"{where}: task name {task.name!r} appears more than once")
        seen.add(task.name)


def _nonblank(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _kind(multiple_choice: bool) -> str:
    return "multiple choice" if multiple_choice else "free text"


def _as_list(value: object, what: str) -> list:
    if not isinstance(value, list):
        raise TaskError(f"{what} must be a list, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------- synthetic suite


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FRUITS = _words(
    "apple apricot banana blackberry blueberry cherry coconut cranberry currant date durian fig "
    "gooseberry grape grapefruit guava kiwi kumquat lemon lime lychee mandarin mango melon mulberry "
    "nectarine olive orange papaya peach pear persimmon pineapple plum pomegranate quince raspberry "
    "strawberry tangerine watermelon"
)
ANIMALS = _words(
    "badger bat bear beaver bison camel cat cheetah cow crab crow deer dog donkey duck eagle ferret fox "
    "frog giraffe goat goose hamster hedgehog horse hyena koala lion lizard llama mole moose mouse otter "
    "owl panda pig rabbit sheep snake tiger wolf zebra"
)
OBJECTS = _words(
    "anchor basket bottle bridge brush candle chair clock cloud desk door drum feather flute garden glove "
    "hammer helmet island jacket kettle ladder lamp letter mirror needle pencil pillow river rocket "
    "saddle shovel spoon stone table ticket tower wagon window"
)


def synthetic_suite(n_examples: int = 64, seed: int = 0) -> list[Task]:
    """Six small tasks in three families (copy, arith, classify), generated from a seeded RNG.

    Inputs within a family share one format, so a model can only tell the tasks apart by what it is
    told (the description) or by the adapter it runs with.
    """
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise TaskError(f"n_examples must be a positive integer, got {n_examples!r}")
    words = sorted(set(FRUITS + ANIMALS + OBJECTS))
    labelled = [(w, 0) for w in FRUITS] + [(w, 1) for w in ANIMALS]

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    def make(name: str, family: str, description: str, alternative: str, examples: list[Example]) -> Task:
        return Task(
            name=name,
            description=description,
            family=family,
            examples=examples,
            source="synthetic",
            metric="accuracy" if examples[0].is_multiple_choice else "exact_match",
            descriptions=[alternative],
            prefix="Input: ",
            output_prefix="\nOutput: ",
        )

    repeat = [words[i] for i in _draw(rng("copy_repeat"), len(words), n_examples)]
    reverse = [words[i] for i in _draw(rng("copy_reverse"), len(words), n_examples)]
    pairs = [divmod(i, 50) for i in _draw(rng("arith_add"), 50 * 50, n_examples)]
    doubles = _draw(rng("arith_double"), 100, n_examples)
    numbers = _draw(rng("classify_parity"), 1000, n_examples)
    things = [labelled[i] for i in _draw(rng("classify_fruit_animal"), len(labelled), n_examples)]
    return [
        make(
            "copy_repeat", "copy", "Repeat the input word twice, separated by a space.", "Say the word two times.",
            [Example(w, target=f"{w} {w}") for w in repeat],
        ),
        make(
            "copy_reverse", "copy", "Reverse the letters of the word.", "Spell the word backwards.",
            [Example(w, target=w[::-1]) for w in reverse],
        ),
        make(
            "arith_add", "arith", "Add the two numbers.", "Give the sum of the two numbers.",
            [Example(f"{a} {b}", target=str(a + b)) for a, b in pairs],
        ),
        make(
            "arith_double", "arith", "Multiply the number by two.", "Double the number.",
            [Example(str(a), target=str(2 * a)) for a in doubles],
        ),
        make(
            "classify_parity", "classify", "Say whether the number is even or odd.", "Is the number even or odd?",
            [Example(str(a), choices=["even", "odd"], answer=a % 2) for a in numbers],
        ),
        make(
            "classify_fruit_animal", "classify", "Say whether the word is a fruit or an animal.",
            "Is this a kind of fruit or a kind of animal?",
            [Example(w, choices=["fruit", "animal"], answer=label) for w, label in things],
        ),
    ]  # fmt: skip


def _draw(rng: random.Random, pool: int, n: int) -> list[int]:
    """`n` indices into range(pool): all different while the pool allows it."""
    if n <= pool:
        return rng.sample(range(pool), n)
    return [rng.randrange(pool) for _ in range(n)]
