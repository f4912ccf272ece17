"""FastAPI dependencies: the service object of the app, and the API-key checks (`Authorization: Bearer`)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loramint.service.core import Service
from loramint.service.errors import AuthError

bearer = HTTPBearer(auto_error=False, description="One of the service's API keys (LORAMINT_API_KEYS).")


def get_service(request: Request) -> Service:
    return request.app.state.service


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _check(service: Service, credentials: HTTPAuthorizationCredentials | None) -> None:
    if credentials is None:
        raise AuthError("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    given = credentials.credentials.encode()
    if not any(hmac.compare_digest(given, key.encode()) for key in service.config.api_keys):
        raise AuthError("the API key is not valid")


def writer(service: Annotated[Service, Depends(get_service)], credentials: Credentials) -> Service:
    """The service, for endpoints that change state (mint, upload, delete): a key unless auth is "none"."""
    if service.config.auth != "none":
        _check(service, credentials)
    return service


def reader(service: Annotated[Service, Depends(get_service)], credentials: Credentials) -> Service:
    """The service, for reads and completions: a key when auth is "all"; a key that is sent is checked
    whatever the policy (a wrong key is a client's mistake to report, never something to ignore)."""
    if service.config.auth == "all" or (credentials is not None and service.config.api_keys):
        _check(service, credentials)
    return service


Writer = Annotated[Service, Depends(writer)]
Reader = Annotated[Service, Depends(reader)]
