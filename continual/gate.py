"""The gate: tonight's candidate adapter replaces the active one only if it is not worse.

The candidate, the adapter it was trained from and the base model are scored on the same
examples by `UpdateConfig.gate_metric` (macro-F1 by default): the user's held-back posts (the
labels they gave there and the answers they let stand there), which none of them trained on. The
candidate is promoted if it is at least as good as both (a tie promotes) and, where it and the
base disagree, it is right clearly more often than the base (`gate_evidence_z`, a sign test): a
user is never moved below the base model they started from, nor below last night's adapter, on
the evidence there is; and a user whose adapter the base now clearly beats (the same test, the
other way round) is sent back to the base. Offsets over the base are judged instead by folds
over all the user's posts (`judge_by_folds`, `gate_folds`). `judge` scores a candidate (continual.update judges the
trained one, then, if need be, the user's logit offsets alone); `decide` writes the decision in one transaction under the user's lock, so a
rollback that happened while the night trained is seen, and wins.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nightowl.adapters import registry
from nightowl.adapters.personal import PersonalKit
from nightowl.adapters.train import scores
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
    back_to_base: bool  # not promoted, and the base now beats the adapter the user is on
    metrics: dict[str, Any]  # gate_metric, gate_size, gate_candidate_*, gate_active_*


def judge(
    kit: PersonalKit,
    config: UpdateConfig,
    candidate: torch.nn.Module,
    *,
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
    models = {"candidate": candidate, f"active v{start.version}" if start else "base": kit.trainable(start_dir)}
    if start is not None:
        models["base"] = kit.trainable(None)  # a fresh adapter: LoRA B = 0, the base's own head
    preds = {name: kit.predictions(model, gate_set) for name, model in models.items()}
    gold = [kit.labels.index(e.label) for e in gate_set]
    doubt = silence_doubt(config, kit.base_error, gate_set, gold, preds["base"])
    gold, weights, at = doubted(gate_set, gold, doubt, len(kit.labels))
    preds = {name: [pred[i] for i in at] for name, pred in preds.items()}
    marks = {name: _marks(gold, pred, len(kit.labels), weights) for name, pred in preds.items()}
    cand = marks.pop("candidate")
    not_worse = all(cand[metric] >= r[metric] for r in marks.values())
    evidence = sign_test(gold, preds["candidate"], preds["base"], config.gate_evidence_z, weights)
    promoted = not_worse and evidence["passed"]
    # The held-back evidence grows every night: an adapter promoted on a few posts may since have
    # fallen behind the base; the same test, the other way round, sends the user back to it.
    back_to_base = False
    if start is not None and not promoted:
        against = sign_test(gold, preds["base"], preds[f"active v{start.version}"], config.gate_evidence_z, weights)
        back_to_base = config.gate_evidence_z > 0 and against["passed"]
    versus = ", ".join(f"{name} {r[metric]:.3f}" for name, r in marks.items())
    reason = f"gate on {len(gate_set)} examples ({gate_kind}), {metric}: candidate {cand[metric]:.3f} vs {versus}"
    if not evidence["passed"]:
        reason += (f"; not enough evidence against the base: right where it is wrong on {evidence['wins']}, "
                   f"wrong where it is right on {evidence['losses']} (needs a margin of z={evidence['z']:g})")
    active = next(iter(marks.values()))
    if back_to_base:
        reason += (f"; the base beats active v{start.version} on the evidence (right where it is wrong on "
                   f"{against['wins']}, wrong where it is right on {against['losses']}): back to the base")
    if doubt:
        reason += f"; answers let stand doubted: {doubt:.2f} of them taken as wrong"
    figures = {"gate_metric": metric, "gate_size": len(gate_set), "gate_evidence": evidence, "back_to_base": back_to_base,
               "gate_silence_doubt": doubt,
               **{f"gate_candidate_{k}": v for k, v in cand.items()},
               **{f"gate_active_{k}": v for k, v in active.items()}}
    if "base" in marks and start is not None:
        figures.update({f"gate_base_{k}": v for k, v in marks["base"].items()})
    return Verdict(promoted, reason, back_to_base, figures)


def judge_by_folds(
    kit: PersonalKit,
    config: UpdateConfig,
    user_id: str,
    labelled: list[Example],
    standing: list[Example],
    fit: Callable[[list[Example], torch.Tensor], list[float] | None],
    *,
    start: AdapterVersion | None,
) -> Verdict:
    """The user's logit offsets over the base, judged by cross-validation (`gate_folds`): the
    offsets `fit` on the other folds answer each fold, so every label the user gave and every
    answer they let stand is evidence, not a held-back fifth of them. The base's logits never
    trained on the user's posts, which is what makes every fold clean. The same rules as `judge`
    then apply against the base: not worse by `gate_metric` and right clearly more often where
    the two disagree; a user on earlier offsets whom the base now clearly beats goes back to it.
    (Earlier offsets were fitted on part of tonight's data by the same recipe: tonight's folds
    judge the recipe, on more evidence than they had.)

    An answer let stand is evidence for the answer served, and the base's answers are the only
    ones it can vouch for here: where the served answer was not the base's (the user was on
    earlier offsets), silence would confirm those offsets by construction, so such posts are fitted
    on but not judged on."""
    examples = labelled + standing
    logits = kit.base_logits(examples)
    base_pred = logits.argmax(-1).tolist()
    gold = [kit.labels.index(e.label) for e in examples]
    folds = [fold_of(user_id, e, config.gate_folds) for e in examples]
    oof = list(base_pred)
    for k in range(config.gate_folds):
        fit_on = [i for i, f in enumerate(folds) if f != k]
        judged = [i for i, f in enumerate(folds) if f == k]
        if not judged or not fit_on:
            continue
        offsets = fit([examples[i] for i in fit_on], logits[fit_on])
        shifted = logits[judged] + torch.tensor(offsets or [0.0] * len(kit.labels), dtype=logits.dtype)
        for i, p in zip(judged, shifted.argmax(-1).tolist()):
            oof[i] = p
    vouched = [i for i in range(len(examples)) if i < len(labelled) or gold[i] == base_pred[i]]
    gold, oof, base_pred = ([xs[i] for i in vouched] for xs in (gold, oof, base_pred))
    n_labels, metric, z = len(kit.labels), config.gate_metric, config.gate_evidence_z
    cand, base = ({k: scores(gold, pred, n_labels)[k] for k in ('accuracy', 'macro_f1')} for pred in (oof, base_pred))
    evidence = sign_test(gold, oof, base_pred, z)
    promoted = cand[metric] >= base[metric] and evidence["passed"]
    against = sign_test(gold, base_pred, oof, z)
    back_to_base = start is not None and not promoted and z > 0 and against["passed"]
    reason = (f"gate by {config.gate_folds}-fold cross-validation over {len(gold)} examples "
              f"({len(labelled)} labels, {len(gold) - len(labelled)} answers let stand), {metric}: "
              f"offsets out of fold {cand[metric]:.3f} vs base {base[metric]:.3f}; right where the base is wrong "
              f"on {evidence['wins']}, wrong where it is right on {evidence['losses']}")
    if not evidence["passed"]:
        reason += f" (not enough evidence against the base: needs a margin of z={z:g})"
    if back_to_base:
        reason += "; the base beats the offsets on the evidence: back to the base"
    figures = {"gate_metric": metric, "gate_size": len(gold), "gate_folds": config.gate_folds, "gate_evidence": evidence,
               "back_to_base": back_to_base, **{f"gate_candidate_{k}": v for k, v in cand.items()},
               **{f"gate_base_{k}": v for k, v in base.items()}}
    return Verdict(promoted, reason, back_to_base, figures)


def gate_score(config: UpdateConfig, base_error: float | None, examples: list[Example], gold: list[int],
               pred: list[int], base_pred: list[int], n_labels: int) -> float:
    """`gate_metric` of the answers `pred` on the gate's `examples`, answers let stand doubted as
    `judge` doubts them (`base_pred`: the base's answers, which the doubt is about)."""
    doubt = silence_doubt(config, base_error, examples, gold, base_pred)
    golds, weights, at = doubted(examples, gold, doubt, n_labels)
    return _marks(golds, [pred[i] for i in at], n_labels, weights)[config.gate_metric]


def _marks(gold: list[int], pred: list[int], n_labels: int, weights: list[float]) -> dict[str, float]:
    if not gold:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    s = scores(gold, pred, n_labels, weights)
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}


def silence_doubt(
    config: UpdateConfig, base_error: float | None, examples: list[Example], gold: list[int], base_pred: list[int]
) -> float:
    """The share of the answers let stand among `examples` that were wrong, estimated (`doubt_silence`).

    A user corrects some wrong answers and lets the rest stand, so silence is not agreement. The
    base's error on its own selection data says how many of these posts it answered wrongly
    (error x posts); the labels that show it wrong account for some of them; the rest stood.
    0 with doubt_silence off, nothing let stand, or no recorded error (a base trained without a
    selection split); at most 0.5 (silence never counts against the answer it let stand)."""
    standing = sum(1 for e in examples if e.id == 0)
    if not config.doubt_silence or not standing or base_error is None:
        return 0.0
    shown_wrong = sum(1 for e, g, b in zip(examples, gold, base_pred) if e.id != 0 and g != b)
    return min(0.5, max(0.0, (base_error * len(examples) - shown_wrong) / standing))


def doubted(
    examples: list[Example], gold: list[int], doubt: float, n_labels: int
) -> tuple[list[int], list[float], list[int]]:
    """The gate's examples as (gold, weight, index of the example) triples, in three lists: a label
    the user gave is one example of weight 1; an answer let stand, with `doubt` > 0, is split over
    the labels: its own with weight 1 - doubt, each other with doubt / (labels - 1)."""
    golds, weights, at = [], [], []
    for i, (e, g) in enumerate(zip(examples, gold)):
        if e.id != 0 or doubt <= 0:
            golds.append(g), weights.append(1.0), at.append(i)
            continue
        for k in range(n_labels):
            golds.append(k), weights.append(1.0 - doubt if k == g else doubt / (n_labels - 1)), at.append(i)
    return golds, weights, at


def fold_of(user_id: str, example: Example, folds: int) -> int:
    """An example's cross-validation fold: by a hash of its post (a relabelled post stays in its
    fold), the same every night."""
    return zlib.crc32(f"fold/{user_id}/{example.post_id}".encode()) % folds


def sign_test(
    gold: list[int], candidate: list[int], base: list[int], z: float, weights: list[float] | None = None
) -> dict[str, Any]:
    """Whether the candidate beats the base where the two disagree: right on `wins` posts the
    base gets wrong, wrong on `losses` it gets right; passed if wins - losses >= z * sqrt(wins +
    losses) and wins > losses (a one-sided sign test; z = 0 leaves it to the metric alone).
    `weights` count each example as that much of one (`doubted`)."""
    weights = weights if weights is not None else [1] * len(gold)
    wins = sum(w for g, c, b, w in zip(gold, candidate, base, weights) if c == g != b)
    losses = sum(w for g, c, b, w in zip(gold, candidate, base, weights) if b == g != c)
    passed = z <= 0 or (wins > losses and wins - losses >= z * math.sqrt(wins + losses))
    return {"wins": round(wins, 3), "losses": round(losses, 3), "z": z, "passed": passed}


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
            if verdict.back_to_base and (now_active and now_active.version) == active_version:
                registry.rollback(s, job.user_id, None, rt.settings.adapters_dir, reason=f"back to the base model: {reason}")
        status = RunStatus.promoted if promoted else RunStatus.rejected
        night_queries.finish_run(
            s, run_id, status, metrics, n_new_feedback=n_new, n_replay=n_replay, adapter_version=version
        )
    return status
