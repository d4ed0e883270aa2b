"""One night: plan the per-user jobs, hand them to an executor, collect the results.

A job is plain data (user id, feedback cutoff, night id), so an executor other than the
in-process one (Ray, a queue of workers) can take the same list: each worker needs only the
settings to build its own runtime and call `nightowl.continual.update.update_user`.

The cutoff is fixed when the night starts: feedback that arrives during the run waits for the
next one. One user's failure is recorded and the night goes on. A killed night changes no active
adapter (activation is a single transaction at the end of a user's job); the next night marks
its leftovers as interrupted and does the work again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterable

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from nightowl.adapters import registry
from nightowl.memory.db import session_scope
from nightowl.memory.models import AdapterStatus, AdapterVersion, Feedback, Lease, RunStatus, TrainingRun, User, utcnow
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

LEASE_NAME = "nightly"
LEASE_TTL = timedelta(hours=12)


@dataclass(frozen=True)
class UserJob:
    night_id: str
    user_id: str
    cutoff_feedback_id: int  # train on this user's feedback with id <= cutoff
    cutoff_time: datetime


@dataclass
class UserResult:
    user_id: str
    status: RunStatus
    adapter_version: int | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class NightSummary:
    night_id: str
    cutoff_time: datetime
    results: list[UserResult]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status.value] = out.get(r.status.value, 0) + 1
        return out


class NightAlreadyRunning(RuntimeError):
    pass


class InProcessExecutor(Executor):
    """Runs jobs one after another in this process (training already uses every core)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)
        return fut


# -- the lease ------------------------------------------------------------------------------

def acquire_lease(rt: Runtime, holder: str, ttl: timedelta = LEASE_TTL) -> bool:
    try:
        return _take_lease(rt, holder, ttl)
    except IntegrityError:  # another process inserted the lease row first (PostgreSQL race)
        return False


def _take_lease(rt: Runtime, holder: str, ttl: timedelta) -> bool:
    now = utcnow()
    with session_scope(rt.engine) as s:
        lease = s.exec(select(Lease).where(Lease.name == LEASE_NAME).with_for_update()).first()
        if lease is None:
            s.add(Lease(name=LEASE_NAME, holder=holder, expires_at=now + ttl))
            return True
        if lease.expires_at > now and lease.holder != holder and not _holder_is_dead(lease.holder):
            return False
        lease.holder, lease.expires_at = holder, now + ttl
        s.add(lease)
        return True


def _process_start(pid: int) -> str:
    """When a process started (clock ticks since boot, from /proc): with the pid it names one
    process, even after the pid is reused. Empty where /proc doesn't say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return ""


def lease_holder() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{uuid.uuid4().hex[:8]}"


def _holder_is_dead(holder: str) -> bool:
    """A holder on this host whose process is gone (killed mid-night) no longer holds the lease."""
    host, pid, started, *_ = (holder.split(":") + ["", "", ""])[:4]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's run: only its TTL can end it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # the pid is alive, but is it still the holder, or a new process that reused the pid?
    return started.isdigit() and _process_start(int(pid)) not in ("", started)


def release_lease(rt: Runtime, holder: str) -> None:
    with session_scope(rt.engine) as s:
        lease = s.get(Lease, LEASE_NAME)
        if lease is not None and lease.holder == holder:
            s.delete(lease)


# -- the global replay memory ----------------------------------------------------------------

def ensure_global_memory(rt: Runtime) -> int:
    """Build the global replay memory from the base model's training data the first time.

    Source: settings.global_replay_data (TomBERT TSV, or JSONL with text/aspect/context/label),
    else the sample shipped with the base model (sentiment labels only).
    """
    from nightowl.adapters.checkpoint import SHIPPED_BASE
    from nightowl.adapters.data import read_tombert_tsv
    from nightowl.memory.replay import Example

    memory = rt.replay_memory
    index, examples = memory.load_global()
    if index is not None:
        return len(examples)
    from nightowl.adapters.data import TOMBERT_LABELS

    source = rt.settings.global_replay_data
    if source is None:
        if rt.labels != TOMBERT_LABELS:
            log.warning("no global_replay_data for labels %s: nightly updates run without global replay", rt.labels)
            return 0
        source = SHIPPED_BASE / "replay_sample.tsv"
    if source.suffix == ".tsv":
        rows = read_tombert_tsv(source, n_labels=len(rt.labels))
        examples = [Example(id=0, text=r.text, aspect=r.aspect, label=rt.labels[r.label]) for r in rows]
    else:
        import json

        examples = []
        for line in source.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                examples.append(Example(id=0, text=r["text"], aspect=r.get("aspect"), context=r.get("context"), label=r["label"]))
    unknown = {e.label for e in examples} - set(rt.labels)
    if unknown:
        log.warning("global replay data %s has labels %s outside %s: no global memory", source, unknown, rt.labels)
        return 0
    memory.build_global(examples)
    return len(examples)


# -- planning -------------------------------------------------------------------------------

def clean_up_interrupted(rt: Runtime) -> int:
    """Runs and candidates left by a killed night: mark them, so they are never mistaken for live."""
    with session_scope(rt.engine) as s:
        runs = s.exec(select(TrainingRun).where(TrainingRun.status == RunStatus.running)).all()
        for run in runs:
            run.status, run.error, run.finished_at = RunStatus.failed, "interrupted (the night was killed)", utcnow()
            s.add(run)
        cands = s.exec(select(AdapterVersion).where(AdapterVersion.status == AdapterStatus.candidate)).all()
        for cand in cands:
            cand.status, cand.reason = AdapterStatus.rejected, "interrupted before evaluation finished"
            s.add(cand)
        return len(runs)


def plan_night(rt: Runtime, night_id: str, cutoff_time: datetime, only_users: Iterable[str] | None = None) -> list[UserJob]:
    """Every user with feedback newer than their active adapter, up to the cutoff."""
    with session_scope(rt.engine) as s:
        cutoff_id = s.exec(select(func.max(Feedback.id)).where(col(Feedback.created_at) <= cutoff_time)).one()
        if cutoff_id is None:
            return []
        users = [u.id for u in s.exec(select(User).order_by(col(User.id)))]
        if only_users is not None:
            wanted = set(only_users)
            users = [u for u in users if u in wanted]
        jobs = []
        for user_id in users:
            current = registry.active(s, user_id)
            trained_through = current.trained_through_feedback_id if current else None
            q = select(func.count()).select_from(Feedback).where(
                Feedback.user_id == user_id, Feedback.id <= cutoff_id
            )
            if trained_through is not None:
                q = q.where(Feedback.id > trained_through)
            if s.exec(q).one() > 0:
                jobs.append(UserJob(night_id, user_id, cutoff_id, cutoff_time))
        return jobs


# -- running --------------------------------------------------------------------------------

def run_night(
    rt: Runtime,
    *,
    executor: Executor | None = None,
    only_users: Iterable[str] | None = None,
    on_result: Callable[[UserResult, int, int], None] | None = None,
    update: Callable[[Runtime, UserJob], UserResult] | None = None,
    stop: threading.Event | None = None,
) -> NightSummary:
    """Run one night. `on_result(result, done, total)` drives a progress bar. Once `stop` is set
    (the server is shutting down), users not yet started are skipped: the next night does them."""
    from nightowl.continual.update import update_user

    update = update or update_user
    holder = lease_holder()
    if not acquire_lease(rt, holder):
        raise NightAlreadyRunning("another nightly run holds the lease")
    try:
        clean_up_interrupted(rt)
        cutoff_time = utcnow()
        night_id = cutoff_time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        jobs = plan_night(rt, night_id, cutoff_time, only_users)
        if jobs:
            ensure_global_memory(rt)
        log.info("night %s: %d users with new feedback", night_id, len(jobs))
        executor = executor or InProcessExecutor()
        results: list[UserResult] = []
        lock = threading.Lock()

        def collect(fut: Future) -> None:  # as each job finishes, whichever executor ran it
            with lock:
                results.append(fut.result())
                if on_result is not None:
                    on_result(results[-1], len(results), len(jobs))

        futures = []
        for job in jobs:
            fut = executor.submit(_guarded, update, rt, job, stop)
            fut.add_done_callback(collect)
            futures.append(fut)
        wait(futures)
        for fut in futures:
            fut.result()  # re-raise what no job should swallow (KeyboardInterrupt, SystemExit)
        return NightSummary(night_id, cutoff_time, results)
    finally:
        release_lease(rt, holder)


def _guarded(update: Callable[[Runtime, UserJob], UserResult], rt: Runtime, job: UserJob,
             stop: threading.Event | None = None) -> UserResult:
    """One user's failure is recorded on their run and never stops the others."""
    if stop is not None and stop.is_set():
        return UserResult(job.user_id, RunStatus.skipped, error="shutting down; left for the next night")
    try:
        return update(rt, job)
    except Exception as exc:
        with session_scope(rt.engine) as s:
            deleted = s.get(User, job.user_id) is None
        if deleted:  # deleted while we trained: drop what the job wrote after the deletion
            registry.delete_user_files(rt.settings.adapters_dir, job.user_id)
            rt.forget_user(job.user_id)
            log.info("user %s was deleted during the night; their update was dropped", job.user_id)
            return UserResult(job.user_id, RunStatus.skipped, error="user deleted during the night")
        log.exception("nightly update failed for user %s", job.user_id)
        error = f"{type(exc).__name__}: {exc}"
        with session_scope(rt.engine) as s:
            for run in s.exec(
                select(TrainingRun).where(
                    TrainingRun.night_id == job.night_id,
                    TrainingRun.user_id == job.user_id,
                    TrainingRun.status == RunStatus.running,
                )
            ):
                run.status, run.error, run.finished_at = RunStatus.failed, error[:4000], utcnow()
                s.add(run)
        return UserResult(job.user_id, RunStatus.failed, error=error)
