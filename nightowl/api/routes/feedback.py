"""Feedback: the label a user says is right for one of their posts, and a post's feedback page by page."""

import re
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from nightowl.api.deps import (
    CallerDep,
    JSONBodyRoute,
    PageLimit,
    PageOffset,
    RuntimeDep,
    UserIdPath,
)
from nightowl.api.errors import ERROR_RESPONSES
from nightowl.auth import Principal
from nightowl.day import logger
from nightowl.runtime import Runtime
from nightowl.schemas import MAX_ID, FeedbackIn, FeedbackList, FeedbackOut

router = APIRouter(tags=["feedback"], responses=ERROR_RESPONSES, route_class=JSONBodyRoute)

# The POST route's path, for the middlewares that meet its requests before FastAPI routes them.
FEEDBACK_PATH = re.compile(r"/v1/users/([^/]+)/feedback")


def takes_cached_caller(scope) -> bool:
    """Whether this request's caller may come from the TokenCache: a feedback POST, whose write
    checks the token against the user's stored digest in its own transaction (FeedbackWrite)."""
    return scope["method"] == "POST" and FEEDBACK_PATH.fullmatch(scope["path"]) is not None


@router.post(
    "/v1/users/{user_id}/feedback",
    response_model=FeedbackOut,
    status_code=201,
    responses={200: {"model": FeedbackOut, "description": "A retry of a stored idempotency key: the stored feedback."}},
)
async def log_feedback(user_id: UserIdPath, body: FeedbackIn, rt: RuntimeDep, caller: CallerDep) -> Response:
    """Record the label the user says is right. A retry with the same idempotency_key returns 200."""
    # Most requests never get here: api.fast_feedback answers the well-formed ones with
    # record_feedback itself, before FastAPI's routing.
    return await record_feedback(rt, caller, user_id, body)


async def record_feedback(rt: Runtime, caller: Principal, user_id: str, body: FeedbackIn) -> Response:
    """The route's work, shared with api.fast_feedback. Async: the busiest route; with group
    commit its request waits for the commit without a thread."""
    caller.require_user(user_id)
    write = logger.checked_feedback(
        rt, user_id, body.post_id, body.label, body.reason, body.idempotency_key, caller.token_hash
    )
    out = await logger.store_feedback_async(rt, write)
    return Response(out.model_dump_json(), status_code=200 if out.duplicate else 201, media_type="application/json")


@router.get("/v1/users/{user_id}/posts/{post_id}/feedback", response_model=FeedbackList)
def list_feedback(
    user_id: UserIdPath,
    post_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    rt: RuntimeDep,
    caller: CallerDep,
    limit: PageLimit = 20,
    offset: PageOffset = 0,
) -> FeedbackList:
    """All of a post's feedback, oldest first, a page at a time (the history carries only the newest)."""
    caller.require_user(user_id)
    return logger.list_feedback(rt, user_id, post_id, limit, offset)
