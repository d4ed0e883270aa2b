"""Initial schema: the tables `SQLModel.metadata.create_all` made before migrations existed.

A database made by that code (commit feb48a2 and before) is stamped at this revision instead of
running it (nightowl.memory.migrations.upgrade), so this file must describe exactly that schema,
on SQLite and on PostgreSQL; never edit it: change the schema in a new revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Native ENUM types on PostgreSQL (created with their tables); plain VARCHARs on SQLite.
ADAPTER_STATUS = sa.Enum("active", "candidate", "rejected", "retired", name="adapterstatus")
JOB_STATUS = sa.Enum("pending", "done", "failed", name="jobstatus")
RUN_STATUS = sa.Enum("running", "promoted", "rejected", "failed", "skipped", name="runstatus")


def upgrade() -> None:
    op.create_table(
        "user",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_user_token_hash", "user", ["token_hash"], unique=True)

    op.create_table(
        "post",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("aspect", sa.String(length=400), nullable=True),
        sa.Column("context", sa.Text(), nullable=True),
        sa.Column("image_sha256", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_post_idempotency"),
    )
    op.create_index("ix_post_user_id", "post", ["user_id"], unique=False)
    op.create_index("ix_post_created_at", "post", ["created_at"], unique=False)

    op.create_table(
        "prediction",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("post_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_prediction_post_id", "prediction", ["post_id"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("post_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_feedback_idempotency"),
    )
    op.create_index("ix_feedback_user_id", "feedback", ["user_id"], unique=False)
    op.create_index("ix_feedback_post_id", "feedback", ["post_id"], unique=False)
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"], unique=False)

    op.create_table(
        "rationale",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("post_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=200), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rationale_post_id", "rationale", ["post_id"], unique=False)

    op.create_table(
        "rationalejob",
        sa.Column("post_id", sa.Integer(), nullable=False),
        sa.Column("status", JOB_STATUS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["post_id"], ["post.id"]),
        sa.PrimaryKeyConstraint("post_id"),
    )
    op.create_index("ix_rationalejob_due", "rationalejob", ["status", "next_attempt_at"], unique=False)

    op.create_table(
        "adapterversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", ADAPTER_STATUS, nullable=False),
        sa.Column("path", sa.String(length=1000), nullable=False),
        sa.Column("trained_through_feedback_id", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "version", name="uq_adapter_user_version"),
    )
    op.create_index("ix_adapterversion_user_id", "adapterversion", ["user_id"], unique=False)

    op.create_table(
        "trainingrun",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("night_id", sa.String(length=64), nullable=False),
        sa.Column("cutoff", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", RUN_STATUS, nullable=False),
        sa.Column("n_new_feedback", sa.Integer(), nullable=False),
        sa.Column("n_replay", sa.Integer(), nullable=False),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["user.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_trainingrun_user_id", "trainingrun", ["user_id"], unique=False)
    op.create_index("ix_trainingrun_night_id", "trainingrun", ["night_id"], unique=False)

    op.create_table(
        "lease",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; PostgreSQL's ENUM types outlive their tables.
    for table in ("lease", "trainingrun", "adapterversion", "rationalejob", "rationale", "feedback", "prediction",
                  "post", "user"):
        op.drop_table(table)
    for enum in (ADAPTER_STATUS, JOB_STATUS, RUN_STATUS):
        enum.drop(op.get_bind(), checkfirst=True)
