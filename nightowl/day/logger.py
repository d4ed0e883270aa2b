"""The interaction logger: what the HTTP API and the CLI both do, in one place.

Every operation validates all of its input before it writes anything, and writes in a single
transaction, so a refused request leaves nothing behind half-way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import anyio.to_thread
from sqlalchemy import bindparam, func, insert
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, delete, select

from nightowl.adapters import registry
from nightowl.auth import hash_token, new_token, same_token_hash, validate_user_id
from nightowl.day import broker
from nightowl.day.group_commit import Outcome, committer_for
from nightowl.errors import (
    Conflict,
    InvalidInput,
    NightowlError,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    as_domain_error,
)
from nightowl.memory.db import read_scope, read_value, session_scope
from nightowl.memory.images import ImageRejected
from nightowl.memory.models import (
    AdapterVersion,
    Feedback,
    JobStatus,
    Post,
    Prediction,
    Rationale,
    RationaleJob,
    TrainingRun,
    User,
    utcnow,
)
from nightowl.runtime import Runtime
from nightowl.schemas import (
    FEEDBACK_PER_POST,
    AdapterList,
    AdapterOut,
    FeedbackItem,
    FeedbackList,
    FeedbackOut,
    Health,
    PostItem,
    PostList,
    PostLogged,
    PredictionOut,
    UserCreated,
)

log = logging.getLogger(__name__)


# --- health ------------------------------------------------------------------------------

# Below these, health() reports "degraded" (and /healthz answers 503).
HEALTH_MIN_FREE_BYTES = 256 * 1024 * 1024  # free space on the disk holding the home folder
HEALTH_SLOW_DATABASE_S = 1.0  # time the database may take to answer
HEALTH_MAX_RATIONALE_LAG_S = 300.0  # how long a due rationale request may wait for the worker


def health(rt: Runtime, worker_alive: bool | None = None) -> Health:
    """Can this server do its work: the database answers (timed; a read that never waits for a
    writer), the disk holding the home folder has room, and the rationale queue drains: the worker
    is alive (`worker_alive`; None when this process didn't start one) and no due request waits
    longer than HEALTH_MAX_RATIONALE_LAG_S. Each problem is named in `problems`; any makes it "degraded"."""
    problems: list[str] = []
    pending = lag_s = database_ms = None
    started = time.perf_counter()
    try:
        with read_scope(rt.engine) as s:
            s.exec(sql_text("SELECT 1"))
            database_ms = round((time.perf_counter() - started) * 1000, 1)
            pending = s.exec(
                select(func.count()).select_from(RationaleJob).where(RationaleJob.status == JobStatus.pending)
            ).one()
            now = utcnow()
            oldest_due = s.exec(
                select(func.min(RationaleJob.next_attempt_at)).where(
                    RationaleJob.status == JobStatus.pending, RationaleJob.next_attempt_at <= now
                )
            ).one()
    except SQLAlchemyError as exc:
        mapped = as_domain_error(exc)
        problems.append(f"database: {mapped.message if mapped else type(exc).__name__}")
    else:
        if database_ms > HEALTH_SLOW_DATABASE_S * 1000:
            problems.append(f"database: took {database_ms:.0f} ms to answer")
        if oldest_due is not None:
            if oldest_due.tzinfo is None:
                oldest_due = oldest_due.replace(tzinfo=timezone.utc)
            lag_s = round(max(0.0, (now - oldest_due).total_seconds()), 1)
        else:
            lag_s = 0.0
        if lag_s > HEALTH_MAX_RATIONALE_LAG_S:
            problems.append(f"rationale queue: a due request has waited {lag_s:.0f} s")
    try:
        free = shutil.disk_usage(rt.settings.home).free
    except OSError as exc:
        free = None
        problems.append(f"disk: can't read the free space of the home folder ({exc.strerror})")
    if free is not None and free < HEALTH_MIN_FREE_BYTES:
        problems.append(f"disk: {free // 2**20} MiB free, under {HEALTH_MIN_FREE_BYTES // 2**20} MiB")
    if worker_alive is False:
        problems.append("rationale worker: not running")
    return Health(
        status="degraded" if problems else "ok",
        problems=problems,
        database=rt.engine.dialect.name,
        database_ms=database_ms,
        model_loaded=rt.predictor_loaded,
        pending_rationales=pending,
        rationale_lag_s=lag_s,
        rationale_worker_alive=worker_alive,
        disk_free_bytes=free,
        process=os.getpid(),
        broker_lag=broker.lag_now(rt.settings.broker),  # None, connecting to nothing, with no broker configured
    )


# --- users -------------------------------------------------------------------------------

def _check_unicode(what: str, value: str | None) -> None:
    """Refuse what can't be stored as UTF-8 (lone surrogates from JSON "\\ud800" escapes) or holds NULs."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")


def create_user(rt: Runtime, user_id: str, name: str | None = None) -> UserCreated:
    validate_user_id(user_id)
    if name is not None and len(name) > 200:
        raise InvalidInput("name is longer than 200 characters")
    _check_unicode("name", name)
    token = new_token()
    try:
        with session_scope(rt.engine) as s:
            if s.get(User, user_id) is not None:
                raise Conflict(f"user {user_id!r} already exists")
            s.add(User(id=user_id, name=name, token_hash=hash_token(token)))
    except IntegrityError:
        raise Conflict(f"user {user_id!r} already exists") from None
    return UserCreated(user_id=user_id, name=name, token=token)


_USER_BY_TOKEN_HASH = select(User.id).where(User.token_hash == bindparam("token_hash"))


def user_for_token(rt: Runtime, token_hash: str, cached: bool = False) -> str | None:
    """The user whose token has this digest, or None. `cached`: the runtime's TokenCache may
    answer, for a request whose write checks the token again in its own transaction (feedback)."""
    if cached and (user_id := rt.token_cache.get(token_hash)) is not None:
        return user_id
    # A prebuilt statement read on a raw connection: this runs on every other request. It never
    # waits for a writer: a bad token's 401 is immediate.
    user_id = read_value(rt.engine, _USER_BY_TOKEN_HASH, {"token_hash": token_hash})
    if user_id is not None:
        rt.token_cache.put(token_hash, user_id)
    return user_id


def require_user(s: Session, user_id: str) -> User:
    validate_user_id(user_id)
    user = s.get(User, user_id)
    if user is None:
        raise NotFound(f"unknown user {user_id!r}")
    return user


# --- posts -------------------------------------------------------------------------------

def _check_text(
    rt: Runtime, text: str | None, aspect: str | None, context: str | None = None
) -> tuple[str, str | None, str | None]:
    limits = rt.settings.limits
    if text is None or not text.strip():
        raise InvalidInput("text is required and must not be blank")
    if len(text) > limits.max_text_chars:
        raise InvalidInput(f"text is {len(text)} characters; the limit is {limits.max_text_chars}")
    if aspect is not None:
        aspect = aspect.strip() or None
    if aspect is not None and len(aspect) > limits.max_aspect_chars:
        raise InvalidInput(f"aspect is {len(aspect)} characters; the limit is {limits.max_aspect_chars}")
    if context is not None:
        context = context.strip() or None
    if context is not None and len(context) > limits.max_text_chars:
        raise InvalidInput(f"context is {len(context)} characters; the limit is {limits.max_text_chars}")
    for what, value in (("text", text), ("aspect", aspect), ("context", context)):
        _check_unicode(what, value)
    return text, aspect, context


def _check_key(rt: Runtime, key: str | None, what: str) -> str | None:
    if key is None:
        return None
    limit = rt.settings.limits.max_idempotency_key_chars
    if not key or len(key) > limit or not key.isprintable():
        raise InvalidInput(f"{what} idempotency_key must be 1-{limit} printable characters")
    return key


def decode_base64_image(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image_base64 is not valid base64") from None


def _prediction_out(p: Prediction | None) -> PredictionOut | None:
    if p is None:
        return None
    return PredictionOut(label=p.label, probabilities=p.probabilities, adapter_version=p.adapter_version)


def log_post(
    rt: Runtime,
    user_id: str,
    text: str | None,
    aspect: str | None = None,
    image: bytes | None = None,
    idempotency_key: str | None = None,
    context: str | None = None,
) -> PostLogged:
    """Store a post, answer it with the user's model, and queue its rationale.

    An image is stored (and its features cached) before the post's transaction; if the post is not
    stored after all (its user was deleted meanwhile: 404; any other failure), the image is
    collected again unless another post references it (see ``_collect_images``).
    """
    text, aspect, context = _check_text(rt, text, aspect, context)
    idempotency_key = _check_key(rt, idempotency_key, "post")
    with read_scope(rt.engine) as s:
        # The user's incarnation: a user deleted and recreated under the same id while this post
        # was being answered is another user, who must not receive it.
        incarnation = require_user(s, user_id).created_at
        if idempotency_key is not None:
            existing = _post_by_key(s, user_id, idempotency_key)
            if existing is not None:
                return _same_post_or_conflict(s, existing, text, aspect, context, _sha(image))

    image_sha = None
    if image is not None:
        limits = rt.settings.limits
        if len(image) > limits.max_image_bytes:
            raise PayloadTooLarge(f"image is {len(image)} bytes; the limit is {limits.max_image_bytes}")
        try:
            image_sha, decoded = rt.images.put(
                image, limits.max_image_bytes, limits.max_image_pixels, limits.max_image_side
            )
        except ImageRejected as exc:
            raise InvalidInput(str(exc)) from None
        # A full disk (OSError, errno ENOSPC) propagates unchanged: the API answers it as such.

    try:
        features, encoder_id = None, None
        if image_sha is not None:
            encoder = rt.predictor.image_encoder
            encoder_id = encoder.encoder_id
            features = rt.images.features(image_sha, encoder_id, encoder.encode, decoded)
            del decoded
        # Predict outside the transaction: the model takes milliseconds we shouldn't hold a lock for.
        result = rt.predictor.predict(
            text, aspect, features, rationale=None, user_id=user_id, context=context, adapter=rt.active_adapter(user_id)
        )
        return _store_post(
            rt, user_id, incarnation, text, aspect, context, idempotency_key, image, image_sha, encoder_id, features, result
        )
    except BaseException:
        if image_sha is not None:
            try:
                _collect_images(rt, {image_sha})  # reference-checked: a blob another post uses stays
            except Exception:
                log.exception("could not collect image %s after a post that was not stored", image_sha)
        raise


def _store_post(
    rt: Runtime,
    user_id: str,
    incarnation,
    text: str,
    aspect: str | None,
    context: str | None,
    idempotency_key: str | None,
    image: bytes | None,
    image_sha: str | None,
    encoder_id: str | None,
    features,
    result,
) -> PostLogged:
    try:
        with session_scope(rt.engine) as s:
            post = Post(
                user_id=user_id,
                text=text,
                aspect=aspect,
                context=context,
                image_sha256=image_sha,
                idempotency_key=idempotency_key,
            )
            s.add(post)
            # The insert first: from here to the commit this transaction holds SQLite's write lock
            # (PostgreSQL: a key-share lock on the user's row, which a DELETE of the user waits for).
            s.flush()
            user = s.get(User, user_id)
            if user is None or user.created_at != incarnation:
                raise NotFound(f"unknown user {user_id!r}")
            if image_sha is not None:
                # Under the lock collection takes: a collection that ran before us (after our
                # put) removed the files; put them back, so the post we commit never dangles.
                _lock_images(s, [image_sha])
                rt.images.restore(image_sha, image, encoder_id, features)
            pred = Prediction(
                post_id=post.id,
                label=result.label,
                probabilities=result.probabilities,
                adapter_version=result.adapter_version,
            )
            s.add(pred)
            if rt.settings.rationale_provider != "none":
                s.add(RationaleJob(post_id=post.id))
            post_id = post.id
    except IntegrityError:
        # The user was deleted meanwhile (foreign key), or a concurrent retry with the same key
        # won the race: answer 404, or with what the retry stored.
        with read_scope(rt.engine) as s:
            user = s.get(User, user_id)
            if user is None or user.created_at != incarnation:
                raise NotFound(f"unknown user {user_id!r}") from None
            existing = _post_by_key(s, user_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return _same_post_or_conflict(s, existing, text, aspect, context, image_sha)
    return PostLogged(post_id=post_id, prediction=_prediction_out(pred), image_sha256=image_sha)


# Collecting images. A blob is shared by every post of the same bytes (one sha256), by any user,
# so it may only go when no post references it, checked so that it can't race a post of the same
# bytes being stored. The design needs no schema change (no refcount table): the check-and-delete
# runs in a write transaction, and a post's transaction, after its insert, makes sure the blob
# exists (puts it back from the request's bytes if not) under that same lock:
# - SQLite: both are write transactions (BEGIN IMMEDIATE), so one runs wholly before the other:
#   either the collector sees the post's row and keeps the blob, or the post sees the blob gone
#   and restores it before it commits.
# - PostgreSQL: writers don't exclude each other, so both take a transaction-scoped advisory lock
#   named by the sha256 (`pg_advisory_xact_lock`), in sorted order (no deadlock), which serialises
#   the same two steps; READ COMMITTED shows the collector a post committed before it got the lock.
# A periodic sweep with a grace period was the alternative; it leaves a deleted user's files on
# disk until the sweep and still needs this check for images re-posted during the grace period.
# Files are removed only after the rows: a crash in between leaves unreferenced files (removed
# by `collect_unreferenced_images`), never a post whose image is gone.

_COLLECT_BATCH = 200


def _lock_images(s: Session, shas) -> None:
    if s.get_bind().dialect.name == "postgresql":
        for sha in sorted(set(shas)):
            s.execute(sql_text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(sha[:15], 16)})


def _collect_images(rt: Runtime, shas) -> int:
    """Remove the images (and their features) among ``shas`` that no post references; their count."""
    todo = sorted(set(shas))
    removed = 0
    for i in range(0, len(todo), _COLLECT_BATCH):
        batch = todo[i : i + _COLLECT_BATCH]
        with session_scope(rt.engine) as s:  # a write transaction: see the comment above
            _lock_images(s, batch)
            used = set(s.exec(select(Post.image_sha256).where(col(Post.image_sha256).in_(batch))))
            for sha in batch:
                if sha not in used:
                    rt.images.delete(sha)
                    removed += 1
    return removed


def collect_unreferenced_images(rt: Runtime, older_than_s: float = 3600.0) -> int:
    """Remove stored images no post references (left by a crash between a deletion's rows and its
    files); only those older than ``older_than_s``, so an upload in flight is never swept."""
    import time

    cutoff = time.time() - older_than_s
    old = []
    for sha, path in rt.images.blobs():
        try:
            if path.stat().st_mtime < cutoff:
                old.append(sha)
        except FileNotFoundError:
            continue
    return _collect_images(rt, old)


def _post_by_key(s: Session, user_id: str, key: str) -> Post | None:
    return s.exec(select(Post).where(Post.user_id == user_id, Post.idempotency_key == key)).first()


def _sha(image: bytes | None) -> str | None:
    return hashlib.sha256(image).hexdigest() if image is not None else None


def _same_post_or_conflict(
    s: Session, post: Post, text: str, aspect: str | None, context: str | None, image_sha: str | None
) -> PostLogged:
    if (post.text, post.aspect, post.context, post.image_sha256) != (text, aspect, context, image_sha):
        raise Conflict("this idempotency_key was already used for a different post")
    pred = s.exec(select(Prediction).where(Prediction.post_id == post.id).order_by(col(Prediction.id).desc())).first()
    return PostLogged(
        post_id=post.id, prediction=_prediction_out(pred), image_sha256=post.image_sha256, duplicate=True
    )


# --- feedback ----------------------------------------------------------------------------

def log_feedback(
    rt: Runtime,
    user_id: str,
    post_id: int,
    label: str,
    reason: str | None = None,
    idempotency_key: str | None = None,
) -> FeedbackOut:
    """Store a user's label for one of their posts; a retry with the same key is stored once."""
    write = checked_feedback(rt, user_id, post_id, label, reason, idempotency_key)
    if rt.settings.ingest_group_commit:
        # One transaction and one flush for all concurrent requests; answered once it is on disk.
        return committer_for(rt).submit(write, write.stored_meanwhile)
    return _write_feedback_alone(rt, write)


async def store_feedback_async(rt: Runtime, write: FeedbackWrite) -> FeedbackOut:
    """`log_feedback`'s store for the event loop (the HTTP API), after `checked_feedback`: a
    group-committed request waits for its group without a thread; one committed alone runs in
    the thread pool."""
    try:
        if rt.settings.ingest_group_commit:
            return await committer_for(rt).submit_async(write, write.stored_meanwhile)
        return await anyio.to_thread.run_sync(_write_feedback_alone, rt, write)
    except Unauthorized:
        # The token no longer names the user (a cached lookup gone stale): the store answers next time.
        rt.token_cache.forget(write.token_hash)
        raise


def queue_feedback(rt: Runtime, writes: Sequence[FeedbackWrite]) -> Future:
    """Checked writes (`checked_feedback`) queued together for the next group commit, not waited
    for: the future holds their outcomes in order, `(True, FeedbackOut)` or `(False, the error)`,
    once the group is on disk. For callers with many at hand (the broker consumer's fetched
    batch): they share one commit. Needs `ingest_group_commit`."""
    if not rt.settings.ingest_group_commit:
        raise RuntimeError("queue_feedback needs ingest_group_commit")
    return committer_for(rt).enqueue_all(writes, FeedbackWrite.stored_meanwhile)


def checked_feedback(
    rt: Runtime,
    user_id: str,
    post_id: int,
    label: str,
    reason: str | None,
    idempotency_key: str | None,
    token_hash: str | None = None,
) -> FeedbackWrite:
    """A feedback request with everything checked that needs no database, before anything is
    queued or written (InvalidInput otherwise); a request without a key gets a fresh one.
    `token_hash`: the digest of the user's token that sent it (HTTP), checked again by the write;
    None for callers trusted as the admin (CLI, broker)."""
    validate_user_id(user_id)
    if label not in rt.labels:
        raise InvalidInput(f"label {label!r} is not one of {rt.labels}")
    limit = rt.settings.limits.max_reason_chars
    if reason is not None and len(reason) > limit:
        raise InvalidInput(f"reason is {len(reason)} characters; the limit is {limit}")
    _check_unicode("reason", reason)
    key = _check_key(rt, idempotency_key, "feedback") or uuid.uuid4().hex
    return FeedbackWrite(user_id, post_id, label, reason, key, token_hash)


def _write_feedback_alone(rt: Runtime, write: FeedbackWrite) -> FeedbackOut:
    try:
        with session_scope(rt.engine) as s:
            return write(s)
    except IntegrityError as exc:
        with session_scope(rt.engine) as s:
            return write.stored_meanwhile(s, exc)


# A group's statements, built once (building and hashing a statement per group cost more than running it).
_USERS_IN = select(User.id, User.token_hash).where(col(User.id).in_(bindparam("ids", expanding=True)))
_POST_OWNERS_IN = select(Post.id, Post.user_id).where(col(Post.id).in_(bindparam("ids", expanding=True)))
# Two IN lists, not a row-value IN over the pairs: SQLite answers `(user_id, key) IN (...)` with a
# scan of the whole feedback table (a group's cost grew with every row ever stored), and the two
# lists with the unique index. They match the lists' cross product: the pairs are picked after.
_FEEDBACK_KEYED_IN = select(*Feedback.__table__.c).where(
    col(Feedback.user_id).in_(bindparam("users", expanding=True)),
    col(Feedback.idempotency_key).in_(bindparam("keys", expanding=True)),
)
# RETURNING the unique key with the id: rows are matched by key, so the database may return them in
# any order (asking for parameter order makes SQLAlchemy send SQLite one INSERT per row).
_INSERT_FEEDBACK = insert(Feedback.__table__).returning(
    Feedback.__table__.c.id, Feedback.__table__.c.user_id, Feedback.__table__.c.idempotency_key
)


@dataclass(frozen=True)
class FeedbackWrite:
    """One validated feedback request, written alone (`write(s)`) or with its neighbours in a
    group commit (`write_all`): the same checks in the same order, the same answers."""

    user_id: str
    post_id: int
    label: str
    reason: str | None
    key: str
    # The digest of the token that sent it, when a user's token did: the write is refused (401) if
    # the user's token is no longer that one (deleted, or deleted and created again), so the
    # token's lookup may come from a cache (TokenCache).
    token_hash: str | None = None

    def __call__(self, s: Session) -> FeedbackOut:
        user = s.get(User, self.user_id)
        self._check_user(None if user is None else user.token_hash)
        existing = _feedback_by_key(s, self.user_id, self.key)
        if existing is not None:
            return _same_feedback_or_conflict(existing, self.post_id, self.label, self.reason)
        post = s.get(Post, self.post_id)
        if post is None or post.user_id != self.user_id:
            raise NotFound(f"post {self.post_id} not found for user {self.user_id!r}")
        fb = Feedback(
            user_id=self.user_id, post_id=self.post_id, label=self.label, reason=self.reason, idempotency_key=self.key
        )
        s.add(fb)
        s.flush()
        return _feedback_out(fb)

    def stored_meanwhile(self, s: Session, exc: Exception) -> FeedbackOut:
        """After a unique-key violation: the row another process stored with our key (a retry's
        twin), or a Conflict if it says something else; anything else re-raises."""
        existing = _feedback_by_key(s, self.user_id, self.key) if isinstance(exc, IntegrityError) else None
        if existing is None:
            raise exc
        return _same_feedback_or_conflict(existing, self.post_id, self.label, self.reason)

    @classmethod
    def write_all(cls, s: Session, writes: Sequence[FeedbackWrite]) -> list[Outcome]:
        """All the writes with one query per table and one multi-row INSERT, each answered as if
        it had been written alone, in order: a key stored earlier in the group is a duplicate.
        Core statements on the session's connection: the ORM's own work per statement and per
        row was most of a group's cost."""
        conn = s.connection()
        users = dict(conn.execute(_USERS_IN, {"ids": list({w.user_id for w in writes})}).all())
        owners = dict(conn.execute(_POST_OWNERS_IN, {"ids": list({w.post_id for w in writes})}).all())
        # Rows stored before (Core rows) or earlier in this group (FeedbackRow): both read as a Feedback.
        pairs = {(w.user_id, w.key) for w in writes}
        keyed = conn.execute(_FEEDBACK_KEYED_IN, {"users": list({u for u, _ in pairs}), "keys": list({k for _, k in pairs})})
        stored: dict[tuple[str, str], object] = {
            (f.user_id, f.idempotency_key): f for f in keyed if (f.user_id, f.idempotency_key) in pairs
        }
        outcomes: list[Outcome] = []
        new_rows: list[FeedbackRow] = []
        for w in writes:
            try:
                twin = w._check(users, owners, stored)
            except NightowlError as exc:
                outcomes.append((False, exc))
                continue
            if twin is not None:
                outcomes.append((True, (twin, True)))
                continue
            fb = FeedbackRow(w.user_id, w.post_id, w.label, w.reason, w.key, utcnow())
            stored[(w.user_id, w.key)] = fb  # a retry later in the group is its duplicate
            new_rows.append(fb)
            outcomes.append((True, (fb, False)))
        _insert_feedback_rows(conn, new_rows)  # sets the new rows' ids, which the answers carry
        return [(True, _feedback_out(*v)) if ok else (False, v) for ok, v in outcomes]

    def _check(self, users: dict[str, str], owners: dict[int, str], stored: dict):
        """What `__call__` checks, on rows read in advance (users: id -> token digest): the stored
        twin of a retry, None for a new row, or the error this write gets."""
        self._check_user(users.get(self.user_id))
        existing = stored.get((self.user_id, self.key))
        if existing is not None:
            _same_feedback_or_conflict(existing, self.post_id, self.label, self.reason)
            return existing
        if owners.get(self.post_id) != self.user_id:
            raise NotFound(f"post {self.post_id} not found for user {self.user_id!r}")
        return None

    def _check_user(self, stored_token_hash: str | None) -> None:
        """The user exists (None: not) and, for a request a user's token sent, the token is still
        theirs: a token whose user was deleted, or deleted and created again, gets the 401 that
        looking it up in the store now would give."""
        if self.token_hash is not None and (
            stored_token_hash is None or not same_token_hash(self.token_hash, stored_token_hash)
        ):
            raise Unauthorized("invalid token")
        if stored_token_hash is None:
            raise NotFound(f"unknown user {self.user_id!r}")


@dataclass
class FeedbackRow:
    """A feedback row a group is about to insert, with the fields a Feedback has (the ORM object
    costs more to build than the row costs to insert)."""

    user_id: str
    post_id: int
    label: str
    reason: str | None
    idempotency_key: str
    created_at: datetime
    id: int | None = None


def _insert_feedback_rows(conn: Connection, rows: list[FeedbackRow]) -> None:
    """One INSERT for all the rows (SQLAlchemy's insertmanyvalues: a multi-row VALUES ... RETURNING
    on SQLite and PostgreSQL); each row's id is set from what comes back for its key."""
    if not rows:
        return
    # Plain dicts by hand: dataclasses.asdict deep-copies every field, and was a third of a group's cost.
    values = [
        {"user_id": fb.user_id, "post_id": fb.post_id, "label": fb.label, "reason": fb.reason,
         "idempotency_key": fb.idempotency_key, "created_at": fb.created_at}
        for fb in rows
    ]
    ids = {(user_id, key): id_ for id_, user_id, key in conn.execute(_INSERT_FEEDBACK, values)}
    for fb in rows:
        fb.id = ids[(fb.user_id, fb.idempotency_key)]


def _feedback_by_key(s: Session, user_id: str, key: str) -> Feedback | None:
    return s.exec(select(Feedback).where(Feedback.user_id == user_id, Feedback.idempotency_key == key)).first()


def _same_feedback_or_conflict(fb: Feedback, post_id: int, label: str, reason: str | None) -> FeedbackOut:
    if (fb.post_id, fb.label, fb.reason) != (post_id, label, reason):
        raise Conflict("this idempotency_key was already used for different feedback")
    return _feedback_out(fb, duplicate=True)


def _feedback_out(fb: Feedback, duplicate: bool = False) -> FeedbackOut:
    return FeedbackOut(
        feedback_id=fb.id,
        post_id=fb.post_id,
        label=fb.label,
        reason=fb.reason,
        idempotency_key=fb.idempotency_key,
        created_at=fb.created_at,
        duplicate=duplicate,
    )


# --- history -----------------------------------------------------------------------------

def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500")
    if offset < 0:
        raise InvalidInput("offset must not be negative")


def list_posts(rt: Runtime, user_id: str, limit: int = 20, offset: int = 0) -> PostList:
    """A user's posts, newest first, each with its prediction, latest rationale and its newest
    FEEDBACK_PER_POST feedback (oldest first) with the post's feedback_total; list_feedback pages the rest."""
    _check_page(limit, offset)
    with read_scope(rt.engine) as s:  # history never waits for a writer
        require_user(s, user_id)
        total = s.exec(select(func.count()).select_from(Post).where(Post.user_id == user_id)).one()
        posts = s.exec(
            select(Post)
            .where(Post.user_id == user_id)
            .order_by(col(Post.created_at).desc(), col(Post.id).desc())
            .limit(limit)
            .offset(offset)
        ).all()
        ids = [p.id for p in posts]
        preds: dict[int, Prediction] = {}
        for p in s.exec(select(Prediction).where(col(Prediction.post_id).in_(ids)).order_by(col(Prediction.id))):
            preds[p.post_id] = p  # the latest wins
        rationales: dict[int, str] = {}
        for r in s.exec(select(Rationale).where(col(Rationale.post_id).in_(ids)).order_by(col(Rationale.id))):
            rationales[r.post_id] = r.text
        feedback_totals: dict[int, int] = dict(
            s.exec(
                select(Feedback.post_id, func.count())
                .where(col(Feedback.post_id).in_(ids))
                .group_by(Feedback.post_id)
            ).all()
        )
        # The newest FEEDBACK_PER_POST of each post, in one query (a window over the posts' feedback).
        newest = (
            select(
                col(Feedback.id).label("id"),
                func.row_number()
                .over(partition_by=Feedback.post_id, order_by=col(Feedback.id).desc())
                .label("rank"),
            )
            .where(col(Feedback.post_id).in_(ids))
            .subquery()
        )
        feedback: dict[int, list[FeedbackItem]] = {i: [] for i in ids}
        for f in s.exec(
            select(Feedback)
            .join(newest, col(Feedback.id) == newest.c.id)
            .where(newest.c.rank <= FEEDBACK_PER_POST)
            .order_by(col(Feedback.id))
        ):
            feedback[f.post_id].append(_feedback_item(f))
        items = [
            PostItem(
                post_id=p.id,
                text=p.text,
                aspect=p.aspect,
                context=p.context,
                image_sha256=p.image_sha256,
                created_at=p.created_at,
                prediction=_prediction_out(preds.get(p.id)),
                rationale=rationales.get(p.id),
                feedback=feedback[p.id],
                feedback_total=feedback_totals.get(p.id, 0),
            )
            for p in posts
        ]
    return PostList(items=items, total=total)


def list_feedback(rt: Runtime, user_id: str, post_id: int, limit: int = 20, offset: int = 0) -> FeedbackList:
    """One post's feedback, oldest first, a page at a time (list_posts carries only the newest)."""
    _check_page(limit, offset)
    with read_scope(rt.engine) as s:
        require_user(s, user_id)
        post = s.get(Post, post_id)
        if post is None or post.user_id != user_id:
            raise NotFound(f"post {post_id} not found for user {user_id!r}")
        total = s.exec(select(func.count()).select_from(Feedback).where(Feedback.post_id == post_id)).one()
        rows = s.exec(
            select(Feedback).where(Feedback.post_id == post_id).order_by(col(Feedback.id)).limit(limit).offset(offset)
        ).all()
        items = [_feedback_item(f) for f in rows]
    return FeedbackList(post_id=post_id, items=items, total=total)


def _feedback_item(f: Feedback) -> FeedbackItem:
    return FeedbackItem(
        feedback_id=f.id, label=f.label, reason=f.reason, idempotency_key=f.idempotency_key, created_at=f.created_at
    )


# --- deletion ----------------------------------------------------------------------------

def delete_user(rt: Runtime, user_id: str) -> dict[str, int]:
    """Remove a user everywhere: rows, replay vectors, adapters, cached rationales, and images no
    one else posted (reference-checked: see ``_collect_images``)."""
    with session_scope(rt.engine) as s:
        token_hash = require_user(s, user_id).token_hash
        # PostgreSQL: lock the user's row first. A post being inserted for the user holds a
        # key-share lock on it (its foreign key): we wait for it, and then delete it too; a post
        # inserted after this waits for our commit and then fails its foreign key (404).
        s.exec(select(User.id).where(User.id == user_id).with_for_update())
        post_ids = list(s.exec(select(Post.id).where(Post.user_id == user_id)))
        shas = set(s.exec(select(Post.image_sha256).where(Post.user_id == user_id, col(Post.image_sha256).is_not(None))))
        counts = {"posts": len(post_ids)}
        counts["feedback"] = s.exec(delete(Feedback).where(Feedback.user_id == user_id)).rowcount
        for model in (Prediction, Rationale, RationaleJob):
            s.exec(delete(model).where(col(model.post_id).in_(post_ids)))
        s.exec(delete(Post).where(Post.user_id == user_id))
        counts["adapter_versions"] = s.exec(delete(AdapterVersion).where(AdapterVersion.user_id == user_id)).rowcount
        s.exec(delete(TrainingRun).where(TrainingRun.user_id == user_id))
        s.exec(delete(User).where(User.id == user_id))
    # This process's cached lookup of the token goes now; other workers' go at its next feedback
    # (its write finds the token gone: 401).
    rt.token_cache.forget(token_hash)
    # Files after the rows: a crash in between leaves unreferenced files, never dangling rows.
    rt.forget_user(user_id)
    registry.delete_user_files(rt.settings.adapters_dir, user_id)
    counts["images"] = _collect_images(rt, shas)
    return counts


# --- adapters ----------------------------------------------------------------------------

def list_adapters(rt: Runtime, user_id: str) -> AdapterList:
    with read_scope(rt.engine) as s:
        require_user(s, user_id)
        rows = registry.versions(s, user_id)
    items = [
        AdapterOut(
            version=r.version,
            status=r.status.value,
            trained_through_feedback_id=r.trained_through_feedback_id,
            reason=r.reason,
            metrics=r.metrics,
            created_at=r.created_at,
        )
        for r in rows
    ]
    active = next((i.version for i in items if i.status == "active"), None)
    return AdapterList(user_id=user_id, active_version=active, items=items)


def rollback_adapter(rt: Runtime, user_id: str, version: int | None) -> AdapterList:
    with session_scope(rt.engine) as s:
        require_user(s, user_id)
        registry.rollback(s, user_id, version, rt.settings.adapters_dir)
    return list_adapters(rt, user_id)


def export_adapter(rt: Runtime, user_id: str, version: int | None, dest) -> dict:
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Conflict(f"{dest} exists and is not an empty folder")
    with session_scope(rt.engine) as s:
        require_user(s, user_id)
        row = registry.export(s, user_id, version, rt.settings.adapters_dir, dest)
    return {"user_id": user_id, "version": row.version, "path": str(dest), "files": list(registry.PEFT_FILES)}
