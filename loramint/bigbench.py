"""Import BIG-bench JSON tasks (task.json files in the sdist `bigbench==1.0.0`) as loramint Tasks.

An optional importer for users who have the 358 MB sdist (PyPI no longer serves it): point
LORAMINT_BIGBENCH_SDIST at it, or put it in the user cache's `bigbench/` folder. One streaming pass lists
every task and copies out only the task.json files asked for; the listing and those files are cached, so
later imports never open it. loramint's own tasks come from its corpus (loramint.corpus).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from loramint.errors import NotFoundError, TaskError
from loramint.paths import atomic_write_bytes, cache_dir, file_lock, sha256_file
from loramint.tasks import Example, Task

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_ENV = "LORAMINT_BIGBENCH_SDIST"
NI = "natural_instructions"
_HINT = f"set {SDIST_ENV} to a local {SDIST_NAME}"

# Member names look like bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json.
_MEMBER = re.compile(
    r"^[^/]+/bigbench/benchmark_tasks/(?P<task>[^/]+(?:/[^/]+)?)/(?P<file>task\.json|task\.py)$"
)
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NI_SUBTASK = re.compile(r"^(?P<short>subtask\d{3})_(?P<family>[a-z]+)")
_NI_FAMILIES = {"essential": "essential_terms", "miscellaneous": "misc", "miscellaenous": "misc"}
_NI_SECTION = re.compile(r"(Definition|Things to Avoid|Emphasis/Caution|Prompt):")
# BIG-bench's own defaults (bigbench/api/json_task.py) for tasks that do not set their prefixes.
_INPUT_PREFIX, _OUTPUT_PREFIX = "\nQ: ", "\nA: "


def fetch_sdist(cache: str | Path | None = None) -> Path:
    """Path of a local bigbench-1.0.0.tar.gz: $LORAMINT_BIGBENCH_SDIST, or the copy in `cache` (default: the
    user cache dir's `bigbench/`), checked against its sha256. PyPI no longer serves this version, so
    nothing is downloaded: without a copy, use the task corpus (`loramint data`) instead."""
    if env := os.environ.get(SDIST_ENV):
        path = Path(env).expanduser()
        if not path.is_file():
            raise NotFoundError(f"{SDIST_ENV}={env} is not a file; point it at a local {SDIST_NAME}")
        return path
    folder = Path(cache) if cache is not None else cache_dir("bigbench")
    target = folder / SDIST_NAME
    if not target.is_file():
        raise NotFoundError(
            f"no {SDIST_NAME} here ({target} is missing) and PyPI no longer serves {SDIST_REQUIREMENT}: "
            f"{_HINT}, or use the tasks of the corpus that ships with loramint (`loramint data tasks`)"
        )
    if sha256_file(target) != SDIST_SHA256:
        raise TaskError(f"{target} is not {SDIST_NAME} (its sha256 differs from the pinned one)")
    return target


def list_tasks() -> list[str]:
    """Names of every importable task, e.g. `sports_understanding`, `arithmetic/2_digit_multiplication`,
    `natural_instructions/subtask004_mctaco_answer_generation_event_duration`."""
    return _index().leaves()


def import_tasks(names: str | Iterable[str], max_examples: int | None = None, seed: int = 0) -> list[Task]:
    """Tasks for `names`, in order, without duplicates.

    A name is a BIG-bench task (`sports_understanding`), a subtask (`arithmetic/2_digit_multiplication`),
    a task with subtasks (`natural_instructions` = its 61 subtasks, `arithmetic`), a natural-instructions
    subtask by its own name or number (`subtask004`), or a loramint task name this module produced.
    `max_examples` keeps a seeded random subset (in file order) of larger tasks.
    """
    selectors = [names] if isinstance(names, str) else list(names)
    if not selectors or not all(isinstance(s, str) and s.strip() for s in selectors):
        raise TaskError(f"give one or more BIG-bench task names (non-empty strings), got {names!r}")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise TaskError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    picked = _resolve(selectors, _index(want=lambda name: any(_selects(name, s) for s in selectors)))
    missing = [name for name in picked if not _task_file(name).is_file()]
    if missing:
        with file_lock(_root() / ".lock"):
            _scan_archive(fetch_sdist(), want=set(missing).__contains__, until=set(missing))
    return [_convert(name, _read_task_json(name), max_examples, seed) for name in picked]


def task_name(bigbench_name: str) -> str:
    """The loramint task name of a BIG-bench task: `ni_subtask004_...` for natural instructions,
    else the path with '/' as '.' (`arithmetic.2_digit_multiplication`)."""
    if bigbench_name.startswith(NI + "/"):
        return "ni_" + bigbench_name.split("/", 1)[1]
    return bigbench_name.replace("/", ".")


# ------------------------------------------------------------------------------------ archive and cache


@dataclass
class _Listing:
    """Every task.json in the sdist, and the tasks that only have a task.py (programmatic)."""

    tasks: list[str]
    programmatic: list[str]

    def children(self, name: str) -> list[str]:
        return sorted(t for t in self.tasks if t.startswith(name + "/"))

    def leaves(self) -> list[str]:
        parents = {t.rsplit("/", 1)[0] for t in self.tasks if "/" in t}
        return sorted(t for t in self.tasks if t not in parents)


def _root() -> Path:
    return cache_dir("bigbench", SDIST_NAME.removesuffix(".tar.gz"))


def _task_file(name: str) -> Path:
    return _root() / "tasks" / name / "task.json"


def _index(want: Callable[[str], bool] = lambda name: False) -> _Listing:
    """The cached listing; without one, scan the sdist once, caching the task.json files `want` picks."""
    listing_file = _root() / "index.json"
    with file_lock(_root() / ".lock"):
        cached = _read_listing(listing_file)
        if cached is not None:
            return cached
        sdist = fetch_sdist()
        listing = _scan_archive(sdist, want)
        data = {
            "sdist_size": sdist.stat().st_size,
            "tasks": listing.tasks,
            "programmatic": listing.programmatic,
        }
        atomic_write_bytes(listing_file, json.dumps(data, indent=1).encode())
        return listing


def _read_listing(path: Path) -> _Listing | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
        listing = _Listing(tasks=list(data["tasks"]), programmatic=list(data["programmatic"]))
        size = int(data["sdist_size"])
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable BIG-bench listing %s (%s); rescanning the sdist", path, err)
        return None
    local = _local_sdist()
    if local is not None and local.stat().st_size != size:
        # A different sdist than the one these files came from: drop them rather than mix two versions.
        log.warning("%s does not match the cached BIG-bench listing; dropping %s", local, path.parent)
        shutil.rmtree(path.parent / "tasks", ignore_errors=True)
        path.unlink()
        return None
    return listing


def _local_sdist() -> Path | None:
    """The sdist if it is here without downloading: $LORAMINT_BIGBENCH_SDIST or the cached copy."""
    if os.environ.get(SDIST_ENV):
        return fetch_sdist()
    cached = cache_dir("bigbench") / SDIST_NAME
    return cached if cached.is_file() else None


def _scan_archive(sdist: Path, want: Callable[[str], bool], until: set[str] | None = None) -> _Listing:
    """One streaming pass over the sdist: list its tasks and cache the task.json of each task `want` picks.

    With `until`, stop as soon as all of those are cached (the listing returned is then partial).
    Members are read with extractfile only; names that are not a plain `<task>[/<sub>]/task.json` of safe
    parts (no '..', no absolute paths, no links) are never written anywhere.
    """
    tasks, scripts, remaining = set(), set(), set(until or ())
    log.info("scanning %s for BIG-bench tasks (one pass, 5-10 s)", sdist)
    with (
        open(sdist, "rb") as raw,
        tqdm(
            total=sdist.stat().st_size, unit="B", unit_scale=True, desc="bigbench sdist", disable=None
        ) as bar,
        tarfile.open(fileobj=_ReadProgress(raw, bar), mode="r|gz") as archive,
    ):
        for member in archive:
            parsed = _parse_member(member.name)
            if parsed is None:
                continue
            name, kind = parsed
            if kind == "task.py":
                scripts.add(name)
                continue
            if not member.isfile():
                continue
            tasks.add(name)
            if want(name):
                handle = archive.extractfile(member)
                assert handle is not None  # a regular file always has a handle
                atomic_write_bytes(_task_file(name), handle.read())
                remaining.discard(name)
                if until and not remaining:
                    break
    if remaining:
        raise TaskError(f"{sdist} has no task.json for {sorted(remaining)}; is it the {SDIST_NAME} sdist?")
    return _Listing(tasks=sorted(tasks), programmatic=sorted(scripts - tasks))


class _ReadProgress:
    """A read-only file wrapper that advances a progress bar by the compressed bytes read."""

    def __init__(self, raw, bar: tqdm) -> None:
        self.raw, self.bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


def _parse_member(member_name: str) -> tuple[str, str] | None:
    """(task name, 'task.json' | 'task.py') for a task file of the sdist, None for anything else."""
    match = _MEMBER.match(member_name)
    if match is None:
        return None
    name = match["task"]
    if not all(_SAFE_PART.match(part) and ".." not in part for part in name.split("/")):
        return None
    return name, match["file"]


def _read_task_json(name: str) -> dict[str, Any]:
    path = _task_file(name)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as err:
        raise TaskError(
            f"{path} (BIG-bench task {name!r}) is not valid JSON: {err}; delete it to re-extract"
        ) from None
    if not isinstance(data, dict):
        raise TaskError(f"{path} (BIG-bench task {name!r}) is not a JSON object")
    return data


# ------------------------------------------------------------------------------------------- selection


def _aliases(name: str) -> set[str]:
    """Every selector that names `name` itself."""
    names = {name, task_name(name)}
    if name.startswith(NI + "/"):
        leaf = name.split("/", 1)[1]
        names.add(leaf)
        if match := _NI_SUBTASK.match(leaf):
            names.add(match["short"])
    return names


def _selects(name: str, selector: str) -> bool:
    """Whether `selector` picks task `name`, either itself or as a subtask of the task it names."""
    selector = selector.strip().strip("/")
    return selector in _aliases(name) or name.startswith(selector + "/")


def _resolve(selectors: list[str], listing: _Listing) -> list[str]:
    by_alias = {alias: name for name in listing.tasks for alias in _aliases(name)}
    scripts = {alias for name in listing.programmatic for alias in _aliases(name)}
    picked: list[str] = []
    for selector in selectors:
        key = selector.strip().strip("/")
        name = by_alias.get(key)
        if name is None:
            if key in scripts:
                raise TaskError(
                    f"BIG-bench task {selector!r} is programmatic (a task.py, no task.json); only JSON tasks can "
                    "be imported"
                )
            close = difflib.get_close_matches(key, sorted(by_alias), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see loramint.bigbench.list_tasks()"
            raise TaskError(f"unknown BIG-bench task {selector!r}{hint}")
        for leaf in listing.children(name) or [name]:
            if leaf not in picked:
                picked.append(leaf)
    return picked


# ------------------------------------------------------------------------------------------ conversion


def _convert(name: str, data: dict[str, Any], max_examples: int | None, seed: int) -> Task:
    raw = data.get("examples")
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"BIG-bench task {name!r} has no examples")
    is_ni = name.startswith(NI + "/")
    multiple_choice = not is_ni and _is_multiple_choice(data, raw)
    examples, skipped = [], Counter()
    for item in raw:
        try:
            examples.append(_choice_example(item) if multiple_choice else _text_example(item))
        except TaskError as err:
            skipped[str(err)] += 1
    if skipped:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in skipped.most_common(3))
        log.info(
            "BIG-bench task %s: skipped %d of %d examples (%s)", name, skipped.total(), len(raw), reasons
        )
    if not examples:
        raise TaskError(f"BIG-bench task {name!r} has no usable examples ({skipped.most_common(1)[0][0]})")
    if max_examples is not None and len(examples) > max_examples:
        keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    if multiple_choice:
        metric = "accuracy"
    else:
        metric = "exact_match" if data.get("preferred_score") == "exact_str_match" else "rougeL"
    description, descriptions = _ni_descriptions(data) if is_ni else _json_descriptions(name, data)
    return Task(
        name=task_name(name),
        description=description,
        family=_ni_family(name) if is_ni else name.split("/")[0],
        examples=examples,
        source=f"bigbench:{name}",
        metric=metric,
        descriptions=descriptions,
        prefix=str(data.get("example_input_prefix", _INPUT_PREFIX)).lstrip(),
        output_prefix=str(data.get("example_output_prefix", _OUTPUT_PREFIX)),
    )


def _is_multiple_choice(data: dict[str, Any], raw: list) -> bool:
    """Scored choices make a multiple-choice task, unless it also has targets and prefers another metric
    (arithmetic has both, and is scored by exact match)."""
    has_scores = any(isinstance(e, dict) and "target_scores" in e for e in raw)
    has_target = any(isinstance(e, dict) and "target" in e for e in raw)
    return has_scores and (not has_target or data.get("preferred_score") == "multiple_choice_grade")


def _text_example(item: Any) -> Example:
    if not isinstance(item, dict):
        raise TaskError("example is not a JSON object")
    target = item.get("target")
    targets = target if isinstance(target, list) else [target]
    targets = [str(t) for t in targets if t is not None and str(t).strip()]
    if not targets:
        raise TaskError("no non-empty target")
    return Example(input=item.get("input"), targets=targets)


def _choice_example(item: Any) -> Example:
    """Choices in their given order; the best-scored one is the answer. Other choices tied with it are
    dropped, so exactly one correct choice remains (`3` and `three` in reasoning_about_colored_objects)."""
    if not isinstance(item, dict):
        raise TaskError("example is not a JSON object")
    scores = item.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise TaskError("no target_scores")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()):
        raise TaskError("non-numeric target_scores")
    best = max(scores.values())
    if best <= 0:
        raise TaskError("no choice scored above 0")
    answer = next(choice for choice, score in scores.items() if score == best)
    choices = [c for c, score in scores.items() if score != best or c == answer]
    return Example(input=item.get("input"), choices=choices, answer=choices.index(answer))


def _ni_family(name: str) -> str:
    """The source dataset of a natural-instructions subtask: subtask004_mctaco_... -> mctaco."""
    match = _NI_SUBTASK.match(name.split("/", 1)[1])
    if match is None:
        return NI
    return _NI_FAMILIES.get(match["family"], match["family"])


def _ni_descriptions(data: dict[str, Any]) -> tuple[str, list[str]]:
    """The crowdsourcing instructions "Definition: ... Things to Avoid: ... Emphasis/Caution: ... Prompt: ...":
    the definition is the description; the one-line prompt and the full text are the alternatives."""
    full = str(data.get("task_prefix") or data.get("description") or "").strip()
    parts = _NI_SECTION.split(full)
    sections = {label: _one_line(text) for label, text in zip(parts[1::2], parts[2::2], strict=True)}
    description = sections.get("Definition") or _one_line(full)
    return description, _distinct([sections.get("Prompt", ""), full], exclude=description)


def _json_descriptions(name: str, data: dict[str, Any]) -> tuple[str, list[str]]:
    """The task's description; its task_prefix (an instruction, often a paraphrase of the description) is
    kept as an alternative phrasing, never put in the prompt, so the model sees only the inputs."""
    task_prefix = str(data.get("task_prefix") or "").strip()
    description = _one_line(str(data.get("description") or "")) or _one_line(task_prefix) or name
    return description, _distinct([task_prefix], exclude=description)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _distinct(texts: list[str], exclude: str) -> list[str]:
    out: list[str] = []
    for text in texts:
        if text and text != exclude and text not in out:
            out.append(text)
    return out
