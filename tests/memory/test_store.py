"""The store and the interaction logger's service layer, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image
from sqlalchemy import text
from sqlmodel import Session, func, select

from nightowl.day import logger
from nightowl.errors import Conflict, InvalidInput, NotFound
from nightowl.memory.models import Feedback, Post, Prediction, RationaleJob


def _jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _count(rt, model) -> int:
    with Session(rt.engine) as s:
        return s.exec(select(func.count()).select_from(model)).one()


def test_post_is_stored_with_its_prediction(runtime):
    logger.create_user(runtime, "alice")
    out = logger.log_post(runtime, "alice", "$T$ is everything #MCM", aspect="Chuck Bass")
    assert out.prediction.label in runtime.labels
    assert set(out.prediction.probabilities) == set(runtime.labels)
    assert abs(sum(out.prediction.probabilities.values()) - 1) < 1e-4
    assert out.prediction.adapter_version is None  # no adapter yet: the base model answered
    with Session(runtime.engine) as s:
        post = s.get(Post, out.post_id)
        assert (post.user_id, post.text, post.aspect) == ("alice", "$T$ is everything #MCM", "Chuck Bass")
        pred = s.exec(select(Prediction).where(Prediction.post_id == out.post_id)).one()
        assert pred.label == out.prediction.label
        assert pred.probabilities == out.prediction.probabilities


def test_image_is_content_addressed_and_features_cached(runtime):
    logger.create_user(runtime, "bob")
    data = _jpeg()
    a = logger.log_post(runtime, "bob", "look at $T$", aspect="this", image=data)
    b = logger.log_post(runtime, "bob", "again $T$", aspect="this", image=data)
    assert a.image_sha256 == b.image_sha256 and len(a.image_sha256) == 64
    blob = runtime.images.path(a.image_sha256)
    assert blob.read_bytes() == data
    encoder_id = runtime.predictor.image_encoder.encoder_id
    cached = list(runtime.settings.features_dir.rglob(f"{a.image_sha256}.safetensors"))
    assert len(cached) == 1 and encoder_id.replace("/", "_") in str(cached[0])

    # A later step reads the cached features instead of decoding: prove it by breaking the blob.
    blob.write_bytes(b"not an image any more")

    def must_not_encode(_image):
        raise AssertionError("features should come from the cache")

    feats = runtime.images.features(a.image_sha256, encoder_id, must_not_encode)
    assert feats.ndim == 2 and feats.shape[0] > 1


def test_feedback_idempotency_and_conflict(runtime):
    logger.create_user(runtime, "carol")
    post = logger.log_post(runtime, "carol", "so great, another Monday", aspect="Monday")
    first = logger.log_feedback(runtime, "carol", post.post_id, "negative", "sarcasm", "k1")
    again = logger.log_feedback(runtime, "carol", post.post_id, "negative", "sarcasm", "k1")
    assert not first.duplicate and again.duplicate
    assert again.feedback_id == first.feedback_id
    assert _count(runtime, Feedback) == 1
    with pytest.raises(Conflict):
        logger.log_feedback(runtime, "carol", post.post_id, "positive", None, "k1")
    # No key: each call is a new feedback row with a generated key.
    c = logger.log_feedback(runtime, "carol", post.post_id, "neutral")
    assert len(c.idempotency_key) == 32 and _count(runtime, Feedback) == 2


def test_concurrent_retries_store_feedback_once(runtime):
    logger.create_user(runtime, "dave")
    post = logger.log_post(runtime, "dave", "what a day", aspect=None)
    errors: list[Exception] = []
    barrier = threading.Barrier(6)

    def send(i: int) -> None:
        try:
            barrier.wait()
            for k in range(5):  # every thread retries the same five keys
                logger.log_feedback(runtime, "dave", post.post_id, "positive", None, f"key-{k}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _count(runtime, Feedback) == 5


def test_bad_input_writes_nothing(runtime):
    logger.create_user(runtime, "erin")
    before = (_count(runtime, Post), _count(runtime, Prediction), _count(runtime, Feedback))
    with pytest.raises(NotFound):
        logger.log_post(runtime, "nobody", "hi")
    with pytest.raises(InvalidInput):
        logger.log_post(runtime, "erin", "   ")
    with pytest.raises(InvalidInput):
        logger.log_post(runtime, "erin", "x" * (runtime.settings.limits.max_text_chars + 1))
    with pytest.raises(InvalidInput):
        logger.log_post(runtime, "erin", "hello", image=b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InvalidInput):
        logger.log_post(runtime, "../etc", "hello")
    with pytest.raises(InvalidInput):
        logger.log_feedback(runtime, "erin", 1, "ecstatic")
    with pytest.raises(NotFound):
        logger.log_feedback(runtime, "erin", 999_999, "positive")
    assert (_count(runtime, Post), _count(runtime, Prediction), _count(runtime, Feedback)) == before


def test_users_cannot_touch_each_others_posts(runtime):
    logger.create_user(runtime, "u1")
    logger.create_user(runtime, "u2")
    post = logger.log_post(runtime, "u1", "mine")
    with pytest.raises(NotFound):
        logger.log_feedback(runtime, "u2", post.post_id, "positive")
    assert logger.list_posts(runtime, "u2").total == 0


def test_listing_is_newest_first_with_feedback(runtime):
    logger.create_user(runtime, "frank")
    ids = [logger.log_post(runtime, "frank", f"post {i}").post_id for i in range(5)]
    logger.log_feedback(runtime, "frank", ids[1], "negative", "not funny", "a")
    logger.log_feedback(runtime, "frank", ids[1], "neutral", None, "b")
    page = logger.list_posts(runtime, "frank", limit=3, offset=1)
    assert page.total == 5
    assert [p.post_id for p in page.items] == [ids[3], ids[2], ids[1]]
    fb = page.items[2].feedback
    assert [(f.label, f.reason, f.idempotency_key) for f in fb] == [("negative", "not funny", "a"), ("neutral", None, "b")]
    assert all(p.prediction is not None for p in page.items)


def test_post_idempotency_key(runtime):
    logger.create_user(runtime, "gina")
    a = logger.log_post(runtime, "gina", "retry me", idempotency_key="p1")
    b = logger.log_post(runtime, "gina", "retry me", idempotency_key="p1")
    assert b.duplicate and b.post_id == a.post_id and _count(runtime, Post) == 1
    with pytest.raises(Conflict):
        logger.log_post(runtime, "gina", "something else", idempotency_key="p1")


def test_rationale_job_queued_only_with_a_provider(runtime):
    logger.create_user(runtime, "hank")
    logger.log_post(runtime, "hank", "no provider configured")
    assert _count(runtime, RationaleJob) == 0


def test_sqlite_runs_in_wal_mode(sqlite_runtime):
    with sqlite_runtime.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
