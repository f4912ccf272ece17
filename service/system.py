"""Routes for operators: /healthz (liveness and what is loaded) and /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramint.service.core import Service
from loramint.service.deps import Reader, get_service
from loramint.service.errors import responses
from loramint.service.schemas import Health, Limits, RuntimeHealth

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(request: Request, response: Response) -> Health:
    """Liveness and the runtime's real state: HTTP 503 with `status: degraded` and its `problems` when a
    worker has stopped or the runtime's expert slots are not all accounted for (nothing could be served)."""
    service: Service = get_service(request)
    stack = service.runtime.stack
    runtime = RuntimeHealth(
        resident=len(stack),
        capacity=stack.capacity,
        free_slots=stack.free_slots,
        slots_accounted=stack.slots_accounted(),
    )
    workers = {name: lane.running for name, lane in service.lanes.items()}
    problems = [f"the {name} worker is not running" for name, up in workers.items() if not up]
    if not runtime.slots_accounted:
        problems.append(
            f"runtime slots leaked: {runtime.resident} resident + {runtime.free_slots} free of {runtime.capacity}"
        )
    if problems:
        response.status_code = 503
    return Health(
        status="degraded" if problems else "ok",
        problems=problems,
        base_model=service.base.hf_id,
        experts=len(service.library),
        minted=len(service.minted),
        generator=service.minter is not None,
        queues={name: lane.depth for name, lane in service.lanes.items()},
        workers=workers,
        runtime=runtime,
    )


@router.get("/v1/limits", response_model=Limits, responses=responses(401))
def limits(service: Reader) -> Limits:
    """Every limit this server puts on requests (the OpenAPI document shows the same values)."""
    return Limits(**service.config.limits())


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, **responses(401)}
)
def metrics(service: Reader) -> Response:
    """Request counts and latency histograms per route, queue depths, rejections (429), timeouts (504),
    batch sizes, worker time, adapters minted, completion tokens."""
    for name, lane in service.lanes.items():
        service.metrics.queue_depth.labels(name).set(lane.depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
