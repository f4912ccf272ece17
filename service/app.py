"""The app factory: `create_app(config)` builds the FastAPI app; its lifespan loads the library, the runtime
and the generator once (or takes ready ones, as tests do) and runs the work lanes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramint.gen.minter import Minter
from loramint.index import ExpertLibrary
from loramint.runtime.runtime import Runtime
from loramint.service import adapters, completions, errors, experts, system, web
from loramint.service.config import ServiceConfig
from loramint.service.core import Service
from loramint.service.guard import Guard
from loramint.service.metrics import Metrics, ObserveAndLimit

UPLOAD_PATHS = ("/v1/experts",)


def create_app(
    config: ServiceConfig | None = None,
    *,
    runtime: Runtime | None = None,
    library: ExpertLibrary | None = None,
    minter: Minter | None = None,
    on_ready: Callable[[Service], None] | None = None,
) -> FastAPI:
    """The service's app. `runtime`, `library`, `minter`: already loaded objects to use instead of loading
    them from `config` (the caller keeps ownership of those). `on_ready` is called once everything is loaded
    and the work lanes run (`loramint serve` prints its curl examples there)."""
    config = config or ServiceConfig()
    config.check_auth()
    metrics = Metrics.create()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await asyncio.to_thread(Service.load, config, runtime, library, minter, metrics)
        service.start()
        app.state.service = service
        if on_ready is not None:
            on_ready(service)
        try:
            yield
        finally:
            await service.stop()
            service.close()

    app = FastAPI(
        title="loramint",
        summary="Mint LoRA adapters from task descriptions; retrieve, manage and serve them (OpenAI-compatible).",
        version="0.1.0",
        lifespan=lifespan,
    )
    default_openapi = app.openapi

    def openapi() -> dict:  # generated once, then cached by FastAPI on app.openapi_schema
        if app.openapi_schema is None:
            app.openapi_schema = document_limits(default_openapi(), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    errors.install(app)
    for module in (adapters, experts, completions, system, web):
        app.include_router(module.router)
    app.add_middleware(Guard, config=config)  # inside ObserveAndLimit: its 401s and 429s are counted
    app.add_middleware(
        ObserveAndLimit,
        metrics=metrics,
        max_body=config.max_body_bytes,
        max_upload=config.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    return app


# (schema, property) -> {JSON-schema keyword: ServiceConfig limit} for the limits a request body meets
DOCUMENTED_LIMITS = {
    ("MintRequest", "description"): {"maxLength": "max_description_chars"},
    ("RetrieveRequest", "description"): {"maxLength": "max_description_chars"},
    ("Body_upload_v1_experts_post", "description"): {"maxLength": "max_description_chars"},
    ("MintRequest", "examples"): {"maxItems": "max_examples", "items.maxLength": "max_example_chars"},
    ("MintRequest", "rank"): {"maximum": "max_rank"},
    ("CompletionRequest", "max_tokens"): {"maximum": "max_tokens"},
    ("ChatRequest", "max_tokens"): {"maximum": "max_tokens"},
}


def document_limits(schema: dict, config: ServiceConfig) -> dict:
    """The OpenAPI document with this server's limits (`ServiceConfig.limits`, the values it enforces and
    `GET /v1/limits` answers) in place of the request models' static bounds."""
    limits = config.limits()
    components = schema.get("components", {}).get("schemas", {})
    for (model, prop), keywords in DOCUMENTED_LIMITS.items():
        spec = components[model]["properties"][prop]
        branches = [b for b in spec.get("anyOf", [spec]) if b.get("type") != "null"]
        for keyword, limit in keywords.items():
            for branch in branches:
                *path, key = keyword.split(".")
                target = branch
                for part in path:
                    target = target[part]
                # a union (texts or solved examples): the length limit is the string branch's
                for leaf in [b for b in target.get("anyOf", []) if b.get("type") == "string"] or [target]:
                    leaf[key] = limits[limit]
    return schema
