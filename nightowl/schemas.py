"""Typed request/response models shared by the HTTP API and the CLI (one shape for both)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

# Row ids are 32-bit integers on PostgreSQL (64 on SQLite): anything larger can't name a row.
MAX_ID = 2**31 - 1
# Feedback items a history entry carries; the rest are paged from /posts/{post_id}/feedback.
FEEDBACK_PER_POST = 20
# What the request models document and the server checks (nightowl.day.logger, nightowl.auth, with
# their own messages): the schema only says so. Limits that settings configure are filled in per app
# (nightowl.api.openapi); a text with a NUL is refused everywhere.
USER_ID_SCHEMA = {"pattern": r"^[A-Za-z0-9_-]{1,64}$", "minLength": 1, "maxLength": 64}
NO_NUL = r"^[^\u0000]*$"
NOT_BLANK_NO_NUL = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"


class RequestModel(BaseModel):
    """A request body: a field it doesn't know is refused (422 naming it), never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class UserCreate(RequestModel):
    user_id: str = Field(description="1-64 letters, digits, '_' or '-'.", examples=["alice"], json_schema_extra=USER_ID_SCHEMA)
    name: str | None = Field(default=None, max_length=200, json_schema_extra={"pattern": NO_NUL})


class UserCreated(BaseModel):
    user_id: str
    name: str | None
    token: str = Field(description="Bearer token for this user. Shown once; only its hash is stored.")


class PredictionOut(BaseModel):
    label: str
    probabilities: dict[str, float]
    adapter_version: int | None = Field(description="The user's adapter version that served it; null = base model.")


class PostJSON(RequestModel):
    """JSON form of a post; the multipart form takes the same fields with the image as a file."""

    text: str = Field(examples=["$T$ is everything #MCM"])
    aspect: str | None = Field(default=None, examples=["Chuck Bass"])
    context: str | None = Field(default=None, description="The post this one replies to, if any.")
    image_base64: str | None = Field(default=None, description="The image's bytes, base64 encoded.")
    idempotency_key: str | None = Field(
        default=None, description="Optional: a retried post with the same key is stored once."
    )


def _no_null_defaults(schema: dict) -> None:
    for field in schema["properties"].values():
        field.pop("default", None)


class PostForm(BaseModel):
    """Multipart form of a post: the JSON form's fields, with the image as a file part."""

    # Only documents the multipart body: the posts route reads the form itself (it takes JSON too).
    # A form field is sent or left out, never null: the schema says so (no null type, no null default).
    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_null_defaults)

    text: str
    aspect: str | SkipJsonSchema[None] = None
    context: str | SkipJsonSchema[None] = None
    idempotency_key: str | SkipJsonSchema[None] = None
    image: bytes | SkipJsonSchema[None] = None


class PostLogged(BaseModel):
    post_id: int
    prediction: PredictionOut
    image_sha256: str | None = None
    duplicate: bool = Field(default=False, description="True when this idempotency key was already stored.")


class FeedbackIn(RequestModel):
    post_id: int = Field(ge=1, le=MAX_ID)
    label: str = Field(description="One of the configured labels.")
    reason: str | None = None
    idempotency_key: str | None = Field(
        default=None, description="Retries with the same key are stored once. Generated if omitted."
    )


class FeedbackOut(BaseModel):
    feedback_id: int
    post_id: int
    label: str
    reason: str | None
    idempotency_key: str
    created_at: datetime
    duplicate: bool = False


class FeedbackItem(BaseModel):
    feedback_id: int
    label: str
    reason: str | None
    idempotency_key: str
    created_at: datetime


class PostItem(BaseModel):
    post_id: int
    text: str
    aspect: str | None
    context: str | None = None
    image_sha256: str | None
    created_at: datetime
    prediction: PredictionOut | None
    rationale: str | None = None
    feedback: list[FeedbackItem] = Field(
        description=f"The newest {FEEDBACK_PER_POST} feedback, newest first; the rest: GET .../posts/{{post_id}}/feedback."
    )
    feedback_total: int = Field(description="How many feedback the post has in all.")


class PostList(BaseModel):
    items: list[PostItem]
    total: int


class FeedbackList(BaseModel):
    post_id: int
    items: list[FeedbackItem] = Field(description="Oldest first.")
    total: int


class Health(BaseModel):
    """GET /healthz: "ok" (HTTP 200) or "degraded" (HTTP 503), with each problem named."""

    status: Literal["ok", "degraded"]
    problems: list[str] = Field(default_factory=list, description="Why it is degraded, one line each.")
    database: str
    database_ms: float | None = Field(default=None, description="Time the database took to answer; null: no answer.")
    model_loaded: bool
    pending_rationales: int | None = None
    rationale_lag_s: float | None = Field(
        default=None, description="How long the oldest due rationale request has waited for the worker."
    )
    rationale_worker_alive: bool | None = Field(
        default=None, description="Whether this server's rationale worker runs; null: it started none."
    )
    disk_free_bytes: int | None = Field(default=None, description="Free space on the disk holding the home folder.")
    process: int | None = Field(
        default=None, description="The answering server process's pid (with `serve --workers N`, one of N)."
    )
    broker_lag: int | None = Field(
        default=None,
        description="Broker messages the consumer has not yet stored (pending + unacked); "
        "null: no broker configured, or it did not answer in time (the HTTP API doesn't need it: "
        "that alone never makes the status degraded).",
    )


class ErrorOut(BaseModel):
    detail: str


class AdapterOut(BaseModel):
    version: int
    status: str
    trained_through_feedback_id: int | None
    reason: str | None
    metrics: dict
    created_at: datetime


class AdapterList(BaseModel):
    user_id: str
    active_version: int | None
    items: list[AdapterOut]


class RollbackIn(RequestModel):
    version: int | None = Field(ge=1, le=MAX_ID, description="The version to make active; null goes back to the base model.")
