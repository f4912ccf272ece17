"""The README and docs/ cannot rot: every code block in them runs, as written, in a fresh workspace.

- `python` blocks run in page order; consecutive ones share one process (a later block sees an earlier
  one's names).
- `bash` blocks run with `bash -euo pipefail`: `make` targets are checked with `make -n` (their real runs are
  the install, the test suite itself and multi-hour builds), `loramint serve` with `--help`, and curl fails
  on an HTTP error; everything else runs for real. `http://127.0.0.1:8000` is a live `loramint serve` of the shipped library and
  generator, started for these tests with the key in the workspace's `data/api-key`, as `make run` leaves.
- `mermaid` blocks (diagrams) may only name folders that exist.
Any other kind of block fails: a block a reader copies must be one that runs.

The workspace is a temp folder with `artifacts/`, `corpus/`, `configs/` and the Makefile linked in, set up
with `loramint setup` (the user's own tasks go to the workspace too), so nothing here touches the checkout's
data/. Also checked: the README's size and results table, that every file in benchmarks/results is cited,
the help texts' example commands, one generator config, no issue numbers in the code.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
URL = "http://127.0.0.1:8000"
BIN = Path(sys.executable).parent
LINKED = ("artifacts", "corpus", "configs", "Makefile", "pyproject.toml")


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block of a page."""
    text = page.read_text()
    return [(m[1], m[2], text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def test_every_block_is_of_a_kind_that_runs():
    found = [(page.name, lang, line) for page in PAGES for lang, _, line in blocks(page)]
    assert found, "no code blocks found: the fence pattern is broken"
    wrong = [f"{name}:{line} ({lang or 'no language'})" for name, lang, line in found]
    wrong = [
        w for w, (_, lang, _) in zip(wrong, found, strict=True) if lang not in ("python", "bash", "mermaid")
    ]
    assert not wrong, f"blocks that would not run (use python, bash or mermaid): {wrong}"


def test_readme_is_short_and_its_results_are_generated():
    assert (ROOT / "README.md").stat().st_size <= 12_000
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "readme_results.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


def test_every_result_file_is_cited():
    text = "\n".join(page.read_text() for page in PAGES)
    results = ROOT / "benchmarks" / "results"
    uncited = [
        str(p.relative_to(results)) for p in sorted(results.rglob("*")) if p.is_file() and p.name not in text
    ]
    assert not uncited, f"results no page cites (cite them or delete them): {uncited}"


def test_one_served_generator_config_and_no_issue_numbers_in_code():
    assert len(list((ROOT / "configs" / "generator").iterdir())) <= 3
    pattern = re.compile(r"\bissues? #?\d+", re.I)
    offenders = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if parts[0].startswith(".") or parts[0] in ("data", "runs", "build") or "egg-info" in parts[0]:
            continue
        if path.suffix in (".py", ".yaml", ".html", ".js", ".toml") or path.name == "Makefile":
            offenders += [
                f"{path.relative_to(ROOT)}:{i}"
                for i, line in enumerate(path.read_text().splitlines(), 1)
                if pattern.search(line)
            ]
    assert not offenders, f"code that cites issue numbers a reader cannot look up: {offenders}"


def test_mermaid_diagrams_name_real_folders():
    for page in PAGES:
        for lang, code, line in blocks(page):
            if lang == "mermaid":
                for folder in re.findall(r"\b([a-z_]+)/", code):
                    assert (ROOT / folder).is_dir(), (
                        f"{page.name}:{line} names {folder}/, which does not exist"
                    )


def test_help_text_examples_parse():
    """Every `loramint ...` example in a command's help text names a real command with valid arguments."""
    from loramint import cli

    examples = []
    for group in cli.COMMANDS.values():
        for func in group.values() if isinstance(group, dict) else [group]:
            examples += re.findall(r"`(loramint [^`]+)`", func.__doc__ or "")
    assert examples
    for example in examples:
        args = shlex.split(example)[1:]
        if not any(a.startswith("-") for a in args[1:]) and len(args) <= 2:
            args.append("--help")  # a bare command name: it must exist
        else:
            args.append("--print_config")  # parses and validates every argument, runs nothing
        run = subprocess.run([str(BIN / "loramint"), *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"help example {example!r}: {run.stderr[-2000:]}"


# ---- running the blocks ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    (root / ".venv").symlink_to(BIN.parent)  # the pages say .venv/bin/loramint, as `make` installs it
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "LORAMINT_USER_TASKS": str(root / "user-tasks.jsonl.gz"),
    }
    subprocess.run([str(BIN / "loramint"), "setup"], cwd=root, env=env, check=True, capture_output=True)
    (root / "data" / "api-key").write_text("docs-test-key-0123456789\n")
    port = _free_port()
    server_env = {**env, "LORAMINT_API_KEYS": "docs-test-key-0123456789", "LORAMINT_PORT": str(port)}
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(BIN / "loramint"),
            "serve",
            "--config",
            "configs/service/default.yaml",
            "--log_level",
            "warning",
        ],
        cwd=root,
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import httpx

    while True:
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start in 300 s"
        time.sleep(0.5)
    yield {"root": root, "env": env, "url": url}
    server.terminate()
    server.wait(timeout=30)


def _shell(code: str, url: str) -> str:
    """A bash block as it runs here: the live server's port, `make` checked with -n, `serve` with --help."""
    code = code.replace(URL, url).replace("curl -s ", "curl -sS --fail-with-body ")  # an HTTP error fails
    code = re.sub(r"^(\s*)make (\w[\w-]*)", r"\1make -n \2 >/dev/null", code, flags=re.M)
    return re.sub(r"^(\s*\S*loramint serve)\b.*$", r"\1 --help >/dev/null", code, flags=re.M)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(lang in ("python", "bash") for lang, _, _ in blocks(p))],
    ids=lambda p: p.name,
)
def test_the_blocks_of_a_page_run_as_written(page, workspace):
    root, env = workspace["root"], workspace["env"]
    python = [(code, line) for lang, code, line in blocks(page) if lang == "python"]
    shell = [(code, line) for lang, code, line in blocks(page) if lang == "bash"]
    # blocks run in page order; consecutive python blocks share one process (one script)
    order = sorted(
        [(line, "python", code) for code, line in python] + [(line, "bash", code) for code, line in shell]
    )
    pending: list[tuple[int, str]] = []

    def flush_python() -> None:
        if not pending:
            return
        script = "\n".join(f"# --- {page.name}:{line}\n{code}" for line, code in pending)
        script = script.replace(URL, workspace["url"])
        run = subprocess.run(
            [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
        )
        numbered = "\n".join(f"{i:4} {x}" for i, x in enumerate(script.splitlines(), 1))
        assert run.returncode == 0, f"python blocks of {page.name}:\n{numbered}\n{run.stderr[-4000:]}"
        pending.clear()

    for line, lang, code in order:
        if lang == "python":
            pending.append((line, code))
            continue
        flush_python()
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _shell(code, workspace["url"])],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, f"{page.name}:{line}:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    flush_python()
