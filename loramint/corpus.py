"""The task corpus that ships with loramint: versioned, licensed tasks with fixed splits, read from `corpus/`.

Layout: `corpus/manifest.json` lists each source (license, provenance, file, sha256, counts) and the split
rule; `corpus/<source>.jsonl.gz` holds that source's tasks, one JSON task per line (loramint.tasks.Task, with
`license` and `splits`). Every file is checked against the manifest's sha256 before it is read.

Sources that may not be redistributed from this repository (data a user brings, or collections fetched from
elsewhere) are built with `build_source` into the user cache and read from there. A user's own tasks go
through `add_user_tasks`: validated, split by the same rule, kept in their own file outside the repository.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loramint.errors import NotFoundError, TaskError
from loramint.paths import atomic_write_bytes, cache_dir, sha256_file
from loramint.tasks import SPLITS, Task

CORPUS_ENV = "LORAMINT_CORPUS"
USER_TASKS_ENV = "LORAMINT_USER_TASKS"
USER_SOURCE = "user"
MANIFEST = "manifest.json"
MAX_EXAMPLES = 500
"""Examples kept per task (a seeded sample of bigger tasks): enough for a 150-example test split, a
50-example validation split and 300 training examples, and keeps the shipped corpus far under 40 MB."""
SPLIT_SEED = 0


def default_root() -> Path:
    """`$LORAMINT_CORPUS`, else the `corpus/` folder of this checkout."""
    if env := os.environ.get(CORPUS_ENV):
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "corpus"


def user_tasks_file() -> Path:
    """Where a user's own tasks are kept: `$LORAMINT_USER_TASKS`, else the user cache's corpus folder."""
    if env := os.environ.get(USER_TASKS_ENV):
        return Path(env).expanduser()
    return cache_dir("corpus") / f"{USER_SOURCE}.jsonl.gz"


def split_sizes(n: int) -> dict[str, int]:
    """The fixed split rule: test gets 30% (at least 100 where half the task allows it, at most 150),
    val 10% (at most 50), train the rest."""
    if n < 3:
        raise TaskError(f"a task needs at least 3 examples to be split into train, val and test, got {n}")
    test = min(150, max(math.ceil(0.3 * n), min(100, n // 2)))
    val = min(50, max(1, math.ceil(0.1 * n)))
    return {"train": n - test - val, "val": val, "test": test}


def finalize(task: Task, max_examples: int = MAX_EXAMPLES, seed: int = SPLIT_SEED) -> Task:
    """`task` capped at `max_examples` (a seeded sample) with its examples shuffled into train | val | test."""
    examples = list(task.examples)
    rng = random.Random(f"{seed}:{task.name}")
    if len(examples) > max_examples:
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), max_examples))]
    rng.shuffle(examples)
    data = task.to_dict()
    data.update(examples=[ex.to_dict() for ex in examples], splits=split_sizes(len(examples)))
    return Task.from_dict(data)


def write_tasks_gz(tasks: Iterable[Task], path: Path) -> str:
    """Write tasks as gzip JSONL, byte for byte reproducible (no timestamp in the header); returns sha256."""
    lines = "".join(json.dumps(t.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for t in tasks)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(lines.encode("utf-8"))
    atomic_write_bytes(path, buffer.getvalue())
    return sha256_file(path)


def read_tasks_gz(path: Path) -> list[Task]:
    tasks = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    tasks.append(Task.from_dict(json.loads(line)))
                except (TaskError, ValueError) as err:
                    raise TaskError(f"{path}, line {lineno}: {err}") from None
    return tasks


@dataclass
class Source:
    """One entry of the manifest."""

    name: str
    license: str
    file: str
    sha256: str
    tasks: int
    examples: int
    shipped: bool = True
    """True: the file is in the repository's corpus/. False: built into the user cache by `build_source`."""
    provenance: dict = field(default_factory=dict)
    """Where the data comes from: kind (pypi, github, code), name, version or commit, sha256 of the inputs."""
    notes: str = ""


class Corpus:
    """The tasks of every available source; `Corpus()` reads the shipped corpus and any built or user ones."""

    def __init__(self, root: str | Path | None = None, user_file: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.user_file = Path(user_file) if user_file is not None else user_tasks_file()
        path = self.root / MANIFEST
        if not path.is_file():
            raise NotFoundError(f"no corpus manifest at {path}: set {CORPUS_ENV} to a corpus folder")
        manifest = json.loads(path.read_text())
        self.version = manifest["version"]
        self.split_seed = manifest["split_seed"]
        self.max_examples = manifest["max_examples"]
        self.sources = {s["name"]: Source(**s) for s in manifest["sources"]}
        self._tasks: dict[str, list[Task]] = {}

    def path(self, source: Source) -> Path:
        return self.root / source.file if source.shipped else cache_dir("corpus") / source.file

    def available(self) -> list[str]:
        """Sources whose tasks can be read here: the shipped ones, the built ones, and the user's."""
        names = [name for name, s in self.sources.items() if self.path(s).is_file()]
        return names + ([USER_SOURCE] if self.user_file.is_file() else [])

    def load(self, source: str) -> list[Task]:
        """The tasks of `source`, read once and checked against the manifest."""
        if source in self._tasks:
            return self._tasks[source]
        if source == USER_SOURCE:
            if not self.user_file.is_file():
                raise NotFoundError(
                    f"no user tasks yet ({self.user_file}): add some with `loramint data add`"
                )
            tasks = read_tasks_gz(self.user_file)
        else:
            entry = self.sources.get(source)
            if entry is None:
                raise NotFoundError(f"unknown corpus source {source!r}; sources: {sorted(self.sources)}")
            path = self.path(entry)
            if not path.is_file():
                raise NotFoundError(
                    f"corpus source {source!r} is not built on this machine ({path} is missing): "
                    f"`loramint data build {source} --input <folder>` builds it from a copy of "
                    f"{entry.provenance.get('repo') or entry.provenance.get('name', 'its data')}"
                )
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise TaskError(
                    f"{path} does not match the manifest (sha256 {digest[:12]}..., expected "
                    f"{entry.sha256[:12]}...): the file was changed or is from another corpus version"
                )
            tasks = read_tasks_gz(path)
        self._tasks[source] = tasks
        return tasks

    def tasks(
        self,
        sources: Iterable[str] | None = None,
        families: Iterable[str] | None = None,
        names: Iterable[str] | None = None,
    ) -> list[Task]:
        """Tasks filtered by source, family and name (None: no filter), in corpus order."""
        chosen = list(sources) if sources is not None else self.available()
        tasks = [t for s in chosen for t in self.load(s)]
        if families is not None:
            wanted = set(families)
            unknown = wanted - {t.family for t in tasks}
            if unknown:
                raise NotFoundError(f"no corpus family {sorted(unknown)} in sources {chosen}")
            tasks = [t for t in tasks if t.family in wanted]
        if names is not None:
            by_name = {t.name: t for t in tasks}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise NotFoundError(f"no corpus task {missing[:5]} in sources {chosen}")
            tasks = [by_name[n] for n in names]
        return tasks

    def task(self, name: str) -> Task:
        return self.tasks(names=[name])[0]

    def families(self, sources: Iterable[str] | None = None) -> Counter[str]:
        return Counter(t.family for t in self.tasks(sources))

    def summary(self, sources: Iterable[str] | None = None) -> dict:
        """Counts of `sources` (default: every available one), in total and per source (`benchmarks/corpus_stats.py`
        writes them to `results/corpus.json`)."""
        rows, tasks = [], []
        for name in sources if sources is not None else self.available():
            loaded = self.load(name)
            tasks += loaded
            entry = self.sources.get(name)
            rows.append({
                "name": name,
                "license": entry.license if entry else "the user's own",
                "shipped": bool(entry and entry.shipped),
                "tasks": len(loaded),
                "families": len({t.family for t in loaded}),
                "examples": sum(len(t.examples) for t in loaded),
                "bytes": (self.path(entry) if entry else self.user_file).stat().st_size,
            })  # fmt: skip
        return {
            "tasks": len(tasks),
            "families": len({t.family for t in tasks}),
            "examples": sum(len(t.examples) for t in tasks),
            "test_examples": sum(t.splits["test"] for t in tasks),
            "bytes": sum(r["bytes"] for r in rows),
            "metrics": dict(Counter(t.metric for t in tasks)),
            "sources": rows,
        }


def add_user_tasks(tasks: list[Task], corpus: Corpus | None = None) -> list[Task]:
    """Add `tasks` (from a user's JSONL) to the user's source: names must be new to the corpus; tasks without
    fixed splits are split by the corpus rule. Returns the stored tasks; nothing is written on any error."""
    corpus = corpus or Corpus()
    taken = {t.name for s in corpus.available() for t in corpus.load(s)}
    clash = [t.name for t in tasks if t.name in taken]
    if clash:
        raise TaskError(f"task name(s) {clash[:5]} already in the corpus: rename them or remove the old ones")
    added = []
    for task in tasks:
        if len(task.examples) < 3:
            raise TaskError(f"task {task.name!r} has {len(task.examples)} examples; a task needs at least 3")
        if not task.splits:
            task = finalize(task, max_examples=max(len(task.examples), 1), seed=corpus.split_seed)
        added.append(task)
    existing = corpus.load(USER_SOURCE) if corpus.user_file.is_file() else []
    write_tasks_gz([*existing, *added], corpus.user_file)
    corpus._tasks.pop(USER_SOURCE, None)
    return added


def export_task(task: Task, split: str | None = None) -> str:
    """JSONL of a task's examples (of one split, or all with a `split` field each)."""
    if split is not None:
        return "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in task.part(split))
    lines = []
    for name in SPLITS if task.splits else ("",):
        for ex in task.part(name) if name else task.examples:
            lines.append(
                json.dumps({**ex.to_dict(), **({"split": name} if name else {})}, ensure_ascii=False)
            )
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------- building

BUILDERS = ("openai-evals", "procedural", "bbh")
"""Sources `build_source` knows; openai-evals and procedural ship in corpus/, bbh is built into the cache."""


def build_source(name: str, input: str | Path | None = None, root: str | Path | None = None) -> Source:
    """(Re)build source `name` from its inputs and record it in the manifest.

    openai-evals: the `evals` wheel (`input`, else `pip download`, checked against its pinned sha256).
    procedural: generated by loramint.procedural. bbh: `input` is a BIG-Bench-Hard checkout; the result goes
    to the user cache and, where the manifest already lists bbh, must match its sha256 byte for byte.
    """
    from loramint import procedural, sources

    root = Path(root) if root is not None else default_root()
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {
        "version": 1, "split_seed": SPLIT_SEED, "max_examples": MAX_EXAMPLES, "sources": []
    }  # fmt: skip
    notes = ""
    if name == "openai-evals":
        wheel = Path(input) if input else cache_dir("sources") / sources.EVALS_WHEEL
        if not wheel.is_file():
            from loramint.paths import pip_download

            pip_download(sources.EVALS_REQUIREMENT, wheel, sources.EVALS_SHA256, hint="pass --input <wheel>")
        if sha256_file(wheel) != sources.EVALS_SHA256:
            raise TaskError(f"{wheel} is not {sources.EVALS_WHEEL} (sha256 differs from the pinned one)")
        tasks, report = sources.openai_evals_tasks(wheel)
        license_, shipped = "MIT", True
        provenance = {
            "kind": "pypi", "requirement": sources.EVALS_REQUIREMENT, "file": sources.EVALS_WHEEL,
            "sha256": sources.EVALS_SHA256, "upstream": "https://github.com/openai/evals",
            "selection": "basic match/includes/fuzzy-match evals with >= 20 usable examples",
        }  # fmt: skip
        notes = "left out: " + ", ".join(f"{k} ({v})" for k, v in sorted(report["skipped"].items()))
    elif name == "procedural":
        tasks, license_, shipped = procedural.procedural_tasks(), "Apache-2.0", True
        provenance = {"kind": "code", "module": "loramint.procedural", "version": procedural.VERSION}
    elif name == "bbh":
        if input is None:
            raise TaskError(
                "bbh is built from a checkout of suzgunmirac/BIG-Bench-Hard: pass --input <folder>"
            )
        tasks, license_, shipped = sources.bbh_tasks(input), "MIT", False
        provenance = {
            "kind": "github", "repo": "suzgunmirac/BIG-Bench-Hard",
            "commit": "9ee07bd481feebf959a6b59d61ea57bdcf30964d", "files": "bbh/*.json, cot-prompts/*.txt",
        }  # fmt: skip
    else:
        raise NotFoundError(f"no builder for source {name!r}; builders: {', '.join(BUILDERS)}")
    seed, cap = manifest["split_seed"], manifest["max_examples"]
    tasks = [finalize(t, cap, seed) for t in tasks if len(t.examples) >= sources.MIN_EXAMPLES]
    file = f"{name}.jsonl.gz"
    path = root / file if shipped else cache_dir("corpus") / file
    old = next((s for s in manifest["sources"] if s["name"] == name), None)
    digest = write_tasks_gz(tasks, path)
    if not shipped and old is not None and old["sha256"] != digest:
        path.unlink()
        raise TaskError(
            f"{name} built from {input} differs from the corpus manifest's (sha256 {digest[:12]}..., expected "
            f"{old['sha256'][:12]}...): is it the commit {provenance.get('commit', '')[:12]}?"
        )
    entry = Source(
        name=name, license=license_, file=file, sha256=digest, tasks=len(tasks),
        examples=sum(len(t.examples) for t in tasks), shipped=shipped, provenance=provenance, notes=notes,
    )  # fmt: skip
    manifest["sources"] = [s for s in manifest["sources"] if s["name"] != name] + [entry.__dict__]
    manifest["sources"].sort(key=lambda s: (not s["shipped"], s["name"]))
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return entry
