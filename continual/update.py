"""One user's nightly update: train a candidate LoRA adapter with avalanche-lib, gate it, promote it.

`update_user` runs these stages in order; each write to the store is a short transaction, so a
kill at any point leaves the active adapter as it was:
1. select examples: the user's examples up to the night's cutoff; "new" = feedback after the
   active adapter's (all of it when the active adapter was trained over another base model);
2. hold back: a fixed share of the user's posts (by a hash of the post id) is never trained on or
   replayed; the gate judges every candidate on all of it (it grows night by night): the labels
   given on those posts and the answers let stand on them; of the rest, the latest answers let
   stand are trained on beside tonight's new labels (`standing_ratio`);
3. select replay: sync the user's FAISS memory with the store and select replay for the new examples;
4. train candidate: the user's label prior is re-estimated and used as a fixed logit offset (last
   night's is taken out of the head first); avalanche: a Naive strategy trains on tonight's
   experience with a ReplayPlugin whose buffer is the FAISS selection (and optional EWC / LwF
   anchored at the starting model);
4b. shrink (`adapter_scales`; none by default): the trained change to the base, scaled by each
   scale, scored on the held-back posts; the smallest of the best is kept;
5. measure forgetting: the same strategy evaluates every earlier experience (one per promoted
   night) and tonight's: accuracy, avalanche's Forgetting and BWT;
6. fold: the offset is folded into the head's bias (the candidate as it will be served);
7. judge (continual.gate.judge): candidate vs the adapter it started from and vs the base, on the
   held-back posts, by `gate_metric` (macro-F1); it passes only if not worse than either and
   clearly right more often than the base where the two disagree (`gate_evidence_z`); if it
   fails, tonight's offsets alone are judged (`fallback_to_prior`): the start adapter with
   tonight's prior, on the held-back posts (`fallback_by_folds`: for a user on the base, the base
   plus the offsets, by folds over all their labels); a user whose adapter the base now clearly beats goes back to it;
8. write candidate: the chosen candidate's files (PEFT layout), then its row;
9. decide (continual.gate.decide): promote it, or reject it with the reason.
"""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.evaluation.metrics import BWT, Forgetting, accuracy_metrics, loss_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from sqlmodel import Session

from nightowl.adapters import registry
from nightowl.adapters.personal import PersonalKit
from nightowl.continual.experiences import ExampleTable, FaissReplayPlugin, IndexedModel
from nightowl.continual.gate import Verdict, decide, gate_score, judge, judge_by_folds
from nightowl.continual.jobs import UserJob, UserResult, require_current
from nightowl.continual.regularizers import AnchoredEWC, anchored_lwf
from nightowl.memory import night_queries
from nightowl.memory.db import session_scope
from nightowl.memory.examples import Example
from nightowl.memory.models import AdapterVersion, RunStatus
from nightowl.memory.replay import ReplayMemory
from nightowl.runtime import Runtime
from nightowl.settings import UpdateConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tonight:
    """What a user's night starts from (stage 1)."""

    start: AdapterVersion | None  # the adapter tonight trains from; None: a fresh one over the base
    start_dir: Path | None
    active_version: int | None  # the active adapter when the night began (None: the base)
    examples: list[Example]  # every example of the user's up to the cutoff
    new: list[Example]  # feedback after the start adapter's
    older: list[Example]  # feedback the start adapter's weights learnt (replay draws from it)
    unlearnt: list[Example]  # feedback its weights did not learn: tonight's training set (held-back posts excepted)
    standing: list[Example]  # answers served and let stand, oldest first (night_queries.standing_answers)
    earlier: list[tuple[int, list[Example]]]  # earlier experiences, keyed by their last feedback id

    @property
    def through(self) -> int:
        """The last feedback id tonight trains on (the candidate's trained_through_feedback_id)."""
        return max(e.id for e in self.new)


@dataclass(frozen=True)
class Split:
    """Tonight's examples by use (stage 2)."""

    holdout: list[Example]  # the gate's evidence: held-back labels and held-back answers let stand
    train_new: list[Example]  # tonight's new labels, held-back ones excepted
    train_standing: list[Example]  # answers let stand, trained on beside train_new

    @property
    def held_post_ids(self) -> set[int]:
        return {e.post_id for e in self.holdout}


@dataclass
class Candidate:
    """Tonight's trained model (stage 4), before its prior offset is folded into the head."""

    peft_model: torch.nn.Module  # the user's classifier (PEFT): what is written, gated and served
    strategy: Naive  # trained on tonight's experience; evaluates the test stream in stage 5
    test_stream: Any  # avalanche's: one experience per earlier night, then tonight's
    adjustment: list[float] | None  # the user's logit offset as served (the prior, moved by the decision offset)
    prior: list[float] | None = None  # the user's label prior, the fixed offset it trained with


def update_user(rt: Runtime, job: UserJob, config: UpdateConfig | None = None) -> UserResult:
    config = config or rt.update_config
    kit = rt.personal  # built (the model loaded) before the seeds are set: training starts from the seed
    t0 = time.perf_counter()
    rng = np.random.default_rng(_seed_for(job))
    torch.manual_seed(_seed_for(job))

    with session_scope(rt.engine) as s:
        require_current(s, job)  # the examples are this user's
        tonight = select_examples(s, job, kit.encoder_id, kit.labels, rt.settings.adapters_dir)
        run_id = night_queries.start_run(s, job.user_id, job.night_id, job.cutoff_time)
    if not tonight.new:
        with session_scope(rt.engine) as s:
            night_queries.finish_run(s, run_id, RunStatus.skipped, {"reason": "no new feedback"})
        return UserResult(job.user_id, RunStatus.skipped)

    with kit.frozen_encoder_states():  # the encoder's states, computed once for the whole night
        split = hold_back(tonight, job.user_id, config)
        replay, replay_info = select_replay(rt.replay_memory, job.user_id, tonight, split, config, rng)
        # Offsets judged by folds are fitted on the base's logits: their candidate is the base plus them.
        start_from = replace(tonight, start=None, start_dir=None) if config.cross_validates_offsets else tonight
        candidate = train_candidate(kit, config, start_from, split, replay, train=config.train_adapter)
        shrunk = shrink_candidate(kit, config, split, candidate) if config.train_adapter else {}
        metrics = {
            "n_new": len(tonight.new),
            "n_train_new": len(split.train_new),
            "n_train_standing": len(split.train_standing),
            "n_holdout": len(split.holdout),
            "replay": replay_info,
            **shrunk,
            **measure_forgetting(rt, job, tonight, candidate),
            "logit_adjustment": candidate.adjustment,  # folded into the head; the next night takes it out
            "label_prior": candidate.prior,
            "base_model": kit.encoder_id,  # the base it was trained over (registry.built_on)
        }
        kit.shift_head_bias(candidate.peft_model, candidate.adjustment)  # as it will be served
        chosen, verdict = judge_candidates(rt, config, job, tonight, split, replay, candidate, metrics)
        version = write_candidate(rt, job, tonight, chosen, metrics, t0)
        status = decide(rt, job, version, run_id, verdict, tonight.active_version, metrics,
                        n_new=len(tonight.new), n_replay=len(replay))
    return UserResult(job.user_id, status, version, metrics, seconds=time.perf_counter() - t0)


# -- the stages, in order ----------------------------------------------------------------------

def select_examples(s: Session, job: UserJob, encoder_id: str, labels: list[str], adapters_dir: Path) -> Tonight:
    """1. The user's examples up to the cutoff, split into new (after the start adapter) and older,
    and the answers they let stand (those in today's label set)."""
    active = registry.active(s, job.user_id)
    # An adapter trained over another base model is no start: train afresh on all feedback.
    start = active if active and registry.built_on(active, encoder_id) else None
    trained_through = start.trained_through_feedback_id if start else 0
    # Offsets over the base learnt nothing into the weights: a LoRA trained from them learns all
    # the feedback (as from the base), not only what came after them.
    learnt_through = 0 if start is None or _over_base(start) else trained_through
    examples = night_queries.user_examples(s, job.user_id, through_feedback_id=job.cutoff_feedback_id)
    standing = night_queries.standing_answers(s, job.user_id, job.cutoff_time, job.cutoff_feedback_id)
    history = night_queries.user_experiences(s, job.user_id)
    by_id = {e.id: e for e in examples}
    earlier = [(key, [by_id[i] for i in ids if i in by_id]) for key, ids in history]
    return Tonight(
        start=start,
        start_dir=adapters_dir / start.path if start else None,
        active_version=active.version if active else None,
        examples=examples,
        new=[e for e in examples if e.id > (trained_through or 0)],
        older=[e for e in examples if e.id <= (learnt_through or 0)],
        unlearnt=[e for e in examples if e.id > (learnt_through or 0)],
        standing=[e for e in standing if e.label in labels],
        earlier=[(key, exs) for key, exs in earlier if exs],
    )


def hold_back(tonight: Tonight, user_id: str, config: UpdateConfig) -> Split:
    """2. The user's held-back posts are a fixed share chosen by a hash of the post id, so a post
    held back once is held back every night: no candidate, no earlier adapter and not the base
    ever trained on them, and the gate's evidence grows with the user's history instead of being
    a fifth of tonight's few. A user with fewer labelled examples than `min_examples_for_holdout`
    has none held back. Of the answers let stand and not held back, the latest are trained on:
    at most `standing_ratio` per new label."""
    use_standing = config.standing_ratio > 0
    no_holdout = config.cross_validates_offsets  # the folds judge every post; the fit uses them all
    if no_holdout or len(tonight.examples) < config.min_examples_for_holdout or config.holdout_fraction <= 0:
        holdout: list[Example] = []
    else:
        candidates = tonight.examples + (tonight.standing if use_standing else [])
        holdout = [e for e in candidates if is_held_back(user_id, e, config.holdout_fraction)]
    held = {e.post_id for e in holdout}
    train_new = [e for e in tonight.unlearnt if e.post_id not in held]
    n_standing = int(np.ceil(config.standing_ratio * len(train_new))) if use_standing else 0
    free = [e for e in tonight.standing if e.post_id not in held]
    return Split(holdout, train_new, free[::-1][:n_standing])


def is_held_back(user_id: str, example: Example, fraction: float) -> bool:
    """Whether a user's example belongs to their held-back share (stable across nights and
    relabellings: keyed by the post, not by the feedback)."""
    if example.post_id is None:
        return False
    return zlib.crc32(f"holdout/{user_id}/{example.post_id}".encode()) % 10_000 < fraction * 10_000


def select_replay(
    memory: ReplayMemory,
    user_id: str,
    tonight: Tonight,
    split: Split,
    config: UpdateConfig,
    rng: np.random.Generator,
) -> tuple[list[Example], dict]:
    """3. Older examples to train on beside the new ones (and the selection's make-up). The
    held-back slice is never replayed: the gate must score it unseen."""
    index = memory.sync_user(user_id, tonight.examples)
    held = split.held_post_ids
    train_new = split.train_new
    older = [e for e in tonight.older if e.post_id not in held]
    if config.replay == "none":
        return [], {"kind": "none"}
    if config.replay == "random":
        n = min(len(older), config.neighbours_per_new * len(train_new) + int(np.ceil(config.random_ratio * len(train_new))))
        picks = rng.choice(len(older), size=n, replace=False).tolist() if n else []
        chosen = [older[i] for i in sorted(picks)]
        _, glob = memory.load_global()
        if glob and config.n_global:
            gp = rng.choice(len(glob), size=min(config.n_global, len(glob)), replace=False)
            chosen += [glob[int(i)] for i in gp]
        return chosen, {"kind": "random", "user": n, "global": len(chosen) - n}
    sel = memory.select_replay(
        index,
        [e.id for e in train_new],
        neighbours_per_new=config.neighbours_per_new,
        random_ratio=config.random_ratio,
        n_global=config.n_global,
        rng=rng,
        exclude=[e.id for e in tonight.examples if e.post_id in held],
    )
    by_id = {e.id: e for e in tonight.examples}
    chosen = [by_id[i] for i in sel.user_ids if i in by_id] + sel.global_examples
    info = {"kind": "faiss", "neighbours": len(sel.neighbour_ids), "random": len(sel.random_ids), "global": len(sel.global_examples)}
    return chosen, info


def train_candidate(
    kit: PersonalKit,
    config: UpdateConfig,
    tonight: Tonight,
    split: Split,
    replay: list[Example],
    train: bool = True,
    offsets: tuple[list[float] | None, list[float] | None] | None = None,
) -> Candidate:
    """4. Avalanche trains the user's adapter on tonight's experience (new labels and answers let
    stand), with replay mixed in. `train=False`: the start adapter with tonight's offsets alone
    (the fallback candidate of stage 7). `offsets`: (prior, served) when already computed
    tonight (user_offsets)."""
    table = ExampleTable()
    train_new = split.train_new
    train_ds = table.dataset(train_new + split.train_standing, kit.labels)
    # Tonight's experience, as forgetting measures it later: the labels the user gave.
    eval_sets = [table.dataset(exs, kit.labels) for _, exs in tonight.earlier] + [table.dataset(train_new, kit.labels)]

    # The user's prior correction: taken out of the current adapter's head, re-estimated from
    # the user's posts up to tonight's cutoff (the labels they gave and the answers they let
    # stand, held-back posts excepted: the gate judges on those), used as a fixed offset while
    # training and folded back into the head once trained.
    start = tonight.start
    previous_adjustment = (start.metrics or {}).get("logit_adjustment") if start else None
    prior, served = offsets or user_offsets(kit, config, tonight, split)
    peft_model = kit.trainable(tonight.start_dir)
    kit.shift_head_bias(peft_model, previous_adjustment, sign=-1.0)
    model = IndexedModel(peft_model, table, kit, prior)
    plugins = _continual_plugins(kit, config, model, table, replay)
    evaluator = _metrics_without_loggers()
    params = [p for p in model.parameters() if p.requires_grad]
    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=config.batch_size,
        train_epochs=config.epochs,
        eval_mb_size=64,
        device=kit.device,
        plugins=plugins,
        evaluator=evaluator,
    )
    bench = benchmark_from_datasets(train=[train_ds] if train_new else [], test=eval_sets)
    if train_new and train:
        strategy.train(bench.train_stream[0])
    if served:  # forgetting is measured on the answers as they will be served
        model.logit_offset.copy_(torch.tensor(served))
    return Candidate(peft_model, strategy, bench.test_stream, served, prior)


def shrink_candidate(kit: PersonalKit, config: UpdateConfig, split: Split, candidate: Candidate) -> dict[str, Any]:
    """4b. The trained adapter's change to the base, scaled by each of `adapter_scales` and scored
    on the held-back posts with tonight's offset (as it will be served); the smallest scale that
    scores best is kept (in place). A change the held-back posts do not show to pay is shrunk away,
    and the answers a shrunk adapter still moves are those it moves most. Returns the metrics
    entries (none when nothing is tried: no scales, or no held-back posts)."""
    holdout = split.holdout
    if not config.adapter_scales or not holdout:
        return {}
    gold = [kit.labels.index(e.label) for e in holdout]
    base_pred = kit.base_logits(holdout).argmax(-1).tolist()
    path = kit.shrink_path(candidate.peft_model)
    marks = {}
    for scale in config.adapter_scales:
        path.set(scale)
        pred = kit.predictions(candidate.peft_model, holdout, candidate.adjustment)
        marks[scale] = gate_score(config, kit.base_error, holdout, gold, pred, base_pred, len(kit.labels))
    best = max(marks.values())
    chosen = min(scale for scale, mark in marks.items() if mark >= best - 1e-9)
    path.set(chosen)
    return {"adapter_scale": chosen, "adapter_scale_scores": {str(scale): mark for scale, mark in marks.items()}}


def user_offsets(kit: PersonalKit, config: UpdateConfig, tonight: Tonight, split: Split) -> tuple[list[float] | None, list[float] | None]:
    """4a. The user's logit offsets, from their posts up to tonight's cutoff (the labels they
    gave and the answers they let stand, held-back posts excepted: the gate judges on those):
    the label prior (`prior_strength`), a fixed offset while training, so that training learns
    only what the prior doesn't explain; and the offset served, folded into the head once
    trained: the prior, moved by the decision offset for `gate_metric` (`decision_offset`)."""
    held = split.held_post_ids
    return fit_offsets(kit, config, [e for e in tonight.examples + tonight.standing if e.post_id not in held])


def fit_offsets(kit: PersonalKit, config: UpdateConfig, seen: list[Example],
                logits: torch.Tensor | None = None) -> tuple[list[float] | None, list[float] | None]:
    """The offsets recipe of 4a on the posts `seen` (`logits`: the base's for them, when already
    computed): (the label prior, the offset served)."""
    prior = kit.prior_adjustment([e.label for e in seen], config.prior_strength) if config.prior_strength > 0 else None
    if not config.decision_offset:
        return prior, prior
    return prior, kit.decision_offset(seen, prior, config.gate_metric, config.decision_penalty, logits)


def measure_forgetting(rt: Runtime, job: UserJob, tonight: Tonight, candidate: Candidate) -> dict[str, Any]:
    """5. Accuracy on every earlier experience and on tonight's; forgetting and BWT against each
    earlier experience's accuracy right after the night that trained on it."""
    eval_results = candidate.strategy.eval(candidate.test_stream)
    n_earlier = len(tonight.earlier)
    exp_acc = _experience_accuracies(eval_results, n_earlier + 1)

    forgetting, bwt = Forgetting(), BWT()
    with session_scope(rt.engine) as s:
        initials = [night_queries.accuracy_after_training(s, job.user_id, key) for key, _ in tonight.earlier]
    for k, initial in enumerate(initials):
        if initial is not None:
            for metric in (forgetting, bwt):
                metric.update(k, initial, initial=True)
                metric.update(k, exp_acc[k])
    f_values, b_values = forgetting.result(), bwt.result()
    keys = [str(key) for key, _ in tonight.earlier]
    return {
        "experience_accuracy": {keys[k]: exp_acc[k] for k in range(n_earlier)},
        "accuracy_after_training": {str(tonight.through): exp_acc[n_earlier]},
        "forgetting": {keys[k]: v for k, v in f_values.items()},
        "bwt": {keys[k]: v for k, v in b_values.items()},
        "forgetting_mean": float(np.mean(list(f_values.values()))) if f_values else None,
        "bwt_mean": float(np.mean(list(b_values.values()))) if b_values else None,
    }


def judge_candidates(
    rt: Runtime, config: UpdateConfig, job: UserJob, tonight: Tonight, split: Split, replay: list[Example],
    trained: Candidate, metrics: dict,
) -> tuple[Candidate, Verdict]:
    """7. The gate judges tonight's trained candidate (continual.gate.judge); if it turns it
    down, and does not send the user back to the base, the user's logit offsets alone are judged
    (`fallback_to_prior`): the low-variance part of a night (a number per label), which, tied to
    the trained candidate, was lost whenever the gate turned the training down: the adapter the
    night started from with tonight's prior, judged on the held-back posts; with
    `fallback_by_folds`, a user whose night starts from the base (or from offsets over it) gets the
    base plus tonight's offsets, judged by folds over all their labels. Offsets without a LoRA
    (`train_adapter` false) are judged by folds alone. `metrics` gains the chosen candidate's
    gate figures (and its own forgetting figures, when it is the fallback)."""
    if config.cross_validates_offsets:
        verdict = _offsets_by_folds(rt, config, job, tonight)
        metrics.update(verdict.metrics, candidate_kind="offsets_only")
        return trained, verdict
    judged = partial(judge, rt.personal, config, start_dir=tonight.start_dir, start=tonight.start,
                     new=tonight.new, holdout=split.holdout, replay=replay)
    verdict = judged(trained.peft_model)
    wants_fallback = (not (verdict.promoted or verdict.back_to_base) and config.fallback_to_prior
                      and config.train_adapter and trained.adjustment)  # untrained: it was the offsets alone
    if wants_fallback and config.fallback_by_folds and config.gate_folds >= 2 and starts_over_base(tonight):
        over_base = replace(tonight, start=None, start_dir=None)
        offsets = fit_offsets(rt.personal, config, tonight.examples + tonight.standing)  # the folds judge them all
        candidate = train_candidate(rt.personal, config, over_base, split, [], train=False, offsets=offsets)
        forgetting = measure_forgetting(rt, job, tonight, candidate)
        rt.personal.shift_head_bias(candidate.peft_model, candidate.adjustment)
        fallback = _offsets_by_folds(rt, config, job, tonight)
        if fallback.promoted or fallback.back_to_base:
            metrics.update(forgetting, **fallback.metrics, candidate_kind="offsets_over_base",
                           trained_candidate_rejected=verdict.reason, logit_adjustment=candidate.adjustment,
                           label_prior=candidate.prior)
            reason = f"the base with the user's logit offsets (the trained candidate was turned down): {fallback.reason}"
            return candidate, replace(fallback, reason=reason)
    elif wants_fallback:
        prior_only = train_candidate(rt.personal, config, tonight, split, [], train=False,
                                     offsets=(trained.prior, trained.adjustment))
        forgetting = measure_forgetting(rt, job, tonight, prior_only)
        rt.personal.shift_head_bias(prior_only.peft_model, prior_only.adjustment)
        fallback = judged(prior_only.peft_model)
        if fallback.promoted:
            metrics.update(forgetting, **fallback.metrics, candidate_kind="prior_only", trained_candidate_rejected=verdict.reason)
            reason = f"the user's logit offsets alone (the trained candidate was turned down): {fallback.reason}"
            return prior_only, Verdict(True, reason, False, fallback.metrics)
    metrics.update(verdict.metrics, candidate_kind="trained" if config.train_adapter else "offsets_only")
    return trained, verdict


def starts_over_base(tonight: Tonight) -> bool:
    """Whether the night starts from the base model itself or from logit offsets over it (no
    trained adapter): the base's logits are then what the user is served, before any offset."""
    return tonight.start is None or _over_base(tonight.start)


OVER_BASE = ("offsets_only", "offsets_over_base")  # candidate kinds that are the base plus offsets


def _over_base(version: AdapterVersion) -> bool:
    return (version.metrics or {}).get("candidate_kind") in OVER_BASE


def _offsets_by_folds(rt: Runtime, config: UpdateConfig, job: UserJob, tonight: Tonight) -> Verdict:
    """Tonight's offsets recipe (4a) judged by folds over every label and answer let stand."""
    def served(seen: list[Example], logits: torch.Tensor) -> list[float] | None:
        return fit_offsets(rt.personal, config, seen, logits)[1]

    return judge_by_folds(rt.personal, config, job.user_id, tonight.examples, tonight.standing, served,
                          start=tonight.start)


def write_candidate(rt: Runtime, job: UserJob, tonight: Tonight, candidate: Candidate, metrics: dict, t0: float) -> int:
    """8. The chosen candidate's files first (PEFT layout, the prior folded into its head), then
    its row: a kill in between leaves files that no row names. Returns its version. `metrics`
    gains train_seconds: the time from the job's start until the files are written."""
    with session_scope(rt.engine) as s:
        require_current(s, job)
        version = registry.next_version(s, job.user_id)
    rel = registry.write_version_files(rt.settings.adapters_dir, job.user_id, version, candidate.peft_model.save_pretrained)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 2)
    with session_scope(rt.engine) as s:
        require_current(s, job)  # a new user of this id owns no old labels
        night_queries.add_candidate(s, job.user_id, version, rel, tonight.through, metrics)
    return version


# 9. promote or reject: continual.gate.decide


# -- helpers -----------------------------------------------------------------------------------

def _seed_for(job: UserJob) -> int:
    return zlib.crc32(f"{job.night_id}/{job.user_id}".encode())


def _continual_plugins(kit: PersonalKit, config: UpdateConfig, model: IndexedModel, table: ExampleTable,
                       replay: list[Example]) -> list:
    """Replay (tonight's FAISS selection, mixed in by avalanche) and the optional anchored EWC / LwF."""
    plugins: list = []
    if replay:
        replay_ds = table.dataset(replay, kit.labels)
        plugins.append(FaissReplayPlugin(replay_ds, config.batch_size))
        if config.ewc_lambda > 0:  # importances need older examples: the replay selection
            plugins.append(AnchoredEWC(config.ewc_lambda, model, replay_ds, kit.device, config.batch_size))
    if config.lwf_alpha > 0:
        plugins.append(anchored_lwf(model, config.lwf_alpha))
    return plugins


def _experience_accuracies(results: dict, n: int) -> list[float]:
    out = []
    for k in range(n):
        key = next((name for name in results if name.startswith("Top1_Acc_Exp/") and name.endswith(f"Exp{k:03d}")), None)
        out.append(float(results[key]) if key is not None else float("nan"))
    return out


def _metrics_without_loggers() -> EvaluationPlugin:
    """Avalanche's metrics, read back from `strategy.eval`'s return value and stored with the run.
    No logger is wanted (a night prints nothing), so avalanche's "no loggers" warning is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)
        return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(stream=True), loggers=[])
