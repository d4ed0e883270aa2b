"""The nightly cron job (APScheduler 3.x), kept in memory: nothing of it is stored.

APScheduler's SQLAlchemy job store would keep the job as a pickle in nightowl's database, and
every server would unpickle what it finds there: write access to that one table would be code
execution in all of them. So the job lives in each process's MemoryJobStore (a module-level
function and a cron trigger, rebuilt at every start) and what the stored job gave comes from
nightowl's own records instead:

- one night at a time across servers: the night's database lease (continual.lease); each server
  schedules the same job, the first to fire takes the lease, the others find it held and skip;
- coalesce: a server that was down over several nights runs the night once, not once per miss;
- a misfire grace (6 h) after an outage: at start, if the most recent scheduled time within the
  grace is newer than the last night recorded in the database (night_queries.last_night_start:
  the newest training run's cutoff), the night runs once now. A database with no night at all
  has nothing to catch up: its first night comes at the scheduled time;
- max_instances=1 and one worker thread: this process never runs two nights at once.

A table `apscheduler_jobs` left by earlier versions is neither read nor dropped.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from tzlocal import get_localzone

from nightowl.memory import night_queries
from nightowl.memory.db import session_scope
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

JOB_ID = "nightowl-nightly-update"
MISFIRE_GRACE_S = 6 * 3600

# The job is a module-level function; it finds the running process's runtime here.
_runtime: Runtime | None = None
# Set when the server stops: a night under way finishes the user in hand and leaves the rest
# for the next night, instead of holding the shutdown for hours.
stopping = threading.Event()


def nightly_job() -> None:
    # Imported when the night fires: the night brings avalanche and torch (seconds), which the
    # server's start-up need not wait for.
    from nightowl.continual.jobs import NightAlreadyRunning
    from nightowl.continual.night import run_night

    if _runtime is None:  # pragma: no cover - only if the job fires outside `nightowl serve`
        log.error("nightly job fired with no runtime; skipped")
        return
    try:
        summary = run_night(_runtime, stop=stopping)
    except NightAlreadyRunning:
        log.info("another process is running the night; this server's run skipped")
        return
    log.info("night finished: %s", summary.counts())


def missed_night(trigger: CronTrigger, last_start: datetime | None, now: datetime,
                 grace: timedelta = timedelta(seconds=MISFIRE_GRACE_S)) -> datetime | None:
    """The most recent scheduled time in (now - grace, now] that no recorded night has started
    since; None when there is none (or no night was ever recorded)."""
    if last_start is None:
        return None
    missed, fire = None, trigger.get_next_fire_time(None, now - grace)
    while fire is not None and fire <= now:
        missed = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    if missed is None or last_start >= missed:
        return None
    return missed


def _last_night_start(rt: Runtime) -> datetime | None:
    try:
        with session_scope(rt.engine) as s:
            return night_queries.last_night_start(s)
    except Exception:  # the schedule must still start; the night itself will meet the database
        log.warning("could not read the last night's start; no catch-up night", exc_info=True)
        return None


def build_scheduler(rt: Runtime, now: datetime | None = None) -> BackgroundScheduler:
    """The scheduler with the one nightly job; when a night was missed within the grace, the
    job's first run is now. `now` is for tests."""
    global _runtime
    _runtime = rt
    stopping.clear()
    settings = rt.settings
    zone = settings.timezone or get_localzone()
    hour, minute = (int(x) for x in settings.nightly_time.split(":"))
    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=zone,
    )
    trigger = CronTrigger(hour=hour, minute=minute, timezone=zone)
    now = now or datetime.now(trigger.timezone)
    extra = {}
    missed = missed_night(trigger, _last_night_start(rt), now)
    if missed is not None:
        log.warning("the night scheduled for %s did not run (server down?): running it now", missed)
        extra["next_run_time"] = now
    scheduler.add_job(
        nightly_job, trigger, id=JOB_ID, name="nightly per-user LoRA update", replace_existing=True, **extra
    )
    return scheduler


def next_run(scheduler: BackgroundScheduler) -> datetime | None:
    job = scheduler.get_job(JOB_ID)
    return job.next_run_time if job else None
