"""schemathesis against the app in-process: every operation, generated from the OpenAPI schema the
app serves, answers without a server error and as its schema says (status, content type, body);
data the schema calls invalid is refused. Bounded: a few dozen cases per operation."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import admin_headers

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# (generation mode, on the seeded user's own data?, cases per operation): valid data on a user and a
# post that exist, valid data anywhere, invalid data
RUNS = [(GenerationMode.POSITIVE, True, 25), (GenerationMode.POSITIVE, False, 8), (GenerationMode.NEGATIVE, True, 8)]


def _seed(client) -> dict[str, object]:
    """alice, with a post that has feedback (again, after a generated DELETE took her away)."""
    client.post("/v1/users", json={"user_id": "alice"}, headers=admin_headers())
    posts = client.get("/v1/users/alice/posts", headers=admin_headers()).json()["items"]
    if not posts:
        r = client.post("/v1/users/alice/posts", json={"text": "$T$ again", "aspect": "Mondays"}, headers=admin_headers())
        posts = [r.json()]
        client.post("/v1/users/alice/feedback", json={"post_id": posts[0]["post_id"], "label": "negative"}, headers=admin_headers())
    return {"user_id": "alice", "post_id": posts[0]["post_id"]}


def _operations(schema):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    return sorted(operations, key=lambda op: op.method == "delete")  # the deletion last


def _run(operation, mode: GenerationMode, path_parameters, cases: int) -> None:
    if path_parameters:
        path_parameters = {k: v for k, v in path_parameters.items() if "{" + k + "}" in operation.path} or None
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(headers=admin_headers(), checks=checks)

    try:
        check()
    except Unsatisfiable:
        # nothing about /healthz (no parameters, no body) can be invalid
        if mode is not GenerationMode.NEGATIVE:
            raise


def test_every_operation_answers_as_its_schema_says(client):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    for operation in _operations(schema):
        for mode, own_data, cases in RUNS:
            _run(operation, mode, _seed(client) if own_data else None, cases)
