"""The durable record of everything nightowl sees and does (SQLModel tables).

Day side: users, posts, the prediction served for each post, feedback, rationales and the
queue of rationale requests. Night side: adapter versions and training runs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import JSON, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# Surrogate integer ids are never handed out twice, even after the rows holding the highest ids
# are deleted: an id names one row for good (a worker or a night holding an id from before a
# user's deletion can't land on another user's row). PostgreSQL's sequences never go back;
# SQLite reuses the highest rowid unless the table is AUTOINCREMENT (revision 0002).
NEVER_REUSED = {"sqlite_autoincrement": True}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class User(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    # sha256 of the bearer token: a leaked database doesn't leak tokens.
    token_hash: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class Post(SQLModel, table=True):
    # A client may name its post (idempotency_key) so that a retried upload is stored once.
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key", name="uq_post_idempotency"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=64)
    text: str = Field(sa_column=Column(Text, nullable=False))
    aspect: str | None = Field(default=None, max_length=400)
    # The post this one answers (a reply's context), when there is one.
    context: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    image_sha256: str | None = Field(default=None, max_length=64)
    idempotency_key: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Prediction(SQLModel, table=True):
    """What the user's model answered when the post arrived."""

    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    post_id: int = Field(foreign_key="post.id", index=True)
    label: str = Field(max_length=64)
    probabilities: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    adapter_version: int | None = None  # None: the shared base model served it
    created_at: datetime = Field(default_factory=utcnow)


class Feedback(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key", name="uq_feedback_idempotency"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=64)
    post_id: int = Field(foreign_key="post.id", index=True)
    label: str = Field(max_length=64)
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    idempotency_key: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class Rationale(SQLModel, table=True):
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    post_id: int = Field(foreign_key="post.id", index=True)
    provider: str = Field(max_length=200)
    text: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class JobStatus(str, Enum):
    pending = "pending"
    done = "done"
    failed = "failed"  # gave up after settings.rationale_max_attempts


class RationaleJob(SQLModel, table=True):
    """A durable request for a post's rationale: the worker survives restarts by re-reading these."""

    __table_args__ = (Index("ix_rationalejob_due", "status", "next_attempt_at"),)

    post_id: int = Field(foreign_key="post.id", primary_key=True)
    status: JobStatus = Field(default=JobStatus.pending)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AdapterStatus(str, Enum):
    active = "active"
    candidate = "candidate"
    rejected = "rejected"
    retired = "retired"


class AdapterVersion(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("user_id", "version", name="uq_adapter_user_version"), NEVER_REUSED)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=64)
    version: int
    status: AdapterStatus = Field(default=AdapterStatus.candidate)
    path: str = Field(max_length=1000)  # relative to settings.adapters_dir
    # Feedback up to this id was used to train it: the next night starts after it.
    trained_through_feedback_id: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class RunStatus(str, Enum):
    running = "running"
    promoted = "promoted"
    rejected = "rejected"
    failed = "failed"
    skipped = "skipped"


class TrainingRun(SQLModel, table=True):
    __table_args__ = NEVER_REUSED

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="user.id", index=True, max_length=64)
    night_id: str = Field(index=True, max_length=64)
    cutoff: datetime
    status: RunStatus = Field(default=RunStatus.running)
    n_new_feedback: int = 0
    n_replay: int = 0
    adapter_version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Lease(SQLModel, table=True):
    """A named lock with an expiry, held in the database so it holds across processes.

    The night takes one: two servers (or a server and `nightowl nightly --now`) never train at
    once; a holder killed mid-night simply lets it expire.
    """

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=128)
    expires_at: datetime
