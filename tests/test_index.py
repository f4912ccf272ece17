"""loramint.index: VectorIndex (flat/HNSW, removal, persistence) and ExpertLibrary (CRUD, semantic search,
validation, index rebuilds, multi-process writers, crash safety under SIGKILL)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from loramint.adapters import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter
from loramint.errors import AdapterError, AlreadyExistsError, InvalidIdError, LibraryError, NotFoundError
from loramint.index import ExpertLibrary, IndexParams, VectorIndex
from loramint.index.library import DB_FILE, INDEX_FILE, LOCK_FILE, TEST_PAUSE_ENV

DIM = 384

TASKS = [  # (id, family, description)
    ("sentiment", "classification", "Classify the sentiment of a movie review as positive or negative."),
    ("translate-fr", "generation", "Translate English sentences into French."),
    ("arithmetic", "math", "Solve grade-school arithmetic word problems step by step."),
    ("science-qa", "qa", "Answer multiple-choice questions about elementary science."),
    ("topic", "classification", "Assign a news article to a topic such as sports, politics or business."),
    ("summarize", "generation", "Write a one-sentence summary of a long news article."),
]


@cache
def adapter(seed: int) -> LoraAdapter:
    return LoraAdapter.random("tiny-llama", r=4, seed=seed)


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


@pytest.fixture(scope="session")
def encoder():
    from loramint.encoders.text import Encoder

    return Encoder()


@pytest.fixture
def lib(tmp_path, encoder):
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        yield library


def fill(library: ExpertLibrary) -> None:
    for i, (id_, family, desc) in enumerate(TASKS):
        library.add(
            adapter(i), id=id_, name=id_.title(), description=desc, family=family, metrics={"acc": i / 10}
        )


def folders(root: Path) -> set[str]:
    return {p.name for p in (root / "experts").iterdir()}


# ---- VectorIndex -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw", "auto"])
def test_vector_index_add_search_remove_save_load(tmp_path, kind):
    vecs = np.stack([unit(i, 32) for i in range(300)])
    index = VectorIndex(32, kind, IndexParams(auto_threshold=100, hnsw_m=8), model="m")
    index.add(np.arange(300) + 1000, vecs)
    assert index.active_kind == ("flat" if kind == "flat" else "hnsw") and len(index) == 300
    scores, ids = index.search(vecs[:20], k=3)
    assert (ids[:, 0] == np.arange(20) + 1000).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.remove([1000, 1001, 999_999]) == 2
    _, ids = index.search(vecs[:2], k=300)
    assert not {1000, 1001} & set(ids.ravel().tolist())
    assert (ids >= 0).sum(axis=1).tolist() == [298, 298]  # every live vector, no removed one
    index.fingerprint = "lib:7"
    index.save(tmp_path / "v.faiss")
    again = VectorIndex.load(tmp_path / "v.faiss", model="m", dim=32)
    assert (again.active_kind, len(again), again.fingerprint) == (index.active_kind, 298, "lib:7")
    np.testing.assert_array_equal(again.search(vecs[2:9], k=4)[1], index.search(vecs[2:9], k=4)[1])


def test_vector_index_allow_list_matches_numpy_reference():
    vecs = np.stack([unit(i, 16) for i in range(500)])
    queries = np.stack([unit(10_000 + i, 16) for i in range(5)])
    allow = list(range(0, 500, 7))
    for params in (IndexParams(), IndexParams(auto_threshold=10)):  # exact subset path, FAISS selector path
        index = VectorIndex(16, "flat", params)
        index.add(np.arange(500), vecs)
        scores, ids = index.search(queries, k=5, allow=allow)
        ref = np.argsort(-(queries @ vecs[allow].T), axis=1)[:, :5]
        np.testing.assert_array_equal(ids, np.array(allow)[ref])
        assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_hnsw_tombstones_are_compacted():
    index = VectorIndex(16, "hnsw", IndexParams(hnsw_m=8, max_tombstones=0.2))
    index.add(np.arange(100), np.stack([unit(i, 16) for i in range(100)]))
    index.remove(range(15))
    assert index.num_tombstones == 15
    index.remove(range(15, 25))  # 25 dead > 20% of 100: the graph is rebuilt without them
    assert index.num_tombstones == 0 and len(index) == 75
    assert index.search(unit(50, 16), k=1)[1][0] == 50


@pytest.mark.parametrize(
    "vecs, ids, match",
    [
        (np.zeros((1, 8)), [1], "zero"),
        (np.full((1, 8), np.nan), [1], "NaN"),
        (np.ones((1, 7)), [1], "dimension"),
        (np.ones((2, 8)), [1, 1], "duplicate"),
        (np.ones((1, 8)), [5], "already"),
    ],
)
def test_vector_index_rejects_bad_input(vecs, ids, match):
    index = VectorIndex(8, "flat")
    index.add([5], np.ones((1, 8)))
    with pytest.raises(ValueError, match=match):
        index.add(ids, vecs)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: p.write_bytes(b"garbage" * 100), "checksum"),
        (lambda p: p.with_suffix(".json").write_text("{not json"), "unreadable"),
        (lambda p: p.with_suffix(".json").unlink(), "missing"),
    ],
)
def test_vector_index_load_refuses_damaged_files(tmp_path, corrupt, match):
    index = VectorIndex(8, "flat", model="m")
    index.add([1, 2], np.eye(8)[:2])
    index.save(tmp_path / "v.faiss")
    with pytest.raises(LibraryError, match="other-model"):
        VectorIndex.load(tmp_path / "v.faiss", model="other-model")
    corrupt(tmp_path / "v.faiss")
    with pytest.raises(LibraryError, match=match):
        VectorIndex.load(tmp_path / "v.faiss", model="m")


# ---- ExpertLibrary: CRUD, search ------------------------------------------------------------------------


def test_add_get_list_remove(lib):
    fill(lib)
    assert len(lib) == len(TASKS) and "sentiment" in lib and "nope" not in lib and "../x" not in lib
    expert = lib.get("sentiment")
    assert (expert.name, expert.family, expert.base_model, expert.rank) == (
        "Sentiment",
        "classification",
        "tiny-llama",
        4,
    )
    assert expert.metrics == {"acc": 0.0} and expert.embedding_model == "all-MiniLM-L6-v2"
    assert expert.path == lib.root / "experts" / "sentiment" and expert.modules == tuple(adapter(0).modules)
    assert expert.load_adapter().content_hash() == adapter(0).content_hash() == expert.content_hash
    assert [e.id for e in lib.list()] == [t[0] for t in TASKS]
    assert [e.id for e in lib.list(family="generation")] == ["translate-fr", "summarize"]
    assert [e.id for e in lib.list(offset=1, limit=2)] == ["translate-fr", "arithmetic"]
    with pytest.raises(ValueError, match="offset"):
        lib.list(offset=-1)
    lib.remove("sentiment")
    assert "sentiment" not in lib and not expert.path.exists() and len(lib) == len(TASKS) - 1
    assert all(e.id != "sentiment" for e, _ in lib.search("movie review sentiment", k=10))


def test_default_id_is_slug_plus_hash(lib):
    expert = lib.add(adapter(0), name="My Sentiment Expert!", description="Sentiment.", embedding=unit(0))
    assert expert.id == f"my-sentiment-expert-{adapter(0).content_hash()[:8]}"
    with pytest.raises(AlreadyExistsError):  # same adapter and name again: same id
        lib.add(adapter(0), name="My Sentiment Expert!", description="Sentiment.", embedding=unit(0))


@pytest.mark.parametrize(
    "query, expected",
    [
        ("classify the sentiment of a review", "sentiment"),
        ("is this product review happy or angry?", "sentiment"),
        ("render this English text in French", "translate-fr"),
        ("compute how many apples are left after eating some", "arithmetic"),
        ("which planet is closest to the sun? A) Mars B) Mercury", "science-qa"),
        ("condense this article into a short tl;dr", "summarize"),
    ],
)
def test_search_ranks_closest_description_first(lib, query, expected):
    fill(lib)
    hits = lib.search(query, k=len(TASKS))
    assert hits[0][0].id == expected
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == len(TASKS)


def test_search_family_filter_and_vector_query(lib, encoder):
    fill(lib)
    hits = lib.search("sports news", k=5, family="classification")
    assert [e.id for e, _ in hits] == ["topic", "sentiment"]
    assert lib.search("anything", k=3, family="no-such-family") == []
    vec = encoder.encode("Translate English sentences into French.")
    (best, score), *_ = lib.search(vec, k=2)
    assert best.id == "translate-fr" and score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="384"):
        lib.search(np.ones(10), k=2)


def test_persistence_across_reopen(tmp_path, encoder):
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        fill(library)
        library.remove("topic")
    assert {INDEX_FILE, "index.json", DB_FILE}.issubset(p.name for p in (tmp_path / "lib").iterdir())
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder, create=False) as library:
        assert library.index_source == "loaded" and len(library) == len(TASKS) - 1
        assert library.search("translate to French", k=1)[0][0].id == "translate-fr"
        assert library.get("arithmetic").load_adapter().content_hash() == adapter(2).content_hash()


def test_open_without_encoder_loads_the_default_lazily(tmp_path, encoder):
    with pytest.raises(NotFoundError):
        ExpertLibrary.open(tmp_path / "missing", create=False)
    with ExpertLibrary.open(tmp_path / "lib") as library:
        vec = encoder.encode(TASKS[0][2])
        library.add(adapter(0), id="sentiment", name="s", description=TASKS[0][2], embedding=vec)
        assert library._encoder is None  # a given embedding needs no encoder
    with ExpertLibrary.open(tmp_path / "lib") as library:
        from loramint.encoders.text import Encoder

        library.add(adapter(1), id="translate-fr", name="t", description=TASKS[1][2])  # embedded by MiniLM
        assert isinstance(library._encoder, Encoder)
        assert library.search("classify the sentiment of a review", k=5)[0][0].id in {
            "sentiment",
            "translate-fr",
        }
        assert library.search("translate into French", k=1)[0][0].id == "translate-fr"


# ---- ExpertLibrary: errors ------------------------------------------------------------------------------

BAD_IDS = [
    "../x",
    "a/b",
    "",
    "..",
    "x" * 200,
    ".hidden",
    "a b",
    "/etc/passwd",
    "a\x00b",
    "abc\n",
]  # "$" matched before a final newline


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_rejected(lib, bad):
    with pytest.raises(InvalidIdError):
        lib.add(adapter(0), id=bad, name="x", description="x", embedding=unit(0))
    for call in (lib.get, lib.remove):
        with pytest.raises(InvalidIdError):
            call(bad)
    assert len(lib) == 0 and folders(lib.root) == set()


def test_duplicate_and_unknown_ids(lib):
    lib.add(adapter(0), id="dup", name="a", description="first", embedding=unit(0))
    with pytest.raises(AlreadyExistsError, match="overwrite"):
        lib.add(adapter(1), id="dup", name="b", description="second", embedding=unit(1))
    assert lib.get("dup").content_hash == adapter(0).content_hash()
    replaced = lib.add(
        adapter(1), id="dup", name="b", description="second", embedding=unit(1), overwrite=True
    )
    assert (
        replaced.content_hash == adapter(1).content_hash() and len(lib) == 1 and folders(lib.root) == {"dup"}
    )
    assert replaced.load_adapter().content_hash() == adapter(1).content_hash()
    assert lib.search(unit(1), k=5)[0][0].description == "second" and len(lib.search(unit(0), k=5)) == 1
    for call in (lib.get, lib.remove):
        with pytest.raises(NotFoundError, match="unknown"):
            call("unknown")


def _wrong_shape(folder: Path) -> None:
    state = load_file(folder / WEIGHTS_FILE)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:, :-3].contiguous()
    save_file(state, folder / WEIGHTS_FILE)


def _nan(folder: Path) -> None:
    state = load_file(folder / WEIGHTS_FILE)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, folder / WEIGHTS_FILE)


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (_wrong_shape, "another base model"),
        (_nan, "NaN"),
        (lambda f: (f / "adapter_model.bin").write_bytes(b"\x80\x04pickle"), "pickle"),
        (lambda f: (f / WEIGHTS_FILE).unlink(), "no adapter_model.safetensors"),
        (lambda f: (f / WEIGHTS_FILE).write_bytes(b"not safetensors"), "safetensors"),
        (lambda f: _config(f, use_dora=True), "DoRA"),
    ],
)
def test_bad_adapters_are_rejected_and_nothing_is_stored(lib, tmp_path, corrupt, match):
    folder = adapter(0).save(tmp_path / "bad")
    corrupt(folder)
    with pytest.raises(AdapterError, match=match):
        lib.add(folder, id="bad", name="bad", description="bad", embedding=unit(0))
    assert len(lib) == 0 and folders(lib.root) == set() and lib.search(unit(0), k=3) == []


def test_bad_adapter_object_is_rejected(lib):
    broken = LoraAdapter(
        adapter(0).config, {m: (a.clone(), b.clone()) for m, (a, b) in adapter(0).weights.items()}
    )
    next(iter(broken.weights.values()))[1][0, 0] = float("inf")
    with pytest.raises(AdapterError, match="infinite"):
        lib.add(broken, id="bad", name="bad", description="bad", embedding=unit(0))
    with pytest.raises(ValueError, match="384"):
        lib.add(adapter(0), id="ok", name="ok", description="ok", embedding=np.ones(12))
    assert len(lib) == 0 and folders(lib.root) == set()


def test_other_encoder_is_refused(tmp_path, encoder):
    class OtherEncoder:
        name, dim = "intfloat/e5-small-v2", 384

    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        library.add(adapter(0), id="a", name="a", description="a", embedding=unit(0))
    with pytest.raises(LibraryError, match="all-MiniLM-L6-v2.*intfloat/e5-small-v2"):
        ExpertLibrary.open(tmp_path / "lib", encoder=OtherEncoder())


# ---- ExpertLibrary: the derived index -------------------------------------------------------------------


def _break_faiss(root: Path) -> None:
    (root / INDEX_FILE).write_bytes(os.urandom(4096))


def _other_model(root: Path) -> None:
    meta = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({**meta, "embedding_model": "intfloat/e5-small-v2"}))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_break_faiss, "checksum"),
        (_other_model, "e5-small"),
        (lambda root: (root / INDEX_FILE).unlink(), "missing"),
        (lambda root: (root / "index.json").unlink(), "missing"),
    ],
)
def test_damaged_or_foreign_index_is_rebuilt(tmp_path, encoder, damage, reason):
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        fill(library)
    damage(tmp_path / "lib")
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        assert library.index_source.startswith("rebuilt") and reason in library.index_source
        assert library.search("classify the sentiment of a review", k=1)[0][0].id == "sentiment"
        assert len(library.index) == len(TASKS)
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:
        assert library.index_source == "loaded"  # the rebuilt index was saved


def test_other_handle_sees_writes_before_search(tmp_path, encoder):
    with (
        ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as reader,
        ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as writer,
    ):
        assert reader.search(unit(5), k=1) == []
        writer.add(adapter(5), id="late", name="late", description="late", embedding=unit(5))
        assert reader.search(unit(5), k=1)[0][0].id == "late"
        writer.remove("late")
        assert reader.search(unit(5), k=1) == []
    with ExpertLibrary.open(tmp_path / "lib", encoder=encoder) as library:  # saved with writer's last state
        assert library.index_source == "loaded" and len(library.index) == 0


def test_stale_saved_index_is_caught_up_not_rebuilt(tmp_path):
    with ExpertLibrary.open(tmp_path / "lib") as library:
        for i in range(4):
            library.add(adapter(i), id=f"e{i}", name="e", description="e", embedding=unit(i))
    stale = (tmp_path / "lib" / INDEX_FILE).read_bytes(), (tmp_path / "lib" / "index.json").read_bytes()
    with ExpertLibrary.open(tmp_path / "lib") as library:
        library.remove("e0")
        library.add(adapter(9), id="e9", name="e", description="e", embedding=unit(9))
    (tmp_path / "lib" / INDEX_FILE).write_bytes(stale[0])  # as if the last writer died before saving
    (tmp_path / "lib" / "index.json").write_bytes(stale[1])
    with ExpertLibrary.open(tmp_path / "lib") as library:
        assert library.index_source == "caught up (+1 -1)"
        assert library.search(unit(9), k=1)[0][0].id == "e9" and library.search(unit(0), k=1)[0][0].id != "e0"


def test_auto_kind_switches_to_hnsw_and_stays_exact_on_matches(tmp_path):
    params = IndexParams(auto_threshold=5, hnsw_m=8)
    with ExpertLibrary.open(tmp_path / "lib", index_params=params) as library:
        for i in range(4):
            library.add(
                adapter(i), id=f"e{i}", name="e", description="e", family=f"f{i % 2}", embedding=unit(i)
            )
        assert library.index.active_kind == "flat"
        for i in range(4, 12):
            library.add(
                adapter(i), id=f"e{i}", name="e", description="e", family=f"f{i % 2}", embedding=unit(i)
            )
        assert library.index.active_kind == "hnsw"
        for i in range(12):
            (best, score), *_ = library.search(unit(i), k=3)
            assert best.id == f"e{i}" and score == pytest.approx(1.0, abs=1e-5)
        library.remove("e3")
        assert library.index.num_tombstones == 1
        assert all(e.id != "e3" for e, _ in library.search(unit(3), k=12))
        assert {e.family for e, _ in library.search(unit(1), k=12, family="f1")} == {"f1"}
    with ExpertLibrary.open(tmp_path / "lib", index_params=params) as library:
        assert library.index_source == "loaded" and library.index.active_kind == "hnsw"
        assert library.search(unit(7), k=1)[0][0].id == "e7"
    with ExpertLibrary.open(
        tmp_path / "lib", index_kind="flat"
    ) as library:  # asked for another kind: rebuilt
        assert library.index_source.startswith("rebuilt") and library.index.active_kind == "flat"
        assert len(library.index) == 11


# ---- ExpertLibrary: crash safety and multiple processes -------------------------------------------------


def _assert_consistent(library: ExpertLibrary) -> None:
    """Rows and folders agree one to one, nothing staged is left, every expert loads."""
    ids = {e.id for e in library.list()}
    assert folders(library.root) == ids
    for expert in library.list():
        expert.load_adapter()


def test_sweep_removes_orphans_only_when_no_writer_holds_the_lock(tmp_path):
    import fcntl

    root = tmp_path / "lib"
    with ExpertLibrary.open(root) as library:
        library.add(adapter(0), id="kept", name="k", description="k", embedding=unit(0))
    adapter(1).save(root / "experts" / "orphan")  # renamed into place, row never committed
    (root / "experts" / ".staged.abc123.tmp").mkdir()  # a writer died while staging
    with open(root / LOCK_FILE, "a+b") as held:  # a live writer in another process
        fcntl.flock(held, fcntl.LOCK_EX)
        with ExpertLibrary.open(root) as library:
            assert library.swept == [] and {"orphan", ".staged.abc123.tmp"} <= folders(root)
            assert "orphan" not in library and len(library) == 1
        fcntl.flock(held, fcntl.LOCK_UN)
    with ExpertLibrary.open(root) as library:
        assert sorted(library.swept) == [".staged.abc123.tmp", "orphan"]
        _assert_consistent(library)
        library.add(adapter(1), id="orphan", name="o", description="o", embedding=unit(1))  # the id is free


def _concurrent_writer(root: str, worker: int, n: int, barrier) -> None:
    adapters = [adapter(100 * worker + i) for i in range(n)]  # built before the barrier: only adds race
    barrier.wait(timeout=120)
    with ExpertLibrary.open(root) as library:
        for i, a in enumerate(adapters):
            library.add(a, id=f"w{worker}-{i}", name="w", description="w", embedding=unit(100 * worker + i))


def test_concurrent_adds_from_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, n = ctx.Barrier(2), 12
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(tmp_path / "lib"), w, n, barrier)) for w in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    with ExpertLibrary.open(tmp_path / "lib") as library:
        assert len(library) == 2 * n and len(library.index) == 2 * n
        for w in (1, 2):
            for i in range(n):
                assert library.search(unit(100 * w + i), k=1)[0][0].id == f"w{w}-{i}"
        _assert_consistent(library)


def _add_until_killed(root: str, acks: str, pause: str) -> None:
    os.environ[TEST_PAUSE_ENV] = pause  # > 0 widens the window between folder rename and row commit
    with ExpertLibrary.open(root) as library, open(acks, "a") as out:
        for i in range(10_000):
            library.add(adapter(i), id=f"k{i}", name="k", description="k", embedding=unit(i))
            out.write(f"k{i}\n")  # acknowledged: add() returned
            out.flush()


def _in_commit_window(root: Path, db: sqlite3.Connection, acked: set[str]) -> str | None:
    """The id of a folder already renamed into place whose row is not committed yet, if any."""
    rows = {r[0] for r in db.execute("SELECT id FROM experts")}
    return next(iter({f for f in folders(root) if not f.startswith(".")} - rows - acked), None)


@pytest.mark.parametrize("window", [True, False], ids=["between-rename-and-commit", "random-moment"])
def test_sigkill_during_add_leaves_no_half_expert(tmp_path, window):
    root, acks = tmp_path / "lib", tmp_path / "acks.txt"
    acks.touch()
    ExpertLibrary.open(root).close()
    args = (str(root), str(acks), "0.3" if window else "0")
    proc = mp.get_context("spawn").Process(target=_add_until_killed, args=args)
    proc.start()
    db = sqlite3.connect(root / DB_FILE)
    deadline, pending = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and proc.is_alive():
            acked = set(acks.read_text().split())
            if len(acked) >= 3:
                if not window:
                    time.sleep(np.random.default_rng().uniform(0, 0.05))  # lands anywhere in add()
                    break
                if pending := _in_commit_window(root, db, acked):
                    break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        if window:
            assert pending is not None, "the writer never reached the commit window"
            assert pending in folders(root)
            assert not db.execute("SELECT 1 FROM experts WHERE id = ?", (pending,)).fetchone()
    finally:
        db.close()
        if proc.is_alive():
            proc.kill()

    acked = acks.read_text().split()
    assert len(acked) >= 3
    with ExpertLibrary.open(root) as library:
        if window:
            assert pending in library.swept and pending not in library
        for id_ in acked:
            i = int(id_[1:])
            assert library.get(id_).load_adapter().content_hash() == adapter(i).content_hash()
            assert library.search(unit(i), k=1)[0][0].id == id_
        _assert_consistent(library)
        library.add(adapter(999), id="after", name="a", description="a", embedding=unit(999))
        assert library.search(unit(999), k=1)[0][0].id == "after"
