"""The night's lease (issue 12, case 8): renewed while the night runs, taken over once it expires,
never judged dead across pid namespaces, and a night that loses it promotes nothing more."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlmodel import Session, select

from nightowl.continual import lease, night
from nightowl.continual.jobs import NightAlreadyRunning, UserJob, UserResult, require_current
from nightowl.day import logger
from nightowl.memory.db import session_scope
from nightowl.memory.models import Lease, RunStatus, User, utcnow
from nightowl.runtime import Runtime
from tests.conftest import make_settings


@pytest.fixture
def rt(tmp_path):
    rt = Runtime(make_settings(tmp_path / "home"))  # no model: these nights train nobody
    yield rt
    rt.close()


def _holder(rt) -> str | None:
    with Session(rt.engine) as s:
        row = s.get(Lease, lease.LEASE_NAME)
        return row.holder if row else None


def _steal(rt, holder="elsewhere:1:1:feedfeedfeedfeed:1:thief", ttl=timedelta(hours=1)) -> None:
    with session_scope(rt.engine) as s:
        row = s.get(Lease, lease.LEASE_NAME)
        row.holder, row.expires_at = holder, utcnow() + ttl
        s.add(row)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_holder_names_its_boot_and_pid_namespace():
    _host, pid, started, boot, pidns, tag = lease.lease_holder().split(":")
    assert int(pid) > 0 and started.isdigit() and len(boot) == 16 and pidns.isdigit() and len(tag) == 8
    assert len(lease.lease_holder()) <= 128


def test_renewal_keeps_a_long_nights_lease(rt):
    ttl = timedelta(seconds=0.6)
    assert lease.acquire_lease(rt.engine, "me", ttl)
    keeper = lease.LeaseKeeper(rt.engine, "me", ttl=ttl, every=timedelta(seconds=0.1)).start()
    try:
        time.sleep(2.0)  # more than three TTLs
        assert not lease.acquire_lease(rt.engine, "other", ttl)
        assert not keeper.lost.is_set() and _holder(rt) == "me"
    finally:
        keeper.stop()
    time.sleep(0.8)  # no longer renewed: it expires
    assert lease.acquire_lease(rt.engine, "other", ttl)


def test_a_night_longer_than_the_ttl_keeps_its_lease(rt, monkeypatch):
    monkeypatch.setattr(lease, "LEASE_TTL", timedelta(seconds=0.6))
    monkeypatch.setattr(lease, "RENEW_EVERY", timedelta(seconds=0.1))
    jobs = [UserJob("n", u, 1, utcnow(), utcnow(), "planned-by-the-night") for u in ("a", "b")]
    monkeypatch.setattr(night, "plan_night", lambda *a, **k: jobs)
    monkeypatch.setattr(night, "ensure_global_memory", lambda rt: 0)
    competitor_got_it = []

    def slow_update(rt, job):
        time.sleep(1.0)  # each user outlasts the TTL
        competitor_got_it.append(lease.acquire_lease(rt.engine, "other-night"))
        return UserResult(job.user_id, RunStatus.promoted)

    summary = night.run_night(rt, update=slow_update)
    assert summary.counts() == {"promoted": 2}
    assert competitor_got_it == [False, False]
    assert _holder(rt) is None  # released at the end


def test_an_expired_lease_is_taken_over(rt):
    assert lease.acquire_lease(rt.engine, "gone", timedelta(seconds=-1))  # already expired
    assert lease.acquire_lease(rt.engine, "next")
    assert _holder(rt) == "next"
    assert not lease.renew_lease(rt.engine, "gone")  # the old holder can't take it back
    assert lease.renew_lease(rt.engine, "next")


def test_a_holder_from_another_pid_namespace_is_not_declared_dead(rt):
    here = lease.lease_holder().split(":")
    dead = str(_dead_pid())
    same_ns = ":".join([here[0], dead, "12345", here[3], here[4], "aaaaaaaa"])
    other_ns = ":".join([here[0], dead, "12345", here[3], str(int(here[4]) + 1), "bbbbbbbb"])
    other_boot = ":".join([here[0], dead, "12345", "0123456789abcdef", here[4], "cccccccc"])
    old_format = ":".join([here[0], dead, "12345", "dddddddd"])
    assert lease._holder_is_dead(same_ns)  # the control: /proc is trusted where it is the holder's
    for holder in (other_ns, other_boot, old_format):
        assert not lease._holder_is_dead(holder), holder
        with session_scope(rt.engine) as s:
            s.merge(Lease(name=lease.LEASE_NAME, holder=holder, expires_at=utcnow() + timedelta(minutes=5)))
        assert not lease.acquire_lease(rt.engine, "me")  # only its TTL ends it
        with pytest.raises(NightAlreadyRunning):
            night.run_night(rt)


def test_a_live_holder_that_reused_nothing_is_alive(rt):
    assert not lease._holder_is_dead(lease.lease_holder())


def _planner(rt, *names):
    """A plan_night for these users, with the lease holder the night passes in."""
    for name in names:
        logger.create_user(rt, name)
    with Session(rt.engine) as s:
        users = [(u.id, u.created_at) for u in s.exec(select(User).where(User.id.in_(names)).order_by(User.id))]

    def plan(rt, night_id, cutoff_time, holder, only_users=None):
        return [UserJob(night_id, user_id, 1, cutoff_time, created, holder) for user_id, created in users]

    return plan


def test_losing_the_lease_mid_night_stops_promotion(rt, monkeypatch):
    monkeypatch.setattr(night, "plan_night", _planner(rt, "u1", "u2", "u3"))
    monkeypatch.setattr(night, "ensure_global_memory", lambda rt: 0)
    promoted, started = [], []

    def update(rt, job):
        started.append(job.user_id)
        if job.user_id == "u1":
            _steal(rt)  # e.g. this process was paused past the TTL and another night took over
        # the promotion: the night's write for this user, checked in its own transaction
        with session_scope(rt.engine) as s:
            require_current(s, job)
            promoted.append(job.user_id)
        return UserResult(job.user_id, RunStatus.promoted)

    summary = night.run_night(rt, update=update)
    assert promoted == [] and started == ["u1"]  # the remaining users never start
    assert [r.status for r in summary.results] == [RunStatus.skipped] * 3
    assert all("lost its lease" in r.error for r in summary.results)
    assert _holder(rt).endswith(":thief")  # the new holder's lease is left alone


def test_a_lease_lost_in_the_background_stops_the_night(rt, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_EVERY", timedelta(seconds=0.05))
    monkeypatch.setattr(night, "plan_night", _planner(rt, "v1", "v2"))
    monkeypatch.setattr(night, "ensure_global_memory", lambda rt: 0)
    wrote = []

    def update(rt, job):
        _steal(rt)
        time.sleep(0.5)  # a long user: the keeper notices meanwhile
        with session_scope(rt.engine) as s:
            require_current(s, job)
            wrote.append(job.user_id)
        return UserResult(job.user_id, RunStatus.promoted)

    summary = night.run_night(rt, update=update)
    assert wrote == []
    assert summary.counts() == {"skipped": 2}
