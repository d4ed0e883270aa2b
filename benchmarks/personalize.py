"""Does it personalize without forgetting? Day-by-day replay of a per-user stream through nightowl.

    nightowl bench personalize --stream FILE.jsonl --out RESULTS.json [--users K] [--seed S]

For every row (variant) a fresh nightowl home is made on the embedded default. Each day's
feedback arrives through nightowl's own logging path (`interactions.log_post` +
`log_feedback`), then the real nightly update runs (`continual.night.run_night`). After every
night each user's current model is scored on their private test set and on every earlier day's
items (avalanche's Forgetting / BWT over that accuracy matrix).

Rows: base (the global model, no personalization); lora_no_replay; lora_random_replay;
nightowl (FAISS replay); joint_annotator_embedding (upper reference: one model trained on all
users' feedback at once, with a learned per-user embedding).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from avalanche.evaluation.metrics import BWT, Forgetting

from benchmarks.stream import Stream, StreamRow, read_stream
from continual.night import run_night
from continual.update import UpdateConfig
from memory.replay import Example
from nightowl import interactions
from nightowl.runtime import Runtime
from nightowl.settings import Settings

ROWS = ("base", "lora_no_replay", "lora_random_replay", "nightowl", "joint_annotator_embedding")
REPLAY_OF_ROW = {"lora_no_replay": "none", "lora_random_replay": "random", "nightowl": "faiss"}


def macro_f1(gold: list[int], pred: list[int], n_labels: int) -> float:
    f1s = []
    for c in range(n_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return 100 * float(np.mean(f1s))


def score(rt: Runtime, user: str | None, rows: list[StreamRow], labels: list[str]) -> dict:
    preds = rt.predictor.predict_many(
        [Example(id=0, text=r.text, aspect=r.aspect, context=r.context, label=r.label) for r in rows],
        adapter=rt.active_adapter(user) if user else None,
    )
    gold = [labels.index(r.label) for r in rows]
    pred = [labels.index(p.label) for p in preds]
    return {
        "accuracy": 100 * float(np.mean([g == p for g, p in zip(gold, pred)])),
        "macro_f1": macro_f1(gold, pred, len(labels)),
    }


def run_variant(name: str, stream: Stream, users: list[str], base_dir: Path, work: Path, config: UpdateConfig) -> dict:
    settings = Settings(
        home=work / name, rationale_provider="none", labels=stream.labels, base_model_dir=base_dir,
        global_replay_data=work / "global.jsonl",
    )
    rt = Runtime(settings)
    rt.update_config = replace(config, replay=REPLAY_OF_ROW[name])
    for u in users:
        interactions.create_user(rt, u)
    per_night, acc_matrix, seconds = [], {u: {} for u in users}, []
    for night in range(1, stream.days + 1):
        for u in users:
            for i, r in enumerate(stream.feedback(u, night)):
                post = interactions.log_post(rt, u, r.text, aspect=r.aspect, context=r.context)
                interactions.log_feedback(rt, u, post.post_id, r.label, None, f"{night}-{i}")
        summary = run_night(rt)
        seconds += [r.seconds for r in summary.results]
        tests = {u: score(rt, u, stream.test(u), stream.labels) for u in users}
        for u in users:
            for day in range(1, night + 1):
                acc_matrix[u].setdefault(day, {})[night] = score(rt, u, stream.feedback(u, day), stream.labels)["accuracy"]
        per_night.append(
            {
                "night": night,
                "macro_f1_mean": statistics.fmean(t["macro_f1"] for t in tests.values()),
                "accuracy_mean": statistics.fmean(t["accuracy"] for t in tests.values()),
                "per_user": tests,
                "statuses": summary.counts(),
                "seconds_per_user_median": statistics.median([r.seconds for r in summary.results]) if summary.results else 0,
            }
        )
    forgetting, bwt = {}, {}
    for u in users:
        f, b = Forgetting(), BWT()
        for day, by_night in acc_matrix[u].items():
            if day == stream.days:
                continue  # the last day has no later night to forget it in
            for m in (f, b):
                m.update(day, by_night[day], initial=True)
                m.update(day, by_night[stream.days])
        forgetting[u] = statistics.fmean(f.result().values()) if f.result() else 0.0
        bwt[u] = statistics.fmean(b.result().values()) if b.result() else 0.0
    rt.close()
    return {"per_night": per_night, "forgetting": forgetting, "bwt": bwt, "seconds": seconds}
