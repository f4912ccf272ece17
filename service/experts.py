"""Routes: the expert library — upload a PEFT adapter zip, list (paged), read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, UploadFile

from loramint.paths import validate_id
from loramint.service.adapters import check_text
from loramint.service.core import expert_info
from loramint.service.deps import Reader, Writer
from loramint.service.errors import responses
from loramint.service.schemas import AdapterInfo, Deleted, ExpertList

router = APIRouter(prefix="/v1/experts", tags=["experts"], responses=responses(401, 422))
ExpertId = Annotated[str, Path(description="An expert id.")]
MAX_OFFSET = 2**63 - 1
"""SQLite's largest integer: a larger offset overflowed in the library's query (HTTP 500, found by fuzzing)."""


@router.post(
    "", response_model=AdapterInfo, status_code=201, responses=responses(400, 409, 413, 429, 504, 507)
)
async def upload(
    service: Writer,
    file: Annotated[UploadFile, File(description="A zip of a PEFT LoRA folder (safetensors only).")],
    description: Annotated[str, Form(min_length=1, max_length=8000)],
    id: Annotated[str | None, Form(max_length=128)] = None,
    name: Annotated[str | None, Form(max_length=200)] = None,
    family: Annotated[str, Form(max_length=128)] = "",
) -> AdapterInfo:
    """Add an uploaded adapter to the library. It must be a plain LoRA for the service's base model (shapes
    checked), finite, in safetensors, within the runtime's modules and max_rank; the zip may hold only the
    PEFT files, with no absolute paths, '..', links, or members over the size limits."""
    check_text(service, "description", description)
    if id is not None:
        validate_id(id, "expert id")
    return await service.lanes["library"].submit(
        lambda: service.upload(file.file, description=description, id=id, name=name, family=family)
    )


@router.get("", response_model=ExpertList)
def list_experts(
    service: Reader,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    family: Annotated[str | None, Query(max_length=128)] = None,
) -> ExpertList:
    """Stored experts in insertion order, `limit` from `offset` (optionally one family's)."""
    experts = service.library.list(family=family, offset=offset, limit=limit + 1)
    total = len(service.library) if family is None else len(service.library.list(family=family))
    return ExpertList(
        data=[expert_info(e) for e in experts[:limit]],
        offset=offset,
        limit=limit,
        total=total,
        has_more=len(experts) > limit,
    )


@router.get("/{expert_id}", response_model=AdapterInfo, responses=responses(400, 404))
def get_expert(expert_id: ExpertId, service: Reader) -> AdapterInfo:
    return expert_info(service.library.get(expert_id))


@router.delete("/{expert_id}", response_model=Deleted, responses=responses(400, 404, 429, 504))
async def delete_expert(expert_id: ExpertId, service: Writer) -> Deleted:
    """Remove an expert from the library (its row, vector and folder) and from the runtime."""
    validate_id(expert_id, "expert id")
    await service.lanes["library"].submit(lambda: service.delete(expert_id))
    return Deleted(id=expert_id)
