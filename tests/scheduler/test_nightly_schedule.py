"""The nightly schedule keeps nothing in the database (issue 12, case 8: APScheduler's SQLAlchemy
job store unpickles rows every server can be handed), and still catches up a night missed by an
outage, once, from the database's own record of nights."""

from __future__ import annotations

import pickle
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import text

from nightowl.day import logger
from nightowl.memory.db import session_scope
from nightowl.memory.models import RunStatus, TrainingRun
from nightowl.runtime import Runtime
from nightowl.scheduler import nightly
from tests.conftest import make_settings

UTC = timezone.utc
TRIGGER = CronTrigger(hour=3, minute=0, timezone=UTC)
TODAY_3 = datetime(2025, 6, 10, 3, 0, tzinfo=UTC)


@pytest.fixture
def rt(tmp_path):
    rt = Runtime(make_settings(tmp_path / "home", nightly_time="03:00", timezone="UTC"))
    yield rt
    rt.close()


def _night_started(rt, when: datetime) -> None:
    """A recorded night: one training run with that cutoff."""
    logger.create_user(rt, f"u{int(when.timestamp())}")
    with session_scope(rt.engine) as s:
        s.add(TrainingRun(user_id=f"u{int(when.timestamp())}", night_id="n", cutoff=when, status=RunStatus.promoted))


@pytest.mark.parametrize(
    "now, last_start, expected",
    [
        (TODAY_3 + timedelta(hours=2), TODAY_3 - timedelta(days=1), TODAY_3),  # missed this morning's
        (TODAY_3 + timedelta(hours=2), TODAY_3 - timedelta(days=4), TODAY_3),  # several missed: once
        (TODAY_3 + timedelta(hours=2), TODAY_3 + timedelta(seconds=5), None),  # it ran
        (TODAY_3 + timedelta(hours=7), TODAY_3 - timedelta(days=1), None),  # past the 6 h grace
        (TODAY_3 - timedelta(minutes=1), TODAY_3 - timedelta(days=2), None),  # the last one is >6 h ago
        (TODAY_3 + timedelta(hours=2), None, None),  # no night ever recorded: nothing to catch up
    ],
)
def test_missed_night(now, last_start, expected):
    assert nightly.missed_night(TRIGGER, last_start, now) == expected


def test_a_night_missed_within_the_grace_runs_at_start(rt):
    _night_started(rt, TODAY_3 - timedelta(days=1))
    now = TODAY_3 + timedelta(hours=1)
    sched = nightly.build_scheduler(rt, now=now)
    sched.start(paused=True)
    try:
        assert nightly.next_run(sched) == now
    finally:
        sched.shutdown(wait=False)


def test_a_night_that_ran_is_not_run_again_at_start(rt):
    _night_started(rt, TODAY_3 - timedelta(days=1))
    _night_started(rt, TODAY_3 + timedelta(seconds=3))
    sched = nightly.build_scheduler(rt, now=TODAY_3 + timedelta(hours=1))
    sched.start(paused=True)
    try:
        nxt = nightly.next_run(sched)  # the schedule's own next time, not now
        assert (nxt.hour, nxt.minute) == (3, 0) and nxt > datetime.now(UTC)
    finally:
        sched.shutdown(wait=False)


def test_the_catch_up_night_runs_once_then_the_schedule_goes_on(rt, monkeypatch):
    _night_started(rt, datetime.now(UTC) - timedelta(days=1, minutes=1))
    now = datetime.now(UTC)
    settings = make_settings(rt.settings.home, nightly_time=(now - timedelta(minutes=30)).strftime("%H:%M"),
                             timezone="UTC")
    rt.settings = settings
    ran = []
    fired = threading.Event()

    def fake_night():
        ran.append(datetime.now(UTC))
        fired.set()

    monkeypatch.setattr(nightly, "nightly_job", fake_night)
    sched = nightly.build_scheduler(rt)
    sched.start()
    try:
        assert fired.wait(10)
        nxt = nightly.next_run(sched)
        assert nxt > now + timedelta(hours=23)  # back on the schedule: tomorrow's night
    finally:
        sched.shutdown(wait=True)
    assert len(ran) == 1


class _Boom:
    """A job-store row an attacker wrote: unpickling it would run code (here: touch a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_old_job_table_is_left_alone_and_never_unpickled(rt, tmp_path):
    marker = tmp_path / "pwned"
    with rt.engine.begin() as conn:
        conn.execute(text("CREATE TABLE apscheduler_jobs (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                          "job_state BLOB NOT NULL)"))
        conn.execute(text("INSERT INTO apscheduler_jobs VALUES (:id, 0, :state)"),
                     {"id": nightly.JOB_ID, "state": pickle.dumps(_Boom(marker))})
    sched = nightly.build_scheduler(rt)
    sched.start(paused=True)
    try:
        assert [j.id for j in sched.get_jobs()] == [nightly.JOB_ID]
    finally:
        sched.shutdown(wait=False)
    assert not marker.exists()
    with rt.engine.connect() as conn:  # not ours to drop
        assert conn.execute(text("SELECT count(*) FROM apscheduler_jobs")).scalar() == 1
