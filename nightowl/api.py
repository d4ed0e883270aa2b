"""The interaction logger's HTTP API (FastAPI). Handlers are thin: nightowl.day.logger does the work."""


import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from nightowl.day import logger
from nightowl.auth import Principal, is_admin_token, load_or_create_admin_token
from nightowl.errors import InvalidInput, NightowlError, PayloadTooLarge, Unauthorized, UnsupportedMediaType
from nightowl.runtime import Runtime
from nightowl.schemas import (
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    Health,
    PostJSON,
    AdapterList,
    PostList,
    PostLogged,
    RollbackIn,
    UserCreate,
    MAX_ID,
    UserCreated,
)

log = logging.getLogger(__name__)
bearer = HTTPBearer(auto_error=False, description="A user's token, or the admin token.")
ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422)}


def create_app(rt: Runtime, background: bool = True) -> FastAPI:
    """The app over a runtime. `background` starts the rationale worker (tests may drive it by hand)."""
    admin_hash, generated = load_or_create_admin_token(rt.settings.admin_token, rt.settings.home)
    if generated:
        log.warning("generated an admin token into %s", rt.settings.home / "admin_token")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the model before taking requests: the first post shouldn't wait seconds for it.
        await run_in_threadpool(lambda: rt.predictor)
        worker = scheduler = None
        if background:
            from nightowl.day.rationale_worker import RationaleWorker
            from nightowl.scheduler.nightly import build_scheduler, next_run

            worker = RationaleWorker(rt)
            worker.start()
            scheduler = build_scheduler(rt)
            scheduler.start()
            log.info("nightly update scheduled; next run %s", next_run(scheduler))
        try:
            yield
        finally:
            if scheduler is not None:
                from nightowl.scheduler.nightly import stopping

                stopping.set()
                scheduler.shutdown(wait=False)
            if worker is not None:
                worker.stop()

    app = FastAPI(
        title="nightowl interaction logger",
        version="1",
        description="Posts and feedback in, per-user sentiment predictions out.",
        lifespan=lifespan,
    )
    app.state.runtime = rt

    @app.exception_handler(NightowlError)
    async def _domain_error(_: Request, exc: NightowlError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One shape for every error: {"detail": "<message>"} (FastAPI's default is a list).
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    # The largest body a request may carry: an image at its limit, base64 (4/3 larger), plus fields.
    app.add_middleware(BodySizeLimit, limit=rt.settings.limits.max_image_bytes * 4 // 3 + 256 * 1024)

    def principal(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if is_admin_token(creds.credentials, admin_hash):
            return Principal(user_id=None)
        user_id = logger.user_for_token(rt, creds.credentials)
        if user_id is None:
            raise Unauthorized("invalid token")
        return Principal(user_id=user_id)

    Caller = Annotated[Principal, Depends(principal)]

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        return logger.health(rt)

    @app.post("/v1/users", response_model=UserCreated, status_code=201, responses=ERRORS, tags=["users"])
    def create_user(body: UserCreate, caller: Caller) -> UserCreated:
        caller.require_admin()
        return logger.create_user(rt, body.user_id, body.name)

    @app.post(
        "/v1/users/{user_id}/posts",
        response_model=PostLogged,
        status_code=201,
        responses=ERRORS,
        tags=["posts"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": PostJSON.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["text"],
                            "properties": {
                                "text": {"type": "string"},
                                "aspect": {"type": "string"},
                                "context": {"type": "string"},
                                "idempotency_key": {"type": "string"},
                                "image": {"type": "string", "format": "binary"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def log_post(user_id: str, request: Request, caller: Caller) -> JSONResponse:
        """Log a post (JSON with base64 image, or multipart with an image file); returns the user's prediction.
        A retry with the same idempotency_key returns 200 and the stored answer."""
        caller.require_user(user_id)
        text, aspect, context, image, key = await _read_post_body(request, rt.settings.limits.max_image_bytes)
        out = await run_in_threadpool(logger.log_post, rt, user_id, text, aspect, image, key, context)
        # 201 for a new post, 200 for a retry of a stored key (as for feedback)
        return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.duplicate else 201)

    @app.post(
        "/v1/users/{user_id}/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS, tags=["feedback"]
    )
    def log_feedback(user_id: str, body: FeedbackIn, caller: Caller) -> JSONResponse:
        """Record the label the user says is right. A retry with the same idempotency_key returns 200."""
        caller.require_user(user_id)
        out = logger.log_feedback(rt, user_id, body.post_id, body.label, body.reason, body.idempotency_key)
        return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.duplicate else 201)

    @app.get("/v1/users/{user_id}/posts", response_model=PostList, responses=ERRORS, tags=["posts"])
    def list_posts(
        user_id: str,
        caller: Caller,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    ) -> PostList:
        """The user's posts, newest first, with predictions and feedback."""
        caller.require_user(user_id)
        return logger.list_posts(rt, user_id, limit, offset)

    @app.delete("/v1/users/{user_id}", responses=ERRORS, tags=["users"])
    def delete_user(user_id: str, caller: Caller) -> dict[str, int]:
        """Delete a user: rows, replay vectors, adapters and images no one else posted (admin)."""
        caller.require_admin()
        return logger.delete_user(rt, user_id)

    @app.get("/v1/users/{user_id}/adapters", response_model=AdapterList, responses=ERRORS, tags=["adapters"])
    def list_adapters(user_id: str, caller: Caller) -> AdapterList:
        """The user's adapter versions: active, candidate, rejected (with the reason), retired."""
        caller.require_user(user_id)
        return logger.list_adapters(rt, user_id)

    @app.post("/v1/users/{user_id}/adapters/rollback", response_model=AdapterList, responses=ERRORS, tags=["adapters"])
    def rollback(user_id: str, body: RollbackIn, caller: Caller) -> AdapterList:
        """Make an earlier adapter version active again (version null: back to the base model)."""
        caller.require_user(user_id)
        return logger.rollback_adapter(rt, user_id, body.version)

    return app


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


async def _read_post_body(
    request: Request, max_image_bytes: int
) -> tuple[str | None, str | None, str | None, bytes | None, str | None]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = PostJSON.model_validate(json.loads(await request.body()))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise InvalidInput("request body is not valid JSON (or nests too deeply)") from None
        except ValidationError as exc:
            raise InvalidInput(_validation_message(exc)) from None
        image = logger.decode_base64_image(body.image_base64) if body.image_base64 else None
        return body.text, body.aspect, body.context, image, body.idempotency_key
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=10)
        except Exception as exc:  # starlette raises several types for malformed multipart
            raise InvalidInput(f"malformed multipart body: {exc}") from None
        fields = {}
        for name in ("text", "aspect", "context", "idempotency_key"):
            value = form.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"{name} must be a form field, not a file")
            fields[name] = value
        image = None
        upload = form.get("image")
        if upload is not None:
            if not isinstance(upload, UploadFile):
                raise InvalidInput("image must be a file part")
            image = await upload.read(max_image_bytes + 1)
            if len(image) > max_image_bytes:
                raise PayloadTooLarge(f"image is over the {max_image_bytes}-byte limit")
        return fields["text"], fields["aspect"], fields["context"], image, fields["idempotency_key"]
    raise UnsupportedMediaType("send the post as application/json or multipart/form-data")


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
