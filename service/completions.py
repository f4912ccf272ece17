"""Routes in OpenAI's shape: /v1/completions, /v1/chat/completions (streaming as server-sent events, OpenAI's
chunk format, ending with `data: [DONE]`) and /v1/models (vLLM's `parent`/`root` for adapters).

`model` is an adapter id, "auto" (the prompt — for chat, the last user message — is retrieved against the
library and its `top_k` nearest experts are mixed by similarity) or the base model's name."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from loramint.service.core import AUTO, CompletionJob, CompletionResult, Service, expert_info, kept_info
from loramint.service.deps import Reader
from loramint.service.errors import WorkTimeoutError, error_body, responses, status_of
from loramint.service.lanes import Lane
from loramint.service.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=responses(401))
STREAM = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"},
    **responses(400, 404, 413, 422, 429, 504),
}


@router.post("/completions", response_model=CompletionResponse, responses=STREAM)
async def completions(req: CompletionRequest, service: Reader):
    """Complete one prompt or a list of them (one choice each) with the base model, an adapter, or "auto"."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    for prompt in prompts:
        _check_prompt(service, len(prompt))
    max_tokens = _max_tokens(service, req.max_tokens or 16)
    jobs = [CompletionJob(prompt=p, max_tokens=max_tokens, stop=_stops(req.stop)) for p in prompts]
    return await _serve(service, req, jobs, prompts, _TextFormat(req.model))


@router.post("/chat/completions", response_model=ChatResponse, responses=STREAM)
async def chat_completions(req: ChatRequest, service: Reader):
    """Answer a conversation (rendered with the base model's chat template)."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
    ]
    _check_prompt(service, sum(len(m["content"]) for m in messages))
    users = [m["content"] for m in messages if m["role"] == "user"]
    max_tokens = _max_tokens(
        service, req.max_completion_tokens or req.max_tokens or service.config.default_max_tokens
    )
    job = CompletionJob(messages=messages, max_tokens=max_tokens, stop=_stops(req.stop))
    query = users[-1] if users else messages[-1]["content"]
    return await _serve(service, req, [job], [query], _ChatFormat(req.model))


@router.get("/models", response_model=ModelList)
def list_models(service: Reader) -> ModelList:
    """The base model, "auto", and every adapter (stored experts, then minted ones held in memory)."""
    kept = [] if service.kept is None else [kept_info(e) for e in service.kept.list()]
    infos = [*map(expert_info, service.library.list()), *kept, *service.minted.infos()]
    return ModelList(data=[*_fixed_cards(service), *(_card(service, i.id, i.created) for i in infos)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=responses(400, 404, 422))
def retrieve_model(model_id: str, service: Reader) -> ModelCard:
    """One model of `GET /v1/models` (what OpenAI's `models.retrieve` asks for): 404 when there is none."""
    for card in _fixed_cards(service):
        if card.id == model_id:
            return card
    return _card(service, model_id, service.info(model_id).created)


def _fixed_cards(service: Service) -> list[ModelCard]:
    """The base model and "auto"."""
    base, started = service.base.hf_id, int(service.started)
    length = getattr(service.base.model.config, "max_position_embeddings", None)
    return [
        ModelCard(id=base, created=started, root=base, parent=None, max_model_len=length),
        ModelCard(id=AUTO, created=started, root=AUTO, parent=base, max_model_len=length),
    ]


def _card(service: Service, adapter_id: str, created: int) -> ModelCard:
    length = getattr(service.base.model.config, "max_position_embeddings", None)
    return ModelCard(
        id=adapter_id, created=created, root=adapter_id, parent=service.base.hf_id, max_model_len=length
    )


# ---- shared ------------------------------------------------------------------------------------------------
def _check_prompt(service: Service, chars: int) -> None:
    if chars > service.config.max_prompt_chars:
        raise ValueError(f"the prompt has {chars} characters, the limit is {service.config.max_prompt_chars}")


def _max_tokens(service: Service, value: int) -> int:
    if value > service.config.max_tokens:
        raise ValueError(f"max_tokens is {value}, the limit is {service.config.max_tokens}")
    return value


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _enqueue_all(lane: Lane, jobs: Sequence[CompletionJob]) -> list[asyncio.Future]:
    futures: list[asyncio.Future] = []
    try:
        for job in jobs:
            futures.append(lane.enqueue(job))
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return futures


async def _serve(service: Service, req, jobs: list[CompletionJob], queries: list[str], fmt):
    route = await run_in_threadpool(service.route_of, req.model)  # a library lookup: not on the loop
    for job, query in zip(jobs, queries, strict=True):
        if route == AUTO:
            job.route = await service.lanes["library"].submit(lambda q=query: service.route_auto(q))
        else:
            job.route = route
    lane = service.lanes["generate"]
    if not req.stream:
        futures = _enqueue_all(lane, jobs)
        try:
            results = await asyncio.gather(*(lane.wait(f) for f in futures))
        except BaseException:  # timed out, failed, or the client went away: nobody wants the other rows
            _cancel(jobs, futures)
            raise
        return fmt.response(results)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await _stream(service, lane, jobs, fmt, include_usage)


async def _stream(service: Service, lane: Lane, jobs: list[CompletionJob], fmt, include_usage: bool):
    """Queue the jobs with sinks feeding one event queue; wait for the first event (so a full queue, a
    timeout or a failed job is still an HTTP error), then stream chunks as SSE."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, str | None, asyncio.Future | None]] = asyncio.Queue()
    for i, job in enumerate(jobs):
        job.sink = lambda piece, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, piece, None))
    futures = _enqueue_all(lane, jobs)
    for i, future in enumerate(futures):
        future.add_done_callback(lambda f, i=i: events.put_nowait((i, None, f)))

    async def next_event() -> tuple[int, str | None, asyncio.Future | None]:
        try:
            return await asyncio.wait_for(events.get(), service.config.timeout_s)
        except TimeoutError:
            _cancel(jobs, futures)
            service.metrics.timeouts.labels(lane.name).inc()
            raise WorkTimeoutError(
                f"no output within {service.config.timeout_s:g} s (server busy): retry later"
            ) from None

    try:
        first = await next_event()
    except BaseException:  # also the client going away before the first token
        _cancel(jobs, futures)
        raise
    if first[2] is not None and not first[2].cancelled() and first[2].exception() is not None:
        raise first[2].exception()

    async def body() -> AsyncIterator[str]:
        finished = False
        try:
            async for chunk in chunks():
                yield chunk
            finished = True
        finally:
            if not finished:  # the client went away (or the stream failed): stop decoding for it
                _cancel(jobs, futures)

    async def chunks() -> AsyncIterator[str]:
        results: list[CompletionResult | None] = [None] * len(jobs)
        for chunk in fmt.start(len(jobs)):
            yield _sse(chunk)
        event, pending = first, len(jobs)
        while True:
            i, piece, future = event
            if future is None:
                yield _sse(fmt.piece(i, piece))
            else:
                error = WorkTimeoutError("cancelled") if future.cancelled() else future.exception()
                if error is not None:
                    yield _sse_error(error)
                    return
                results[i] = future.result()
                yield _sse(fmt.end(i, results[i]))
                pending -= 1
                if not pending:
                    break
            try:
                event = await next_event()
            except WorkTimeoutError as exc:
                yield _sse_error(exc)
                return
        if include_usage:
            yield _sse(fmt.usage_chunk(_usage(results)))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _cancel(jobs: Sequence[CompletionJob], futures: Sequence[asyncio.Future]) -> None:
    """Nobody waits for these jobs any more: queued ones are skipped, a pass of cancelled rows stops."""
    for job in jobs:
        job.cancelled.set()
    for future in futures:
        future.cancel()


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _sse_error(exc: BaseException) -> str:
    import json

    return f"data: {json.dumps(error_body(str(exc), type(exc).__name__, status_of(exc)))}\n\n"


def _usage(results: Sequence[CompletionResult | None]) -> Usage:
    done = [r for r in results if r is not None]
    prompt = sum(r.prompt_tokens for r in done)
    completion = sum(r.completion_tokens for r in done)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _TextFormat:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def start(self, n: int) -> list[CompletionChunk]:
        return []

    def piece(self, i: int, text: str) -> CompletionChunk:
        return self._chunk([CompletionChoice(index=i, text=text, finish_reason=None)])

    def end(self, i: int, r: CompletionResult) -> CompletionChunk:
        return self._chunk([CompletionChoice(index=i, text="", finish_reason=r.finish_reason, route=r.route)])

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return self._chunk([], usage)

    def response(self, results: Sequence[CompletionResult]) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason, route=r.route)
            for i, r in enumerate(results)
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=_usage(results)
        )


class _ChatFormat:
    def __init__(self, model: str) -> None:
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatChunk:
        return ChatChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self, n: int) -> list[ChatChunk]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            for i in range(n)
        ]

    def piece(self, i: int, text: str) -> ChatChunk:
        return self._chunk([ChatChunkChoice(index=i, delta=Delta(content=text))])

    def end(self, i: int, r: CompletionResult) -> ChatChunk:
        return self._chunk([ChatChunkChoice(index=i, delta=Delta(), finish_reason=r.finish_reason)])

    def usage_chunk(self, usage: Usage) -> ChatChunk:
        return self._chunk([], usage)

    def response(self, results: Sequence[CompletionResult]) -> ChatResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=r.finish_reason,
                route=r.route,
            )
            for i, r in enumerate(results)
        ]
        return ChatResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=_usage(results)
        )
