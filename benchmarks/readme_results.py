"""The README's table of current results, generated from benchmarks/results/*.json (never typed by hand).

    python benchmarks/readme_results.py          # rewrite the table between the README's markers
    python benchmarks/readme_results.py --check  # exit 1 when the README's table is not the generated one

The test suite runs the check, so a result that changes without its README row fails the build.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loramint.training.metrics import format_ci

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start (python benchmarks/readme_results.py) -->", "<!-- results:end -->"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _machine(result: dict) -> str:
    m = result.get("machine") or {}
    runs = [v for v in m.values() if isinstance(v, dict)] if "cores" not in m else [m]  # an assembled table
    names = []
    for run in runs:
        gpu = run.get("gpu")
        name = f"{run.get('cores', '?')}-core {run.get('cpu', '?')}" + (f", {gpu}" if gpu else "")
        names += [name] if name not in names else []
    return " / ".join(names) or "-"


def rows() -> list[tuple[str, str, str, str]]:
    """(what, result, file, machine) per line of the table."""
    out = []
    corpus = _load("corpus.json")
    shipped = corpus["shipped"]
    out.append(
        (
            "Task corpus in the repository",
            f"{shipped['tasks']} tasks, {shipped['families']} families, {shipped['examples']:,} examples "
            f"({corpus['tasks']} tasks / {corpus['families']} families with the optional BIG-Bench Hard build)",
            "corpus.json",
            "-",
        )
    )
    lib = _load("library.json")
    out.append(
        (
            "Shipped expert library (corpus tasks, early stopping)",
            f"{lib['experts']} experts from {lib['families']} families, {lib['converged']} converged; "
            f"{lib['beat_base']} beat the base model on their task's test split (the retrievable ones); "
            f"{lib['experts_per_hour_typical']:.0f} experts an hour",
            "library.json",
            _machine(lib),
        )
    )
    held = _load("eval_heldout.json")
    m, fam = held["methods"], held["groups"]["heldout_families"]
    baselines = [
        k for k in ("base+description", "few-shot", "top1", "topk", "arrow", "lorahub", "multitask") if k in m
    ]
    best = max(baselines, key=lambda k: m[k]["mean"])
    out.append(
        (
            f"{held['n_tasks']} unseen tasks ({fam['n_tasks']} in {held['n_families_heldout']} families the library "
            "and generator never saw), task metric, mean [95% CI]",
            f"base {format_ci(m['base'])}; best baseline ({best}) {format_ci(m[best])}; oracle {format_ci(m['oracle'])}; "
            f"minted {format_ci(m['minted'])}, {format_ci(held['recovered'].get('minted'), 2)} of the oracle's gain "
            f"({format_ci(fam['methods']['minted'].get('recovered'), 2)} on the held-out families); "
            f"minted for an unrelated task {format_ci(m['minted-unrelated'])}",
            "eval_heldout.json",
            _machine(held),
        )
    )
    ood = _load("ood_corpus.json")
    out.append(
        (
            f"Held-out families: {ood['n']} tasks the library and generator never saw, minted from their "
            f"description + {ood['scoring']['shots']} solved examples (task metric vs base)",
            f"served with the fallback: {ood['worse_than_base']} worse beyond noise, {ood['better_than_base']} "
            f"better, {ood['fell_back']} fell back to the base model; as minted: "
            f"{ood['minted_worse_than_base']} worse, {ood['minted_better_than_base']} better",
            "ood_corpus.json",
            _machine(ood),
        )
    )
    mint = _load("bench_mint.json")
    out.append(
        (
            "Mint latency (one description -> PEFT adapter)",
            f"p50 {mint['p50_ms']:.1f} ms, p99 {mint['p99_ms']:.1f} ms",
            "bench_mint.json",
            _machine(mint),
        )
    )
    rt = _load("bench_runtime.json")
    tps = rt["tokens_per_s"]
    out.append(
        (
            "Runtime: 8 requests with 8 different adapters in one batch",
            f"{tps['mixed8']} tokens/s = {rt['mixed8_vs_base']:.2f}x the base model, "
            f"{rt['mixed8_vs_peft_switching']:.1f}x PEFT adapter switching",
            "bench_runtime.json",
            _machine(rt),
        )
    )
    svc = _load("bench_service.json")
    out.append(
        (
            "Service: 8 clients minting (kept on disk), 30 mints with solved examples one at a time, then 32 mixed clients, killed and restarted",
            f"mint p50 {svc['mint_p50_ms']:.0f} ms / p99 {svc['mint_p99_ms']:.0f} ms "
            f"({svc['mint_only']['per_s']} mints/s); with {svc['checked_mints']['shots']} solved examples "
            f"(checked against the base model) p50 {svc['checked_mint_p50_ms'] / 1000:.1f} s / p99 "
            f"{svc['checked_mint_p99_ms'] / 1000:.1f} s, {svc['checked_mints']['fell_back']} of "
            f"{svc['checked_mints']['ok']} fell back; RSS at rest {svc['rss_rest_mb']:.0f} MB; "
            f"{svc['unexpected_errors']} unexpected errors; {svc['stored_lost']} of {svc['stored_acknowledged']} "
            "stored adapters lost",
            "bench_service.json",
            _machine(svc),
        )
    )
    faults = _load("faults.json")
    out.append(
        (
            "Fault suite against a live server",
            f"{faults['cases']} attacks: {faults['server_errors']} server errors, {faults['dropped_connections']} dropped "
            f"connections; {faults['lost_writes']} writes lost over {faults['kill9_rounds']} kill -9 rounds; "
            f"RSS {faults['rss_start_mb']:.0f} -> {faults['rss_end_mb']:.0f} MB over a {faults['soak_seconds']:.0f} s soak",
            "faults.json",
            _machine(faults),
        )
    )
    index = _load("bench_index.json")
    out.append(
        (
            f"Expert search over {index['n']:,} experts",
            f"p50 {index['p50_ms']:.2f} ms, recall@10 {index['recall_at_10']:.3f}",
            "bench_index.json",
            _machine(index),
        )
    )
    clone = _load("fresh_clone.json")
    out.append(
        (
            "Fresh clone to the first minted adapter (empty caches)",
            f"{clone['seconds_to_first_adapter']:.0f} s; then `make test`: {clone['tests_passed']} passed, "
            f"{clone['tests_failed']} failed, {clone['tests_skipped']} skipped",
            "fresh_clone.json",
            _machine(clone),
        )
    )
    cli = _load("bench_cli.json")
    out.append(("`loramint --help`", f"{cli['help_s']:.2f} s", "bench_cli.json", _machine(cli)))
    return out


def table() -> str:
    lines = ["| what | result | file | machine |", "|---|---|---|---|"]
    for what, result, name, machine in rows():
        lines.append(f"| {what} | {result} | [`{name}`](benchmarks/results/{name}) | {machine} |")
    return "\n".join(lines)


def render(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START!r} ... {END!r}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    readme = README.read_text()
    new = render(readme)
    if args.check:
        if new != readme:
            print(
                "README.md's results table is stale: run python benchmarks/readme_results.py", file=sys.stderr
            )
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
