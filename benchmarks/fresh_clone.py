"""Fresh clone check: what a new user meets, from `git clone` to a minted adapter and a green `make test`.

Phases, each timed as a user runs it (a fresh process, its own output captured to a log):

    clone    git clone --no-local <repo> <tmp>/loramint    (objects copied, not hard-linked)
    install  make setup                                    (the README's set-up: .venv, pip install -e ".[test]")
    setup    .venv/bin/loramint setup                      (verify the artifacts, base model, library, generator)
    mint     .venv/bin/loramint mint "<description>" -o <tmp>/first-adapter
    test     make test                                     (the README's test command: ruff + pytest)

Every phase runs with a new, empty HOME (no pip cache, no user cache, no config of this user's) and
LORAMINT_CACHE at an empty folder inside the clone (.ci-cache, as .ci/run sets it), so the base model and
everything else is fetched and built as on a new machine. The environment's pip configuration (PIP_*
variables, pip.conf: local wheel folders and indexes, copied into the new HOME) is used as it is. Writes
benchmarks/results/fresh_clone.json: seconds to the first adapter, the test counts and every skip's reason.

    python benchmarks/fresh_clone.py [--repo PATH_OR_URL] [--ref REF] [--no-tests] [--keep] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = "Answer questions about how long everyday events last"


def clean_env(clone: Path, home: Path) -> dict[str, str]:
    """This environment minus the active virtualenv (a user's shell has none) and with a new, empty HOME;
    pip settings kept as they are."""
    env = dict(os.environ)
    venv = env.pop("VIRTUAL_ENV", None)
    for key in (
        "PYTHONPATH",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "LORAMINT_BIGBENCH_SDIST",
    ):
        env.pop(key, None)
    env["HOME"] = str(home)
    if venv:
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv)
        )
    env["LORAMINT_CACHE"] = str(clone / ".ci-cache")
    return env


def phases(clone: Path, out: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, command) in order; every command but the clone runs inside the clone."""
    clone_cmd = ["git", "clone", "--no-local", "--quiet"] + (["--branch", args.ref] if args.ref else [])
    steps = [
        ("clone", [*clone_cmd, args.repo, str(clone)]),
        ("install", ["make", "setup"]),
        ("setup", [".venv/bin/loramint", "setup"]),
        ("mint", [".venv/bin/loramint", "mint", args.description, "-o", os.path.relpath(out, clone)]),
    ]
    return steps + ([] if args.no_tests else [("test", ["make", "test"])])


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] ([^:]+:\d+): (.*)$")


def test_counts(log: str) -> dict:
    """pytest's closing counts and each skip's reason (pytest runs with -ra) from a `make test` log."""
    summary = next(
        (line for line in reversed(log.splitlines()) if _COUNT.search(line) and " in " in line), ""
    )
    counts = {kind: int(n) for n, kind in _COUNT.findall(summary)}
    skipped = [
        {"count": int(m.group(1)), "where": m.group(2), "reason": m.group(3)}
        for m in map(_SKIP.match, log.splitlines())
        if m
    ]
    failed = [line.split(" ", 1)[1] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {
        "failed_tests": failed,
        "tests_passed": counts.get("passed", 0),
        "tests_failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "tests_skipped": counts.get("skipped", 0),
        "skipped_reasons": skipped,
        "pytest_summary": summary.strip("= "),
    }


def has_artifacts(repo: str, ref: str | None) -> bool | None:
    """Whether `ref` (HEAD) of a local repository holds artifacts/MANIFEST.json; None if not a local repo."""
    if not Path(repo).is_dir():
        return None
    done = subprocess.run(
        ["git", "-C", repo, "cat-file", "-e", f"{ref or 'HEAD'}:artifacts/MANIFEST.json"],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def pip_settings(env: dict[str, str]) -> dict:
    """What pip reads besides the command line: PIP_* variables and `pip config list`."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, env=env, check=False
    ).stdout.splitlines()
    return {"env": {k: v for k, v in env.items() if k.startswith("PIP_")}, "config": listed}


def run_phase(
    name: str, command: list[str], cwd: Path, env: dict[str, str], logs: Path, may_fail: bool = False
) -> float:
    log = logs / f"{name}.log"
    print(f"[{name}] {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0 and not may_fail:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"[{name}] failed (exit {done.returncode}) after {seconds:.1f}s; log {log}:\n{tail}")
    print(f"[{name}] {seconds:.1f}s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repo", default=str(REPO), help="repository to clone (path or URL; default: this one)"
    )
    parser.add_argument("--ref", default=None, help="branch or tag to clone (default: the repository's HEAD)")
    parser.add_argument("--description", default=DESCRIPTION, help="what the first adapter is minted for")
    parser.add_argument("--no-tests", action="store_true", help="stop after the first adapter")
    parser.add_argument("--workdir", default=None, help="parent of the temp folder (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the clone, its venv and logs")
    parser.add_argument("--dry-run", action="store_true", help="print the phases and checks, run nothing")
    parser.add_argument("--out", default="fresh_clone", help="result name under benchmarks/results/")
    args = parser.parse_args()

    artifacts = has_artifacts(args.repo, args.ref)
    if args.dry_run:
        clone = Path(args.workdir or tempfile.gettempdir()) / "<tmp>" / "loramint"
        print(f"would clone {args.repo}{f' at {args.ref}' if args.ref else ''} into {clone} and run:")
        for name, command in phases(clone, clone.parent / "first-adapter", args):
            print(f"  {name:8s} {shlex.join(command)}")
        env = clean_env(clone, clone.parent / "home")
        print(
            f"  HOME={env['HOME']} LORAMINT_CACHE={env['LORAMINT_CACHE']}; pip: {json.dumps(pip_settings(env))}"
        )
        if artifacts is False:
            print(
                "warning: the repository's HEAD has no artifacts/MANIFEST.json: `loramint setup` would fail"
            )
        print(f"then write benchmarks/results/{args.out}.json")
        return
    if artifacts is False:
        raise SystemExit(
            f"{args.repo} has no committed artifacts/MANIFEST.json at {args.ref or 'HEAD'}: run "
            "`loramint pack-defaults` and commit artifacts/ first"
        )

    work = Path(tempfile.mkdtemp(prefix="loramint-fresh-clone-", dir=args.workdir))
    clone, out, logs, home = work / "loramint", work / "first-adapter", work / "logs", work / "home"
    logs.mkdir()
    home.mkdir()
    env = clean_env(clone, home)
    pip_conf = Path.home() / ".config" / "pip" / "pip.conf"
    if pip_conf.is_file():  # how this machine reaches the package registries: configuration, not a cache
        (home / ".config" / "pip").mkdir(parents=True)
        shutil.copy(pip_conf, home / ".config" / "pip" / "pip.conf")
    ok = False
    try:
        timings = {}
        cache_empty = None
        for name, command in phases(clone, out, args):
            if name == "install":  # nothing of loramint's or pip's cached before the first command
                cache_empty = not (clone / ".ci-cache").exists() and not any(
                    p for p in home.rglob("*") if p.is_file() and p.name != "pip.conf"
                )
            timings[name] = run_phase(
                name, command, clone if name != "clone" else work, env, logs, name == "test"
            )
            if name == "mint" and not (
                (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
            ):
                raise SystemExit(f"the mint phase left no PEFT adapter in {out}")
        tests = test_counts((logs / "test.log").read_text(errors="replace")) if "test" in timings else {}
        commit = subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        manifest = json.loads((clone / "artifacts" / "MANIFEST.json").read_text())
        commands = dict(phases(clone, out, args))
        result = {
            "cache_empty": cache_empty,
            "seconds_to_first_adapter": round(sum(s for n, s in timings.items() if n != "test"), 2),
            **tests,
            "phases": [
                {
                    "name": n,
                    "seconds": round(s, 2),
                    "command": shlex.join(commands[n]).replace(str(work), "<tmp>"),
                }
                for n, s in timings.items()
            ],
            "repo": args.repo,
            "commit": commit,
            "description": args.description,
            "artifacts_bytes": manifest.get("total_bytes"),
            "home": "new and empty (<tmp>/home)",
            "loramint_cache": "new and empty (<clone>/.ci-cache)",
            "pip": pip_settings(env),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
        }
        path = write_result(args.out, result)
        print(
            f"fresh clone to first adapter: {result['seconds_to_first_adapter']:.1f}s; "
            f"({', '.join(f'{n} {s:.1f}s' for n, s in timings.items())}); "
            f"tests: {tests.get('pytest_summary', 'not run')} -> {path}"
        )
        ok = True
    finally:
        if args.keep or not ok:
            print(f"kept {work}" + ("" if ok else " (the run failed: logs under logs/)"))
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
