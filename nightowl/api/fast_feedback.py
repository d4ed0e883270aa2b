"""The busiest route without FastAPI's routing: a well-formed feedback request is answered here.

py-spy on a server under the ingest benchmark's load (32 clients, group commit): FastAPI's
routing, dependency solving and the middleware layers around them held the GIL for about half
of a worker's time on `POST /v1/users/{user_id}/feedback`, against ~6% for the route's own work.
This middleware takes exactly the requests that route would accept as they are (JSON body that
`FeedbackIn` validates, a caller that `BodySizeLimit` authenticated) and runs the route's own
function on them (`routes.feedback.record_feedback`), with the app's own error handlers. Anything
else (another route, a body FastAPI would refuse, another content type, a caller not yet known)
goes down the app unchanged, with its body replayed, so every error is the route's own.
"""

from pydantic import ValidationError
from starlette.requests import Request

from nightowl.api.deps import CALLER_SCOPE_KEY
from nightowl.api.errors import error_response
from nightowl.api.routes.feedback import FEEDBACK_PATH, record_feedback
from nightowl.auth import Principal
from nightowl.schemas import FeedbackIn

class FeedbackFastPath:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        match = FEEDBACK_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        caller = scope.get(CALLER_SCOPE_KEY)
        if match is None or not isinstance(caller, Principal) or not _is_json(scope):
            return await self.app(scope, receive, send)
        body, complete = await _read_body(receive)
        if not complete:  # the client went away mid-body: nothing to answer
            return
        try:
            feedback = FeedbackIn.model_validate_json(body)
        except ValidationError:
            return await self.app(scope, _replay(body, receive), send)
        try:
            response = await record_feedback(scope["app"].state.runtime, caller, match.group(1), feedback)
        except Exception as exc:
            response = await error_response(Request(scope, receive), exc)
        await response(scope, receive, send)


def _is_json(scope) -> bool:
    # Only the usual header, exactly: any other spelling goes down the app, which checks it.
    return [v for k, v in scope["headers"] if k == b"content-type"] == [b"application/json"]


async def _read_body(receive) -> tuple[bytes, bool]:
    """The whole body (bounded: BodySizeLimit counts what arrives); False if the client left first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive):
    """A receive that gives the body already read, then whatever the client sends next."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
