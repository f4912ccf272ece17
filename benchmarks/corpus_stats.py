"""The task corpus in numbers: tasks, families, examples and bytes per source, and in total.

Reads corpus/ through loramint.corpus (every file checked against the manifest). Sources the repository
does not ship (bbh) count where they are built on this machine (`loramint data build bbh --input ...`);
the `shipped` block counts what every fresh clone has.

    python benchmarks/corpus_stats.py

Writes benchmarks/results/corpus.json and prints a table.
"""

from __future__ import annotations

from collections import Counter

from common import markdown_table, write_result

from loramint.corpus import Corpus


def totals(corpus: Corpus, names: list[str]) -> dict:
    tasks = [t for n in names for t in corpus.load(n)]
    return {
        "tasks": len(tasks),
        "families": len({t.family for t in tasks}),
        "examples": sum(len(t.examples) for t in tasks),
        "test_examples": sum(t.splits["test"] for t in tasks),
        "bytes": sum(corpus.path(corpus.sources[n]).stat().st_size for n in names),
        "metrics": dict(Counter(t.metric for t in tasks)),
    }


def main() -> None:
    corpus = Corpus()
    here = [n for n in corpus.available() if n in corpus.sources]  # a user's own tasks are not counted
    shipped = [n for n in here if corpus.sources[n].shipped]
    sources = []
    for name, entry in corpus.sources.items():
        row = {"name": name, "license": entry.license, "shipped": entry.shipped, "tasks": entry.tasks}
        row.update(examples=entry.examples, provenance=entry.provenance, built_here=name in here)
        if name in here:
            row["families"] = len({t.family for t in corpus.load(name)})
        sources.append(row)
    result = {
        **totals(corpus, here),
        "sources": sources,
        "shipped": {**totals(corpus, shipped), "sources": shipped},
        "corpus_version": corpus.version,
        "max_examples_per_task": corpus.max_examples,
        "split_seed": corpus.split_seed,
    }
    path = write_result("corpus", result)
    print(
        markdown_table(
            [
                {k: r.get(k, "") for k in ("name", "license", "shipped", "tasks", "families", "examples")}
                for r in sources
            ]
        )
    )
    print(f"all built here: {result['tasks']} tasks, {result['families']} families; shipped: "
          f"{result['shipped']['tasks']} tasks, {result['shipped']['families']} families, "
          f"{result['shipped']['bytes'] / 1e6:.1f} MB -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
