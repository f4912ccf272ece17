"""Shared by the benchmark scripts: a description of the machine and the JSON/Markdown writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loramint.sysinfo import machine  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, result: dict) -> Path:
    """results/<name>.json; $BENCH_NOTE, when set, is recorded as the result's "note"."""
    if os.environ.get("BENCH_NOTE"):
        result = {**result, "note": os.environ["BENCH_NOTE"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
