"""The rationale queue: durable, off the request path, survives restarts and provider outages."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlmodel import Session, select

from nightowl.day import logger
from nightowl.day.rationale_worker import RationaleWorker
from nightowl.devserver import free_port
from nightowl.memory.models import JobStatus, Rationale, RationaleJob, utcnow
from nightowl.rationales import OpenAICompatible, RationaleCache
from nightowl.runtime import Runtime
from tests.conftest import make_settings


def _runtime(tmp_path, predictor, provider="cache"):
    return Runtime(make_settings(tmp_path / "home", rationale_provider=provider, rationale_retry_s=60), predictor=predictor)


def _job(rt, post_id) -> RationaleJob:
    with Session(rt.engine) as s:
        return s.get(RationaleJob, post_id)


def test_pending_job_survives_restart_and_is_worked(tmp_path, predictor):
    rt = _runtime(tmp_path, predictor)
    logger.create_user(rt, "alice")
    post = logger.log_post(rt, "alice", "$T$ again, wonderful", aspect="Monday")
    assert _job(rt, post.post_id).status == JobStatus.pending
    rt.close()  # "restart": a new process over the same home picks the job up

    rt2 = _runtime(tmp_path, predictor)
    cache = RationaleCache(rt2.settings.rationale_cache_dir)
    cache.put("$T$ again, wonderful", "Monday", None, "The text praises Monday in a tone that reads as weary.")
    worker = RationaleWorker(rt2, provider=cache)
    assert worker.run_once() == 1
    with Session(rt2.engine) as s:
        stored = s.exec(select(Rationale).where(Rationale.post_id == post.post_id)).one()
    assert stored.provider == "cache" and "Monday" in stored.text
    assert _job(rt2, post.post_id).status == JobStatus.done
    listing = logger.list_posts(rt2, "alice")
    assert listing.items[0].rationale == stored.text
    assert worker.run_once() == 0  # nothing left


def test_provider_down_reschedules_with_backoff(tmp_path, predictor):
    rt = _runtime(tmp_path, predictor, provider="openai")
    logger.create_user(rt, "bob")
    post = logger.log_post(rt, "bob", "served without a rationale", aspect=None)
    assert post.prediction.label in rt.labels  # the post was answered while the provider is down

    down = OpenAICompatible(f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=1, retries=1, backoff_s=0.01)
    worker = RationaleWorker(rt, provider=down)
    assert worker.run_once() == 0
    job = _job(rt, post.post_id)
    assert job.status == JobStatus.pending and job.attempts == 1 and job.last_error
    assert job.next_attempt_at > utcnow() + timedelta(seconds=50)
    assert worker.claim_due() == []  # not due yet

    # Once due again and the provider is back (here: the cache has it), it completes.
    with Session(rt.engine) as s:
        j = s.get(RationaleJob, post.post_id)
        j.next_attempt_at = utcnow() - timedelta(seconds=1)
        s.add(j)
        s.commit()
    cache = RationaleCache(rt.settings.rationale_cache_dir)
    cache.put("served without a rationale", None, None, "A plain statement with no evaluative words.")
    assert RationaleWorker(rt, provider=cache).run_once() == 1
    assert _job(rt, post.post_id).status == JobStatus.done


def test_gives_up_after_max_attempts(tmp_path, predictor):
    rt = Runtime(
        make_settings(tmp_path / "home", rationale_provider="cache", rationale_retry_s=0, rationale_max_attempts=2),
        predictor=predictor,
    )
    logger.create_user(rt, "cy")
    post = logger.log_post(rt, "cy", "nobody will ever explain this")
    worker = RationaleWorker(rt, provider=RationaleCache(rt.settings.rationale_cache_dir))
    worker.run_once()
    worker.run_once()
    job = _job(rt, post.post_id)
    assert job.status == JobStatus.failed and job.attempts == 2 and "no stored rationale" in job.last_error


class _SlowProvider:
    """Writes a rationale from the text it is given, but only once the test lets it."""

    name = "slow"

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, text, aspect, image_path=None) -> str:
        self.started.set()
        assert self.release.wait(30)
        return f"An analysis of: {text}"


def test_a_deleted_users_rationale_never_lands_on_anothers_post(tmp_path, predictor):
    """Issue 12, case 1: the owner is deleted while the provider works, and the next post (another
    user's) gets the same id; the late rationale, made from the first user's words, is dropped."""
    rt = _runtime(tmp_path, predictor)
    logger.create_user(rt, "ann")
    logger.create_user(rt, "ben")
    first = logger.log_post(rt, "ann", "ann's private words about her day")
    provider = _SlowProvider()
    worker = RationaleWorker(rt, provider=provider)
    assert worker.claim_due() == [first.post_id]
    working = threading.Thread(target=worker.work_one, args=(first.post_id,))
    working.start()
    assert provider.started.wait(30)
    logger.delete_user(rt, "ann")
    second = logger.log_post(rt, "ben", "ben says something else entirely")
    provider.release.set()
    working.join(30)

    with Session(rt.engine) as s:
        stored = s.exec(select(Rationale)).all()
    assert all("ann's private words" not in r.text for r in stored)
    assert _job(rt, second.post_id).status == JobStatus.pending  # ben's own request still waits
    assert logger.list_posts(rt, "ben").items[0].rationale is None


class _Echo:
    """A provider that always answers."""

    name = "echo"

    def generate(self, text, aspect, image_path=None) -> str:
        return f"About: {text}"


def _db_error(*args, **kwargs):
    from sqlalchemy.exc import OperationalError

    raise OperationalError("INSERT INTO rationale ...", {}, Exception("disk I/O error"))


def test_a_failing_store_fails_its_job_not_the_pass(tmp_path, predictor, monkeypatch, caplog):
    """Issue 12, case 8: the database refusing one rationale is logged and recorded on that job
    (counted, backed off); the pass goes on with the other jobs."""
    rt = _runtime(tmp_path, predictor)
    logger.create_user(rt, "dan")
    bad = logger.log_post(rt, "dan", "this one will not store")
    good = logger.log_post(rt, "dan", "this one stores fine")
    worker = RationaleWorker(rt, provider=_Echo())
    store = worker._store

    def flaky_store(post_id, seen, rationale):
        if post_id == bad.post_id:
            _db_error()
        return store(post_id, seen, rationale)

    monkeypatch.setattr(worker, "_store", flaky_store)
    assert worker.run_once() == 1
    assert _job(rt, good.post_id).status == JobStatus.done
    job = _job(rt, bad.post_id)
    assert job.status == JobStatus.pending and job.attempts == 1 and "disk I/O error" in job.last_error
    assert job.next_attempt_at > utcnow() + timedelta(seconds=50)  # backed off, not retried at once
    assert f"rationale job for post {bad.post_id} failed" in caplog.text


def test_a_job_whose_failures_cant_be_recorded_is_still_given_up(tmp_path, predictor, monkeypatch):
    """Even when the database refuses every write for a job (its rationale and its reschedule),
    the attempts counted at each claim end it after rationale_max_attempts: never retried forever."""
    rt = Runtime(
        make_settings(tmp_path / "home", rationale_provider="cache", rationale_retry_s=0, rationale_max_attempts=3),
        predictor=predictor,
    )
    logger.create_user(rt, "eve")
    post = logger.log_post(rt, "eve", "never stored")
    worker = RationaleWorker(rt, provider=_Echo())
    monkeypatch.setattr(worker, "_store", _db_error)
    monkeypatch.setattr(worker, "_reschedule", _db_error)
    for _ in range(6):
        assert worker.run_once() == 0  # never raises
        with Session(rt.engine) as s:  # the claim's lease runs out: due again
            j = s.get(RationaleJob, post.post_id)
            j.next_attempt_at = utcnow() - timedelta(seconds=1)
            s.add(j)
            s.commit()
    job = _job(rt, post.post_id)
    assert job.status == JobStatus.failed and job.attempts == 3 and "gave up after 3 attempts" in job.last_error
    assert worker.claim_due() == []
