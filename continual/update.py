"""One user's nightly update: train a candidate LoRA adapter with avalanche-lib, gate it, promote it.

Steps (each a short transaction, so a kill at any point leaves the active adapter as it was):
1. the user's examples up to the night's cutoff; "new" = feedback after the active adapter's
   (all of it when the active adapter was trained over another base model);
2. a held-back slice of the new feedback is kept out of training (and out of replay) for the gate;
3. sync the user's FAISS memory with the store and select replay for the new examples;
4. the user's label prior is re-estimated and used as a fixed logit offset (last night's is
   taken out of the head first);
5. avalanche: a Naive strategy trains on tonight's experience with a ReplayPlugin whose buffer
   is the FAISS selection (and optional EWC / LwF anchored at the starting model), then is
   evaluated on every earlier experience (one per promoted night) for accuracy, forgetting, BWT;
   the offset is folded into the head's bias;
6. the candidate's files are written (PEFT layout) and registered as a candidate;
7. gate: candidate vs active on held-back + replay by macro-F1; promoted only if not worse,
   else rejected with the reason.
"""

from __future__ import annotations

import logging
import time
import zlib

import numpy as np
import torch
from avalanche.evaluation.metrics import BWT, Forgetting, accuracy_metrics, loss_metrics
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.supervised import Naive
from sqlmodel import col, select

from nightowl.adapters import registry
from nightowl.settings import UpdateConfig
from nightowl.continual.experiences import ExampleTable, FaissReplayBuffer, IndexedModel, user_experiences
from nightowl.continual.night import UserJob, UserResult
from nightowl.continual.regularizers import AnchoredEWC, anchored_lwf
from nightowl.memory.db import session_scope
from nightowl.memory.models import AdapterStatus, AdapterVersion, RunStatus, TrainingRun, utcnow
from nightowl.memory.replay import Example, served_labels_not_corrected, user_examples
from nightowl.runtime import Runtime

log = logging.getLogger(__name__)


def _seed_for(job: UserJob) -> int:
    return zlib.crc32(f"{job.night_id}/{job.user_id}".encode())


def update_user(rt: Runtime, job: UserJob, config: UpdateConfig | None = None) -> UserResult:
    config = config or rt.update_config
    kit = rt.personal
    t0 = time.perf_counter()
    rng = np.random.default_rng(_seed_for(job))
    torch.manual_seed(_seed_for(job))

    with session_scope(rt.engine) as s:
        current = registry.active(s, job.user_id)
        # An adapter trained over another base model is no start: train afresh on all feedback.
        start = current if current and registry.built_on(current, kit.encoder_id) else None
        current_dir = rt.settings.adapters_dir / start.path if start else None
        trained_through = start.trained_through_feedback_id if start else 0
        examples = user_examples(s, job.user_id, through_feedback_id=job.cutoff_feedback_id)
        uncorrected = served_labels_not_corrected(s, job.user_id, job.cutoff_time, job.cutoff_feedback_id)
        history = user_experiences(s, job.user_id)
        run = TrainingRun(user_id=job.user_id, night_id=job.night_id, cutoff=job.cutoff_time)
        s.add(run)
        s.flush()
        run_id = run.id

    new = [e for e in examples if e.id > (trained_through or 0)]
    older = [e for e in examples if e.id <= (trained_through or 0)]
    if not new:
        _finish_run(rt, run_id, RunStatus.skipped, {"reason": "no new feedback"})
        return UserResult(job.user_id, RunStatus.skipped)

    # -- held-back slice and replay ----------------------------------------------------------
    holdout: list[Example] = []
    if len(new) >= config.min_new_for_holdout:
        n_hold = max(1, round(config.holdout_fraction * len(new)))
        picks = set(rng.choice(len(new), size=n_hold, replace=False).tolist())
        holdout = [e for i, e in enumerate(new) if i in picks]
    train_new = [e for e in new if e not in holdout]

    memory = rt.replay_memory
    index = memory.sync_user(job.user_id, examples)
    by_id = {e.id: e for e in examples}
    replay, selection_info = _select_replay(memory, index, older, train_new, holdout, config, rng, by_id)

    # -- avalanche: experiences, strategy with the FAISS replay buffer, evaluation -----------
    table = ExampleTable()
    train_ds = table.dataset(train_new, kit.labels)
    earlier = [(key, [by_id[i] for i in ids if i in by_id]) for key, ids in history]
    earlier = [(key, exs) for key, exs in earlier if exs]
    eval_sets = [table.dataset(exs, kit.labels) for _, exs in earlier] + [train_ds]

    # The user's prior correction: taken out of the current adapter's head, re-estimated from
    # the user's posts up to tonight's cutoff (the labels they gave, held-back ones excepted, and
    # the answers they let stand), used as a fixed offset while training and folded back into
    # the head once trained.
    previous_adjustment = (start.metrics or {}).get("logit_adjustment") if start else None
    adjustment = None
    if config.prior_strength > 0:
        given = [e.label for e in examples if e not in holdout]
        adjustment = kit.prior_adjustment(given + [x for x in uncorrected if x in kit.labels], config.prior_strength)
    peft_model = kit.trainable(current_dir)
    kit.shift_head_bias(peft_model, previous_adjustment, sign=-1.0)
    model = IndexedModel(peft_model, table, kit, adjustment)
    plugins = []
    if replay:
        replay_ds = table.dataset(replay, kit.labels)
        buffer = FaissReplayBuffer(replay_ds)
        plugins.append(
            ReplayPlugin(mem_size=buffer.max_size, batch_size=config.batch_size, batch_size_mem=config.batch_size, storage_policy=buffer)
        )
        if config.ewc_lambda > 0:  # importances need older examples: the replay selection
            plugins.append(AnchoredEWC(config.ewc_lambda, model, replay_ds, kit.device, config.batch_size))
    if config.lwf_alpha > 0:
        plugins.append(anchored_lwf(model, config.lwf_alpha))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loss_metrics(stream=True), loggers=[])
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
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    bench = benchmark_from_datasets(train=[train_ds] if train_new else [], test=eval_sets)
    if train_new:
        strategy.train(bench.train_stream[0])
    eval_results = strategy.eval(bench.test_stream)
    exp_acc = _experience_accuracies(eval_results, len(eval_sets))
    kit.shift_head_bias(peft_model, adjustment)

    forgetting, bwt = Forgetting(), BWT()
    for k, (key, _) in enumerate(earlier):
        initial = _initial_accuracy(rt, job.user_id, key)
        if initial is not None:
            for metric in (forgetting, bwt):
                metric.update(k, initial, initial=True)
                metric.update(k, exp_acc[k])
    f_values, b_values = forgetting.result(), bwt.result()

    # -- the candidate: files first, then its row ---------------------------------------------
    with session_scope(rt.engine) as s:
        version = registry.next_version(s, job.user_id)
    rel = registry.write_version_files(rt.settings.adapters_dir, job.user_id, version, peft_model.save_pretrained)
    through = max(e.id for e in new)
    own_key = str(through)
    metrics = {
        "n_new": len(new),
        "n_train_new": len(train_new),
        "n_holdout": len(holdout),
        "replay": selection_info,
        "experience_accuracy": {str(key): exp_acc[k] for k, (key, _) in enumerate(earlier)},
        "accuracy_after_training": {own_key: exp_acc[len(eval_sets) - 1]},
        "forgetting": {str(earlier[k][0]): v for k, v in f_values.items()},
        "bwt": {str(earlier[k][0]): v for k, v in b_values.items()},
        "forgetting_mean": float(np.mean(list(f_values.values()))) if f_values else None,
        "bwt_mean": float(np.mean(list(b_values.values()))) if b_values else None,
        "logit_adjustment": adjustment,
        "base_model": kit.encoder_id,  # the base it was trained over (registry.built_on)
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    with session_scope(rt.engine) as s:
        s.add(
            AdapterVersion(
                user_id=job.user_id, version=version, path=rel, trained_through_feedback_id=through, metrics=metrics
            )
        )

    # -- the gate ------------------------------------------------------------------------------
    # Held-back new feedback shows whether it learned tonight's lesson; replay (the user's older
    # examples and a few global ones) shows whether it kept the old ones.
    gate_set = holdout + replay
    gate_kind = "held-back new feedback + replay"
    if not holdout:
        gate_set = new + replay
        gate_kind = f"in-sample new feedback + replay (fewer than {config.min_new_for_holdout} new examples)"
    cand = kit.scores(peft_model, gate_set)
    active_model = kit.trainable(current_dir)  # the active adapter (or the base) on the same slice
    active = kit.scores(active_model, gate_set)
    metric = config.gate_metric
    promoted = cand[metric] >= active[metric]
    reason = (
        f"gate on {len(gate_set)} examples ({gate_kind}), {metric}: candidate {cand[metric]:.3f} vs "
        f"{'active v' + str(start.version) if start else 'base'} {active[metric]:.3f}"
    )
    metrics.update({"gate_metric": metric, "gate_size": len(gate_set),
                    **{f"gate_candidate_{k}": v for k, v in cand.items()},
                    **{f"gate_active_{k}": v for k, v in active.items()}})

    with session_scope(rt.engine) as s:
        registry.lock_user(s, job.user_id)  # a rollback of this user waits for this transaction
        row = registry.get(s, job.user_id, version)
        row.metrics = metrics
        now_active = registry.active(s, job.user_id)
        if promoted and (now_active and now_active.version) != (current and current.version):
            # The user (or an operator) rolled back while we trained: their choice stands.
            promoted = False
            reason = f"the active adapter changed during the night (now {now_active.version if now_active else 'base'}); {reason}"
        if promoted:
            registry.activate(s, job.user_id, version, reason=f"promoted: {reason}")
        else:
            row.status, row.reason = AdapterStatus.rejected, f"rejected: {reason}"
            s.add(row)
        run = s.get(TrainingRun, run_id)
        run.status = RunStatus.promoted if promoted else RunStatus.rejected
        run.n_new_feedback, run.n_replay, run.adapter_version = len(new), len(replay), version
        run.metrics, run.finished_at = metrics, utcnow()
        s.add(run)
    status = RunStatus.promoted if promoted else RunStatus.rejected
    return UserResult(job.user_id, status, version, metrics, seconds=time.perf_counter() - t0)


def _select_replay(memory, index, older, train_new, holdout, config: UpdateConfig, rng, by_id):
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
        exclude=[e.id for e in holdout],
    )
    chosen = [by_id[i] for i in sel.user_ids if i in by_id] + sel.global_examples
    info = {"kind": "faiss", "neighbours": len(sel.neighbour_ids), "random": len(sel.random_ids), "global": len(sel.global_examples)}
    return chosen, info


def _experience_accuracies(results: dict, n: int) -> list[float]:
    out = []
    for k in range(n):
        key = next((name for name in results if name.startswith("Top1_Acc_Exp/") and name.endswith(f"Exp{k:03d}")), None)
        out.append(float(results[key]) if key is not None else float("nan"))
    return out


def _initial_accuracy(rt: Runtime, user_id: str, key: int) -> float | None:
    """Accuracy on an experience right after the night that trained on it (avalanche's 'initial')."""
    with session_scope(rt.engine) as s:
        row = s.exec(
            select(AdapterVersion).where(
                AdapterVersion.user_id == user_id, AdapterVersion.trained_through_feedback_id == key
            ).order_by(col(AdapterVersion.version).desc())
        ).first()
        value = (row.metrics or {}).get("accuracy_after_training", {}).get(str(key)) if row else None
        return float(value) if value is not None else None


def _finish_run(rt: Runtime, run_id: int, status: RunStatus, metrics: dict) -> None:
    with session_scope(rt.engine) as s:
        run = s.get(TrainingRun, run_id)
        run.status, run.metrics, run.finished_at = status, metrics, utcnow()
        s.add(run)
