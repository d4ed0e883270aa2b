"""One night: take the lease, plan the per-user jobs, hand them to an executor, collect the results.

The lease (continual.lease) keeps a second night from starting while this one runs: it is short
and renewed while the night runs (in the background, and before each user). A night that loses
it (another holder has it now) skips its remaining users, and the lease is checked in the same
transactions as each user's writes (continual.jobs.require_current), so it promotes nothing more. A
job is plain data (continual.jobs: user id, feedback cutoff, night id, the user's incarnation and
the lease's holder), so an executor other than the
in-process one (Ray, a queue of workers) can take the same list: each worker needs only the
settings to build its own runtime and call `nightowl.continual.update.update_user`.

The cutoff is fixed when the night starts: feedback that arrives during the run waits for the
next one. One user's failure is recorded and the night goes on. A killed night changes no active
adapter (activation is a single transaction at the end of a user's job); the next night marks
its leftovers as interrupted and does the work again.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from concurrent.futures import Executor, Future, wait
from datetime import datetime
from typing import Callable, Iterable

from nightowl.adapters import registry
from nightowl.adapters.checkpoint import SHIPPED_BASE
from nightowl.adapters.data import TOMBERT_LABELS, read_tombert_tsv
from nightowl.continual.jobs import (
    NightAlreadyRunning,
    NightSummary,
    UserJob,
    UserResult,
)
from nightowl.continual.lease import (
    LeaseKeeper,
    LeaseLost,
    acquire_lease,
    lease_holder,
    release_lease,
)
from nightowl.continual.update import update_user
from nightowl.memory import night_queries
from nightowl.memory.db import session_scope
from nightowl.memory.examples import Example
from nightowl.memory.models import RunStatus, utcnow
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

class InProcessExecutor(Executor):
    """Runs jobs one after another in this process (training already uses every core)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)
        return fut


# -- the global replay memory ----------------------------------------------------------------

def ensure_global_memory(rt: Runtime) -> int:
    """Build the global replay memory from the base model's training data the first time.

    Source: settings.global_replay_data (TomBERT TSV, or JSONL with text/aspect/context/label),
    else the sample shipped with the base model (sentiment labels only).
    """
    memory = rt.replay_memory
    index, examples = memory.load_global()
    if index is not None:
        return len(examples)
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
        return night_queries.mark_interrupted(s)


def plan_night(
    rt: Runtime, night_id: str, cutoff_time: datetime, holder: str, only_users: Iterable[str] | None = None
) -> list[UserJob]:
    """Every user with feedback newer than their active adapter, up to the cutoff."""
    with session_scope(rt.engine) as s:
        cutoff_id = night_queries.latest_feedback_id(s, cutoff_time)
        if cutoff_id is None:
            return []
        users = night_queries.user_ids(s)
        if only_users is not None:
            wanted = set(only_users)
            users = [u for u in users if u in wanted]
        jobs = []
        for user_id in users:
            current = registry.active(s, user_id)
            trained_through = current.trained_through_feedback_id if current else None
            if night_queries.count_feedback(s, user_id, cutoff_id, after_id=trained_through) > 0:
                jobs.append(UserJob(night_id, user_id, cutoff_id, cutoff_time, night_queries.incarnation(s, user_id), holder))
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
    (the server is shutting down), users not yet started are skipped: the next night does them.
    So are they once the night has lost its lease."""
    update = update or update_user
    holder = lease_holder()
    if not acquire_lease(rt.engine, holder):
        raise NightAlreadyRunning("another nightly run holds the lease")
    keeper = LeaseKeeper(rt.engine, holder).start()
    try:
        clean_up_interrupted(rt)
        cutoff_time = utcnow()
        night_id = cutoff_time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        jobs = plan_night(rt, night_id, cutoff_time, holder, only_users)
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
            fut = executor.submit(_guarded, update, rt, job, stop, keeper)
            fut.add_done_callback(collect)
            futures.append(fut)
        wait(futures)
        for fut in futures:
            fut.result()  # re-raise what no job should swallow (KeyboardInterrupt, SystemExit)
        if keeper.lost.is_set():
            log.error("night %s lost its lease: it stopped early", night_id)
        return NightSummary(night_id, cutoff_time, results)
    finally:
        keeper.stop()
        release_lease(rt.engine, holder)


LEASE_LOST = "the night lost its lease; left for the next night"


def _guarded(update: Callable[[Runtime, UserJob], UserResult], rt: Runtime, job: UserJob,
             stop: threading.Event | None = None, keeper: LeaseKeeper | None = None) -> UserResult:
    """One user's failure is recorded on their run and never stops the others. Before each user
    the lease is renewed; while the user's job runs, each of its writes checks the lease."""
    if stop is not None and stop.is_set():
        return UserResult(job.user_id, RunStatus.skipped, error="shutting down; left for the next night")
    if keeper is not None and not keeper.renew():
        return UserResult(job.user_id, RunStatus.skipped, error=LEASE_LOST)
    try:
        return update(rt, job)
    except LeaseLost:
        log.error("night lost its lease during user %s: nothing of theirs was promoted", job.user_id)
        if keeper is not None:
            keeper.lost.set()
        return UserResult(job.user_id, RunStatus.skipped, error=LEASE_LOST)
    except Exception as exc:
        with session_scope(rt.engine) as s:
            deleted = night_queries.incarnation(s, job.user_id) != job.incarnation
        if deleted:  # deleted (maybe recreated) while we trained: drop what the job wrote for them
            registry.delete_user_files(rt.settings.adapters_dir, job.user_id)
            rt.forget_user(job.user_id)
            log.info("user %s was deleted during the night; their update was dropped", job.user_id)
            return UserResult(job.user_id, RunStatus.skipped, error="user deleted during the night")
        log.exception("nightly update failed for user %s", job.user_id)
        error = f"{type(exc).__name__}: {exc}"
        with session_scope(rt.engine) as s:
            night_queries.fail_running_runs(s, job.night_id, job.user_id, error)
        return UserResult(job.user_id, RunStatus.failed, error=error)
