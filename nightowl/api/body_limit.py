"""A limit on request bodies, enforced before they sit in memory (413 over it)."""

from fastapi.responses import JSONResponse


class _BodyTooLarge(BaseException):
    # A BaseException so that no body parser on the way (FastAPI's, multipart's) turns it into
    # its own 400/422: it must reach BodySizeLimit, which answers 413.
    pass


class BodySizeLimit:
    """Refuse request bodies over `limit` bytes: from Content-Length before reading anything, and
    by counting what arrives when there is none (chunked uploads), before it all sits in memory."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, send)
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
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
                await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        await JSONResponse({"detail": f"request body over the {self.limit}-byte limit"}, status_code=413)(scope, None, send)
