"""ExpertLibrary: PEFT adapter folders + SQLite metadata (the source of truth) + a FAISS index (derived).

Layout of a library folder:

    library.sqlite        experts, their description embeddings, and library settings (`meta`)
    experts/<id>/         one stock PEFT folder per expert
    index.faiss, .json    the FAISS index over the embeddings and its sidecar; rebuilt whenever in doubt
    .lock                 flock'd by writers (add, remove, orphan sweep, index save)

An expert is visible iff its SQLite row exists. `add` stages the folder, renames it into experts/, then
commits the row; `remove` commits the deletion, then deletes the folder. A crash therefore leaves at most an
orphan folder, which the next `open` sweeps once it holds the lock (so a live writer is never disturbed).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loramint.adapters import LoraAdapter
from loramint.encoders.text import DEFAULT_ENCODER, Encoder
from loramint.errors import AlreadyExistsError, LibraryError, NotFoundError
from loramint.index.vectors import KINDS, IndexParams, VectorIndex, sidecar_path
from loramint.paths import staged_dir, validate_id

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_FILE = "library.sqlite"
EXPERTS_DIR = "experts"
INDEX_FILE = "index.faiss"
LOCK_FILE = ".lock"
KNOWN_DIMS = {"all-minilm-l6-v2": 384}
"""Dimensions of known embedding models, so a new library needs no encoder until a text is embedded."""
TEST_PAUSE_ENV = "LORAMINT_TEST_PAUSE_BEFORE_COMMIT"
"""Test-only: seconds `add` sleeps between moving the folder into place and committing the row, so crash
tests can SIGKILL a writer inside that window. Never set outside tests."""

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS experts (
        vid INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id (AUTOINCREMENT: never reused after a delete)
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        family TEXT NOT NULL DEFAULT '',
        base_model TEXT NOT NULL,
        rank INTEGER NOT NULL,
        alpha REAL NOT NULL,
        target_modules TEXT NOT NULL,           -- JSON list of leaf names
        modules TEXT NOT NULL,                  -- JSON list of module paths
        metrics TEXT NOT NULL,                  -- JSON object
        embedding BLOB NOT NULL,                -- float32 [dim], unit norm
        embedding_model TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS experts_family ON experts (family)",
    "CREATE INDEX IF NOT EXISTS experts_retrievable ON experts (json_extract(metrics, '$.retrievable'))",
)
UNFIT = "json_extract(metrics, '$.retrievable')"
"""SQL of an expert's `retrievable` flag (1, 0 or NULL when unset: retrievable)."""
COLUMNS = (  # what an Expert is read from (everything but the embedding)
    "id",
    "name",
    "description",
    "family",
    "base_model",
    "rank",
    "alpha",
    "target_modules",
    "modules",
    "metrics",
    "embedding_model",
    "content_hash",
    "nbytes",
    "created_at",
)
SELECT_COLUMNS = ", ".join(COLUMNS)


@dataclass(frozen=True)
class Expert:
    """One stored expert's metadata (no tensors): `expert.load_adapter()` reads its PEFT folder."""

    id: str
    name: str
    description: str
    family: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: tuple[str, ...]
    metrics: dict[str, Any] = field(hash=False)
    embedding_model: str
    content_hash: str
    """sha256 of the adapter's config and tensors (LoraAdapter.content_hash)."""
    nbytes: int
    created_at: float
    """Unix time."""
    path: Path
    """The expert's PEFT folder."""

    def load_adapter(self) -> LoraAdapter:
        return LoraAdapter.load(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


class ExpertLibrary:
    """`lib = ExpertLibrary.open("experts/")`; `lib.add(adapter, name=..., description=...)`; `lib.search(text)`."""

    def __init__(
        self,
        root: Path,
        conn: sqlite3.Connection,
        encoder: Encoder | None,
        index_kind: str,
        index_params: IndexParams,
    ) -> None:
        """Use `ExpertLibrary.open`."""
        self.root = root
        self.experts_dir = root / EXPERTS_DIR
        self._conn: sqlite3.Connection | None = conn
        self._encoder = encoder
        self.index_kind = index_kind
        self.index_params = index_params
        self._mutex = threading.RLock()  # one connection and one index, shared by this process's threads
        meta = self._meta()
        self.library_id = meta["library_id"]
        self.embedding_model = meta["embedding_model"]
        self.dim = int(meta["dim"])
        self._index = VectorIndex(self.dim, index_kind, index_params, self.embedding_model)
        self._synced_gen = -1  # the generation of SQLite the in-memory index reflects
        self._dirty = False  # the in-memory index differs from the files
        self._disk_ok = False  # the index files passed VectorIndex.load's checks at open
        self.index_source = ""
        """How the index was obtained at open: "loaded", "caught up (+a -r)", or "rebuilt (<reason>)"."""
        self.swept: list[str] = []
        """Names removed by the orphan sweep at open (crashed writers' leftovers)."""

    # ---- open / close -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        encoder: Encoder | None = None,
        create: bool = True,
        index_kind: str = "auto",
        index_params: IndexParams | None = None,
    ) -> ExpertLibrary:
        """Open (or create) the library in folder `path`.

        `encoder` embeds descriptions and text queries; if None, one is loaded lazily (only when a text must
        be embedded) for the embedding model recorded in the library (all-MiniLM-L6-v2 for a new one).
        """
        if index_kind not in KINDS:
            raise ValueError(f"index_kind must be one of {KINDS}, got {index_kind!r}")
        root = Path(path).absolute()
        if not (root / DB_FILE).is_file():
            if not create:
                raise NotFoundError(
                    f"no expert library at {root} (no {DB_FILE}); pass create=True to make one"
                )
            root.mkdir(parents=True, exist_ok=True)
        conn = _connect(root / DB_FILE)
        try:
            _init_schema(conn, encoder)
            lib = cls(root, conn, encoder, index_kind, index_params or IndexParams())
            lib._check_encoder(encoder)
        except BaseException:
            conn.close()
            raise
        lib.experts_dir.mkdir(exist_ok=True)
        lib._sweep()
        lib._open_index()
        return lib

    def close(self) -> None:
        """Save the index if it changed, then close the database. Idempotent."""
        if self._conn is None:
            return
        try:
            self.save_index()
        except (OSError, LibraryError, sqlite3.Error) as exc:  # the index is derived: never lose data over it
            log.warning(
                "could not save the index of %s (%s); it will be rebuilt on next open", self.root, exc
            )
        with self._mutex:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ExpertLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LibraryError(f"expert library {self.root} is closed")
        return self._conn

    @property
    def encoder(self) -> Encoder:
        """The library's encoder, loaded on first use."""
        if self._encoder is None:
            encoder = Encoder(self.embedding_model)
            self._check_encoder(encoder)
            self._encoder = encoder
        return self._encoder

    def _check_encoder(self, encoder: Encoder | None) -> None:
        if encoder is None:
            return
        if _model_key(encoder.name) != _model_key(self.embedding_model):
            raise LibraryError(
                f"library {self.root} was built with embedding model {self.embedding_model!r}, but the "
                f"encoder given is {encoder.name!r}: open it with that model, or make a new library"
            )
        if encoder.dim != self.dim:
            raise LibraryError(
                f"library {self.root} holds {self.dim}-d embeddings, encoder {encoder.name!r} gives {encoder.dim}-d"
            )

    # ---- writes -------------------------------------------------------------------------------------------
    def add(
        self,
        adapter: LoraAdapter | str | Path,
        *,
        id: str | None = None,
        name: str,
        description: str,
        family: str = "",
        metrics: dict[str, Any] | None = None,
        embedding: np.ndarray | None = None,
        overwrite: bool = False,
        created_at: float | None = None,
    ) -> Expert:
        """Validate and store an adapter (object or PEFT folder); returns it once it is durably stored.

        `id` defaults to a slug of `name` + 8 hex digits of the adapter's content hash. The description is
        embedded with the library's encoder unless `embedding` ([dim], from the same model) is given.
        `overwrite=True` replaces an expert with the same id (remove, then add: a crash in between may lose
        the old version, never shows a half-written one). `created_at` (seconds since the epoch) keeps an
        expert's original time when it is copied or restored; default: now.
        """
        if created_at is not None and not (isinstance(created_at, int | float) and np.isfinite(created_at)):
            raise ValueError(f"created_at must be a finite number of seconds, got {created_at!r}")
        if isinstance(adapter, str | Path):
            adapter = LoraAdapter.load(adapter)
        elif isinstance(adapter, LoraAdapter):
            adapter.validate()
        else:
            raise TypeError(
                f"adapter must be a LoraAdapter or a PEFT folder path, got {type(adapter).__name__}"
            )
        for what, value in (("name", name), ("description", description)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{what} must be a non-empty string")
        if not isinstance(family, str) or len(family) > 128:
            raise ValueError("family must be a string of at most 128 characters")
        try:
            metrics_json = json.dumps(dict(metrics or {}), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metrics must be a JSON-serialisable dict of finite values: {exc}") from exc
        content_hash = adapter.content_hash()
        expert_id = validate_id(_default_id(name, content_hash) if id is None else id, "expert id")
        if not overwrite and expert_id in self:  # fail fast, before embedding; re-checked under the lock
            raise AlreadyExistsError(
                f"expert {expert_id!r} already exists; pass overwrite=True to replace it"
            )
        vec = self._embedding(description, embedding)  # [dim]
        row = {
            "id": expert_id,
            "name": name,
            "description": description,
            "family": family,
            "base_model": adapter.config.base_model,
            "rank": adapter.config.r,
            "alpha": adapter.config.alpha,
            "target_modules": json.dumps(sorted(adapter.config.target_modules)),
            "modules": json.dumps(adapter.modules),
            "metrics": metrics_json,
            "embedding": vec.astype("<f4").tobytes(),
            "embedding_model": self.embedding_model,
            "content_hash": content_hash,
            "nbytes": adapter.nbytes(),
            "created_at": time.time() if created_at is None else float(created_at),
        }
        final = self.experts_dir / expert_id
        with self._mutex, self._lock():
            old = self._vid(expert_id)
            if old is not None and not overwrite:
                raise AlreadyExistsError(
                    f"expert {expert_id!r} already exists; pass overwrite=True to replace it"
                )
            with staged_dir(final) as tmp:
                adapter.save(tmp)
                if old is not None:
                    before, after, _ = self._write("DELETE FROM experts WHERE vid = ?", (old,))
                    self._apply(before, after, removed=[old])
                if final.exists():  # the old version's folder, or an orphan of a writer that died
                    self._discard(final)
            if pause := float(os.environ.get(TEST_PAUSE_ENV) or 0):
                time.sleep(pause)
            sql = f"INSERT INTO experts ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
            try:
                before, after, vid = self._write(sql, tuple(row.values()))
            except BaseException:
                self._discard(final)  # not acknowledged: leave nothing behind
                raise
            self._apply(before, after, added=[(vid, vec)])
        return self._expert(tuple(row[c] for c in COLUMNS))

    def remove(self, id: str) -> None:
        """Delete an expert: its row first (from then on it is gone), then its folder."""
        validate_id(id, "expert id")
        with self._mutex, self._lock():
            vid = self._vid(id)
            if vid is None:
                raise NotFoundError(f"no expert {id!r} in library {self.root}")
            before, after, _ = self._write("DELETE FROM experts WHERE vid = ?", (vid,))
            self._discard(self.experts_dir / id)
            self._apply(before, after, removed=[vid])

    def _write(self, sql: str, args: tuple) -> tuple[int, int, int]:
        """Run one statement and bump the generation counter in one transaction: (gen before, after, lastrowid)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            rowid = conn.execute(sql, args).lastrowid
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(before + 1),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return before, before + 1, rowid

    def _apply(
        self,
        before: int,
        after: int,
        added: Sequence[tuple[int, np.ndarray]] = (),
        removed: Sequence[int] = (),
    ) -> None:
        """Mirror a committed write in the in-memory index."""
        self._index.remove(removed)
        for vid, vec in added:
            self._index.add([vid], vec[None])
        if before == self._synced_gen:  # otherwise another process wrote in between: catch up before search
            self._synced_gen = after
        self._dirty = True

    def _discard(self, folder: Path) -> None:
        """Remove a folder: renamed to a `.tmp` name first, so a crash mid-delete leaves a sweepable name."""
        if not folder.exists():
            return
        trash = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- reads --------------------------------------------------------------------------------------------
    def get(self, id: str) -> Expert:
        validate_id(id, "expert id")
        with self._mutex:
            row = self.conn.execute(f"SELECT {SELECT_COLUMNS} FROM experts WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no expert {id!r} in library {self.root}")
        return self._expert(row)

    def list(self, family: str | None = None, offset: int = 0, limit: int | None = None) -> list[Expert]:
        """Experts in insertion order, optionally one family's, paged by offset/limit."""
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
        where, args = ("WHERE family = ?", [family]) if family is not None else ("", [])
        sql = f"SELECT {SELECT_COLUMNS} FROM experts {where} ORDER BY vid LIMIT ? OFFSET ?"
        with self._mutex:
            rows = self.conn.execute(sql, (*args, -1 if limit is None else limit, offset)).fetchall()
        return [self._expert(r) for r in rows]

    def __len__(self) -> int:
        with self._mutex:
            return self.conn.execute("SELECT COUNT(*) FROM experts").fetchone()[0]

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, str):
            return False
        try:
            validate_id(id)
        except ValueError:
            return False
        return self._vid(id) is not None

    def embeddings(self, ids: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(ids, [n, dim] float32 unit rows) of the stored description embeddings, all or the given ids."""
        with self._mutex:
            if ids is None:
                rows = self.conn.execute("SELECT id, embedding FROM experts ORDER BY vid").fetchall()
            else:
                by_id = {
                    r[0]: r
                    for r in self.conn.execute(
                        f"SELECT id, embedding FROM experts WHERE id IN ({', '.join('?' * len(ids))})", ids
                    )
                }
                if missing := [i for i in ids if i not in by_id]:
                    raise NotFoundError(f"no experts {missing[:5]} in library {self.root}")
                rows = [by_id[i] for i in ids]
        vecs = np.stack([np.frombuffer(r[1], "<f4") for r in rows]) if rows else np.zeros((0, self.dim))
        return [r[0] for r in rows], vecs.astype(np.float32)

    def search(
        self, query: str | np.ndarray, k: int = 5, family: str | None = None, include_unfit: bool = False
    ) -> list[tuple[Expert, float]]:
        """The k experts whose descriptions are closest to `query` (a text, or a [dim] vector from the
        library's embedding model), best first, as (expert, cosine). Experts whose metrics say
        `retrievable: false` (their quality card shows no gain over the base model) are left out unless
        `include_unfit`."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vec = self.encoder.encode(query) if isinstance(query, str) else self._embedding("", query)
        with self._mutex:
            self._catch_up()
            k = min(k, len(self._index))
            if k == 0:
                return []
            allow = None
            if family is not None:
                allow = [
                    r[0] for r in self.conn.execute("SELECT vid FROM experts WHERE family = ?", (family,))
                ]
            unfit = set() if include_unfit else self._unfit()
            wide = min(k + len(unfit), len(self._index))
            scores, vids = self._index.search(vec, wide, allow)  # [wide], [wide]
            hits = [
                (int(v), float(s)) for v, s in zip(vids, scores, strict=True) if v >= 0 and v not in unfit
            ]
            hits = hits[:k]
            sql = f"SELECT vid, {SELECT_COLUMNS} FROM experts WHERE vid IN ({', '.join('?' * len(hits))})"
            rows = {r[0]: r[1:] for r in self.conn.execute(sql, [v for v, _ in hits])}
        # A row can vanish between the index search and the read (another process removed it): skip it.
        return [(self._expert(rows[v]), s) for v, s in hits if v in rows]

    def _unfit(self) -> set[int]:
        """vids of the experts flagged `retrievable: false` (an index on the expression keeps this cheap)."""
        sql = f"SELECT vid FROM experts WHERE {UNFIT} = 0"
        return {r[0] for r in self.conn.execute(sql)}

    def _vid(self, id: str) -> int | None:
        with self._mutex:
            row = self.conn.execute("SELECT vid FROM experts WHERE id = ?", (id,)).fetchone()
        return None if row is None else row[0]

    def _expert(self, row: tuple) -> Expert:
        fields = dict(zip(COLUMNS, row, strict=True))
        for key in ("target_modules", "modules"):
            fields[key] = tuple(json.loads(fields[key]))
        fields["metrics"] = json.loads(fields["metrics"])
        return Expert(**fields, path=self.experts_dir / fields["id"])

    def _embedding(self, description: str, embedding: np.ndarray | None) -> np.ndarray:
        """[dim] float32 unit vector: `embedding` checked, or `description` encoded."""
        if embedding is None:
            return self.encoder.encode(description).astype(np.float32)
        vec = np.asarray(embedding, dtype=np.float32)
        if vec.shape not in ((self.dim,), (1, self.dim)):
            raise ValueError(
                f"embedding has shape {vec.shape}; this library's model {self.embedding_model!r} gives "
                f"[{self.dim}] vectors"
            )
        vec = vec.reshape(-1)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(vec).all() or norm < 1e-12:
            raise ValueError("embedding must be finite and non-zero")
        return vec / norm

    # ---- the derived index --------------------------------------------------------------------------------
    def _open_index(self) -> None:
        path = self.root / INDEX_FILE
        gen = self._generation()
        try:
            index = VectorIndex.load(path, model=self.embedding_model, dim=self.dim)
            lib_id, _, saved = index.fingerprint.partition(":")
            if lib_id != self.library_id:
                raise LibraryError("it belongs to another library")
            if not saved.isdigit() or int(saved) > gen:
                raise LibraryError(
                    "it is newer than the database (was library.sqlite restored from a backup?)"
                )
            if index.kind != self.index_kind:
                raise LibraryError(f"it is a {index.kind!r} index, {self.index_kind!r} was asked for")
            graph = ("hnsw_m", "ef_construction")  # the others apply to a built index as they are
            if index.active_kind == "hnsw" and any(
                getattr(index.params, f) != getattr(self.index_params, f) for f in graph
            ):
                raise LibraryError(f"its HNSW graph was built with other parameters ({index.params})")
        except LibraryError as exc:
            reason = "missing" if not path.exists() else str(exc)
            log.info("rebuilding the index of %s from SQLite: %s", self.root, reason)
            self._rebuild()
            self.index_source = f"rebuilt ({reason})"
            return
        self._dirty, self._disk_ok = index.params != self.index_params, True
        index.params = self.index_params
        self._index, self._synced_gen = index, int(saved)
        added, removed = self._catch_up()
        self.index_source = f"caught up (+{added} -{removed})" if added or removed else "loaded"

    def _catch_up(self) -> tuple[int, int]:
        """Bring the in-memory index up to SQLite (other processes may have written): (added, removed)."""
        conn = self.conn
        gen = self._generation()
        if gen == self._synced_gen:
            return 0, 0
        conn.execute("BEGIN")  # one snapshot for the generation and the rows
        try:
            gen = self._generation()
            db = {r[0] for r in conn.execute("SELECT vid FROM experts")}
            have = set(self._index.ids().tolist())
            self._index.remove(have - db)
            new = sorted(db - have)
            for start in range(0, len(new), 500):
                chunk = new[start : start + 500]
                rows = conn.execute(
                    f"SELECT vid, embedding FROM experts WHERE vid IN ({', '.join('?' * len(chunk))})", chunk
                ).fetchall()
                self._index.add([r[0] for r in rows], np.stack([np.frombuffer(r[1], "<f4") for r in rows]))
        finally:
            conn.execute("COMMIT")
        self._synced_gen = gen
        self._dirty = True
        return len(new), len(have - db)

    def _rebuild(self) -> None:
        index = VectorIndex(self.dim, self.index_kind, self.index_params, self.embedding_model)
        conn = self.conn
        conn.execute("BEGIN")
        try:
            gen = self._generation()
            vids, vecs = [], []
            for vid, blob in conn.execute("SELECT vid, embedding FROM experts ORDER BY vid"):
                vids.append(vid)
                vecs.append(np.frombuffer(blob, "<f4"))
        finally:
            conn.execute("COMMIT")
        if vids:
            index.add(vids, np.stack(vecs))
        self._index, self._synced_gen, self._dirty, self._disk_ok = index, gen, True, False

    def rebuild_index(self) -> None:
        """Rebuild the FAISS index from the embeddings in SQLite and save it."""
        with self._mutex:
            self._rebuild()
            self.save_index()

    def save_index(self) -> None:
        """Write index.faiss + index.json (atomically) if the in-memory index changed since it was read."""
        with self._mutex:
            if not self._dirty:
                return
            with self._lock():
                self._catch_up()
                self._index.fingerprint = f"{self.library_id}:{self._synced_gen}"
                if not self._same_on_disk():
                    self._index.save(self.root / INDEX_FILE)
                    self._disk_ok = True
            self._dirty = False

    def _same_on_disk(self) -> bool:
        """Whether the saved index already holds this state (another handle saved the same catch-up).

        Trusted only if the files were intact when this handle opened them: a corrupt file is rewritten.
        """
        if not self._disk_ok:
            return False
        try:
            saved = json.loads(sidecar_path(self.root / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return False
        ours = self._index
        return (saved.get("fingerprint"), saved.get("kind"), saved.get("active_kind")) == (
            ours.fingerprint,
            ours.kind,
            ours.active_kind,
        )

    @property
    def index(self) -> VectorIndex:
        """The in-memory vector index (caught up with SQLite)."""
        with self._mutex:
            self._catch_up()
            return self._index

    # ---- housekeeping -------------------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Delete leftovers of writers that died: staging dirs and folders without a row.

        Runs only if the writer lock is free right now: holding it proves no add/remove is in flight (a
        killed writer's lock is released by the kernel). If it is busy, a live writer exists and the next
        open sweeps instead.
        """
        with self._mutex, self._lock(blocking=False) as got:
            if not got:
                return
            ids = {r[0] for r in self.conn.execute("SELECT id FROM experts")}
            for entry in sorted(self.experts_dir.iterdir()):
                staged = entry.name.startswith(".") and entry.name.endswith(".tmp")
                if staged or (entry.is_dir() and entry.name not in ids):
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    self.swept.append(entry.name)
            for entry in self.root.glob(".index.*.tmp"):  # a torn atomic_write_bytes of the index
                entry.unlink(missing_ok=True)
                self.swept.append(entry.name)
            if missing := sorted(i for i in ids if not (self.experts_dir / i).is_dir()):
                log.warning(
                    "library %s: experts %s have no folder (deleted by hand?); remove them with lib.remove(id)",
                    self.root,
                    missing[:10],
                )
        if self.swept:
            log.info("library %s: swept leftovers of crashed writers: %s", self.root, self.swept)

    def _lock(self, blocking: bool = True) -> AbstractContextManager[bool]:
        """The library's writer lock (<root>/.lock); see `_file_lock`."""
        return _file_lock(self.root / LOCK_FILE, blocking)

    def _meta(self) -> dict[str, str]:
        with self._mutex:
            return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def _generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def __repr__(self) -> str:
        return f"ExpertLibrary({str(self.root)!r}, model={self.embedding_model!r}, index={self._index.active_kind})"


# ----------------------------------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE for writes).
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # Switching a new database to WAL fails at once ("database is locked", no busy wait) when
            # another process opens it at the same moment: creators take turns under the lock.
            with _file_lock(path.parent / LOCK_FILE):
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
        # FULL, not NORMAL: `remove` deletes the folder right after the commit, so the commit must survive a
        # power loss, or the row would come back without its folder. One fsync per write is cheap next to
        # the adapter files fsync'd by the same add.
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.DatabaseError as exc:
        raise LibraryError(f"{path} is not a usable SQLite database: {exc}") from exc
    return conn


@contextmanager
def _file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """flock on `path` across processes; yields whether it was acquired (always, if blocking).

    Released by the kernel if the holder dies, so a SIGKILLed writer never leaves the library locked.
    """
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _init_schema(conn: sqlite3.Connection, encoder: Encoder | None) -> None:
    """Create tables and library settings if absent (safe when several processes create at once)."""
    model = encoder.name if encoder is not None else DEFAULT_ENCODER
    dim = encoder.dim if encoder is not None else KNOWN_DIMS[_model_key(DEFAULT_ENCODER)]
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:  # not executescript: it would COMMIT the transaction
                conn.execute(statement)
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "embedding_model": model,
                "dim": str(dim),
                "normalization": "l2",
                "library_id": uuid.uuid4().hex,
                "generation": "0",
                "created_at": str(time.time()),
            }
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", defaults.items())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise LibraryError(f"expert library metadata is unreadable: {exc}") from exc
    if int(meta["schema_version"]) > SCHEMA_VERSION:
        raise LibraryError(
            f"library schema v{meta['schema_version']} is newer than this loramint's v{SCHEMA_VERSION}: upgrade"
        )


def _model_key(name: str) -> str:
    return name.strip().lower().removeprefix("sentence-transformers/")


def _default_id(name: str, content_hash: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-") or "expert"
    return f"{slug}-{content_hash[:8]}"
