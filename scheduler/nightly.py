"""The nightly cron job (APScheduler 3.x).

- persistent job store in nightowl's database (table `apscheduler_jobs`), one fixed job id, so
  restarts and several servers share one schedule instead of adding copies;
- coalesce: a server that was down over several nights runs the night once, not once per miss;
- a generous misfire grace (6 h): a night missed by a short outage still runs when it comes back;
- max_instances=1 here, and the night itself takes a database lease (continual.lease), so only
  one night runs at a time across processes.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from tzlocal import get_localzone

from nightowl.runtime import Runtime

log = logging.getLogger(__name__)

JOB_ID = "nightowl-nightly-update"
MISFIRE_GRACE_S = 6 * 3600

# The job store keeps a reference to a module-level function (not a pickled object), so the job
# finds the running process's runtime here instead of carrying it in the database.
_runtime: Runtime | None = None
# Set when the server stops: a night under way finishes the user in hand and leaves the rest
# for the next night, instead of holding the shutdown for hours.
stopping = threading.Event()


def nightly_job() -> None:
    # Imported when the night fires: the night brings avalanche and torch (seconds), which the
    # server's start-up need not wait for.
    from nightowl.continual.night import run_night

    if _runtime is None:  # pragma: no cover - only if the job fires outside `nightowl serve`
        log.error("nightly job fired with no runtime; skipped")
        return
    summary = run_night(_runtime, stop=stopping)
    log.info("night finished: %s", summary.counts())


def build_scheduler(rt: Runtime) -> BackgroundScheduler:
    global _runtime
    _runtime = rt
    stopping.clear()
    settings = rt.settings
    zone = settings.timezone or get_localzone()
    hour, minute = (int(x) for x in settings.nightly_time.split(":"))
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=rt.engine, tablename="apscheduler_jobs")},
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": MISFIRE_GRACE_S},
        timezone=zone,
    )
    scheduler.add_job(
        nightly_job,
        CronTrigger(hour=hour, minute=minute, timezone=zone),
        id=JOB_ID,
        name="nightly per-user LoRA update",
        replace_existing=True,  # a changed nightly_time takes effect on restart
    )
    return scheduler


def next_run(scheduler: BackgroundScheduler) -> datetime | None:
    job = scheduler.get_job(JOB_ID)
    return job.next_run_time if job else None
