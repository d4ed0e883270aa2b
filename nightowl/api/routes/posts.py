"""Posts: log one (JSON with a base64 image, or multipart with an image file) and list a user's posts."""

from contextlib import aclosing
from typing import NamedTuple

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from nightowl.api.deps import (
    CallerDep,
    PageLimit,
    PageOffset,
    RuntimeDep,
    UserIdPath,
    parse_json_body,
)
from nightowl.api.errors import ERROR_RESPONSES, validation_message
from nightowl.day import logger
from nightowl.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from nightowl.schemas import PostForm, PostJSON, PostList, PostLogged
from nightowl.settings import LimitSettings

router = APIRouter(tags=["posts"], responses=ERROR_RESPONSES)

# The route reads its body itself (two content types), so FastAPI can't infer it: document both.
BOTH_BODIES = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PostJSON.model_json_schema()},
            "multipart/form-data": {"schema": PostForm.model_json_schema()},
        },
    }
}
# The multipart reader takes the fields PostForm documents, so the two can't drift apart.
FORM_TEXT_FIELDS = tuple(name for name in PostForm.model_fields if name != "image")


class PostBody(NamedTuple):
    text: str | None
    aspect: str | None
    context: str | None
    image: bytes | None
    idempotency_key: str | None


@router.post(
    "/v1/users/{user_id}/posts",
    response_model=PostLogged,
    status_code=201,
    responses={200: {"model": PostLogged, "description": "A retry of a stored idempotency key: the stored answer."}},
    openapi_extra=BOTH_BODIES,
)
async def log_post(user_id: UserIdPath, request: Request, rt: RuntimeDep, caller: CallerDep) -> JSONResponse:
    """Log a post (JSON with base64 image, or multipart with an image file); returns the user's prediction.
    A retry with the same idempotency_key returns 200 and the stored answer."""
    caller.require_user(user_id)
    post = await read_post_body(request, rt.settings.limits.max_image_bytes)
    _check_lengths(post, rt.settings.limits)
    out = await run_in_threadpool(
        logger.log_post, rt, user_id, post.text, post.aspect, post.image, post.idempotency_key, post.context
    )
    # 201 for a new post, 200 for a retry of a stored key (as for feedback)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.duplicate else 201)


@router.get("/v1/users/{user_id}/posts", response_model=PostList)
def list_posts(
    user_id: UserIdPath,
    rt: RuntimeDep,
    caller: CallerDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
) -> PostList:
    """The user's posts, newest first, with predictions and each post's newest feedback (and its count)."""
    caller.require_user(user_id)
    return logger.list_posts(rt, user_id, limit, offset)


async def read_post_body(request: Request, max_image_bytes: int) -> PostBody:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return await _read_json(request)
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_image_bytes)
    raise UnsupportedMediaType("send the post as application/json or multipart/form-data")


def _check_lengths(post: PostBody, limits: LimitSettings) -> None:
    # What was sent, before logger.log_post strips it: the limit the schema documents (maxLength).
    for name, value, limit in (("aspect", post.aspect, limits.max_aspect_chars), ("context", post.context, limits.max_text_chars)):
        if value is not None and len(value) > limit:
            raise InvalidInput(f"{name} is {len(value)} characters; the limit is {limit}")


async def _read_json(request: Request) -> PostBody:
    data = parse_json_body(await request.body())
    try:
        body = PostJSON.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from None
    image = logger.decode_base64_image(body.image_base64) if body.image_base64 else None
    return PostBody(body.text, body.aspect, body.context, image, body.idempotency_key)


class _UTF8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field that isn't UTF-8 is refused
    (Starlette falls back to Latin-1, which would store mojibake as the user's words)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            return super().on_part_end()
        try:
            value = bytes(part.data).decode("utf-8")
        except UnicodeDecodeError:
            raise MultiPartException(f"form field {part.field_name!r} is not valid UTF-8 text") from None
        self.items.append((part.field_name, value))


async def _read_multipart(request: Request, max_image_bytes: int) -> PostBody:
    try:
        async with aclosing(request.stream()) as stream:
            form = await _UTF8MultiPartParser(request.headers, stream, max_files=1, max_fields=10).parse()
    except MultiPartException as exc:
        raise InvalidInput(f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        raise InvalidInput(f"malformed multipart body: {exc}") from None
    try:
        unknown = sorted(set(form.keys()) - set(PostForm.model_fields))
        if unknown:
            raise InvalidInput("; ".join(f"{name}: Extra inputs are not permitted" for name in unknown))
        fields = {name: _text_field(form, name) for name in FORM_TEXT_FIELDS}
        return PostBody(image=await _image_file(form, max_image_bytes), **fields)
    finally:
        await form.close()


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{name} must be a form field, not a file")
    return value


async def _image_file(form: FormData, max_image_bytes: int) -> bytes | None:
    upload = form.get("image")
    if upload is None:
        return None
    if not isinstance(upload, UploadFile):
        raise InvalidInput("image must be a file part")
    image = await upload.read(max_image_bytes + 1)
    if len(image) > max_image_bytes:
        raise PayloadTooLarge(f"image is over the {max_image_bytes}-byte limit")
    return image
