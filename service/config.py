"""The service's settings: one dataclass, mirrored by configs/service/default.yaml and `loramint serve --help`.

Environment variables `LORAMINT_<FIELD>` (e.g. `LORAMINT_PORT=9000`, `LORAMINT_API_KEYS=key1,key2`) override
the file and the flags, so a container can keep its keys out of the YAML.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_type_hints

from loramint.fallback import FallbackPolicy
from loramint.paths import DEFAULT_GENERATOR, DEFAULT_LIBRARY

Auth = Literal["writes", "all", "none"]
ENV_PREFIX = "LORAMINT_"


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    library: str = DEFAULT_LIBRARY
    """Expert library folder (created when missing)."""
    generator: str | None = DEFAULT_GENERATOR
    """Generator checkpoint (`loramint train-generator`); None serves without minting (POST /v1/adapters: 503)."""
    base_model: str = "smollm2-135m"
    """Registry name, HF id or local path; the generator and every served adapter must be made for it."""
    device: str | None = None
    """torch device of the base model and the generator; None picks cuda when present."""
    api_keys: list[str] = field(default_factory=list)
    """Keys accepted as `Authorization: Bearer <key>` (set them with LORAMINT_API_KEYS=k1,k2)."""
    auth: Auth = "all"
    """Which endpoints need a key: "all" (every /v1 endpoint), "writes" (mint, upload, delete only), or "none"
    (trusted network only). /healthz, the web page and the API docs are always open; a key that a request
    sends is always checked."""
    capacity: int = 64
    """Experts resident in the runtime at once (LRU)."""
    target_modules: list[str] | None = None
    """Linear layers the runtime can apply adapters to; None: those the generator mints for and the library's
    experts use (q_proj and v_proj for the defaults). Uploads targeting others are refused."""
    max_rank: int = 48
    """Highest LoRA rank the runtime serves; uploads above it are refused. The default generator (an ensemble
    of 3) mints rank 48 (its 3 retrieved rank-8 experts + three 8-rank corrections; `rank` in a mint request
    compresses). Each resident slot holds max_rank factors: 64 slots x rank 48 take ~0.7 GB for SmolLM2."""
    top_k: int = 2
    """Experts mixed for `model: "auto"` (retrieved by the prompt, weighted by similarity)."""
    queue_size: int = 64
    """Requests waiting per work queue (mint, library, generate); one more gets HTTP 429."""
    timeout_s: float = 60.0
    """Seconds a request may wait for its work (queue + run) before HTTP 504."""
    mint_batch: int = 16
    """Mint requests decoded together in one `Minter.mint_many` call."""
    fallback_min_confidence: float = 0.0
    """Serve the base model instead of a minted adapter when the request's best similarity to a library
    expert is below this (`loramint.fallback`; 0: never on this ground)."""
    fallback_min_gain: float = 0.0
    """With solved examples in a mint request: serve the base model unless the minted adapter lowers their
    mean answer loss by more than this many nats per token."""
    mint_workers: int = 2
    """Mint batches in flight at once, each on its own thread (their text encoding and decoding run at
    once; only the tokenizer is taken in turn)."""
    torch_threads: int | None = None
    """torch's intra-op threads for the whole process; None: the CPU cores this process may use divided by
    `mint_workers` (at least 1), so that the mint batches in flight each get their share of the cores
    instead of every batch spreading over all of them (measured on 2 cores: 33 vs 30 mints/s)."""
    completion_batch: int = 8
    """Completion requests (rows) decoded together in one runtime pass."""
    batch_wait_ms: float = 5.0
    """How long a worker waits for more requests to join a batch."""
    max_minted: int = 64
    """Minted adapters held in memory with `store: false` (least recently used dropped; ~11 MB each at rank 48)."""
    minted_store: str | None = "data/minted"
    """Folder where minted adapters are kept by default (until they expire); None keeps every mint in memory."""
    minted_ttl_hours: int = 168
    """How long a kept minted adapter lives (it is deleted after; mint again for a new one)."""
    minted_quota_mb: int = 2048
    """Disk per API key for kept minted adapters; a mint over it gets HTTP 429."""
    max_description_chars: int = 4000
    max_examples: int = 16
    max_example_chars: int = 4000
    max_prompt_chars: int = 16000
    """Per prompt (completions) or per request's messages together (chat)."""
    max_tokens: int = 512
    """Largest `max_tokens` a completion may ask for."""
    default_max_tokens: int = 128
    """Chat completions without `max_tokens` (plain completions default to 16, as OpenAI's)."""
    max_body_bytes: int = 1 << 20
    """Request bodies other than uploads; larger ones get HTTP 413."""
    max_upload_bytes: int = 64 << 20
    """An uploaded adapter zip."""
    max_unzipped_bytes: int = 256 << 20
    """An uploaded zip's members together, decompressed."""
    mint_per_minute: int = 600
    """Mint requests a minute per API key (per client address without auth): a minute's allowance at once,
    refilled continuously; one more gets HTTP 429 with Retry-After."""
    upload_per_minute: int = 60
    """Expert uploads a minute per API key, likewise."""

    def thread_count(self) -> int:
        """torch's intra-op threads for the server (`torch_threads`, or the cores' share of each mint worker)."""
        if self.torch_threads is not None:
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.mint_workers)

    def fallback_policy(self) -> FallbackPolicy:
        return FallbackPolicy(self.fallback_min_confidence, self.fallback_min_gain)

    def limits(self) -> dict[str, int]:
        """Every limit a request meets, by name: what `GET /v1/limits` answers and the OpenAPI document shows."""
        return {name: getattr(self, name) for name in LIMITS}

    def __post_init__(self) -> None:
        if self.auth not in ("writes", "all", "none"):
            raise ValueError(f"auth must be 'writes', 'all' or 'none', got {self.auth!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if any(not isinstance(k, str) or len(k) < 8 for k in self.api_keys):
            raise ValueError("every api_keys entry must be a string of at least 8 characters")
        positive = (
            "capacity",
            "top_k",
            "mint_batch",
            "mint_workers",
            "completion_batch",
            "default_max_tokens",
            *LIMITS,
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null, got {self.torch_threads}")
        if self.timeout_s <= 0 or self.batch_wait_ms < 0:
            raise ValueError("timeout_s must be > 0 and batch_wait_ms >= 0")
        self.fallback_policy()  # its own checks of the two fallback settings
        if self.top_k > self.capacity:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed capacity ({self.capacity})")

    def with_env(self, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        """A copy with every `LORAMINT_<FIELD>` set in `environ` (default: os.environ) applied."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(ServiceConfig)
        changes = {}
        for f in fields(self):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = hints[f.name]
            try:
                if kind in (list[str], list[str] | None):
                    changes[f.name] = [k.strip() for k in raw.split(",") if k.strip()]
                elif kind is int or kind is float:
                    changes[f.name] = kind(raw)
                elif kind == str | None:
                    changes[f.name] = raw or None
                elif kind == int | None:
                    changes[f.name] = int(raw) if raw else None
                else:
                    changes[f.name] = raw
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}") from exc
        return replace(self, **changes)

    def ready_message(self, minted_id: str | None, key_command: str | None = None) -> str:
        """What `loramint serve` prints once it is up: where it listens and curl commands that work against it
        (mint, or retrieve when there is no generator, then a chat completion). `minted_id`: the id that the
        printed mint returns (the server mints it once at start-up, so the chat command works as printed),
        None without a generator. `key_command`: a shell expression giving a key (e.g. `$(cat data/api-key)`);
        else the examples say <key>. Never a key."""
        minting = minted_id is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        url = f"http://{host}:{self.port}"
        auth = "" if self.auth == "none" else f' -H "Authorization: Bearer {key_command or "<key>"}"'
        read_auth = auth if self.auth == "all" else ""
        description = READY_DESCRIPTION
        if minting:
            first = (
                f"curl -s {url}/v1/adapters{auth} -H 'Content-Type: application/json' \\\n"
                f'       -d \'{{"description": "{description}"}}\'   # -> {{"id": "{minted_id}", ...}}'
            )
            model = minted_id
        else:
            first = (
                f"curl -s {url}/v1/retrieve{read_auth} -H 'Content-Type: application/json' \\\n"
                f'       -d \'{{"description": "{description}", "k": 3}}\'   # no generator: retrieval only'
            )
            model = "auto"
        lines = [
            f"loramint is ready on {url} (web page: {url}/, OpenAPI: {url}/openapi.json)",
            "  " + first,
            f"  curl -s {url}/v1/chat/completions{read_auth} -H 'Content-Type: application/json' \\",
            f'       -d \'{{"model": "{model}", "messages": [{{"role": "user", '
            f'"content": "How long does it take to brush your teeth?"}}]}}\'',
        ]
        if auth and not key_command and (minting or read_auth):
            lines.append("  <key>: one of the keys in LORAMINT_API_KEYS")
        return "\n".join(lines)

    def check_auth(self) -> None:
        """Refuse to serve with keys required but none configured (every write would be refused)."""
        if self.auth != "none" and not self.api_keys:
            raise ValueError(
                f'auth is "{self.auth}" but no api_keys are set: set LORAMINT_API_KEYS=<key> (8+ characters), '
                'or auth: "none" on a trusted network'
            )


READY_DESCRIPTION = "Answer questions about how long everyday events last"
"""The description of the mint that `loramint serve` prints as its first example."""

LIMITS = (
    "max_description_chars",
    "max_examples",
    "max_example_chars",
    "max_prompt_chars",
    "max_tokens",
    "max_rank",
    "max_body_bytes",
    "max_upload_bytes",
    "max_unzipped_bytes",
    "max_minted",
    "minted_ttl_hours",
    "minted_quota_mb",
    "queue_size",
    "mint_per_minute",
    "upload_per_minute",
)
"""The request limits of a `ServiceConfig`, in one place (see `ServiceConfig.limits`)."""
