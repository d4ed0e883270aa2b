"""What the routes share, as `Annotated` dependencies (after the FastAPI full-stack template's
api/deps.py): the runtime the app serves, the caller that the bearer token names, the `{user_id}`
path parameter as the schema documents it; and the route class of the JSON-body routes."""

import json
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from nightowl.auth import (
    USER_ID_PATTERN,
    Principal,
    bearer_token,
    hash_token,
    looks_like_user_token,
    same_token_hash,
)
from nightowl.day import logger
from nightowl.errors import InvalidInput, Unauthorized, UnsupportedMediaType
from nightowl.runtime import Runtime
from nightowl.schemas import MAX_ID

# Documents the scheme in OpenAPI; the token itself is read by authenticate().
bearer = HTTPBearer(auto_error=False, description="A user's token, or the admin token.")
# Where BodySizeLimit leaves the caller it authenticated before any body was read.
CALLER_SCOPE_KEY = "nightowl.caller"


async def get_runtime(request: Request) -> Runtime:
    # async: an attribute read needs no trip to the thread pool (sync dependencies take one).
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def authenticate(rt: Runtime, admin_token_hash: str, authorization: str | None, cached: bool = False) -> Principal:
    """The admin, or the user whose token it is (Unauthorized otherwise). Cheap checks first: the
    header's shape, the admin token's hash; the store is asked only about what could be a user's
    token. `cached`: a recent lookup may answer (only for a request whose write checks the token
    again: see routes.feedback.takes_cached_caller)."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    token_hash = hash_token(token)
    if same_token_hash(token_hash, admin_token_hash):
        return Principal(user_id=None)
    user_id = logger.user_for_token(rt, token_hash, cached) if looks_like_user_token(token) else None
    if user_id is None:
        raise Unauthorized("invalid token")
    return Principal(user_id=user_id, token_hash=token_hash)


async def get_caller(request: Request, rt: RuntimeDep, _: Annotated[Any, Depends(bearer)]) -> Principal:
    """The caller BodySizeLimit authenticated before the body was read; else (an app without it)
    authenticated here, in the thread pool: the token lookup queries the store. Async so that the
    usual case, the caller already in the scope, costs no trip to the thread pool."""
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if isinstance(caller, Principal):
        return caller
    return await run_in_threadpool(
        authenticate, rt, request.app.state.admin_token_hash, request.headers.get("authorization")
    )


CallerDep = Annotated[Principal, Depends(get_caller)]

# A page of a listing (the history, a post's feedback); the logger checks the same bounds.
PageLimit = Annotated[int, Query(ge=1, le=500)]
PageOffset = Annotated[int, Query(ge=0, le=MAX_ID)]

# The server checks user ids itself (logger.require_user, with its own message); the schema says the same.
UserIdPath = Annotated[
    str,
    Path(
        description="1-64 letters, digits, '_' or '-'.",
        json_schema_extra={"pattern": USER_ID_PATTERN.pattern, "minLength": 1, "maxLength": 64},
    ),
]


def parse_json_body(body: bytes) -> Any:
    """A request body as JSON: UTF-8 only (RFC 8259), every failure a 422 that says what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body is not valid UTF-8 (byte {exc.start}): send JSON as UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidInput("request body is not valid JSON: it nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None


def is_json_media_type(content_type: str) -> bool:
    if content_type == "application/json":  # nearly every request: no header parsing for it
        return True
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class JSONBodyRoute(APIRoute):
    """A route whose body FastAPI parses into a model: the body is checked first, so that JSON that
    isn't UTF-8 or nests too deeply is a 422 like any other invalid JSON (FastAPI answers those 400),
    and another content type is a 415."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if content_type is not None and not is_json_media_type(content_type):
                raise UnsupportedMediaType("send the body as application/json")
            body = await request.body()  # bounded by BodySizeLimit; FastAPI reads the same bytes again
            if body:
                parse_json_body(body)
            return await handler(request)

        return checked
