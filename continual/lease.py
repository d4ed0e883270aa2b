"""The night's lease: one night at a time, across processes, containers and machines.

A row in the database (`Lease`) names the holder and an expiry. Two servers, or a server and
`nightowl nightly --now`, never train at once.

- The lease is short (LEASE_TTL, 10 minutes) and renewed while the night runs: a `LeaseKeeper`
  thread renews it every RENEW_EVERY, and the night renews it again before each user. A long
  night never outlives its lease, and a holder that dies lets it go within minutes.
- A renewal that finds another holder (this process was paused, or cut off from the database,
  for longer than the TTL, and another night took over) marks the lease lost: the night skips
  its remaining users, and `require_lease`, checked in the same transactions as the night's
  writes for a user (run row, candidate, promotion), keeps it from promoting anything.
- A holder killed mid-night can be judged dead at once only from the same pid namespace: the
  holder names its boot (/proc/sys/kernel/random/boot_id) and pid namespace (the inode of
  /proc/self/ns/pid) as well as its pid and the pid's start time. Two containers on one host may
  share a hostname and reuse each other's pids, so a holder from another boot or namespace (or
  one that doesn't say) is never checked through /proc: only its expiry ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from nightowl.memory.db import session_scope
from nightowl.memory.models import Lease, utcnow

log = logging.getLogger(__name__)

LEASE_NAME = "nightly"
LEASE_TTL = timedelta(minutes=10)
RENEW_EVERY = timedelta(minutes=1)
_HOST_CHARS = 40  # the holder column holds 128 characters


class LeaseLost(RuntimeError):
    """This night's lease was taken by another holder: it writes nothing more."""


def lease_holder() -> str:
    """This process's name as a holder: host, pid, the pid's start time, boot id, pid namespace
    and a random tag (`host:pid:start:boot:pidns:tag`)."""
    pid = os.getpid()
    return ":".join(
        [socket.gethostname()[:_HOST_CHARS], str(pid), _process_start(pid), _boot_id(), _pid_namespace(),
         uuid.uuid4().hex[:8]]
    )


def acquire_lease(engine: Engine, holder: str, ttl: timedelta | None = None) -> bool:
    """Take (or renew) the lease for `ttl`; False while another live holder has it."""
    try:
        return _take_lease(engine, holder, ttl or LEASE_TTL)
    except IntegrityError:  # another process inserted the lease row first (PostgreSQL race)
        return False


def renew_lease(engine: Engine, holder: str, ttl: timedelta | None = None) -> bool:
    """Push the expiry of a lease `holder` holds `ttl` ahead; False if it is no longer theirs
    (taken over, or released and taken by another night since): never takes it back."""
    with session_scope(engine) as s:
        lease = s.exec(select(Lease).where(Lease.name == LEASE_NAME).with_for_update()).first()
        if lease is None or lease.holder != holder:
            return False
        lease.expires_at = utcnow() + (ttl or LEASE_TTL)
        s.add(lease)
        return True


def release_lease(engine: Engine, holder: str) -> None:
    """Give the lease back, if `holder` still holds it."""
    with session_scope(engine) as s:
        lease = s.get(Lease, LEASE_NAME)
        if lease is not None and lease.holder == holder:
            s.delete(lease)


def require_lease(session: Session, holder: str) -> None:
    """Call inside a transaction that writes for the night: LeaseLost unless `holder` still holds
    the lease. The row is locked for the transaction (PostgreSQL; SQLite's writer holds the whole
    database), so a takeover waits until this write has committed or rolled back."""
    lease = session.exec(select(Lease).where(Lease.name == LEASE_NAME).with_for_update(read=True)).first()
    if lease is None or lease.holder != holder:
        raise LeaseLost(f"the night's lease is held by {lease.holder if lease else 'nobody'} now")


class LeaseKeeper:
    """Renews a held lease every `every` until stopped. `lost` is set, for good, once a renewal
    finds another holder, or once renewals have failed (database unreachable) until the last
    granted expiry: after that another night may have taken over."""

    def __init__(self, engine: Engine, holder: str, ttl: timedelta | None = None, every: timedelta | None = None):
        self.engine, self.holder = engine, holder
        self.ttl, self.every = ttl or LEASE_TTL, every or RENEW_EVERY
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._held_until = time.monotonic() + self.ttl.total_seconds()  # from the acquisition just made
        self._thread: threading.Thread | None = None

    def renew(self) -> bool:
        """Renew now; False once the lease is lost."""
        with self._lock:
            if self.lost.is_set():
                return False
            asked = time.monotonic()
            try:
                held = renew_lease(self.engine, self.holder, self.ttl)
            except Exception:  # the database may be briefly unavailable: the lease runs until its expiry
                log.warning("could not renew the night's lease", exc_info=True)
                if time.monotonic() < self._held_until:
                    return True
                self._lose("the lease expired while the database could not be reached")
                return False
            if not held:
                self._lose("another holder has taken the lease")
                return False
            self._held_until = asked + self.ttl.total_seconds()
            return True

    def _lose(self, why: str) -> None:
        log.error("the night lost its lease (%s): remaining users are left for the next night", why)
        self.lost.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every.total_seconds()):
            if not self.renew():
                return

    def start(self) -> "LeaseKeeper":
        self._thread = threading.Thread(target=self._run, name="night-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _take_lease(engine: Engine, holder: str, ttl: timedelta) -> bool:
    now = utcnow()
    with session_scope(engine) as s:
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


def _boot_id() -> str:
    """This boot of this kernel (a random id, new at every boot); empty where /proc doesn't say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace (its inode; unique on one boot); empty where /proc doesn't say."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _holder_is_dead(holder: str) -> bool:
    """A holder whose process is gone (killed mid-night) no longer holds the lease. Only judged
    where its pid means the same process here: same boot, same pid namespace."""
    fields = holder.split(":")
    if len(fields) != 6:
        return False  # an older holder format, or not ours: only its TTL can end it
    _host, pid, started, boot, pidns, _tag = fields
    if not pid.isdigit() or not boot or not pidns or (boot, pidns) != (_boot_id(), _pid_namespace()):
        return False  # another machine, boot or container: its pid means nothing here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's process: compare its start time below
    # the pid is alive, but is it still the holder, or a new process that reused the pid?
    return started.isdigit() and _process_start(int(pid)) not in ("", started)
