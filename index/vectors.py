"""FAISS top-k over unit vectors with int64 ids: exact (flat) or HNSW, removals, and self-describing files.

Vectors are L2-normalised on the way in, so inner product = cosine. An index file `<name>.faiss` always
travels with a JSON sidecar `<name>.json` naming the embedding model, dimension, normalisation, kind,
parameters, a checksum of the FAISS bytes and a fingerprint of the metadata it was built from; `load`
refuses (raises LibraryError) anything that does not match, so the caller rebuilds instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from loramint.errors import LibraryError
from loramint.paths import atomic_write_bytes

KINDS = ("auto", "flat", "hnsw")
FORMAT = "loramint-vector-index"
FORMAT_VERSION = 1
SMALL_BATCH = 8
"""Searches with fewer queries than this run on one thread (see `_threads`)."""


@dataclass(frozen=True)
class IndexParams:
    """How a VectorIndex is built and searched. Defaults come from benchmarks/bench_index.py (384-d, 2 cores)."""

    auto_threshold: int = 10_000
    """kind="auto" stays exact (flat) up to this many vectors and switches to HNSW above it. Exact search
    costs ~0.065 ms per 1000 384-d vectors on one core (benchmarks/bench_index.py), so 10k keeps a
    single query under ~1 ms; 20k already takes ~1.7 ms."""
    hnsw_m: int = 32
    """HNSW graph degree (faiss `M`): higher = better recall, more memory (~2*M*4 bytes per vector) and
    slower builds. 16 is ~30% faster to build, 0.01 lower in recall@10 at 100k."""
    ef_construction: int = 80
    """HNSW candidate list while building; higher = better graph, slower add."""
    ef_search: int = 64
    """HNSW candidate list while searching (raised to k when k is larger); the recall/latency knob.
    At 100k clustered 384-d vectors: recall@10 0.99 at ~0.4 ms per query (32: 0.98, 96: 0.994)."""
    max_tombstones: float = 0.2
    """HNSW cannot delete: removed ids are filtered out of results, and the graph is rebuilt from the live
    vectors once this fraction of it is dead."""

    def __post_init__(self) -> None:
        if self.auto_threshold < 0:
            raise ValueError(f"auto_threshold must be >= 0, got {self.auto_threshold}")
        if not 4 <= self.hnsw_m <= 256:
            raise ValueError(f"hnsw_m must be in [4, 256], got {self.hnsw_m}")
        if self.ef_construction < 1 or self.ef_search < 1:
            raise ValueError("ef_construction and ef_search must be >= 1")
        if not 0.0 < self.max_tombstones <= 1.0:
            raise ValueError(f"max_tombstones must be in (0, 1], got {self.max_tombstones}")


def sidecar_path(path: str | Path) -> Path:
    """`index.faiss` -> `index.json`."""
    return Path(path).with_suffix(".json")


class VectorIndex:
    """`VectorIndex(384).add(ids, vecs)`; `search(queries, k)` -> (scores [n, k], ids [n, k], -1 = none)."""

    def __init__(
        self,
        dim: int,
        kind: str = "auto",
        params: IndexParams | None = None,
        model: str = "",
        use_gpu: bool | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.kind = kind
        """What was asked for ("auto" resolves to `active_kind` by size)."""
        self.params = params or IndexParams()
        self.model = model
        """Id of the embedding model the vectors come from (recorded in the sidecar, checked on load)."""
        self.fingerprint = ""
        """Opaque description of the metadata state the index reflects (set by the owner, saved, loaded)."""
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu = (gpus > 0) if use_gpu is None else use_gpu
        self._gpu_index = None
        self._live: set[int] = set()
        self._dead: set[int] = set()  # ids still inside an HNSW graph but removed
        self._skip = None
        self._index = self._empty("hnsw" if kind == "hnsw" else "flat")

    # ---- construction -------------------------------------------------------------------------------------
    def _empty(self, kind: str) -> faiss.IndexIDMap2:
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params.ef_construction
            inner.hnsw.efSearch = self.params.ef_search
        return faiss.IndexIDMap2(inner)

    @property
    def active_kind(self) -> str:
        """The structure in use, "flat" or "hnsw" (kind="auto" switches by size)."""
        return "hnsw" if isinstance(faiss.downcast_index(self._index.index), faiss.IndexHNSW) else "flat"

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, vid: object) -> bool:
        return vid in self._live

    @property
    def num_tombstones(self) -> int:
        return len(self._dead)

    def ids(self) -> np.ndarray:
        """Live ids, sorted: [n] int64."""
        return np.array(sorted(self._live), dtype=np.int64)

    # ---- writes -------------------------------------------------------------------------------------------
    def add(self, ids: Iterable[int] | np.ndarray, vecs: np.ndarray) -> None:
        """Add vectors [n, dim] under new int64 ids (normalised here; zero or non-finite rows are refused)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vecs = self._as_unit_rows(vecs)
        if len(ids) != len(vecs):
            raise ValueError(f"got {len(ids)} ids for {len(vecs)} vectors")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("duplicate ids in one add")
        if taken := self._live.intersection(ids.tolist()):
            raise ValueError(f"ids already in the index: {sorted(taken)[:5]}; remove them first")
        if self._dead.intersection(ids.tolist()):
            self.compact()  # a dead copy of the id would shadow the new vector
        if (
            self.kind == "auto"
            and self.active_kind == "flat"
            and len(self) + len(ids) > self.params.auto_threshold
        ):
            self._rebuild("hnsw")
        self._index.add_with_ids(vecs, ids)
        self._live.update(ids.tolist())
        self._gpu_index = None

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        gone = self._live.intersection(np.asarray(list(ids), dtype=np.int64).reshape(-1).tolist())
        if not gone:
            return 0
        self._live -= gone
        self._gpu_index = None
        if self.active_kind == "flat":
            self._index.remove_ids(faiss.IDSelectorBatch(np.array(sorted(gone), dtype=np.int64)))
        else:
            self._dead |= gone
            self._skip = None
            if len(self._dead) > self.params.max_tombstones * self._index.ntotal:
                self.compact()
        return len(gone)

    def compact(self) -> None:
        """Rebuild the structure from the live vectors, dropping tombstones."""
        self._rebuild(self.active_kind)

    def _rebuild(self, kind: str) -> None:
        ids = self.ids()
        vecs = self.reconstruct(ids)
        self._index = self._empty(kind)
        if len(ids):
            self._index.add_with_ids(vecs, ids)
        self._dead.clear()
        self._skip = None
        self._gpu_index = None

    # ---- reads --------------------------------------------------------------------------------------------
    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored unit vectors of `ids`: [n, dim] float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_batch(ids)

    def search(
        self, queries: np.ndarray, k: int, allow: Collection[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine: (scores [n, k] float32, ids [n, k] int64), padded with -inf / -1.

        `queries` is [n, dim] (or [dim], giving [k] results). `allow` restricts results to those ids
        (e.g. one family): small allow-lists are scored exactly from the stored vectors, large ones are
        filtered inside FAISS.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        single = np.asarray(queries).ndim == 1
        q = self._as_unit_rows(queries)  # q: [n, dim]
        with _threads(1 if len(q) < SMALL_BATCH else None):
            if allow is None:
                scores, ids = self._faiss_search(q, k, self._skip_selector())
            else:
                keep = np.array(sorted(self._live.intersection(allow)), dtype=np.int64)
                if len(keep) <= self.params.auto_threshold:
                    scores, ids = self._exact_subset(q, k, keep)
                else:
                    scores, ids = self._faiss_search(q, k, faiss.IDSelectorBatch(keep))
        return (scores[0], ids[0]) if single else (scores, ids)

    def _skip_selector(self) -> faiss.IDSelector | None:
        """Selector that hides tombstones (cached: rebuilt only when the tombstone set changes)."""
        if not self._dead:
            return None
        if self._skip is None:
            batch = faiss.IDSelectorBatch(np.array(sorted(self._dead), dtype=np.int64))
            self._skip = (faiss.IDSelectorNot(batch), batch)  # keep `batch` alive: Not holds a raw pointer
        return self._skip[0]

    def _faiss_search(
        self, q: np.ndarray, k: int, sel: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.active_kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.params.ef_search, k))
            if sel is not None:
                params.sel = sel
            scores, ids = self._index.search(q, k, params=params)
        elif sel is None and self.use_gpu:
            scores, ids = self._gpu().search(q, k)
        else:
            scores, ids = self._index.search(q, k, params=faiss.SearchParameters(sel=sel) if sel else None)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _exact_subset(self, q: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(q), k), -np.inf, np.float32)
        out = np.full((len(q), k), -1, np.int64)
        if not len(ids):
            return scores, out
        sims = q @ self.reconstruct(ids).T  # [n, m]
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        m = top.shape[1]
        scores[:, :m] = np.take_along_axis(sims, top, axis=1)
        out[:, :m] = ids[top]
        return scores, out

    def _gpu(self):
        """A GPU copy of the flat index, made on first search after each change (faiss-gpu builds only)."""
        if self._gpu_index is None:
            resources = faiss.StandardGpuResources()
            self._gpu_index = (faiss.index_cpu_to_gpu(resources, 0, self._index), resources)
        return self._gpu_index[0]

    def _as_unit_rows(self, vecs: np.ndarray) -> np.ndarray:
        x = np.array(vecs, dtype=np.float32, copy=True, ndmin=2)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {np.shape(vecs)}")
        if not np.isfinite(x).all():
            raise ValueError("vectors contain NaN or infinite values")
        if len(x) and (np.linalg.norm(x, axis=1) < 1e-12).any():
            raise ValueError("zero vector: cannot be normalised")
        faiss.normalize_L2(x)
        return x

    # ---- persistence --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `path` (FAISS bytes) then its JSON sidecar, each atomically; never pickle."""
        path = Path(path)
        data = faiss.serialize_index(self._index).tobytes()
        sidecar = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "embedding_model": self.model,
            "dim": self.dim,
            "normalization": "l2",
            "metric": "inner_product",
            "kind": self.kind,
            "active_kind": self.active_kind,
            "params": asdict(self.params),
            "count": len(self),
            "ntotal": int(self._index.ntotal),
            "tombstones": sorted(self._dead),
            "fingerprint": self.fingerprint,
            "sha256": hashlib.sha256(data).hexdigest(),
            "faiss_version": faiss.__version__,
            "saved_at": time.time(),
        }
        # Data first: a crash between the two writes leaves a checksum mismatch, which load refuses.
        atomic_write_bytes(path, data)
        atomic_write_bytes(sidecar_path(path), json.dumps(sidecar, indent=2).encode())

    @classmethod
    def load(
        cls, path: str | Path, model: str | None = None, dim: int | None = None, use_gpu: bool | None = None
    ) -> VectorIndex:
        """Read an index saved by `save`; LibraryError if missing, corrupt, or not for `model` / `dim`."""
        path = Path(path)
        meta = _read_sidecar(sidecar_path(path))
        if model is not None and meta["embedding_model"] != model:
            raise LibraryError(
                f"{path} was built with embedding model {meta['embedding_model']!r}, not {model!r}"
            )
        if dim is not None and meta["dim"] != dim:
            raise LibraryError(f"{path} holds {meta['dim']}-d vectors, expected {dim}-d")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LibraryError(f"cannot read {path}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise LibraryError(f"{path} does not match the checksum in its sidecar (corrupt or torn write)")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise LibraryError(f"{path} is not a readable FAISS index: {exc}") from exc
        out = cls(meta["dim"], meta["kind"], IndexParams(**meta["params"]), meta["embedding_model"], use_gpu)
        if (
            not isinstance(index, faiss.IndexIDMap2)
            or index.d != out.dim
            or index.metric_type != faiss.METRIC_INNER_PRODUCT
            or index.ntotal != meta["ntotal"]
        ):
            raise LibraryError(f"{path} does not hold what its sidecar describes")
        out._index = index
        if out.active_kind != meta["active_kind"]:
            raise LibraryError(f"{path} holds a {out.active_kind} index, sidecar says {meta['active_kind']}")
        if out.active_kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = out.params.ef_search
        out._dead = set(meta["tombstones"])
        out._live = set(faiss.vector_to_array(index.id_map).tolist()) - out._dead
        if len(out._live) != meta["count"]:
            raise LibraryError(f"{path} holds {len(out._live)} live vectors, sidecar says {meta['count']}")
        out.fingerprint = meta["fingerprint"]
        return out


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run FAISS with `n` OpenMP threads in this thread (the setting is per calling thread; None = as is).

    A single exact query split over threads is slower, not faster, on a few cores (measured: 10k x 384-d,
    2 cores: 0.79 ms on one thread, 1.32 ms on two), and a service runs many single queries side by side.
    """
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LibraryError(f"index sidecar {path} is missing") from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LibraryError(f"index sidecar {path} is unreadable: {exc}") from exc
    required = {
        "format": str,
        "version": int,
        "embedding_model": str,
        "dim": int,
        "normalization": str,
        "kind": str,
        "active_kind": str,
        "params": dict,
        "count": int,
        "ntotal": int,
        "tombstones": list,
        "fingerprint": str,
        "sha256": str,
    }
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in required.items()):
        raise LibraryError(f"index sidecar {path} lacks fields {sorted(required)} or has wrong types")
    if meta["format"] != FORMAT or meta["version"] != FORMAT_VERSION:
        raise LibraryError(f"{path} is format {meta['format']!r} v{meta['version']}, expected {FORMAT} v1")
    if meta["normalization"] != "l2" or meta["kind"] not in KINDS or meta["active_kind"] not in KINDS[1:]:
        raise LibraryError(f"{path}: unsupported normalization/kind {meta['normalization']}/{meta['kind']}")
    try:
        IndexParams(**meta["params"])
    except (TypeError, ValueError) as exc:
        raise LibraryError(f"{path}: bad params {meta['params']}: {exc}") from exc
    return meta
