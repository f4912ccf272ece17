"""The service's state and the work its endpoints hand to worker threads: minting (batched), library reads and
writes, completions (batched through the runtime). Plain Python, no HTTP: the routers only validate, queue and
format.

Threads: minting and every library call that embeds text share one thread (the encoder and its cache are not
thread-safe); the runtime has its own (one forward pass at a time anyway); downloads a third. Nothing here
runs on the event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from loramint import models
from loramint.adapters import LoraAdapter
from loramint.errors import AdapterError, AlreadyExistsError, GeneratorError, NotFoundError
from loramint.fallback import check_examples, decide
from loramint.index import Expert, ExpertLibrary
from loramint.paths import validate_id
from loramint.runtime.runtime import Runtime, Usage, similarity_weights
from loramint.service.config import ServiceConfig
from loramint.service.errors import ContextLengthError, QuotaError, UnavailableError, WorkTimeoutError
from loramint.service.lanes import Lane
from loramint.service.metrics import Metrics
from loramint.service.schemas import AdapterInfo, MintRequest, RetrievedExpert
from loramint.service.zipfiles import extract_adapter, zip_adapter

if TYPE_CHECKING:
    from loramint.gen.protocol import MintingModel

log = logging.getLogger(__name__)
Route = dict[str, float]
AUTO = "auto"


def _model_key(name: str) -> str:
    return name.strip().lower().removeprefix("sentence-transformers/")


# ---- what the lanes carry ----------------------------------------------------------------------------------
@dataclass
class CompletionJob:
    """One row of a completion batch: a raw prompt or chat messages, its route (None: the base model; an
    adapter id; or a resolved mixture), and an optional sink receiving text pieces as they are decoded."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    route: str | Route | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    sink: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when nobody waits for the result any more (the client went away, or the request timed out): the
    job is skipped if it has not started, and a runtime pass whose every row is cancelled stops early."""


@dataclass
class CompletionResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    route: Route


@dataclass
class MintJob:
    """A mint request and whose it is (a hash of its API key, or its client's address): kept mints count to
    that owner's storage quota."""

    request: MintRequest
    owner: str = ""
    defer: bool = False
    """Hand a kept adapter's disk write back as a call (see `Service._keep`) instead of doing it here."""


@dataclass
class PendingCheck:
    """A minted adapter to check on its request's solved examples (`Service.check`, on the runtime thread)
    before it is kept or the base model is served instead."""

    job: MintJob
    adapter: LoraAdapter
    drawn: dict


@dataclass
class _Row:
    """A job ready to decode: its prompt text, token count and route as a mixture."""

    index: int
    job: CompletionJob
    text: str
    prompt_tokens: int
    route: Route


class _StopFilter:
    """Accumulates one row's pieces, cuts the text before the first stop sequence and forwards to the sink
    only text that can no longer turn out to start a stop sequence."""

    def __init__(self, stops: Sequence[str], sink: Callable[[str], None] | None) -> None:
        self.stops, self.sink = list(stops), sink
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        cuts = [i for s in self.stops if (i := self.text.find(s)) >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            self._emit(len(self.text))
        else:
            self._emit(len(self.text) - self.hold)

    def close(self) -> str:
        self._emit(len(self.text))
        return self.text

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            piece, self.sent = self.text[self.sent : upto], upto
            if self.sink is not None:
                self.sink(piece)


class MintedAdapters:
    """Minted adapters not stored in the library: the most recent `capacity`, least recently used dropped
    (`on_drop(id)` is told, so the runtime can let its slot go)."""

    def __init__(self, capacity: int, on_drop: Callable[[str], None]) -> None:
        self.capacity, self.on_drop = capacity, on_drop
        self._items: OrderedDict[str, tuple[LoraAdapter, AdapterInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, adapter_id: str, adapter: LoraAdapter, info: AdapterInfo) -> None:
        with self._lock:
            self._items[adapter_id] = (adapter, info)
            self._items.move_to_end(adapter_id)
            while len(self._items) > self.capacity:
                dropped, _ = self._items.popitem(last=False)
                self.on_drop(dropped)

    def get(self, adapter_id: str) -> tuple[LoraAdapter, AdapterInfo] | None:
        with self._lock:
            item = self._items.get(adapter_id)
            if item is not None:
                self._items.move_to_end(adapter_id)
            return item

    def pop(self, adapter_id: str) -> None:
        with self._lock:
            self._items.pop(adapter_id, None)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [info for _, info in self._items.values()]

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._items

    def __len__(self) -> int:
        return len(self._items)


class MintedStore:
    """Minted adapters kept on disk (a library folder of its own, never retrieved from): each has an owner
    (a hash of the key that minted it) and an expiry; an owner's adapters together stay under a quota.
    Crash safety is the library's (a stored adapter is whole or absent); expired ones are swept at start-up
    and then on every add, and are never served."""

    def __init__(
        self,
        path: str | Path,
        encoder,
        ttl_s: float,
        quota_bytes: int,
        on_drop: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lib = ExpertLibrary.open(path, encoder=encoder)
        self.ttl_s, self.quota_bytes, self.on_drop, self.clock = ttl_s, quota_bytes, on_drop, clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, int, float]] = {}  # id -> (owner, nbytes, expires_at)
        self._adding: dict[str, threading.Event] = {}  # ids being written now: set when the write has ended
        for expert in self.lib.list():
            minted = expert.metrics.get("minted", {})
            self._entries[expert.id] = (
                minted.get("owner", ""),
                expert.nbytes,
                float(minted.get("expires_at", 0)),
            )
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove every expired adapter; returns their ids."""
        now = self.clock()
        with self._lock:
            gone = [i for i, (_, _, expires) in self._entries.items() if expires <= now]
            for adapter_id in gone:
                self._entries.pop(adapter_id)
        for adapter_id in gone:
            with contextlib.suppress(NotFoundError):
                self.lib.remove(adapter_id)
            self.on_drop(adapter_id)
        return gone

    def used(self, owner: str) -> int:
        with self._lock:
            return sum(n for o, n, _ in self._entries.values() if o == owner)

    def add(self, adapter: LoraAdapter, adapter_id: str, owner: str, embedding, **fields) -> Expert:
        self.sweep()
        nbytes, now = adapter.nbytes(), self.clock()
        with self._lock:
            if adapter_id in self._entries:  # kept already, or being added by another thread right now
                raise AlreadyExistsError(f"a kept minted adapter {adapter_id!r} exists already")
            mine = [(e, n) for o, n, e in self._entries.values() if o == owner]
            if sum(n for _, n in mine) + nbytes > self.quota_bytes:
                wait = max(1, int(min((e for e, _ in mine), default=now + 1) - now) + 1)
                raise QuotaError(
                    f"the storage quota of {self.quota_bytes >> 20} MB per API key for kept minted adapters is "
                    f"used up ({sum(n for _, n in mine) >> 20} MB in {len(mine)} adapters): delete some "
                    "(DELETE /v1/adapters/{id}), wait for them to expire, or mint with store: false",
                    retry_after=wait,
                )
            expires = now + self.ttl_s
            self._entries[adapter_id] = (owner, nbytes, expires)  # reserved: a racing add counts it
            done = self._adding[adapter_id] = threading.Event()
        metrics = dict(fields.pop("metrics", {}))
        metrics["minted"] = {**metrics.get("minted", {}), "owner": owner, "expires_at": expires}
        try:
            return self.lib.add(adapter, id=adapter_id, embedding=embedding, metrics=metrics, **fields)
        except BaseException:
            with self._lock:
                self._entries.pop(adapter_id, None)
            raise
        finally:
            with self._lock:
                self._adding.pop(adapter_id, None)
            done.set()

    def settled(self, adapter_id: str, timeout_s: float = 60.0) -> Expert | None:
        """`get(adapter_id)` once an add of it under way in another thread has ended (None: it failed)."""
        with self._lock:
            done = self._adding.get(adapter_id)
        if done is not None:
            done.wait(timeout_s)
        return self.get(adapter_id)

    def get(self, adapter_id: str) -> Expert | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
        if entry is None or entry[2] <= self.clock():
            return None
        try:
            return self.lib.get(adapter_id)
        except NotFoundError:
            return None

    def remove(self, adapter_id: str) -> bool:
        with self._lock:
            if self._entries.pop(adapter_id, None) is None:
                return False
        with contextlib.suppress(NotFoundError):
            self.lib.remove(adapter_id)
        self.on_drop(adapter_id)
        return True

    def list(self) -> list[Expert]:
        now = self.clock()
        with self._lock:
            live = {i for i, (_, _, e) in self._entries.items() if e > now}
        return [e for e in self.lib.list() if e.id in live]

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            entry = self._entries.get(adapter_id)  # type: ignore[arg-type]
        return entry is not None and entry[2] > self.clock()

    def close(self) -> None:
        self.lib.close()


class Service:
    """`Service.load(config)`; `start()` the lanes inside the event loop; `stop()`; `close()`."""

    def __init__(
        self,
        config: ServiceConfig,
        runtime: Runtime,
        library: ExpertLibrary,
        minter: MintingModel | None = None,
        metrics: Metrics | None = None,
        owns: Sequence[object] = (),
    ) -> None:
        self.config, self.runtime, self.library, self.minter = config, runtime, library, minter
        self.metrics = metrics or Metrics.create()
        self.base = runtime.base
        self.started = time.time()
        self.base_names = {self.base.name, self.base.hf_id, models.canonical_name(self.base.name)}
        if minter is not None and models.canonical_name(minter.layout.base_model) != self.base.name:
            raise GeneratorError(
                f"the generator mints adapters for {minter.layout.base_model!r}, the service's base model "
                f"is {self.base.name!r}: pass the generator trained for it"
            )
        self._stale: set[str] = set()
        self._stale_lock = threading.Lock()
        self.minted = MintedAdapters(config.max_minted, self._mark_stale)
        self._owns = list(owns)
        self.kept: MintedStore | None = None  # minted adapters persisted with an expiry
        if config.minted_store and minter is not None:
            self.kept = MintedStore(
                config.minted_store,
                library.encoder,
                ttl_s=config.minted_ttl_hours * 3600.0,
                quota_bytes=config.minted_quota_mb << 20,
                on_drop=self._mark_stale,
            )
            self._owns.append(self.kept)
        self._pools = {
            "encoder": ThreadPoolExecutor(1, "loramint-encoder"),
            "mint": ThreadPoolExecutor(config.mint_workers, "loramint-mint"),
            "runtime": ThreadPoolExecutor(1, "loramint-runtime"),
            "files": ThreadPoolExecutor(2, "loramint-files"),
        }
        lane = dict(metrics=self.metrics, queue_size=config.queue_size, timeout_s=config.timeout_s)
        wait = config.batch_wait_ms / 1000
        self.lanes = {
            "mint": Lane(
                "mint",
                self.mint_batch,
                executor=self._pools["mint"],
                max_batch=config.mint_batch,
                max_wait_s=wait,
                workers=config.mint_workers,
                **lane,
            ),
            "library": Lane("library", _call_each, executor=self._pools["encoder"], **lane),
            "generate": Lane(
                "generate",
                self.complete_batch,
                executor=self._pools["runtime"],
                max_batch=config.completion_batch,
                max_wait_s=wait,
                **lane,
            ),
            # two at once: a kept mint's hashing and checks overlap another's write (the library serialises
            # only the move into place and the row)
            "files": Lane("files", _call_each, executor=self._pools["files"], workers=2, **lane),
            # the runtime's one thread: checks of minted adapters on solved examples run between passes
            "check": Lane("check", _call_each, executor=self._pools["runtime"], **lane),
        }

    @classmethod
    def load(
        cls,
        config: ServiceConfig,
        runtime: Runtime | None = None,
        library: ExpertLibrary | None = None,
        minter: MintingModel | None = None,
        metrics: Metrics | None = None,
    ) -> Service:
        """Open what was not given: the library, the runtime on the base model, the generator (sharing the
        library's encoder when both use the same embedding model)."""
        owns: list[ExpertLibrary] = []
        if library is None:
            library = ExpertLibrary.open(config.library)
            owns.append(library)
        try:
            return cls._load(config, runtime, library, minter, metrics, owns)
        except BaseException:
            for opened in owns:
                opened.close()
            raise

    @classmethod
    def _load(cls, config, runtime, library, minter, metrics, owns) -> Service:
        if minter is None and config.generator:
            from loramint.gen.minter import Minter

            path = Path(config.generator)
            try:
                encoder_name = json.loads((path / "generator.json").read_text()).get("encoder", "")
            except (OSError, ValueError) as exc:
                raise GeneratorError(
                    f"{path} is not a generator checkpoint: {exc} (on a fresh clone, `loramint setup` restores "
                    "the default one from artifacts/)"
                ) from exc
            shared = (
                library.encoder if _model_key(encoder_name) == _model_key(library.embedding_model) else None
            )
            # the base model's device: a given runtime's, else where the runtime below will put it
            device = str(runtime.base.device) if runtime is not None else models.default_device(config.device)
            minter = Minter.from_pretrained(path, encoder=shared, device=device)
        if runtime is None:
            targets = config.target_modules
            if targets is None:  # what is served: the generator's modules and the library's experts'
                served = set(minter.layout.module_types) if minter is not None else set()
                served |= {m for expert in library.list() for m in expert.target_modules}
                targets = sorted(served) or None
            runtime = Runtime(
                config.base_model,
                library=library,
                capacity=config.capacity,
                max_rank=config.max_rank,
                device=config.device,
                top_k=config.top_k,
                **({"target_modules": targets} if targets else {}),
            )
        return cls(config, runtime, library, minter, metrics, owns=owns)

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()

    async def stop(self) -> None:
        for lane in self.lanes.values():
            await lane.stop()
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        for thing in self._owns:
            thing.close()

    # ---- lookups -----------------------------------------------------------------------------------------
    def info(self, adapter_id: str) -> AdapterInfo:
        """Metadata of a minted (in memory or kept) or stored adapter."""
        validate_id(adapter_id, "adapter id")
        if (item := self.minted.get(adapter_id)) is not None:
            return item[1]
        if self.kept is not None and (kept := self.kept.get(adapter_id)) is not None:
            return kept_info(kept)
        return expert_info(self.library.get(adapter_id))

    def adapter(self, adapter_id: str) -> LoraAdapter:
        validate_id(adapter_id, "adapter id")
        if (item := self.minted.get(adapter_id)) is not None:
            return item[0]
        if self.kept is not None and (kept := self.kept.get(adapter_id)) is not None:
            return kept.load_adapter()
        return self.library.get(adapter_id).load_adapter()

    def exists(self, adapter_id: str) -> bool:
        return (
            adapter_id in self.minted
            or (self.kept is not None and adapter_id in self.kept)
            or adapter_id in self.library
        )

    def delete_minted(self, adapter_id: str) -> None:
        """Forget a minted adapter (kept or in memory); library experts are deleted through /v1/experts."""
        validate_id(adapter_id, "adapter id")
        if adapter_id in self.minted:
            self.minted.pop(adapter_id)
            self._mark_stale(adapter_id)
            return
        if self.kept is not None and self.kept.remove(adapter_id):
            return
        if adapter_id in self.library:
            raise AlreadyExistsError(
                f"{adapter_id!r} is a library expert: delete it with DELETE /v1/experts/{adapter_id}"
            )
        raise NotFoundError(f"no minted adapter {adapter_id!r}")

    def route_of(self, model: str) -> str | None:
        """A request's `model` as a route: None (the base model), "auto", or an existing adapter id."""
        if model in self.base_names:
            return None
        if model == AUTO:
            return AUTO
        validate_id(model, "model (adapter id)")
        if not self.exists(model):
            raise NotFoundError(
                f"model {model!r} does not exist: use an adapter id from GET /v1/models, {AUTO!r} or "
                f"the base model {self.base.hf_id!r}"
            )
        return model

    def download(self, adapter_id: str) -> bytes:
        return zip_adapter(self.adapter(adapter_id), adapter_id)

    # ---- minting (the mint threads) ---------------------------------------------------------------------
    def mint_batch(self, items: Sequence[MintRequest | MintJob]) -> list[AdapterInfo | Exception]:
        """Mint every request, those with the same rank in one `mint_many` call each."""
        jobs = [item if isinstance(item, MintJob) else MintJob(item) for item in items]
        requests = [job.request for job in jobs]
        if self.minter is None:
            error = UnavailableError("this service has no generator configured: minting is off")
            return [error] * len(requests)

        groups: dict[int | None, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.rank, []).append(i)
        results: list[AdapterInfo | Exception | None] = [None] * len(requests)
        for rank, members in groups.items():
            batch = [requests[i] for i in members]
            texts, shots = [r.description for r in batch], [r.example_texts() or None for r in batch]
            try:
                adapters = self.minter.mint_many(texts, shots, rank)
                reports = self.minter.provenance(texts, shots)  # what each draws on, for the whole batch
            except Exception as exc:
                if len(members) == 1:
                    results[members[0]] = exc
                    continue
                adapters = reports = [None] * len(members)  # one bad request must not fail the others
            for at, (i, adapter, drawn) in enumerate(zip(members, adapters, reports, strict=True)):
                try:
                    if adapter is None:  # retried alone
                        adapter = self.minter.mint(texts[at], shots[at], rank)
                        (drawn,) = self.minter.provenance([texts[at]], [shots[at]])
                    results[i] = self._decide(jobs[i], adapter, drawn)
                except Exception as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]

    def _decide(self, job: MintJob, adapter: LoraAdapter, drawn: dict):
        """Fall back at once when nothing in the library is near; check a request with solved examples
        first (a `PendingCheck` for the runtime thread); keep the rest."""
        decision = decide(self.config.fallback_policy(), drawn["confidence"])
        if decision.fell_back:
            return self._fallback(job.request, drawn, decision.reason, "confidence")
        if job.request.solved():
            return PendingCheck(job, adapter, drawn)
        return self._keep(job.request, adapter, {**drawn, "fell_back": False}, job.owner, job.defer)

    def check(self, pending: PendingCheck) -> AdapterInfo | Callable[[], AdapterInfo]:
        """(The runtime thread.) Score the minted adapter against the base model on the request's solved
        examples, their answers' likelihood and the greedy answers of both; serve the base model when the
        adapter does not do better, else keep it (returned as a call for the files lane)."""
        req, adapter = pending.job.request, pending.adapter.compact()  # checked as it would be served
        probe = f"check-{uuid.uuid4().hex}"
        self.runtime.add(probe, adapter)

        def routes(minted: Sequence[bool]) -> list[str | None]:  # each row: the probe adapter or the base
            return [probe if m else None for m in minted]

        try:
            check = check_examples(
                self.base.tokenizer,
                lambda items, minted: self.runtime.answer_nll(items, routes(minted)),
                req.description,
                req.solved(),
                answer=lambda prompts, minted, limits: self.runtime.generate(
                    prompts, routes(minted), max_new_tokens=limits
                ),
            )
        finally:
            self.runtime.remove(probe)
        drawn = {**pending.drawn, "check": check.as_dict()}
        decision = decide(self.config.fallback_policy(), drawn["confidence"], check)
        if decision.fell_back:
            return self._fallback(req, drawn, decision.reason, "examples")
        return lambda: self._keep(req, adapter, {**drawn, "fell_back": False}, pending.job.owner)

    def _fallback(self, req: MintRequest, drawn: dict, reason: str | None, ground: str) -> AdapterInfo:
        """What a mint that fell back answers: the base model, with why."""
        self.metrics.fell_back.labels(ground).inc()
        base = self.base.hf_id
        return AdapterInfo(
            id=base,
            stored=False,
            name=base,
            description=req.description,
            family=req.family,
            base_model=base,
            rank=0,
            alpha=0.0,
            target_modules=[],
            num_modules=0,
            nbytes=0,
            content_hash="",
            created=int(time.time()),
            metrics={"minted": {**drawn, "fell_back": True, "fallback_reason": reason}},
            download_url=None,
            fell_back=True,
        )

    def _keep(
        self, req: MintRequest, adapter: LoraAdapter, drawn: dict, owner: str = "", defer: bool = False
    ) -> AdapterInfo | Callable[[], AdapterInfo]:
        """Keep the adapter under the request's id or its content's: in the expert library (`store: true`),
        in memory only (`store: false`), or by default on disk with an expiry, counted to `owner`'s quota.
        `defer`: for an adapter kept on disk, return all of that (hashing, the id checks, the write) as a
        call for another thread (the files lane), so that the mint thread goes on decoding meanwhile. Kept
        and served with float16 factors (`LoraAdapter.compact`): half the bytes to write, hold and send."""
        keep = "memory" if req.store is False or self.kept is None else "library" if req.store else "kept"
        if keep == "kept" and defer:
            return lambda: self._keep(req, adapter, drawn, owner)
        adapter = adapter.compact()
        digest = adapter.content_hash()
        if req.id is not None:
            adapter_id = validate_id(req.id, "adapter id")
            if self.exists(adapter_id):
                raise AlreadyExistsError(f"an adapter with id {adapter_id!r} already exists: pick another id")
        else:  # the same adapter minted again gets the same id
            adapter_id = f"minted-{digest[:16]}"
            if adapter_id in self.library:
                return expert_info(self.library.get(adapter_id))
            if (
                keep != "library"
                and self.kept is not None
                and (kept := self.kept.get(adapter_id)) is not None
            ):
                return kept_info(kept)
            if keep == "memory" and (item := self.minted.get(adapter_id)) is not None:
                return item[1]
        # which library experts it draws on, and how well the best one fits (gen.minter.provenance)
        metrics = {"minted": {"rank": req.rank, "examples": len(req.examples or []), **drawn}}
        fields = dict(
            name=req.name or adapter_id, description=req.description, family=req.family, metrics=metrics
        )
        if keep == "library":
            expert = self.library.add(adapter, id=adapter_id, **fields)
            self.minted.pop(adapter_id)
            self.metrics.minted.labels("library").inc()
            return expert_info(expert)
        if keep == "kept":
            assert self.kept is not None
            embedding = self.library.encoder.encode(req.description)  # cached: the mint encoded it already
            try:
                kept = self.kept.add(adapter, adapter_id, owner, embedding, **fields)
            except AlreadyExistsError:
                # the same adapter kept by a request that ran at the same time (files jobs run in parallel)
                if req.id is not None or (kept := self.kept.settled(adapter_id)) is None:
                    raise
                return kept_info(kept)
            self.minted.pop(adapter_id)
            self.metrics.minted.labels("kept").inc()
            return kept_info(kept)
        info = adapter_info(adapter_id, adapter, digest, **fields)
        self.minted.put(adapter_id, adapter, info)
        self.metrics.minted.labels("memory").inc()
        return info

    # ---- the library (the encoder thread) ---------------------------------------------------------------
    def retrieve(self, description: str, k: int, family: str | None) -> list[RetrievedExpert]:
        return [
            RetrievedExpert(**expert_info(e).model_dump(), score=s)
            for e, s in self.library.search(description, k=k, family=family)
        ]

    def route_auto(self, text: str) -> Route:
        """The library's `top_k` nearest experts to `text`, weighted by similarity ({} when it is empty)."""
        hits = self.library.search(text, k=self.config.top_k)
        return dict(zip([e.id for e, _ in hits], similarity_weights([s for _, s in hits]), strict=True))

    def upload(
        self, fileobj: BinaryIO, *, description: str, id: str | None, name: str | None, family: str
    ) -> AdapterInfo:
        """Validate an uploaded PEFT zip (format, base model, shapes, finite values, what the runtime serves)
        and add it to the library. Nothing is stored unless every check passes."""
        if id is not None:
            validate_id(id, "expert id")
            if self.exists(id):
                raise AlreadyExistsError(f"an adapter with id {id!r} already exists: delete it first")
        with tempfile.TemporaryDirectory(prefix="loramint-upload-") as tmp:
            extract_adapter(fileobj, Path(tmp), self.config.max_unzipped_bytes)
            adapter = LoraAdapter.load(tmp, base_model=self.base.name)
        self._check_servable(adapter)
        expert = self.library.add(
            adapter, id=id, name=name or id or "uploaded", description=description, family=family
        )
        self._mark_stale(expert.id)  # an old expert of that id may still be resident
        return expert_info(expert)

    def _check_servable(self, adapter: LoraAdapter) -> None:
        stack = self.runtime.stack
        unknown = sorted(set(adapter.weights) - set(stack.shapes))
        if unknown:
            raise AdapterError(
                f"adapter targets {unknown[:3]}, which this service's runtime does not serve "
                f"(it serves {sorted({m.rsplit('.', 1)[-1] for m in stack.shapes})})"
            )
        if (rank := max(adapter.ranks.values())) > stack.max_rank:
            raise AdapterError(f"adapter rank {rank} exceeds the service's max_rank {stack.max_rank}")

    def delete(self, expert_id: str) -> None:
        self.library.remove(expert_id)
        self._mark_stale(expert_id)

    # ---- completions (the runtime thread) ---------------------------------------------------------------
    def complete_batch(self, jobs: Sequence[CompletionJob]) -> list[CompletionResult | Exception]:
        """Decode every job: rows with the same max_tokens together in one runtime pass (each with its own
        adapter or mixture); a job that cannot be prepared fails alone."""
        results: list[CompletionResult | Exception | None] = [None] * len(jobs)
        rows: list[_Row] = []
        for i, job in enumerate(jobs):
            if job.cancelled.is_set():
                results[i] = WorkTimeoutError("cancelled: the client went away before the work started")
                continue
            try:
                rows.append(self._prepare(i, job))
            except Exception as exc:
                results[i] = exc
        self._evict_stale()
        for group in self._groups(rows):
            try:
                self._decode(group, results)
            except Exception as exc:
                for row in group:
                    if results[row.index] is None:
                        results[row.index] = exc
        return results  # type: ignore[return-value]

    def _prepare(self, index: int, job: CompletionJob) -> _Row:
        tok = self.base.tokenizer
        if job.messages is not None:
            if getattr(tok, "chat_template", None) is None:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in job.messages) + "assistant:"
            else:
                text = tok.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        else:
            text = job.prompt or ""
        n_prompt = len(tok(text, add_special_tokens=False).input_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        limit = getattr(self.base.model.config, "max_position_embeddings", None)
        if limit is not None and n_prompt + job.max_tokens > limit:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens and max_tokens is {job.max_tokens}: together over the "
                f"base model's context of {limit} tokens"
            )
        if job.route is None:
            route = {}
        elif isinstance(job.route, str):
            if not self.exists(job.route):
                raise NotFoundError(f"model {job.route!r} does not exist (deleted?)")
            route = {job.route: 1.0}
        else:
            route = dict(job.route)
        return _Row(index, job, text, n_prompt, route)

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows in arrival order, split so that no group names more experts than the runtime holds (each row
        keeps its own max_tokens inside a group)."""
        groups: list[list[_Row]] = []
        group: list[_Row] = []
        experts: set[str] = set()
        for row in rows:
            if group and len(experts | set(row.route)) > self.runtime.stack.capacity:
                groups.append(group)
                group, experts = [], set()
            group.append(row)
            experts |= set(row.route)
        if group:
            groups.append(group)
        return groups

    def _decode(self, group: list[_Row], results: list) -> None:
        stack = self.runtime.stack
        wanted = list(dict.fromkeys(e for row in group for e in row.route))
        if resident := [e for e in wanted if e in stack]:
            stack.slots(resident)  # most recently used first, so the loads below evict none of them
        failed: dict[str, Exception] = {}
        for expert_id in wanted:
            if expert_id not in stack:
                try:
                    stack.add(expert_id, self.adapter(expert_id))
                except Exception as exc:  # e.g. deleted meanwhile, or not servable: its rows fail alone
                    failed[expert_id] = exc
        for row in group:
            if bad := next((e for e in row.route if e in failed), None):
                results[row.index] = failed[bad]
        group = [row for row in group if results[row.index] is None]
        if not group:
            return
        filters = [_StopFilter(row.job.stop, row.job.sink) for row in group]
        usage: list[Usage] = []
        pieces = self.runtime.stream(
            [row.text for row in group],
            [row.route or None for row in group],
            max_new_tokens=[row.job.max_tokens for row in group],
            chat=False,
            usage=usage,
        )
        try:
            for r, piece in pieces:
                if group[r].job.cancelled.is_set():
                    if all(row.job.cancelled.is_set() for row in group):  # nobody is listening: stop the pass
                        self.metrics.cancelled.inc(len(group))
                        for row in group:
                            results[row.index] = WorkTimeoutError("cancelled: the client went away")
                        return
                    continue
                filters[r].feed(piece)
        finally:
            pieces.close()  # an early exit ends the runtime's pass after its current step
        tok = self.base.tokenizer
        for row, f, used in zip(group, filters, usage, strict=True):
            text = f.close()
            if f.stopped:  # cut at a stop sequence: count the tokens of what is returned
                n, finish = len(tok(text, add_special_tokens=False).input_ids), "stop"
            else:
                n, finish = used.completion_tokens, used.finish_reason
            results[row.index] = CompletionResult(text, finish, row.prompt_tokens, n, row.route)
            self.metrics.completion_tokens.inc(n)

    def _mark_stale(self, adapter_id: str) -> None:
        with self._stale_lock:
            self._stale.add(adapter_id)

    def _evict_stale(self) -> None:
        """Drop resident copies of deleted or replaced adapters (on the runtime thread, between passes)."""
        with self._stale_lock:
            stale, self._stale = self._stale, set()
        for adapter_id in stale:
            self.runtime.remove(adapter_id)


def _call_each(calls: Sequence[Callable[[], object]]) -> list[object]:
    out: list[object] = []
    for call in calls:
        try:
            out.append(call())
        except Exception as exc:
            out.append(exc)
    return out


def expert_info(expert: Expert) -> AdapterInfo:
    return AdapterInfo(
        id=expert.id,
        stored=True,
        name=expert.name,
        description=expert.description,
        family=expert.family,
        base_model=expert.base_model,
        rank=expert.rank,
        alpha=expert.alpha,
        target_modules=list(expert.target_modules),
        num_modules=len(expert.modules),
        nbytes=expert.nbytes,
        content_hash=expert.content_hash,
        created=int(expert.created_at),
        metrics=expert.metrics,
        download_url=f"/v1/adapters/{expert.id}/download",
    )


def kept_info(expert: Expert) -> AdapterInfo:
    """A kept minted adapter: not in the expert library, on disk until `expires_at`."""
    info = expert_info(expert)
    expires = expert.metrics.get("minted", {}).get("expires_at")
    return info.model_copy(
        update={"stored": False, "kept": True, "expires_at": int(expires) if expires else None}
    )


def adapter_info(adapter_id: str, adapter: LoraAdapter, digest: str, **fields) -> AdapterInfo:
    cfg = adapter.config
    return AdapterInfo(
        id=adapter_id,
        stored=False,
        base_model=cfg.base_model,
        rank=cfg.r,
        alpha=cfg.alpha,
        target_modules=sorted(cfg.target_modules),
        num_modules=len(adapter.modules),
        nbytes=adapter.nbytes(),
        content_hash=digest,
        created=int(time.time()),
        download_url=f"/v1/adapters/{adapter_id}/download",
        **fields,
    )
