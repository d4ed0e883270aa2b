"""Feedback: the label a user says is right for one of their posts."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from nightowl.api.deps import CallerDep, RuntimeDep
from nightowl.api.errors import ERROR_RESPONSES
from nightowl.day import logger
from nightowl.schemas import FeedbackIn, FeedbackOut

router = APIRouter(tags=["feedback"], responses=ERROR_RESPONSES)


@router.post("/v1/users/{user_id}/feedback", response_model=FeedbackOut, status_code=201)
def log_feedback(user_id: str, body: FeedbackIn, rt: RuntimeDep, caller: CallerDep) -> JSONResponse:
    """Record the label the user says is right. A retry with the same idempotency_key returns 200."""
    caller.require_user(user_id)
    out = logger.log_feedback(rt, user_id, body.post_id, body.label, body.reason, body.idempotency_key)
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.duplicate else 201)
