"""What a night hands out and gets back: plain data, so that any executor (in-process, Ray, a
queue of workers) can carry a job to `nightowl.continual.update.update_user` and its result back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session

from nightowl.continual.lease import require_lease
from nightowl.memory import night_queries
from nightowl.memory.models import RunStatus


@dataclass(frozen=True)
class UserJob:
    night_id: str
    user_id: str
    cutoff_feedback_id: int  # train on this user's feedback with id <= cutoff
    cutoff_time: datetime
    # Which user of that id (their row's created_at): one deleted and recreated during the night
    # is another person, who must never be served what was trained on the first one's labels.
    incarnation: datetime
    lease_holder: str  # the night's lease: a night that lost it writes nothing more (continual.lease)


def require_current(session: Session, job: UserJob) -> None:
    """Call inside every transaction that writes for a job, so the check commits with the write:
    the user is still the one the night planned for (UserGone), and the night still holds its
    lease (LeaseLost)."""
    require_lease(session, job.lease_holder)
    night_queries.require_incarnation(session, job.user_id, job.incarnation)


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
    """Another process holds the night's lease (continual.lease): this night does not start."""
