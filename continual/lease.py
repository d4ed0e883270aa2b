"""The night's lease: one night at a time, across processes and machines.

A row in the database (`Lease`) names the holder and an expiry. Two servers, or a server and
`nightowl nightly --now`, never train at once. A holder killed mid-night lets the lease go two
ways: on its own host, the next night sees that the holder's process is gone and takes over at
once; from another host, only the expiry (LEASE_TTL) ends it.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from nightowl.memory.db import session_scope
from nightowl.memory.models import Lease, utcnow

LEASE_NAME = "nightly"
LEASE_TTL = timedelta(hours=12)


def lease_holder() -> str:
    """This process's name as a holder: host, pid, the pid's start time, and a random tag."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{uuid.uuid4().hex[:8]}"


def acquire_lease(engine: Engine, holder: str, ttl: timedelta = LEASE_TTL) -> bool:
    """Take (or renew) the lease for `ttl`; False while another live holder has it."""
    try:
        return _take_lease(engine, holder, ttl)
    except IntegrityError:  # another process inserted the lease row first (PostgreSQL race)
        return False


def release_lease(engine: Engine, holder: str) -> None:
    """Give the lease back, if `holder` still holds it."""
    with session_scope(engine) as s:
        lease = s.get(Lease, LEASE_NAME)
        if lease is not None and lease.holder == holder:
            s.delete(lease)


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
