"""The interaction logger: what the HTTP API and the CLI both do, in one place.

Every operation validates all of its input before it writes anything, and writes in a single
transaction, so a refused request leaves nothing behind half-way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from pathlib import Path

from sqlalchemy import func
from sqlalchemy import text as sql_text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from nightowl.adapters import registry
from nightowl.auth import hash_token, new_token, validate_user_id
from nightowl.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from nightowl.memory.db import session_scope
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
)
from nightowl.runtime import Runtime
from nightowl.schemas import (
    AdapterList,
    AdapterOut,
    FeedbackItem,
    FeedbackOut,
    Health,
    PostItem,
    PostList,
    PostLogged,
    PredictionOut,
    UserCreated,
)

# --- health ------------------------------------------------------------------------------

def health(rt: Runtime) -> Health:
    """The database answers; whether the model is loaded; how many rationale requests wait."""
    with session_scope(rt.engine) as s:
        s.exec(sql_text("SELECT 1"))
        pending = s.exec(
            select(func.count()).select_from(RationaleJob).where(RationaleJob.status == JobStatus.pending)
        ).one()
    return Health(status="ok", database=rt.engine.dialect.name, model_loaded=rt.predictor_loaded, pending_rationales=pending)


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


def user_for_token(rt: Runtime, token: str) -> str | None:
    with session_scope(rt.engine) as s:
        user = s.exec(select(User).where(User.token_hash == hash_token(token))).first()
        return user.id if user else None


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
    """Store a post, answer it with the user's model, and queue its rationale."""
    text, aspect, context = _check_text(rt, text, aspect, context)
    idempotency_key = _check_key(rt, idempotency_key, "post")
    with session_scope(rt.engine) as s:
        require_user(s, user_id)
        if idempotency_key is not None:
            existing = _post_by_key(s, user_id, idempotency_key)
            if existing is not None:
                return _same_post_or_conflict(s, existing, text, aspect, context, _sha(image))

    image_sha, features = None, None
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
        encoder = rt.predictor.image_encoder
        features = rt.images.features(image_sha, encoder.encoder_id, encoder.encode, decoded)

    # Predict outside the transaction: the model takes milliseconds we shouldn't hold a lock for.
    result = rt.predictor.predict(
        text, aspect, features, rationale=None, user_id=user_id, context=context, adapter=rt.active_adapter(user_id)
    )

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
            s.flush()
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
        # A concurrent retry with the same key won the race: answer with what it stored.
        with session_scope(rt.engine) as s:
            existing = _post_by_key(s, user_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return _same_post_or_conflict(s, existing, text, aspect, context, image_sha)
    return PostLogged(post_id=post_id, prediction=_prediction_out(pred), image_sha256=image_sha)


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
    if label not in rt.labels:
        raise InvalidInput(f"label {label!r} is not one of {rt.labels}")
    limit = rt.settings.limits.max_reason_chars
    if reason is not None and len(reason) > limit:
        raise InvalidInput(f"reason is {len(reason)} characters; the limit is {limit}")
    _check_unicode("reason", reason)
    key = _check_key(rt, idempotency_key, "feedback") or uuid.uuid4().hex

    try:
        with session_scope(rt.engine) as s:
            require_user(s, user_id)
            existing = _feedback_by_key(s, user_id, key)
            if existing is not None:
                return _same_feedback_or_conflict(existing, post_id, label, reason)
            post = s.get(Post, post_id)
            if post is None or post.user_id != user_id:
                raise NotFound(f"post {post_id} not found for user {user_id!r}")
            fb = Feedback(user_id=user_id, post_id=post_id, label=label, reason=reason, idempotency_key=key)
            s.add(fb)
            s.flush()
            return _feedback_out(fb)
    except IntegrityError:
        with session_scope(rt.engine) as s:
            existing = _feedback_by_key(s, user_id, key)
            if existing is None:
                raise
            return _same_feedback_or_conflict(existing, post_id, label, reason)


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

def list_posts(rt: Runtime, user_id: str, limit: int = 20, offset: int = 0) -> PostList:
    """A user's posts, newest first, each with its prediction, latest rationale and feedback."""
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500")
    if offset < 0:
        raise InvalidInput("offset must not be negative")
    with session_scope(rt.engine) as s:
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
        feedback: dict[int, list[FeedbackItem]] = {i: [] for i in ids}
        for f in s.exec(select(Feedback).where(col(Feedback.post_id).in_(ids)).order_by(col(Feedback.id))):
            feedback[f.post_id].append(
                FeedbackItem(label=f.label, reason=f.reason, idempotency_key=f.idempotency_key, created_at=f.created_at)
            )
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
            )
            for p in posts
        ]
    return PostList(items=items, total=total)


# --- deletion ----------------------------------------------------------------------------

def delete_user(rt: Runtime, user_id: str) -> dict[str, int]:
    """Remove a user everywhere: rows, replay vectors, adapters, and images no one else posted."""
    with session_scope(rt.engine) as s:
        require_user(s, user_id)
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
        still_used = set(s.exec(select(Post.image_sha256).where(col(Post.image_sha256).in_(shas)))) if shas else set()
    # Files after the rows: a crash in between leaves unreferenced files, never dangling rows.
    rt.forget_user(user_id)
    registry.delete_user_files(rt.settings.adapters_dir, user_id)
    for sha in shas - still_used:
        rt.images.delete(sha)
    counts["images"] = len(shas - still_used)
    return counts


# --- adapters ----------------------------------------------------------------------------

def list_adapters(rt: Runtime, user_id: str) -> AdapterList:
    with session_scope(rt.engine) as s:
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
