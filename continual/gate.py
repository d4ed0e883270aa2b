"""The gate: tonight's candidate adapter replaces the active one only if it is not worse.

The candidate, the adapter it was trained from and the base model are scored on the same
examples by `UpdateConfig.gate_metric` (macro-F1 by default): tonight's held-back feedback, which
none of them trained on. The candidate is promoted if it is at least as good as both (a tie
promotes): a user is never moved below the base model they started from, nor below last night's
adapter, on the evidence there is. The decision is written in one transaction under the user's
lock, so a rollback that happened while the night trained is seen, and wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nightowl.adapters import registry
from nightowl.adapters.personal import PersonalKit
from nightowl.continual.jobs import UserJob, require_current
from nightowl.memory import night_queries
from nightowl.memory.db import session_scope
from nightowl.memory.examples import Example
from nightowl.memory.models import AdapterVersion, RunStatus
from nightowl.runtime import Runtime
from nightowl.settings import UpdateConfig


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    metrics: dict[str, Any]  # gate_metric, gate_size, gate_candidate_*, gate_active_*


def gate(
    rt: Runtime,
    job: UserJob,
    config: UpdateConfig,
    candidate: torch.nn.Module,
    *,
    version: int,
    run_id: int,
    start: AdapterVersion | None,
    active_version: int | None,
    new: list[Example],
    holdout: list[Example],
    replay: list[Example],
    metrics: dict[str, Any],
) -> RunStatus:
    """Judge candidate `version` against `start` (the adapter it was trained from; None: the
    base), then promote or reject it. `active_version`: the active adapter when the night began.
    `metrics` (the candidate's) gains the gate's figures and is stored on the adapter and the run."""
    start_dir = rt.settings.adapters_dir / start.path if start else None
    verdict = judge(rt.personal, config, candidate, start_dir, start, new, holdout, replay)
    metrics.update(verdict.metrics)
    return decide(rt, job, version, run_id, verdict, active_version, metrics, n_new=len(new), n_replay=len(replay))


def judge(
    kit: PersonalKit,
    config: UpdateConfig,
    candidate: torch.nn.Module,
    start_dir: Path | None,
    start: AdapterVersion | None,
    new: list[Example],
    holdout: list[Example],
    replay: list[Example],
) -> Verdict:
    """Candidate vs the adapter it was trained from and vs the base, on the gate's examples."""
    # Only examples the candidate never trained on show whether it generalises: the user's
    # held-back posts. (Replay was trained on; scoring it favoured every candidate, and let
    # through adapters that served users worse than the base.)
    gate_set, gate_kind = holdout, "the user's held-back posts"
    if not holdout:
        gate_set = new + replay
        gate_kind = f"in-sample new feedback + replay (no held-back posts: fewer than {config.min_examples_for_holdout} examples)"
    metric = config.gate_metric
    cand = kit.scores(candidate, gate_set)
    rivals = {f"active v{start.version}" if start else "base": kit.trainable(start_dir)}
    if start is not None:
        rivals["base"] = kit.trainable(None)  # a fresh adapter: LoRA B = 0, the base's own head
    rival_scores = {name: kit.scores(model, gate_set) for name, model in rivals.items()}
    promoted = all(cand[metric] >= r[metric] for r in rival_scores.values())
    versus = ", ".join(f"{name} {r[metric]:.3f}" for name, r in rival_scores.items())
    reason = f"gate on {len(gate_set)} examples ({gate_kind}), {metric}: candidate {cand[metric]:.3f} vs {versus}"
    active = next(iter(rival_scores.values()))
    figures = {"gate_metric": metric, "gate_size": len(gate_set),
               **{f"gate_candidate_{k}": v for k, v in cand.items()},
               **{f"gate_active_{k}": v for k, v in active.items()}}
    if "base" in rival_scores and start is not None:
        figures.update({f"gate_base_{k}": v for k, v in rival_scores["base"].items()})
    return Verdict(promoted, reason, figures)


def decide(
    rt: Runtime,
    job: UserJob,
    version: int,
    run_id: int,
    verdict: Verdict,
    active_version: int | None,
    metrics: dict[str, Any],
    *,
    n_new: int,
    n_replay: int,
) -> RunStatus:
    """Promote or reject the candidate and close the run, in one transaction."""
    promoted, reason = verdict.promoted, verdict.reason
    with session_scope(rt.engine) as s:
        registry.lock_user(s, job.user_id)  # a rollback of this user waits for this transaction
        require_current(s, job)
        row = registry.get(s, job.user_id, version)
        row.metrics = metrics
        now_active = registry.active(s, job.user_id)
        if promoted and (now_active and now_active.version) != active_version:
            # The user (or an operator) rolled back while we trained: their choice stands.
            promoted = False
            reason = f"the active adapter changed during the night (now {now_active.version if now_active else 'base'}); {reason}"
        if promoted:
            registry.activate(s, job.user_id, version, reason=f"promoted: {reason}")
        else:
            night_queries.reject_candidate(s, row, reason)
        status = RunStatus.promoted if promoted else RunStatus.rejected
        night_queries.finish_run(
            s, run_id, status, metrics, n_new_feedback=n_new, n_replay=n_replay, adapter_version=version
        )
    return status
