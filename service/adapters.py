"""Routes: mint an adapter, read its metadata, download it as a PEFT zip, retrieve experts by description."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from loramint.paths import validate_id
from loramint.service.core import MintJob, PendingCheck, Service
from loramint.service.deps import Reader, Writer
from loramint.service.errors import responses
from loramint.service.guard import bearer_key, client_of
from loramint.service.schemas import AdapterInfo, MintRequest, RetrieveRequest, RetrieveResponse

router = APIRouter(prefix="/v1", tags=["adapters"], responses=responses(401))
AdapterId = Annotated[str, Path(description="An adapter (expert) id.")]


def check_text(service: Service, what: str, text: str) -> None:
    limit = service.config.max_description_chars
    if len(text) > limit:
        raise ValueError(f"{what} has {len(text)} characters, the limit is {limit}")


@router.post(
    "/adapters",
    response_model=AdapterInfo,
    status_code=201,
    responses={
        200: {
            "model": AdapterInfo,
            "description": "No adapter fits the task (`fell_back`): the base model is the answer, nothing "
            "was stored",
        },
        **responses(400, 409, 413, 422, 429, 503, 504, 507),
    },
)
async def mint(req: MintRequest, request: Request, response: Response, service: Writer) -> AdapterInfo:
    """Mint a LoRA adapter from a task description (one generator pass; concurrent requests are batched).
    By default it is kept on disk until it expires (`expires_at`), counted to the key's storage quota;
    `store: true` adds it to the expert library, `store: false` keeps it in memory only."""
    cfg = service.config
    check_text(service, "description", req.description)
    examples = req.example_texts()
    if len(examples) > cfg.max_examples:
        raise ValueError(f"{len(examples)} examples, the limit is {cfg.max_examples}")
    if any(len(e) > cfg.max_example_chars for e in examples):
        raise ValueError(
            f"an example is over the limit of {cfg.max_example_chars} characters (a solved example: its "
            "input and output together)"
        )
    if req.id is not None:
        validate_id(req.id, "adapter id")
    owner = client_of(request.scope, bearer_key(request.scope))
    result = await service.lanes["mint"].submit(MintJob(req, owner, defer=True))
    if isinstance(result, PendingCheck):  # solved examples: scored on the runtime thread, beside completions
        pending = result
        result = await service.lanes["check"].submit(lambda: service.check(pending))
    if callable(result):  # a kept adapter: written on the files lane while the mint lane decodes the next
        result = await service.lanes["files"].submit(result)
    if result.fell_back:
        response.status_code = 200  # nothing was created: the base model is the answer
    return result


@router.get("/adapters/{adapter_id}", response_model=AdapterInfo, responses=responses(400, 404, 422))
def get_adapter(adapter_id: AdapterId, service: Reader) -> AdapterInfo:
    """Metadata of a minted or stored adapter."""
    return service.info(adapter_id)


@router.delete("/adapters/{adapter_id}", status_code=204, responses=responses(400, 404, 409, 422))
async def delete_adapter(adapter_id: AdapterId, service: Writer) -> Response:
    """Delete a minted adapter (kept or in memory) and free its share of the key's quota. Library experts
    are deleted with DELETE /v1/experts/{id} (409 here)."""
    await service.lanes["files"].submit(lambda: service.delete_minted(adapter_id))
    return Response(status_code=204)


@router.get(
    "/adapters/{adapter_id}/download",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "A stock PEFT folder, zipped."},
        **responses(400, 404, 422, 429, 504),
    },
)
async def download(adapter_id: AdapterId, service: Reader) -> Response:
    """The adapter as a zip of a PEFT folder (`adapter_config.json` with `base_model_name_or_path`,
    `adapter_model.safetensors` with LoRA factors only): loads with `PeftModel.from_pretrained`, vLLM, LoRAX."""
    validate_id(adapter_id, "adapter id")
    data = await service.lanes["files"].submit(lambda: service.download(adapter_id))
    headers = {"Content-Disposition": f'attachment; filename="{adapter_id}.zip"'}
    return Response(data, media_type="application/zip", headers=headers)


@router.post("/retrieve", response_model=RetrieveResponse, responses=responses(400, 413, 422, 429, 504))
async def retrieve(req: RetrieveRequest, service: Reader) -> RetrieveResponse:
    """The library's k experts whose descriptions are nearest to `description`, best first."""
    check_text(service, "description", req.description)
    hits = await service.lanes["library"].submit(lambda: service.retrieve(req.description, req.k, req.family))
    return RetrieveResponse(data=hits)
