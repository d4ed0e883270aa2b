"""Background worker that fills in rationales for posts, off the request path.

Requests live in the `rationalejob` table, so they survive a restart: a job is claimed by
pushing its next_attempt_at a lease ahead, worked outside any transaction, then marked done.
A process killed mid-job leaves the lease to expire and the job is picked up again. A provider
that is down just reschedules the job with exponential backoff.

Attempts are counted when a job is claimed, so they are bounded (settings.rationale_max_attempts)
even when an attempt leaves no outcome (a kill, a database that refuses the write): a job claimed
that many times without success is given up. One job's failure, the provider's or the store's,
is logged and recorded on that job; the pass goes on with the next.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlmodel import col, select

from nightowl.memory.db import session_scope
from nightowl.memory.models import JobStatus, Post, Rationale, RationaleJob, utcnow
from nightowl.rationales import (
    ProviderUnavailable,
    build_provider,
    forget_for,
    generate_for,
)
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

CLAIM_LEASE = timedelta(minutes=5)


class PostIdentity(NamedTuple):
    """What names one post for good: its owner and creation time, and what a rationale is written from."""

    user_id: str
    created_at: datetime
    text: str
    aspect: str | None
    image_sha256: str | None


def _identity(post: Post) -> PostIdentity:
    return PostIdentity(post.user_id, post.created_at, post.text, post.aspect, post.image_sha256)


class RationaleWorker:
    def __init__(self, rt: Runtime, provider=None, poll_s: float = 2.0, batch: int = 8):
        self.rt = rt
        self.provider = provider if provider is not None else build_provider(rt.settings)
        self.poll_s = poll_s
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass; also what tests and `nightowl rationales run-once` call -------------------
    def claim_due(self) -> list[int]:
        now = utcnow()
        max_attempts = self.rt.settings.rationale_max_attempts
        with session_scope(self.rt.engine) as s:
            jobs = s.exec(
                select(RationaleJob)
                .where(RationaleJob.status == JobStatus.pending, col(RationaleJob.next_attempt_at) <= now)
                .order_by(col(RationaleJob.next_attempt_at))
                .limit(self.batch)
                .with_for_update(skip_locked=True)  # PostgreSQL: several servers never share a job
            ).all()
            claimed = []
            for job in jobs:
                if job.attempts >= max_attempts:  # earlier attempts ended without an outcome
                    job.status = JobStatus.failed
                    job.last_error = (job.last_error or f"gave up after {job.attempts} attempts")[:2000]
                else:
                    job.attempts += 1  # counted now: an attempt that records nothing still counts
                    job.next_attempt_at = now + CLAIM_LEASE
                    claimed.append(job.post_id)
                s.add(job)
            return claimed

    def work_one(self, post_id: int) -> bool:
        """Generate and store one post's rationale; True when stored."""
        with session_scope(self.rt.engine) as s:
            post = s.get(Post, post_id)
            if post is None:
                return False
            seen = _identity(post)
        image_path = self.rt.images.path(seen.image_sha256) if seen.image_sha256 else None
        try:
            # Whose post it is: a caching provider keeps each user's entries apart (issue 12 case 6).
            rationale = generate_for(self.provider, seen.user_id, seen.text, seen.aspect, image_path)
        except ProviderUnavailable as exc:
            self._reschedule(post_id, str(exc))
            return False
        except Exception as exc:  # a provider bug must not kill the worker; record it and back off
            log.exception("rationale provider failed on post %s", post_id)
            self._reschedule(post_id, f"{type(exc).__name__}: {exc}")
            return False
        return self._store(post_id, seen, rationale)

    def _store(self, post_id: int, seen: "PostIdentity", rationale: str) -> bool:
        """Store the rationale only on the post it was written for, checked in the same transaction
        as the write: while the provider worked, the post's owner may have been deleted and the id
        given to another user's post (SQLite reuses the highest rowid). That post keeps its own job."""
        with session_scope(self.rt.engine) as s:
            post = s.get(Post, post_id)
            if post is None or _identity(post) != seen:
                log.info("post %s changed hands while its rationale was written; dropped", post_id)
                # And so is what a caching provider kept of it: its user may be deleted (and purged) by now.
                forget_for(self.provider, seen.user_id, seen.text, seen.aspect, seen.image_sha256)
                return False
            s.add(Rationale(post_id=post_id, provider=self.provider.name, text=rationale))
            job = s.get(RationaleJob, post_id)
            if job is not None:
                job.status = JobStatus.done
                job.last_error = None
                s.add(job)
        return True

    def _reschedule(self, post_id: int, error: str) -> None:
        settings = self.rt.settings
        with session_scope(self.rt.engine) as s:
            job = s.get(RationaleJob, post_id)
            if job is None or job.status != JobStatus.pending:
                return
            job.last_error = error[:2000]
            if job.attempts >= settings.rationale_max_attempts:
                job.status = JobStatus.failed
            else:
                backoff = settings.rationale_retry_s * (2 ** min(job.attempts - 1, 6))
                job.next_attempt_at = utcnow() + timedelta(seconds=backoff)
            s.add(job)

    def run_once(self) -> int:
        done = 0
        for post_id in self.claim_due():
            if self._stop.is_set():
                break
            try:
                done += self.work_one(post_id)
            except Exception as exc:  # e.g. the database refused the rationale: this job only
                log.exception("rationale job for post %s failed", post_id)
                self._record_failure(post_id, f"{type(exc).__name__}: {exc}")
        return done

    def _record_failure(self, post_id: int, error: str) -> None:
        """Back the job off (or give it up) after a failure; if even that can't be written, its
        claim runs out and a later pass retries it, within the attempts counted at each claim."""
        try:
            self._reschedule(post_id, error)
        except Exception:
            log.exception("could not record the failure of the rationale job for post %s", post_id)

    # -- background thread -----------------------------------------------------------------
    def start(self) -> None:
        if self.provider is None:
            return
        self._thread = threading.Thread(target=self._loop, name="rationale-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # the database may be briefly unavailable; keep the worker alive
                log.exception("rationale worker pass failed")
                worked = 0
            if not worked:
                self._stop.wait(self.poll_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
