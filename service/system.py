"""Routes for operators: /healthz (liveness and what is loaded) and /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramint.service.core import Service
from loramint.service.deps import Reader, get_service
from loramint.service.errors import responses
from loramint.service.schemas import Health, Limits

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
def healthz(request: Request) -> Health:
    service: Service = get_service(request)
    return Health(
        base_model=service.base.hf_id,
        experts=len(service.library),
        minted=len(service.minted),
        generator=service.minter is not None,
        queues={name: lane.depth for name, lane in service.lanes.items()},
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
