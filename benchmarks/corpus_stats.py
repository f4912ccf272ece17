"""The task corpus in numbers: tasks, families, examples and bytes per source, and in total.

Reads corpus/ through loramint.corpus (every file checked against the manifest). Sources the repository
does not ship (bbh) count where they are built on this machine (`loramint data build bbh --input ...`);
the `shipped` block counts what every fresh clone has.

    python benchmarks/corpus_stats.py

Writes benchmarks/results/corpus.json and prints a table.
"""

from __future__ import annotations

from common import markdown_table, write_result

from loramint.corpus import Corpus


def main() -> None:
    corpus = Corpus()
    here = [n for n in corpus.available() if n in corpus.sources]  # a user's own tasks are not counted
    built = {row["name"]: row for row in corpus.summary(here)["sources"]}
    sources = [
        {"name": name, "license": entry.license, "shipped": entry.shipped, "tasks": entry.tasks,
         "examples": entry.examples, "provenance": entry.provenance, "built_here": name in built,
         **({"families": built[name]["families"]} if name in built else {})}
        for name, entry in corpus.sources.items()
    ]  # fmt: skip
    shipped = [n for n in here if corpus.sources[n].shipped]
    result = {
        **{k: v for k, v in corpus.summary(here).items() if k != "sources"},
        "sources": sources,
        "shipped": {**corpus.summary(shipped), "sources": shipped},
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
