"""The gate every request passes before its body is read: the API key, then the per-key rate limits.

A request that needs a key and has none, or sends a wrong one, is answered 401 from its headers alone, so an
unauthenticated client cannot make the server read (or buffer) a body. Minting and uploads are then rate
limited per key (per client address where auth is "none") by token buckets: a minute's allowance at once,
refilled continuously; one request over it gets 429 with `Retry-After` (seconds until a token is back).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from loramint.service.config import ServiceConfig
from loramint.service.errors import error_body

OPEN_PATHS = ("/healthz", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
"""Never behind a key: liveness, the web page (it asks for the key itself) and the API docs."""


def is_write(method: str, path: str) -> bool:
    """Requests that change what the service stores: mint, upload, delete."""
    return (method == "POST" and path in ("/v1/adapters", "/v1/experts")) or (
        method == "DELETE" and path.startswith(("/v1/experts/", "/v1/adapters/"))
    )


def rate_kind(method: str, path: str) -> str | None:
    """Which per-key allowance a request spends: "mint", "upload" or none."""
    if method == "POST" and path == "/v1/adapters":
        return "mint"
    if method == "POST" and path == "/v1/experts":
        return "upload"
    return None


def bearer_key(scope: Scope) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; "" for another scheme or a malformed header."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return None


def key_problem(config: ServiceConfig, method: str, path: str, key: str | None) -> str | None:
    """Why a request is refused by the key policy, or None when it may go on."""
    if config.auth == "none" or path in OPEN_PATHS:
        return None
    needed = is_write(method, path) or config.auth == "all"
    if key is None:
        return "this endpoint needs an API key: send 'Authorization: Bearer <key>'" if needed else None
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
        return "the API key is not valid"  # a key that is sent is always checked, even where none is needed
    return None


@dataclass
class Bucket:
    capacity: float
    per_second: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float) -> float:
        """Spend one token: 0.0 when there was one, else the seconds until there will be."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class RateLimits:
    """Token buckets per (allowance, client), thread-safe; buckets idle long enough to be full are dropped."""

    def __init__(self, per_minute: dict[str, int], clock=time.monotonic) -> None:
        self.per_minute, self.clock = dict(per_minute), clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def take(self, kind: str, client: str) -> float:
        rate = self.per_minute[kind]
        now = self.clock()
        with self._lock:
            if len(self._buckets) > 10_000:  # full buckets carry no state: forget them
                idle = [k for k, b in self._buckets.items() if now - b.stamp > 60]
                for k in idle:
                    del self._buckets[k]
            bucket = self._buckets.get((kind, client))
            if bucket is None:
                bucket = self._buckets[(kind, client)] = Bucket(rate, rate / 60, stamp=now)
            return bucket.take(now)


def client_of(scope: Scope, key: str | None) -> str:
    """Whose allowance a request spends: its key (hashed: keys never sit in memory twice), else its address."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    host = (scope.get("client") or ("?", 0))[0]
    return f"addr:{host}"


class Guard:
    """Pure ASGI middleware: the key policy and the rate limits, from the headers, before any body is read."""

    def __init__(self, app: ASGIApp, config: ServiceConfig, limits: RateLimits | None = None) -> None:
        self.app, self.config = app, config
        self.limits = limits or RateLimits(
            {"mint": config.mint_per_minute, "upload": config.upload_per_minute}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        key = bearer_key(scope)
        if problem := key_problem(self.config, method, path, key):
            await _refuse(send, 401, "AuthError", problem, [(b"www-authenticate", b"Bearer")])
            return
        if (kind := rate_kind(method, path)) is not None:
            wait = self.limits.take(kind, client_of(scope, key))
            if wait > 0:
                per_minute = self.limits.per_minute[kind]
                message = (
                    f"rate limit: at most {per_minute} {kind} requests a minute per API key; "
                    f"retry in {math.ceil(wait)} s"
                )
                await _refuse(
                    send, 429, "RateLimitError", message, [(b"retry-after", str(math.ceil(wait)).encode())]
                )
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, kind: str, message: str, headers: list) -> None:
    body = json.dumps(error_body(message, kind, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
