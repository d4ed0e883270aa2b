"""Group commit: concurrent requests' writes share one transaction and one flush to disk.

A durable commit costs one fsync (SQLite WAL with synchronous=FULL, PostgreSQL's WAL flush), and
the disk allows a few hundred of them a second. A request that has validated everything it can
on its own hands its write to the runtime's one committer thread and waits. The committer takes
everything that is waiting (no artificial delay: what queued while the last commit was flushing
is the next group), writes them all inside ONE transaction (see below), commits once, and only
then answers every request in the group.

- Writes of one kind are applied together: a write whose class has `write_all(session, writes)`
  (a `GroupedWrite`, e.g. feedback) is validated and stored with set-based statements for all of
  its run of neighbours in the queue (one query per table, one multi-row INSERT), instead of a
  savepoint and several ORM round trips each. Per-request CPU, not the flush, is what limits a
  server on a small machine, and this is where most of it went.
- One bad request never fails its neighbours: a grouped write answers each request on its own
  (a NotFound or Conflict for one, stored rows for the rest); should the set-based statements
  themselves fail (a unique key another process stored in between), their savepoint is rolled
  back and each request of the run is written alone, in its own savepoint, as any other write.
  A write that raises inside its savepoint rolls back only itself; the request gets that
  exception (the same one the per-request path raises), the others go on.
- Later writes in a group see earlier ones (same session): a retry of an idempotency key that
  arrives in the same group finds the row its twin just wrote.
- A request is answered only after the commit holding its row returned. If the commit fails,
  every request of the group gets the error: nothing acknowledged that is not on disk.
- A caller with many writes at hand (the broker consumer's fetched batch) queues them as one
  entry (`enqueue_all`) and gets one future for their outcomes, not a future and a wake-up each.
- `close()` commits whatever was queued before it; a request that arrives after gets an error.
  Nothing queued is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar

from sqlalchemy.engine import Engine
from sqlmodel import Session

from nightowl.errors import Unavailable
from nightowl.memory.db import BUSY_TIMEOUT_S, session_scope
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")

# The most requests in one transaction: bounds a group's latency and the time the write lock is held.
MAX_BATCH = 256
# How long a request waits for its group's commit before it is answered 503 (only if its write
# was not started yet; one being written is waited for, as its outcome is then decided by the commit).
WAIT_S = BUSY_TIMEOUT_S * 2

_STOP = object()
_create_lock = threading.Lock()

# What a write answers its request: (True, result) or (False, the exception to raise).
Outcome = tuple[bool, object]


class GroupedWrite(Protocol):
    """A write that can also be applied with others of its kind. Called alone (`write(session)`)
    it is the fallback; `write_all` must give every write the outcome it would have had alone, in
    order (a later write sees what an earlier one stored), and raise only if the database refused
    the statements themselves."""

    def __call__(self, s: Session) -> object: ...

    @classmethod
    def write_all(cls, s: Session, writes: Sequence["GroupedWrite"]) -> list[Outcome]: ...


class GroupCommitter:
    """One per engine: a queue of writes and the one thread that commits them in groups."""

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH, name: str = "nightowl-group-commit"):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # Counters (tests, benchmarks): groups committed and the writes in them.
        self.groups = 0
        self.writes = 0

    def submit(
        self, write: Callable[[Session], T], recover: Callable[[Session, Exception], T] | None = None
    ) -> T:
        """Run `write(session)` in its own savepoint in the next group; return its result once that
        group is committed. If it raises, its savepoint is rolled back and `recover(session, exc)`,
        when given, answers instead (e.g. a unique key stored meanwhile: the stored row)."""
        fut = self._put(write, recover)
        try:
            return fut.result(timeout=WAIT_S)
        except FutureTimeout:
            if fut.cancel():  # never started: nothing of it was written
                raise Unavailable(f"the database is busy: not written within {WAIT_S} s; retry later") from None
            return fut.result()  # being written: the commit decides, and answers soon

    async def submit_async(
        self, write: Callable[[Session], T], recover: Callable[[Session, Exception], T] | None = None
    ) -> T:
        """`submit` for the event loop: the request waits for its group without holding a thread.
        A request whose client goes away meanwhile is still written (shielded): nothing of it is
        half-way, and a retry with its idempotency key finds it."""
        fut = self._put(write, recover)
        waiting = asyncio.wrap_future(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting), WAIT_S)
        except asyncio.TimeoutError:
            if fut.cancel():  # never started: nothing of it was written
                raise Unavailable(f"the database is busy: not written within {WAIT_S} s; retry later") from None
            return await waiting  # being written: the commit decides, and answers soon

    def enqueue(self, write: Callable[[Session], T], recover: Callable[[Session, Exception], T] | None = None) -> Future:
        """Queue `write` for the next group without waiting: the future is set once the group holding
        it is committed (its result, or the exception the write met)."""
        return self._put(write, recover)

    def enqueue_all(
        self, writes: Sequence[GroupedWrite], recover: Callable[[GroupedWrite, Session, Exception], object] | None = None
    ) -> Future:
        """Queue writes of one kind as one item, not waited for: the future is set, once the group
        holding them is committed, to their outcomes in order (`(True, result)` or `(False, the
        exception)`, as each would have had alone; `recover(write, session, exc)` as in `submit`).
        For a caller with many at hand (a broker's fetched batch): one future and one queue entry
        instead of one per write."""
        if not writes:
            raise ValueError("enqueue_all needs at least one write")
        return self._put(_Together(tuple(writes), recover), None)

    def _put(self, write: Callable, recover: Callable | None) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down; retry later")
            self._queue.put((write, recover, fut))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, stop the thread; anything left (thread stuck) gets an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        while True:  # only if the thread did not finish in time: never leave a request waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[-1].set_running_or_notify_cancel():
                item[-1].set_exception(Unavailable("the server shut down before this was written; retry"))
        self._queue.put(_STOP)  # a thread still busy stops when it is done

    # -- the committer thread -----------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = []
            while True:
                if item is _STOP:
                    stopping = True
                elif item[-1].set_running_or_notify_cancel():  # False: its request gave up waiting
                    batch.append(item)
                if stopping or len(batch) >= self.max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._commit(batch)
                except BaseException as exc:  # noqa: BLE001 - every waiter must get an answer
                    log.exception("group commit failed")
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)

    def _commit(self, batch: list) -> None:
        results: list[tuple[Future, bool, object]] = []
        with session_scope(self.engine) as s:
            for run in _runs_of_one_kind(batch):
                kind = type(run[0][0])
                if kind is _Together:
                    results.extend((fut, True, together.outcomes(s)) for together, _, fut in run)
                    continue
                outcomes = _outcomes(s, [(write, recover) for write, recover, _ in run])
                results.extend((fut, ok, value) for (*_, fut), (ok, value) in zip(run, outcomes))
        # Committed (session_scope returned): now, and only now, answer.
        self.groups += 1
        self.writes += sum(len(write.writes) if isinstance(write, _Together) else 1 for write, *_ in batch)
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _runs_of_one_kind(batch: list) -> list[list]:
    """The batch cut into runs of neighbouring writes of the same class: arrival order is kept
    between runs, and a grouped write's run is as long as the queue allows."""
    runs: list[list] = []
    for item in batch:
        if runs and type(runs[-1][0][0]) is type(item[0]):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


@dataclass(frozen=True)
class _Together:
    """Writes of one kind queued as one item (`enqueue_all`), answered with all their outcomes."""

    writes: tuple
    recover: Callable | None

    def outcomes(self, s: Session) -> list[Outcome]:
        return _outcomes(s, [(w, self._recover_for(w)) for w in self.writes])

    def _recover_for(self, write) -> Callable | None:
        if self.recover is None:
            return None
        return lambda s, exc: self.recover(write, s, exc)


def _outcomes(s: Session, run: list[tuple[Callable, Callable | None]]) -> list[Outcome]:
    """A run of writes of one class, (write, recover) each: together with set-based statements
    when the class has `write_all` and the database takes them, else each alone."""
    kind = type(run[0][0])
    if hasattr(kind, "write_all"):
        outcomes = _write_together(s, kind, [write for write, _ in run])
        if outcomes is not None:
            return outcomes
    return [_write_alone(s, write, recover) for write, recover in run]


def _write_together(s: Session, kind: type[GroupedWrite], writes: list) -> list[Outcome] | None:
    """The writes in one savepoint with set-based statements; None if the database refused
    them (their savepoint is rolled back: each is then written alone)."""
    try:
        with s.begin_nested():
            return kind.write_all(s, writes)
    except Exception:  # noqa: BLE001 - each write alone then meets the error that is its own
        if not s.in_transaction():  # the transaction itself is gone: stop here
            raise
        log.debug("grouped %s writes refused; writing them one by one", kind.__name__, exc_info=True)
        return None


def _write_alone(s: Session, write: Callable, recover: Callable | None) -> Outcome:
    try:
        with s.begin_nested():  # a SAVEPOINT: a failing write undoes only itself
            return True, write(s)
    except Exception as exc:  # noqa: BLE001 - handed to its own request
        if not s.in_transaction():  # the transaction itself is gone: stop here
            raise
        if recover is None:
            return False, exc
        try:
            return True, recover(s, exc)
        except Exception as exc2:  # noqa: BLE001
            return False, exc2


def committer_for(rt: Runtime) -> GroupCommitter:
    """The runtime's committer, started on first use and stopped by `rt.close()`."""
    c = getattr(rt, "_group_committer", None)
    if c is None:
        with _create_lock:
            c = getattr(rt, "_group_committer", None)
            if c is None:
                c = GroupCommitter(rt.engine)
                rt.closers.append(c.close)
                rt._group_committer = c
    return c
