"""What a request must pass before its body is read, so that memory stays bounded whoever sends it:
a body within its route's limit (413 over it), and, on /v1, a bearer token that names a caller (401)."""

import re

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from nightowl.api.deps import CALLER_SCOPE_KEY, authenticate
from nightowl.api.routes.feedback import takes_cached_caller
from nightowl.errors import Unauthorized
from nightowl.memory.db import reads_never_wait
from nightowl.settings import LimitSettings

# The one route that may carry an image; every other body is a small JSON object.
_IMAGE_ROUTE = re.compile(r"/v1/users/[^/]+/posts/?")


def json_body_limit(limits: LimitSettings) -> int:
    """The largest small JSON body (users, feedback, rollback): its longest strings with every
    character escaped as a surrogate pair (12 bytes, what json.dumps' ensure_ascii sends), plus room."""
    longest_strings = max(limits.max_reason_chars + limits.max_idempotency_key_chars, 200 + 64)
    return 12 * longest_strings + 4096


class _BodyTooLarge(BaseException):
    # A BaseException so that no body parser on the way (FastAPI's, multipart's) turns it into
    # its own 400/422: it must reach BodySizeLimit, which answers 413.
    pass


class BodySizeLimit:
    """Refuse request bodies over their route's limit: `limit` for an image post, json_body_limit()
    for the rest. From Content-Length before reading anything, and by counting what arrives when
    there is none (chunked uploads), before it all sits in memory. /v1 requests are authenticated
    here too, before a byte of their body is read (the caller is left in the scope for get_caller)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit_for(scope)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(scope, send, limit)
        if scope["path"].startswith("/v1/") and not await self._authenticated(scope, send, headers):
            return
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, send, limit)

    def _limit_for(self, scope) -> int:
        if scope["method"] == "POST" and _IMAGE_ROUTE.fullmatch(scope["path"]):
            return self.limit
        return json_body_limit(scope["app"].state.runtime.settings.limits)

    async def _authenticated(self, scope, send, headers) -> bool:
        state = scope["app"].state
        authorization = headers.get(b"authorization")
        try:
            args = (
                state.runtime,
                state.admin_token_hash,
                authorization.decode("latin-1") if authorization else None,
                takes_cached_caller(scope),
            )
            if reads_never_wait(state.runtime.engine):
                caller = authenticate(*args)  # one indexed read of a local file: cheaper here than a thread hop
            else:
                caller = await run_in_threadpool(authenticate, *args)
        except Unauthorized as exc:
            response = JSONResponse({"detail": exc.message}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, None, send)
            return False
        except Exception:
            # The store failed: let the app answer (its handlers say what failed). get_caller
            # authenticates again before the handler runs; the body stays within its limit.
            return True
        scope[CALLER_SCOPE_KEY] = caller
        return True

    async def _refuse(self, scope, send, limit: int) -> None:
        await JSONResponse({"detail": f"request body over the {limit}-byte limit"}, status_code=413)(scope, None, send)
