"""Service load test: a real `loramint serve` process on loopback under concurrent clients, killed with SIGKILL
during the load and restarted, then every adapter it acknowledged as stored is checked.

    python benchmarks/bench_service.py                  # 8 minting clients for 30 s, then 32 mixed clients for
                                                        # 60 s, the shipped library + generator
    python benchmarks/bench_service.py --quick          # 8 clients, 12 s (a smoke run)
    python benchmarks/bench_service.py --library L --generator G --base-model tiny-llama --clients 4 --duration 3

What it does:
- copies `--library` into a temporary folder (the real library is never written; the copy is deleted at the
  end) and starts `python -m loramint.cli serve` on a random free loopback port, every
  path and one fresh API key per client (concurrent users: each its own rate limit and storage quota) passed
  as LORAMINT_* environment variables (which override the config file and flags);
- before the mixed load: `--mint-clients` clients only minting for `--mint-duration` s, then
  `--checked-mints` mints with 5 solved examples each, one at a time (the service checks each adapter
  against the base model on them before serving it; `checked_mint_p50_ms`, how many `fell_back`);
- runs `--clients` closed-loop asyncio + httpx clients for `--duration` seconds of load: a mix of
  POST /v1/adapters (mint; `--store-fraction` of them with `store: true` and an explicit id),
  POST /v1/retrieve and POST /v1/completions (`--max-tokens` new tokens; `model` a minted id, "auto" or the
  base model, a third each). Every description is new (the encoder's cache does not help);
- at `--kill-at` of the load (once at least one stored adapter was acknowledged) the server gets SIGKILL,
  is restarted on the same library copy and the load goes on; at the end of the load it gets SIGKILL again,
  under load, and is restarted once more;
- on that last server every adapter acknowledged as stored (2xx with its id) must still be there:
  GET /v1/adapters/{id} (stored, same content hash), GET /v1/adapters/{id}/download (a valid PEFT zip) and
  POST /v1/retrieve (each stored adapter has its own family, so the vector index must return it).

Counted per endpoint: requests, status histogram, p50/p99 latency of the 2xx answers, throughput (2xx answers
per second of load); completions tokens/s = the `usage.completion_tokens` of answered completions per second of
load (work in flight at a SIGKILL is lost and not counted). The server runs `--config` (default
configs/service/default.yaml) with the environment of this script (e.g. OMP_NUM_THREADS), niceness included. `unexpected_errors`: every answer that is not 2xx and not a 429 (the
service's deliberate back-pressure), every malformed 2xx and every exception, except transport errors of
requests that were in flight when the benchmark itself killed the server (`interrupted_by_kill`). Latency and
throughput cover only the time the server was up (`load_s`); restarts are timed separately.
Writes benchmarks/results/bench_service.json (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine  # noqa: E402

from loramint.paths import DEFAULT_GENERATOR, DEFAULT_LIBRARY  # noqa: E402

ROOT = HERE.parent
FRESH_CLONE = RESULTS / "fresh_clone.json"
DEFAULT_CONFIG = ROOT / "configs" / "service" / "default.yaml"
ENDPOINTS = {"mint": "/v1/adapters", "retrieve": "/v1/retrieve", "completions": "/v1/completions"}
RECENT_UNSTORED = 32
"""Unstored minted ids clients pick as `model`: the most recent few, far below the service's `max_minted`,
so an id cannot have left the service's in-memory LRU by the time its completion arrives."""

SUBJECTS = ["recipes", "contracts", "poems", "tweets", "emails", "reviews", "proofs", "jokes", "news", "code"]
ACTIONS = ["Summarise", "Classify", "Translate", "Answer questions about", "Rewrite", "Find errors in"]
CHECK_SHOTS = 5
"""Solved examples per checked mint (what benchmarks/ood.py sends with each held-out task)."""


def solved_examples(rng: random.Random) -> tuple[str, list[dict[str, str]]]:
    """A small task a user could describe, with `CHECK_SHOTS` solved examples: (description, examples)."""
    kind = rng.randrange(4)
    examples = []
    for _ in range(CHECK_SHOTS):
        a, b = rng.randrange(2, 99), rng.randrange(2, 99)
        word = rng.choice(SUBJECTS)
        if kind == 0:
            examples.append({"input": f"Is {a} even?", "output": "yes" if a % 2 == 0 else "no"})
        elif kind == 1:
            examples.append({"input": f"{a} + {b} =", "output": str(a + b)})
        elif kind == 2:
            examples.append({"input": f"Spell '{word}' backwards.", "output": word[::-1]})
        else:
            examples.append({"input": f"Which is larger, {a} or {b}?", "output": str(max(a, b))})
    what = [
        "Say whether a number is even",
        "Add two numbers",
        "Spell a word backwards",
        "Pick the larger of two numbers",
    ][kind]
    return f"{what} (request {rng.randrange(10**9)}).", examples


PROMPTS = [
    "Question: How long does it take to brush your teeth?\nAnswer:",
    "Translate to French: The cat sleeps on the sofa.\n",
    "2 + 3 =",
    "Write one sentence about the sea.",
    "Is the following review positive or negative? 'The soup was cold and bland.'\nAnswer:",
    "List three colours:",
    "Summarise: The meeting was moved from Monday to Wednesday because the room was booked.\nSummary:",
    "Q: What is the capital of Italy?\nA:",
]


@dataclass
class LoadConfig:
    library: str
    generator: str | None
    base_model: str = "smollm2-135m"
    clients: int = 32
    duration_s: float = 60.0
    mix: dict[str, float] = field(default_factory=lambda: {"mint": 0.3, "retrieve": 0.3, "completions": 0.4})
    store_fraction: float = 0.3
    """Of the mints, those with `store: true`."""
    max_tokens: int = 16
    kill: bool = True
    """SIGKILL the server during the load and at its end (restarting it each time); False: never."""
    kill_at: float = 0.5
    """Fraction of the load after which the first SIGKILL comes."""
    config_file: str | None = None
    """A service YAML (`loramint serve --config`); library, generator, base model, host, port and keys are
    overridden by the benchmark."""
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    seed: int = 0
    mint_clients: int = 8
    """Clients of the mint-only phase before the mixed load (0: none): `mint_p50_ms` / `mint_p99_ms`."""
    mint_duration_s: float = 30.0
    checked_mints: int = 30
    """Mints with `CHECK_SHOTS` solved examples, one at a time, after the mint-only phase (0: none):
    `checked_mint_p50_ms` / `checked_mint_p99_ms` (the adapter is checked against the base model first)."""
    server_env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the server (e.g. OMP_NUM_THREADS)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values), q)), 2) if values else None


@dataclass
class Sample:
    endpoint: str
    tag: str
    status: str  # the HTTP status, "exc:<Exception>", or "killed:<Exception>" (in flight at our SIGKILL)
    ms: float
    ok: bool
    tokens: int = 0


class LoadTest:
    """One run: the server process (started, killed, restarted), the clients, the records."""

    def __init__(self, cfg: LoadConfig, workdir: Path) -> None:
        self.cfg, self.workdir = cfg, workdir
        self.library = workdir / "library"
        self.log_path = workdir / "server.log"
        # one API key per client, as concurrent users would have (each with its own rate limit and quota)
        token = secrets.token_hex(16)
        self.keys = [f"bench{i}-{token}" for i in range(max(cfg.clients, cfg.mint_clients, 1))]
        self.key = self.keys[0]
        self.run_id = secrets.token_hex(4)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.http = None
        self.old_clients: list = []
        self.up = asyncio.Event()
        self.stopping = False
        self.epoch = 0
        self.in_flight = 0
        self.base_name = cfg.base_model
        self.samples: list[Sample] = []
        self.unexpected: list[dict] = []
        self.interrupted = 0
        self.acknowledged: dict[str, dict] = {}  # stored id -> content hash and description
        self.stored_ids: list[str] = []
        self.recent_unstored: collections.deque[str] = collections.deque(maxlen=RECENT_UNSTORED)
        self.starts: list[dict] = []
        self.kills: list[dict] = []
        self.load_s = 0.0
        self._up_since: float | None = None
        self._counter = 0
        self.rss_rest_mb = self.rss_after_mint_mb = self.rss_end_mb = None
        self.mint_only: dict | None = None
        self.checked: dict | None = None

    # ---- the server ----------------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "loramint.cli", "serve"]
        if self.cfg.config_file:
            command.append(f"--config={self.cfg.config_file}")
        return [*command, "--log_level=warning"]

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.cfg.server_env}
        env.update(
            LORAMINT_HOST="127.0.0.1",
            LORAMINT_PORT=str(self.port),
            LORAMINT_API_KEYS=",".join(self.keys),
            LORAMINT_AUTH="writes",
            LORAMINT_LIBRARY=str(self.library),
            LORAMINT_GENERATOR=self.cfg.generator or "",
            LORAMINT_BASE_MODEL=self.cfg.base_model,
            LORAMINT_MINTED_STORE=str(self.workdir / "minted"),
            LORAMINT_MINTED_QUOTA_MB=str(1 << 20),  # one key mints everything here: latency, not the quota
        )
        return env

    def rss_mb(self) -> float | None:
        """The server process's resident set size, from /proc (None where there is no /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return round(next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024, 1)
        except (OSError, StopIteration, AttributeError):
            return None

    async def start_server(self, why: str) -> None:
        import httpx

        started = time.perf_counter()
        with self.log_path.open("a") as log:
            log.write(f"\n==== bench_service: starting the server ({why}) ====\n")
            log.flush()
            self.proc = subprocess.Popen(
                self._command(), env=self._env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = started + self.cfg.startup_timeout_s
        async with httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=2) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    response = await probe.get("/healthz")
                    if response.status_code == 200:
                        self.base_name = response.json()["base_model"]
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the server was not up after {self.cfg.startup_timeout_s:g} s")
                await asyncio.sleep(0.2)
        self.starts.append({"why": why, "ready_s": round(time.perf_counter() - started, 2)})
        limits = httpx.Limits(
            max_connections=self.cfg.clients + 8, max_keepalive_connections=self.cfg.clients + 8
        )
        self.http = httpx.AsyncClient(
            base_url=self.url, trust_env=False, timeout=self.cfg.request_timeout_s, limits=limits
        )
        self.recent_unstored.clear()  # unstored adapters lived in the killed process's memory only

    def go(self) -> None:
        self._up_since = time.perf_counter()
        self.up.set()

    def pause(self) -> None:
        if self._up_since is not None:
            self.load_s += time.perf_counter() - self._up_since
            self._up_since = None
        self.up.clear()

    async def kill_server(self, why: str) -> None:
        """SIGKILL under load: no shutdown, no flush; whatever was acknowledged must already be durable."""
        self.pause()
        self.epoch += 1
        in_flight = self.in_flight
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)
        self.kills.append(
            {
                "why": why,
                "at_load_s": round(self.load_s, 2),
                "in_flight": in_flight,
                "stored_so_far": len(self.acknowledged),
            }
        )
        if self.http is not None:
            self.old_clients.append(self.http)
            self.http = None

    async def stop_server(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        for client in [*self.old_clients, *([self.http] if self.http is not None else [])]:
            await client.aclose()
        self.old_clients, self.http = [], None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ---- the clients ---------------------------------------------------------------------------------------
    def _description(self, rng: random.Random) -> str:
        self._counter += 1
        return (
            f"{rng.choice(ACTIONS)} {rng.choice(SUBJECTS)} written by people in group {self._counter} "
            f"of run {self.run_id}, keeping the answer short."
        )

    def _request(self, rng: random.Random) -> tuple[str, str, dict]:
        """(endpoint, tag, JSON body) of the next request."""
        endpoint = rng.choices(list(self.cfg.mix), weights=list(self.cfg.mix.values()))[0]
        if endpoint == "mint":
            body = {"description": self._description(rng)}
            if rng.random() < self.cfg.store_fraction:
                adapter_id = f"bench-{self.run_id}-{self._counter}"  # its own family: retrieval is checkable
                body.update(store=True, id=adapter_id, family=adapter_id)
                return endpoint, "store", body
            return endpoint, "kept", body
        if endpoint == "retrieve":
            return endpoint, "retrieve", {"description": self._description(rng), "k": 5}
        kind = rng.choice(["adapter", "auto", "base"])
        pool = self.stored_ids + list(self.recent_unstored)
        if kind == "adapter" and pool:
            model = rng.choice(pool)
        elif kind == "auto":
            model = "auto"
        else:
            kind, model = "base", self.base_name
        prompt = rng.choice(PROMPTS)
        return endpoint, kind, {"model": model, "prompt": prompt, "max_tokens": self.cfg.max_tokens}

    async def client(self, index: int) -> None:
        rng = random.Random(self.cfg.seed * 100_003 + index)
        headers = {"Authorization": f"Bearer {self.keys[index % len(self.keys)]}"}
        while True:
            await self.up.wait()
            if self.stopping:
                return
            endpoint, tag, body = self._request(rng)
            epoch, http = self.epoch, self.http
            self.in_flight += 1
            started = time.perf_counter()
            try:
                response = await http.post(ENDPOINTS[endpoint], json=body, headers=headers)
                ms = (time.perf_counter() - started) * 1000
                self._answer(endpoint, tag, body, response, ms)
            except Exception as exc:
                ms = (time.perf_counter() - started) * 1000
                killed = epoch != self.epoch or not self.up.is_set()  # the benchmark killed the server
                status = f"{'killed' if killed else 'exc'}:{type(exc).__name__}"
                self.samples.append(Sample(endpoint, tag, status, ms, ok=False))
                if killed:
                    self.interrupted += 1
                else:
                    self._unexpected(endpoint, tag, status, repr(exc))
            finally:
                self.in_flight -= 1

    def _answer(self, endpoint: str, tag: str, body: dict, response, ms: float) -> None:
        status = str(response.status_code)
        if response.status_code == 429:
            self.samples.append(Sample(endpoint, tag, status, ms, ok=False))
            return
        if not 200 <= response.status_code < 300:
            self.samples.append(Sample(endpoint, tag, status, ms, ok=False))
            self._unexpected(endpoint, tag, status, response.text[:500])
            return
        tokens = 0
        try:
            data = response.json()
            if endpoint == "mint":
                adapter_id = data["id"]
                if body.get("store") and (not data["stored"] or adapter_id != body["id"]):
                    raise ValueError(f"asked to store it as {body['id']!r}, got {data}")
                if data["stored"]:
                    self.acknowledged[adapter_id] = {
                        "content_hash": data["content_hash"],
                        "description": body["description"],
                    }
                    self.stored_ids.append(adapter_id)
                else:
                    self.recent_unstored.append(adapter_id)
            elif endpoint == "retrieve":
                if not isinstance(data["data"], list):
                    raise ValueError("no list of experts")
            else:
                if len(data["choices"]) != 1:
                    raise ValueError(f"{len(data['choices'])} choices")
                tokens = int(data["usage"]["completion_tokens"])
        except Exception as exc:
            self.samples.append(Sample(endpoint, tag, status, ms, ok=False))
            self._unexpected(endpoint, tag, f"{status} malformed", f"{exc!r}: {response.text[:300]}")
            return
        self.samples.append(Sample(endpoint, tag, status, ms, ok=True, tokens=tokens))

    def _unexpected(self, endpoint: str, tag: str, status: str, detail: str) -> None:
        self.unexpected.append({"endpoint": endpoint, "tag": tag, "status": status, "detail": detail})

    # ---- the run -------------------------------------------------------------------------------------------
    async def lane_totals(self) -> dict[str, dict[str, float]]:
        """Per work lane of the server (its /metrics): batches, jobs, worker seconds, queue-wait seconds."""
        from prometheus_client.parser import text_string_to_metric_families

        response = await self.http.get("/metrics", headers={"Authorization": f"Bearer {self.key}"})
        names = {
            "loramint_batch_size_count": "batches",
            "loramint_batch_size_sum": "jobs",
            "loramint_work_seconds_sum": "work_s",
            "loramint_queue_wait_seconds_sum": "wait_s",
        }
        totals: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in names and "lane" in sample.labels:
                    totals.setdefault(sample.labels["lane"], {})[names[sample.name]] = sample.value
        return totals

    async def mint_phase(self) -> dict:
        """`mint_clients` closed-loop clients minting new descriptions (kept, the default) and nothing else."""
        samples: list[tuple[float, int]] = []
        rng = random.Random(self.cfg.seed)
        deadline = time.perf_counter() + self.cfg.mint_duration_s

        async def client(index: int) -> None:
            headers = {"Authorization": f"Bearer {self.keys[index % len(self.keys)]}"}
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await self.http.post(
                        ENDPOINTS["mint"], json={"description": self._description(rng)}, headers=headers
                    )
                    status = response.status_code
                except Exception as exc:  # counted as unexpected below
                    self._unexpected("mint-phase", "kept", "exception", repr(exc))
                    continue
                samples.append(((time.perf_counter() - started) * 1000, status))
                if status != 201:
                    self._unexpected("mint-phase", "kept", str(status), response.text[:300])

        before = await self.lane_totals()
        await asyncio.gather(*(client(i) for i in range(self.cfg.mint_clients)))
        ok = [ms for ms, status in samples if status == 201]
        after = await self.lane_totals()
        lanes = {}
        for lane in sorted(after):
            d = {k: v - before.get(lane, {}).get(k, 0.0) for k, v in after[lane].items()}
            if d.get("batches"):
                lanes[lane] = {
                    "batches": int(d["batches"]),
                    "mean_batch": round(d["jobs"] / d["batches"], 2),
                    "mean_work_ms": round(1000 * d["work_s"] / d["batches"], 1),
                    "mean_wait_ms": round(1000 * d["wait_s"] / max(d["jobs"], 1), 1),
                }
        return {
            "lanes": lanes,
            "clients": self.cfg.mint_clients,
            "seconds": self.cfg.mint_duration_s,
            "count": len(samples),
            "ok": len(ok),
            "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99),
            "per_s": round(len(ok) / self.cfg.mint_duration_s, 2),
        }

    async def checked_phase(self) -> dict:
        """`checked_mints` mints with solved examples, one after another: what a user waits for a checked
        adapter on an idle server, and how often it fell back to the base model."""
        samples: list[float] = []
        fell_back = 0
        rng = random.Random(self.cfg.seed + 1)
        headers = {"Authorization": f"Bearer {self.keys[0]}"}
        for _ in range(self.cfg.checked_mints):
            description, examples = solved_examples(rng)
            body = {"description": description, "examples": examples, "store": False}
            started = time.perf_counter()
            try:
                response = await self.http.post(ENDPOINTS["mint"], json=body, headers=headers)
            except Exception as exc:  # counted as unexpected
                self._unexpected("checked-phase", "unstored", "exception", repr(exc))
                continue
            ms = (time.perf_counter() - started) * 1000
            if response.status_code not in (200, 201):
                self._unexpected("checked-phase", "unstored", str(response.status_code), response.text[:300])
                continue
            minted = response.json().get("metrics", {}).get("minted", {})
            if "check" not in minted:
                self._unexpected("checked-phase", "unstored", "unchecked", response.text[:300])
                continue
            samples.append(ms)
            fell_back += bool(minted.get("fell_back"))
        return {
            "count": self.cfg.checked_mints,
            "ok": len(samples),
            "shots": CHECK_SHOTS,
            "fell_back": fell_back,
            "p50_ms": percentile(samples, 50),
            "p99_ms": percentile(samples, 99),
            "mean_ms": round(float(np.mean(samples)), 1) if samples else None,
        }

    async def run(self) -> dict:
        cfg = self.cfg
        await self.start_server("initial")
        await asyncio.sleep(2.0)
        self.rss_rest_mb = self.rss_mb()  # loaded, nothing served yet
        self.mint_only = await self.mint_phase() if cfg.mint_clients and cfg.generator else None
        self.checked = await self.checked_phase() if cfg.checked_mints and cfg.generator else None
        self.rss_after_mint_mb = self.rss_mb()
        self.go()
        clients = [asyncio.create_task(self.client(i)) for i in range(cfg.clients)]
        try:
            if cfg.kill:
                await asyncio.sleep(cfg.duration_s * cfg.kill_at)
                # the kill must find stored adapters to lose: wait (bounded) for the first acknowledgement
                deadline = time.perf_counter() + max(cfg.duration_s, 30.0)
                while not self.acknowledged and time.perf_counter() < deadline:
                    await asyncio.sleep(0.05)
                await self.kill_server("during the load")
                await self.start_server("after SIGKILL during the load")
                self.go()
                await asyncio.sleep(max(cfg.duration_s - self.load_s, 0.0))
                self.rss_end_mb = self.rss_mb()
                await self.kill_server("at the end of the load, under load")
            else:
                await asyncio.sleep(cfg.duration_s)
                self.rss_end_mb = self.rss_mb()
                self.pause()
            self.stopping = True
            self.up.set()  # wake the clients waiting for a server, so they return
            await asyncio.gather(*clients)
            if cfg.kill:
                await self.start_server("after the final SIGKILL, for the durability check")
            durability = await self.check_stored()
        finally:
            self.stopping = True
            self.up.set()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await self.stop_server()
        return self.report(durability)

    async def check_stored(self) -> dict:
        """Every acknowledged stored adapter: its metadata, its zip, and the vector index's hit."""
        lost: list[dict] = []
        changed: list[str] = []
        not_retrievable: list[str] = []
        limit = asyncio.Semaphore(8)

        async def check(adapter_id: str, expected: dict) -> None:
            async with limit:
                try:
                    info = await self.http.get(f"/v1/adapters/{adapter_id}")
                    if info.status_code != 200 or not info.json().get("stored"):
                        lost.append({"id": adapter_id, "what": "metadata", "status": info.status_code})
                        return
                    if info.json()["content_hash"] != expected["content_hash"]:
                        changed.append(adapter_id)
                    download = await self.http.get(f"/v1/adapters/{adapter_id}/download")
                    problem = _zip_problem(download.content) if download.status_code == 200 else None
                    if download.status_code != 200 or problem:
                        lost.append(
                            {"id": adapter_id, "what": problem or "download", "status": download.status_code}
                        )
                        return
                    hits = await self.http.post(
                        "/v1/retrieve",
                        json={"description": expected["description"], "k": 1, "family": adapter_id},
                    )
                    if hits.status_code != 200 or [h["id"] for h in hits.json()["data"]] != [adapter_id]:
                        not_retrievable.append(adapter_id)
                except Exception as exc:
                    lost.append({"id": adapter_id, "what": repr(exc), "status": None})

        await asyncio.gather(*(check(i, e) for i, e in self.acknowledged.items()))
        return {
            "stored_acknowledged": len(self.acknowledged),
            "stored_lost": len(lost),
            "stored_changed": len(changed),
            "stored_not_retrievable": len(not_retrievable),
            "lost": lost[:20],
            "changed": changed[:20],
            "not_retrievable": not_retrievable[:20],
        }

    def report(self, durability: dict) -> dict:
        load_s = max(self.load_s, 1e-9)
        endpoints = {
            name: _stats([s for s in self.samples if s.endpoint == name], load_s) for name in ENDPOINTS
        }
        by_tag = {
            f"{name}[{tag}]": _stats([s for s in self.samples if s.endpoint == name and s.tag == tag], load_s)
            for name, tags in (("mint", ("kept", "store")), ("completions", ("adapter", "auto", "base")))
            for tag in tags
        }
        tokens = sum(s.tokens for s in self.samples)
        fresh, note = fresh_clone_seconds()
        return {
            "unexpected_errors": len(self.unexpected),
            "stored_acknowledged": durability["stored_acknowledged"],
            "stored_lost": durability["stored_lost"],
            "stored_changed": durability["stored_changed"],
            "stored_not_retrievable": durability["stored_not_retrievable"],
            "rss_rest_mb": self.rss_rest_mb,
            "rss_after_mint_mb": self.rss_after_mint_mb,
            "rss_end_mb": self.rss_end_mb,
            "mint_clients": self.cfg.mint_clients,
            "mint_p50_ms": (self.mint_only or {}).get("p50_ms"),
            "mint_p99_ms": (self.mint_only or {}).get("p99_ms"),
            "mint_only": self.mint_only,
            "checked_mint_p50_ms": (self.checked or {}).get("p50_ms"),
            "checked_mint_p99_ms": (self.checked or {}).get("p99_ms"),
            "checked_mints": self.checked,
            "mixed_mint_p50_ms": endpoints["mint"]["p50_ms"],
            "mixed_mint_p99_ms": endpoints["mint"]["p99_ms"],
            "retrieve_p50_ms": endpoints["retrieve"]["p50_ms"],
            "retrieve_p99_ms": endpoints["retrieve"]["p99_ms"],
            "completions_p50_ms": endpoints["completions"]["p50_ms"],
            "completions_p99_ms": endpoints["completions"]["p99_ms"],
            "completions_tokens_per_s": round(tokens / load_s, 2),
            "completion_tokens": tokens,
            "requests_per_s": round(sum(s.ok for s in self.samples) / load_s, 2),
            "rejected_429": sum(s.status == "429" for s in self.samples),
            "interrupted_by_kill": self.interrupted,
            "seconds_to_first_adapter": fresh,
            "fresh_clone_note": note,
            "load_s": round(self.load_s, 2),
            "endpoints": endpoints,
            "endpoints_by_kind": by_tag,
            "server": {"starts": self.starts, "kills": self.kills},
            "durability": durability,
            "unexpected": self.unexpected[:20],
            "server_log_tail": self.log_tail() if self.unexpected or durability["stored_lost"] else None,
            "config": {
                **asdict(self.cfg),
                "server_omp_num_threads": self._env().get("OMP_NUM_THREADS"),
                "service_config": _service_config(self.cfg.config_file),
            },
            "machine": machine(),
        }


def _stats(samples: list[Sample], load_s: float) -> dict:
    ok = [s.ms for s in samples if s.ok]
    statuses = collections.Counter(s.status for s in samples)
    return {
        "count": len(samples),
        "ok": len(ok),
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "mean_ms": round(float(np.mean(ok)), 2) if ok else None,
        "throughput_per_s": round(len(ok) / load_s, 2),
        "status": dict(sorted(statuses.items())),
        "completion_tokens": sum(s.tokens for s in samples),
    }


def _service_config(path: str | None) -> dict | None:
    """The service YAML's `service:` settings as run (the benchmark overrides paths, host, port and keys)."""
    if not path:
        return None
    import yaml

    return (yaml.safe_load(Path(path).read_text()) or {}).get("service")


def _zip_problem(data: bytes) -> str | None:
    """None if `data` is a zip of one PEFT folder with a config naming its base model and non-empty weights."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if archive.testzip() is not None:
                return "corrupt zip member"
            names = {Path(n).name: n for n in archive.namelist()}
            if set(names) != {"adapter_config.json", "adapter_model.safetensors"}:
                return f"zip members {sorted(names)}"
            config = json.loads(archive.read(names["adapter_config.json"]))
            if not config.get("base_model_name_or_path"):
                return "adapter_config.json has no base_model_name_or_path"
            if len(archive.read(names["adapter_model.safetensors"])) < 16:
                return "empty adapter_model.safetensors"
    except (zipfile.BadZipFile, ValueError, KeyError) as exc:
        return f"bad zip: {exc}"
    return None


def fresh_clone_seconds() -> tuple[float | None, str]:
    if not FRESH_CLONE.exists():
        return (
            None,
            f"{FRESH_CLONE.relative_to(ROOT)} does not exist yet (the fresh-clone run is not measured)",
        )
    data = json.loads(FRESH_CLONE.read_text())
    value = data.get("seconds_to_first_adapter")
    if value is None:
        return None, f"{FRESH_CLONE.relative_to(ROOT)} has no seconds_to_first_adapter"
    return value, f"from {FRESH_CLONE.relative_to(ROOT)}"


def run_load_test(cfg: LoadConfig) -> dict:
    """Run the whole load test (server, load, kills, durability check) and return the report."""
    if not Path(cfg.library, "library.sqlite").exists():
        raise SystemExit(f"{cfg.library} is not an expert library (no library.sqlite)")
    with tempfile.TemporaryDirectory(prefix="loramint-bench-service-") as tmp:
        workdir = Path(tmp)
        # the lock file is per copy; the copy is taken while nothing writes the source (a reader is harmless)
        shutil.copytree(cfg.library, workdir / "library", ignore=shutil.ignore_patterns(".lock"))
        return asyncio.run(LoadTest(cfg, workdir).run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--library", default=DEFAULT_LIBRARY, help="copied; never written")
    parser.add_argument("--generator", default=DEFAULT_GENERATOR, help="'' to serve without one")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
        help="service YAML (default configs/service/default.yaml; 'none' for the built-in defaults)",
    )
    parser.add_argument(
        "--clients", type=int, default=None, help="concurrent clients (default 32; --quick 8)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of load (default 60; --quick 12)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--store-fraction", type=float, default=0.3)
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument(
        "--no-kill", action="store_true", help="no SIGKILL and restart (durability unchecked)"
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mint-clients", type=int, default=8, help="clients of the mint-only phase (0: skip)"
    )
    parser.add_argument("--mint-duration", type=float, default=30.0)
    parser.add_argument(
        "--checked-mints", type=int, default=30, help="mints with solved examples, one at a time (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="8 clients, 12 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_service.json")
    args = parser.parse_args()
    config_file = None if args.config in (None, "", "none") else args.config
    if config_file and Path(config_file).resolve().is_relative_to(ROOT):
        config_file = str(Path(config_file).resolve().relative_to(ROOT))  # the server runs in ROOT
    cfg = LoadConfig(
        library=args.library,
        generator=args.generator or None,
        base_model=args.base_model,
        clients=args.clients or (8 if args.quick else 32),
        duration_s=args.duration or (12.0 if args.quick else 60.0),
        store_fraction=args.store_fraction,
        max_tokens=args.max_tokens,
        kill=not args.no_kill,
        kill_at=args.kill_at,
        config_file=config_file,
        startup_timeout_s=args.startup_timeout,
        seed=args.seed,
        mint_clients=args.mint_clients,
        mint_duration_s=args.mint_duration if not args.quick else min(args.mint_duration, 8.0),
        checked_mints=args.checked_mints if not args.quick else min(args.checked_mints, 5),
    )
    result = run_load_test(cfg)
    result["quick"] = args.quick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| endpoint | count | ok | p50 ms | p99 ms | per s | statuses |\n|---|---|---|---|---|---|---|")
    for name, s in {**result["endpoints"], **result["endpoints_by_kind"]}.items():
        print(
            f"| {name} | {s['count']} | {s['ok']} | {s['p50_ms']} | {s['p99_ms']} | {s['throughput_per_s']} | {s['status']} |"
        )
    print(
        f"\nunexpected_errors {result['unexpected_errors']}, interrupted_by_kill {result['interrupted_by_kill']}, "
        f"429s {result['rejected_429']}; completions {result['completions_tokens_per_s']} tokens/s; "
        f"stored_acknowledged {result['stored_acknowledged']}, stored_lost {result['stored_lost']} "
        f"(changed {result['stored_changed']}, not retrievable {result['stored_not_retrievable']}); "
        f"restarts {[s['ready_s'] for s in result['server']['starts']]} s"
    )
    print(f"wrote {args.out}")
    if result["unexpected_errors"] or result["stored_lost"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
