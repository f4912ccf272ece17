"""How long `loramint --help` and a subcommand's `--help` take, as a user sees it (a fresh process each).

The CLI imports its subcommands' modules lazily (torch, transformers and FAISS only when a command needs
them), so help answers fast. Writes benchmarks/results/bench_cli.json (median of `--runs` fresh processes
per command, after one warm-up run that fills the OS file cache).

    python benchmarks/bench_cli.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, write_result

COMMANDS = (["--help"], ["mint", "--help"], ["serve", "--help"], ["data", "show", "--help"])
TARGET_S = 1.0


def loramint() -> list[str]:
    script = Path(sys.executable).with_name("loramint")
    return [str(script)] if script.exists() else [shutil.which("loramint") or "loramint"]


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([*loramint(), *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for command in COMMANDS:
        timed(command)  # warm-up: the OS file cache, as on any second call
        runs = [timed(command) for _ in range(args.runs)]
        rows.append(
            {
                "command": "loramint " + " ".join(command),
                "median_s": round(statistics.median(runs), 3),
                "max_s": round(max(runs), 3),
            }
        )
        print(
            f"{rows[-1]['command']}: median {rows[-1]['median_s']} s, max {rows[-1]['max_s']} s", flush=True
        )
    help_s = rows[0]["median_s"]
    result = {
        "command": "python benchmarks/bench_cli.py",
        "runs": args.runs,
        "help_s": help_s,
        "target_s": TARGET_S,
        "meets_target": help_s < TARGET_S,
        "commands": rows,
        "machine": machine(),
    }
    print(write_result("bench_cli", result))


if __name__ == "__main__":
    main()
