"""The night's reads and writes in the store, in one place.

Every function takes the caller's `Session` and neither commits nor opens one: the night decides
where its transactions begin and end (continual.update, continual.gate, continual.night), so that
a kill at any point leaves the active adapter as it was. The adapter registry's own rules
(which version is active, promotion, the per-user lock) stay in `nightowl.adapters.registry`;
the lease's row stays with the lease (continual.lease).

- planning: which users have feedback newer than their active adapter, up to the night's cutoff;
- what a user's night trains on: their examples, the answers they let stand, their experiences;
- the night's own record: training runs, candidate adapter rows, leftovers of a killed night.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from nightowl.memory.examples import Example
from nightowl.memory.models import (
    AdapterStatus,
    AdapterVersion,
    Feedback,
    Post,
    Prediction,
    Rationale,
    RunStatus,
    TrainingRun,
    User,
    utcnow,
)

# -- planning -----------------------------------------------------------------------------------


def latest_feedback_id(session: Session, until: datetime) -> int | None:
    """The night's cutoff: the newest feedback id given up to `until` (None: no feedback yet)."""
    return session.exec(select(func.max(Feedback.id)).where(col(Feedback.created_at) <= until)).one()


def user_ids(session: Session) -> list[str]:
    return [u.id for u in session.exec(select(User).order_by(col(User.id)))]


def count_feedback(session: Session, user_id: str, through_id: int, after_id: int | None = None) -> int:
    """The user's feedback rows with `after_id` < id <= `through_id` (no lower bound when None)."""
    q = select(func.count()).select_from(Feedback).where(Feedback.user_id == user_id, Feedback.id <= through_id)
    if after_id is not None:
        q = q.where(Feedback.id > after_id)
    return session.exec(q).one()


def user_exists(session: Session, user_id: str) -> bool:
    return session.get(User, user_id) is not None


def incarnation(session: Session, user_id: str) -> datetime | None:
    """Which user holds this id now (their row's creation time); None: nobody."""
    user = session.get(User, user_id)
    return user.created_at if user is not None else None


class UserGone(Exception):
    """The user a night's job was for was deleted (and maybe recreated) while it ran."""


def require_incarnation(session: Session, user_id: str, expected: datetime) -> None:
    """Call inside the transaction that writes for the user: the check and the write commit together."""
    if incarnation(session, user_id) != expected:
        raise UserGone(f"user {user_id} was deleted during the night")


# -- what a user's night trains on ------------------------------------------------------------


def user_examples(session: Session, user_id: str, through_feedback_id: int | None = None) -> list[Example]:
    """The user's labelled examples: the latest feedback on each post wins (a later correction
    supersedes an earlier one), optionally only feedback up to an id (a night's cutoff)."""
    q = select(Feedback, Post).join(Post, Post.id == Feedback.post_id).where(Feedback.user_id == user_id)
    if through_feedback_id is not None:
        q = q.where(Feedback.id <= through_feedback_id)
    latest: dict[int, Example] = {}
    rationales = _rationales(session, user_id)
    for fb, post in session.exec(q.order_by(col(Feedback.id))):
        latest[post.id] = _example(post, fb.label, fb.id, rationales)
    return sorted(latest.values(), key=lambda e: e.id)


def standing_answers(session: Session, user_id: str, cutoff: datetime, through_feedback_id: int) -> list[Example]:
    """The answers the user was served and let stand: their posts up to `cutoff` with no feedback
    up to `through_feedback_id`, labelled with the latest answer served (id 0: no feedback row),
    oldest post first. Feedback is mostly correction, so the labels a user gives are not a fair
    sample of their posts; the answers they let stand are the rest of the picture."""
    corrected = select(Feedback.post_id).where(Feedback.user_id == user_id, Feedback.id <= through_feedback_id)
    rows = session.exec(
        select(Post, Prediction.label)
        .join(Prediction, Post.id == Prediction.post_id)
        .where(Post.user_id == user_id, Post.created_at <= cutoff, col(Post.id).not_in(corrected))
        .order_by(col(Prediction.id))
    )
    latest = {post.id: (post, label) for post, label in rows}  # a post's latest answer wins
    rationales = _rationales(session, user_id)
    return [_example(post, label, 0, rationales) for post, label in sorted(latest.values(), key=lambda r: r[0].id)]


def _rationales(session: Session, user_id: str) -> dict[int, str]:
    """The latest stored rationale of each of the user's posts."""
    return {
        r.post_id: r.text
        for r in session.exec(
            select(Rationale).join(Post, Post.id == Rationale.post_id).where(Post.user_id == user_id).order_by(col(Rationale.id))
        )
    }


def _example(post: Post, label: str, example_id: int, rationales: dict[int, str]) -> Example:
    return Example(
        id=example_id,
        text=post.text,
        aspect=post.aspect,
        label=label,
        image_sha256=post.image_sha256,
        context=post.context,
        rationale=rationales.get(post.id),
        post_id=post.id,
    )


def user_experiences(session: Session, user_id: str) -> list[tuple[int, list[int]]]:
    """The user's earlier experiences: the feedback ids each promoted night trained on,
    keyed by that night's last feedback id (avalanche's experience order)."""
    versions = session.exec(
        select(AdapterVersion)
        .where(
            AdapterVersion.user_id == user_id,
            col(AdapterVersion.status).in_([AdapterStatus.active, AdapterStatus.retired]),
            col(AdapterVersion.trained_through_feedback_id).is_not(None),
        )
        .order_by(col(AdapterVersion.trained_through_feedback_id))
    ).all()
    bounds = sorted({v.trained_through_feedback_id for v in versions})
    ids = [
        f.id for f in session.exec(select(Feedback).where(Feedback.user_id == user_id).order_by(col(Feedback.id)))
    ]
    out, low = [], 0
    for high in bounds:
        out.append((high, [i for i in ids if low < i <= high]))
        low = high
    return out


def accuracy_after_training(session: Session, user_id: str, experience: int) -> float | None:
    """Accuracy on an experience right after the night that trained on it (avalanche's 'initial'):
    recorded in the metrics of the newest adapter trained through that experience's last feedback."""
    row = session.exec(
        select(AdapterVersion).where(
            AdapterVersion.user_id == user_id, AdapterVersion.trained_through_feedback_id == experience
        ).order_by(col(AdapterVersion.version).desc())
    ).first()
    value = (row.metrics or {}).get("accuracy_after_training", {}).get(str(experience)) if row else None
    return float(value) if value is not None else None


# -- the night's record: runs and candidates ---------------------------------------------------


def start_run(session: Session, user_id: str, night_id: str, cutoff: datetime) -> int:
    """A `running` row for one user's update; its id names the run until it finishes."""
    run = TrainingRun(user_id=user_id, night_id=night_id, cutoff=cutoff)
    session.add(run)
    session.flush()
    return run.id


def finish_run(
    session: Session,
    run_id: int,
    status: RunStatus,
    metrics: dict[str, Any],
    *,
    n_new_feedback: int | None = None,
    n_replay: int | None = None,
    adapter_version: int | None = None,
) -> None:
    """Close a run with its outcome (counts and version only when it got that far)."""
    run = session.get(TrainingRun, run_id)
    run.status = status
    if n_new_feedback is not None:
        run.n_new_feedback = n_new_feedback
    if n_replay is not None:
        run.n_replay = n_replay
    if adapter_version is not None:
        run.adapter_version = adapter_version
    run.metrics, run.finished_at = metrics, utcnow()
    session.add(run)


def fail_running_runs(session: Session, night_id: str, user_id: str, error: str) -> None:
    """The user's runs of this night that are still `running`: failed, with the error."""
    for run in session.exec(
        select(TrainingRun).where(
            TrainingRun.night_id == night_id,
            TrainingRun.user_id == user_id,
            TrainingRun.status == RunStatus.running,
        )
    ):
        run.status, run.error, run.finished_at = RunStatus.failed, error[:4000], utcnow()
        session.add(run)


def add_candidate(
    session: Session, user_id: str, version: int, path: str, trained_through_feedback_id: int, metrics: dict[str, Any]
) -> None:
    """Register a candidate adapter whose files are already in place (files first, then the row)."""
    session.add(
        AdapterVersion(
            user_id=user_id,
            version=version,
            path=path,
            trained_through_feedback_id=trained_through_feedback_id,
            metrics=metrics,
        )
    )


def reject_candidate(session: Session, row: AdapterVersion, reason: str) -> None:
    row.status, row.reason = AdapterStatus.rejected, f"rejected: {reason}"
    session.add(row)


def last_night_start(session: Session) -> datetime | None:
    """When the newest recorded night started (its cutoff); None when no night has trained anyone."""
    return session.exec(select(func.max(TrainingRun.cutoff))).one()


def mark_interrupted(session: Session) -> int:
    """Runs and candidates left by a killed night: failed and rejected, so they are never
    mistaken for live ones. Returns the number of runs marked."""
    runs = session.exec(select(TrainingRun).where(TrainingRun.status == RunStatus.running)).all()
    for run in runs:
        run.status, run.error, run.finished_at = RunStatus.failed, "interrupted (the night was killed)", utcnow()
        session.add(run)
    cands = session.exec(select(AdapterVersion).where(AdapterVersion.status == AdapterStatus.candidate)).all()
    for cand in cands:
        cand.status, cand.reason = AdapterStatus.rejected, "interrupted before evaluation finished"
        session.add(cand)
    return len(runs)
