"""Nightly cost per user: one user's update with 100 new feedback + replay, and the users/hour it implies.

    python -m benchmarks.nightly_cost [--users 3] [--new 100]

Each user first gets a night of history (so replay has older examples to draw on), then 100 new
feedback; the second night is timed per user, end to end (memory sync, replay selection,
avalanche training, candidate save, gate, promotion). Real Twitter-2015 texts are used where
../shared/data is present, the shipped sample otherwise. Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nightowl.continual.night import run_night
from nightowl.day import logger
from nightowl.io import atomic_write_text
from nightowl.runtime import Runtime
from nightowl.settings import Settings

RESULTS = Path(__file__).parent / "results"
SHARED_TSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitter2015" / "train.tsv"
SAMPLE_TSV = Path(__file__).resolve().parents[1] / "adapters" / "base_model" / "replay_sample.tsv"
LABELS = ["negative", "neutral", "positive"]


def sample_texts(n: int) -> list[tuple[str, str, str]]:
    """(text, aspect, label) rows from a TomBERT-format TSV."""
    path = SHARED_TSV if SHARED_TSV.exists() else SAMPLE_TSV
    rows = []
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for r in reader:
            rows.append((r[3], r[4], LABELS[int(r[1])]))
            if len(rows) >= n:
                break
    return rows


def seed_user(rt: Runtime, user: str, rows, night: int) -> None:
    """Log posts and feedback for a user through nightowl's own logging path."""
    try:
        logger.create_user(rt, user)
    except Exception:
        pass  # already there from an earlier night
    for i, row in enumerate(rows):
        text, aspect, label = row if isinstance(row, tuple) else (row, None, "negative")
        post = logger.log_post(rt, user, text, aspect=aspect)
        # The user disagrees with a third of the labels (personal view), so the update has work to do.
        if i % 3 == 0:
            label = LABELS[(LABELS.index(label) + 1) % 3]
        logger.log_feedback(rt, user, post.post_id, label, None, f"{user}-{night}-{i}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or RESULTS / f"nightly_cost_{device}.json"
    rows = sample_texts(args.users * args.new * 2)

    with tempfile.TemporaryDirectory(prefix="nightowl-night-") as tmp:
        rt = Runtime(Settings(home=Path(tmp) / "home", rationale_provider="none"))
        users = [f"user{k}" for k in range(args.users)]
        for k, user in enumerate(users):
            seed_user(rt, user, rows[(2 * k) * args.new : (2 * k + 1) * args.new], night=1)
        first = run_night(rt)
        for k, user in enumerate(users):
            seed_user(rt, user, rows[(2 * k + 1) * args.new : (2 * k + 2) * args.new], night=2)
        t0 = time.perf_counter()
        second = run_night(rt)
        wall = time.perf_counter() - t0

    per_user = [r.seconds for r in second.results]
    median = statistics.median(per_user)
    result = {
        "benchmark": "nightly_cost",
        "command": f"python -m benchmarks.nightly_cost --users {args.users} --new {args.new}",
        "device": device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "new_feedback_per_user": args.new,
        "config": rt.update_config.model_dump(),
        "first_night": first.counts(),
        "second_night": second.counts(),
        "replay_per_user": [r.metrics.get("replay") for r in second.results],
        "seconds_per_user": [round(s, 2) for s in per_user],
        "seconds_per_user_median": round(median, 2),
        "night_wall_seconds": round(wall, 2),
        "users_per_hour": round(3600 / median, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
