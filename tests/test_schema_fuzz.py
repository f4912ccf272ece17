"""Property-based fuzzing of the service's own OpenAPI schema with schemathesis: every operation, with valid
(positive) and invalid (negative) inputs, with and without an API key, through the ASGI app in-process (no
network). No answer may be a 5xx; statuses, content types, headers and bodies must be the ones the schema
documents; invalid inputs must be refused. Seeded (derandomized), a bounded number of examples each."""

from __future__ import annotations

import json

import pytest
import schemathesis
import test_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_service import AUTH, BASE, SNAPSHOT, make_app

world = test_service.world  # the service tests' fixture: tiny-llama, a small library and generator
OPERATIONS = [
    (method.upper(), path)
    for path, ops in json.loads(SNAPSHOT.read_text())["paths"].items()
    for method in ops
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 50
KNOWN_IDS = ["arith_0", "strong", "auto", BASE]
"""Random ids almost never exist; drawing these too lets valid requests reach the library and the runtime."""


@pytest.fixture(scope="module")
def schema(world):
    from schemathesis.python.asgi import shutdown_lifespans

    schema = schemathesis.openapi.from_asgi("/openapi.json", make_app(world))
    # The key is ours to send (or not): schemathesis would otherwise make up Authorization headers, and in
    # negative mode expect their absence to be refused, which reads do not do under `auth: writes`.
    schema.config.generation.update(with_security_parameters=False)
    refused = schema.config.checks.negative_data_rejection  # a body over the size limit is refused too
    refused.expected_statuses = [*refused.expected_statuses, "413"]
    yield schema
    shutdown_lifespans()  # schemathesis keeps an app's lifespan running until asked


def _with_known_id(case, known: str | None) -> None:
    """Point a valid case's id (path parameter or `model`) at something that exists."""
    if known is None:
        return
    for name in case.path_parameters or {}:
        case.path_parameters[name] = known
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = known


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("key", [True, False], ids=["key", "no-key"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_server_errors_and_answers_as_documented(schema, method, path, key, mode):
    operation = schema[path][method]
    only_ids = all(p.location == "path" for p in operation.iter_parameters())  # any string is a valid id
    if mode == GenerationMode.NEGATIVE and only_ids and not operation.body:
        pytest.skip("no inputs that can be made invalid")
    known = st.sampled_from(KNOWN_IDS) | st.none() if mode == GenerationMode.POSITIVE else st.none()

    @given(case=operation.as_strategy(generation_mode=mode), known=known)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case, known):
        _with_known_id(case, known)
        case.call_and_validate(headers=AUTH if key else None, checks=CHECKS)

    fuzz()
