"""The FastAPI service: mint, retrieve, manage experts, complete text through the runtime.

`create_app(ServiceConfig(...))` (`loramint serve`); routers: `adapters` (mint, metadata, download,
retrieve), `experts` (upload, list, delete), `completions` (OpenAI-compatible), `system` (healthz, metrics),
`web` (the page at `/`, service/static/index.html).
The work itself lives in `core.Service` and runs on worker threads behind bounded queues (`lanes`).
`create_app` is imported lazily so that `loramint.service.config` stays light (the CLI builds its parser
from it).
"""

from __future__ import annotations

from typing import Any

from loramint.service.config import ServiceConfig

__all__ = ["ServiceConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from loramint.service.app import create_app

        return create_app
    raise AttributeError(f"module 'loramint.service' has no attribute {name!r}")
