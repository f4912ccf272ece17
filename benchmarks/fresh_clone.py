"""Fresh clone to first adapter: how long a new user waits from `git clone` to a minted PEFT adapter.

Phases, each timed as a user runs it (a fresh process, its own output captured to a log):

    clone    git clone --no-local <repo> <tmp>/loramint    (objects copied, not hard-linked)
    venv     python3 -m venv .venv
    install  .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e .
             (the Makefile's setup recipe; `--extras test` installs -e ".[test]" as `make setup` does)
    setup    .venv/bin/loramint setup                      (verify the artifacts, base model, library, generator)
    mint     .venv/bin/loramint mint "<description>" -o <tmp>/first-adapter

As in .ci/run, the environment's pip configuration (PIP_* variables, pip.conf: local wheel folders and
indexes) is used as it is, and LORAMINT_CACHE points at an empty folder inside the clone (.ci-cache), so the
base model is fetched and converted as on a new machine (`--loramint-cache` reuses another). The clone
needs the committed artifacts (`loramint pack-defaults`, then commit artifacts/). Writes
benchmarks/results/fresh_clone.json.

    python benchmarks/fresh_clone.py [--repo PATH_OR_URL] [--ref REF] [--extras test] [--keep] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
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


def clean_env(clone: Path, loramint_cache: str | None) -> dict[str, str]:
    """This environment minus the active virtualenv (a user's shell has none); pip settings kept as they are."""
    env = dict(os.environ)
    venv = env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    if venv:
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(venv)
        )
    env["LORAMINT_CACHE"] = loramint_cache or str(clone / ".ci-cache")
    return env


def phases(clone: Path, out: Path, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, command) in order; every command but the clone runs inside the clone."""
    python, loramint = ".venv/bin/python", ".venv/bin/loramint"  # relative: the commands run in the clone
    target = f".[{args.extras}]" if args.extras else "."
    clone_cmd = ["git", "clone", "--no-local", "--quiet"] + (["--branch", args.ref] if args.ref else [])
    return [
        ("clone", [*clone_cmd, args.repo, str(clone)]),
        ("venv", [args.python, "-m", "venv", ".venv"]),
        (
            "install",
            [
                "sh",
                "-c",
                f"{python} -m pip install -q --upgrade pip && {python} -m pip install -q -e {shlex.quote(target)}",
            ],
        ),
        ("setup", [loramint, "setup"]),
        ("mint", [loramint, "mint", args.description, "-o", os.path.relpath(out, clone)]),
    ]


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


def run_phase(name: str, command: list[str], cwd: Path, env: dict[str, str], logs: Path) -> float:
    log = logs / f"{name}.log"
    print(f"[{name}] {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
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
    parser.add_argument(
        "--python", default="python3", help="interpreter that creates the venv (Makefile: python3)"
    )
    parser.add_argument(
        "--extras", default="", help='pip extras, e.g. "test" to install as `make setup` does'
    )
    parser.add_argument("--description", default=DESCRIPTION, help="what the first adapter is minted for")
    parser.add_argument(
        "--loramint-cache", default=None, help="LORAMINT_CACHE (default: empty, in the clone)"
    )
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
        env = clean_env(clone, args.loramint_cache)
        print(f"  LORAMINT_CACHE={env['LORAMINT_CACHE']}; pip settings: {json.dumps(pip_settings(env))}")
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
    clone, out, logs = work / "loramint", work / "first-adapter", work / "logs"
    logs.mkdir()
    env = clean_env(clone, args.loramint_cache)
    ok = False
    try:
        timings = {}
        for name, command in phases(clone, out, args):
            timings[name] = run_phase(name, command, clone if name != "clone" else work, env, logs)
        if not ((out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()):
            raise SystemExit(f"the mint phase left no PEFT adapter in {out}")
        commit = subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        manifest = json.loads((clone / "artifacts" / "MANIFEST.json").read_text())
        commands = dict(phases(clone, out, args))
        result = {
            "fresh_clone_to_first_adapter_s": round(sum(timings.values()), 2),
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
            "install_extras": args.extras,
            "artifacts_bytes": manifest.get("total_bytes"),
            "loramint_cache": "fresh (<clone>/.ci-cache)"
            if args.loramint_cache is None
            else args.loramint_cache,
            "pip": pip_settings(env),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
        }
        path = write_result(args.out, result)
        print(
            f"fresh clone to first adapter: {result['fresh_clone_to_first_adapter_s']:.1f}s "
            f"({', '.join(f'{n} {s:.1f}s' for n, s in timings.items())}) -> {path}"
        )
        ok = True
    finally:
        if args.keep or not ok:
            print(f"kept {work}" + ("" if ok else " (the run failed: logs under logs/)"))
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
