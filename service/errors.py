"""Every error the service answers with, mapped to one HTTP status in one table; bodies in OpenAI's error shape
`{"error": {"message", "type", "code"}}` so OpenAI clients show the message."""

from __future__ import annotations

import errno
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loramint.errors import (
    AdapterError,
    AlreadyExistsError,
    FetchError,
    GeneratorError,
    InvalidIdError,
    LibraryError,
    LoramintError,
    ModelError,
    NotFoundError,
    TaskError,
)
from loramint.service.schemas import ErrorResponse

log = logging.getLogger(__name__)


class ServiceError(LoramintError):
    """Base of the errors only the HTTP layer raises."""


class AuthError(ServiceError):
    """No API key, or not one of the configured keys."""


class QueueFullError(ServiceError):
    """A work queue is full: the client should retry later."""


class QuotaError(ServiceError):
    """A key's storage quota for kept minted adapters is used up; `retry_after`: seconds until one expires."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WorkTimeoutError(ServiceError):
    """The work did not finish within the configured timeout."""


class UnavailableError(ServiceError):
    """A capability is not configured (no generator) or the service is shutting down."""


class ContextLengthError(ServiceError, ValueError):
    """Prompt tokens + max_tokens exceed the base model's context."""


STATUS: dict[type[BaseException], int] = {  # most specific first: the first isinstance match wins
    InvalidIdError: 400,
    ContextLengthError: 400,
    AuthError: 401,
    NotFoundError: 404,
    AlreadyExistsError: 409,
    AdapterError: 422,
    GeneratorError: 422,
    TaskError: 422,
    QueueFullError: 429,
    QuotaError: 429,
    LibraryError: 500,
    ModelError: 500,
    FetchError: 502,
    UnavailableError: 503,
    WorkTimeoutError: 504,
    ValueError: 422,
}


WHEN = {
    400: "A body that cannot be parsed, an invalid id, or a prompt over the base model's context.",
    401: "No API key, or not a valid one.",
    404: "No adapter, expert or model of that id.",
    409: "An adapter or expert of that id already exists.",
    413: "The request body is over the size limit.",
    422: "The request is invalid (fields, limits, an unusable adapter).",
    429: "The work queue is full: retry later (Retry-After).",
    503: "Not configured (no generator) or shutting down.",
    504: "The work did not finish within the timeout.",
    507: "The server's disk is full: nothing was stored; retry later.",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses, each with the error body's schema."""
    return {code: {"model": ErrorResponse, "description": WHEN[code]} for code in codes}


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def status_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return 507
    return next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?!v1/)(?:[^\s/'\"]+/)+([^\s/'\",;:)]+)")
"""An absolute file-system path; the API's own URL paths (/v1/...), which messages name on purpose, are not."""


def public_message(message: str) -> str:
    """`message` without the server's file system: every absolute path becomes its last component (the
    library, checkpoint or file it names), so errors tell clients what went wrong but not where it lives."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


def error_body(message: str, kind: str, code: int, **extra) -> dict:
    return {"error": {"message": public_message(message), "type": kind, "code": code, **extra}}


def _respond(exc: BaseException, code: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    if code == 429:
        headers = {"Retry-After": str(getattr(exc, "retry_after", 1))}
    return JSONResponse(error_body(str(exc), type(exc).__name__, code), status_code=code, headers=headers)


async def _known(_request: Request, exc: Exception) -> JSONResponse:
    code = status_of(exc)
    if code == 507:
        log.error("disk full: %s", exc)
        return JSONResponse(
            error_body("the server's disk is full: nothing was stored; retry later", "StorageFullError", 507),
            status_code=507,
            headers={"Retry-After": "60"},
        )
    if code in (500, 502):  # our fault, not the client's or the load's
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return _respond(exc, code)


async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]
    return JSONResponse(error_body(message, "RequestValidationError", 422, detail=detail), status_code=422)


async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
    kind = (
        "PayloadTooLargeError" if exc.status_code == 413 else "HTTPException"
    )  # see metrics.ObserveAndLimit
    return JSONResponse(
        error_body(str(exc.detail), kind, exc.status_code),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def install(app: FastAPI) -> None:
    """Register the handlers: loramint errors and ValueError by the table, validation, HTTP errors."""
    app.add_exception_handler(LoramintError, _known)
    app.add_exception_handler(ValueError, _known)
    app.add_exception_handler(OSError, _known)  # a full disk is a documented 507; any other is a 500
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
