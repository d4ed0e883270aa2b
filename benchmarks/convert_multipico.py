"""Convert MultiPICo-EN (per-annotator irony labels) into nightowl's personalization stream.

    python -m benchmarks.convert_multipico [--data ../shared/data/multipico_en] [--days 5] [--seed 0] \
        [--out benchmarks/work/multipico_en.stream.jsonl]

The stream format (read by `python -m benchmarks.personalize`) is JSONL. The first line is a header:
    {"stream": "multipico_en", "labels": ["not_ironic", "ironic"], "days": 5, ...}
then one labelled example a line:
    user_id   the annotator (null on day-0 rows: base training data belongs to no user)
    text      the post being judged (here: the reply)
    context   optional: the post it answers
    aspect    optional
    image     optional path
    label     one of the header's labels
    day       0 = base training data, 1..N = the feedback night it arrives before; null for test rows
    split     "feedback" (day 0: base training data; 1..N: a user's feedback) or "test"

Protocol (issue 5): day 0 = the majority label of every train item (no annotator information);
each annotator's labels on test items are their private test set; their labels on train/dev
items arrive as feedback over N days, in a fixed shuffled order.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

LABELS = ["not_ironic", "ironic"]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multipico_en"
DEFAULT_OUT = Path(__file__).resolve().parent / "work" / "multipico_en.stream.jsonl"


def _label(v: str) -> str:
    return LABELS[int(float(v))]


def _majority(annotations: dict[str, str]) -> str | None:
    counts = Counter(_label(v) for v in annotations.values())
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        return None  # a tie has no majority: left out of the base data
    return top


def convert(data_dir: Path, days: int, seed: int) -> tuple[dict, list[dict]]:
    splits = {name: json.loads((data_dir / f"{name}.json").read_text()) for name in ("train", "dev", "test")}
    rows: list[dict] = []
    for item in splits["train"].values():
        label = _majority(item["annotations"])
        if label is not None:
            rows.append(_row(None, item, label, day=0, split="feedback"))

    per_user_feedback: dict[str, list[dict]] = {}
    per_user_test: dict[str, list[dict]] = {}
    for name in ("train", "dev"):
        for item_id in sorted(splits[name]):
            item = splits[name][item_id]
            for ann, v in sorted(item["annotations"].items()):
                per_user_feedback.setdefault(ann, []).append(_row(ann, item, _label(v), day=None, split="feedback"))
    for item_id in sorted(splits["test"]):
        item = splits["test"][item_id]
        for ann, v in sorted(item["annotations"].items()):
            per_user_test.setdefault(ann, []).append(_row(ann, item, _label(v), day=None, split="test"))

    rng = random.Random(seed)
    for ann in sorted(per_user_feedback):
        items = per_user_feedback[ann]
        rng.shuffle(items)
        for i, row in enumerate(items):
            row["day"] = 1 + (i * days) // len(items)  # N near-equal nights, in the shuffled order
        rows.extend(items)
    for ann in sorted(per_user_test):
        rows.extend(per_user_test[ann])
    header = {
        "stream": "multipico_en",
        "labels": LABELS,
        "days": days,
        "seed": seed,
        "source": "MultiPICo-EN (Le-Wi-Di 2025 release), Casola et al. 2024; research use",
        "users": len(set(per_user_feedback) | set(per_user_test)),
    }
    return header, rows


def _row(user: str | None, item: dict, label: str, day: int | None, split: str) -> dict:
    return {
        "user_id": user,
        "text": item["text"]["reply"],
        "context": item["text"]["post"],
        "label": label,
        "day": day,
        "split": split,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    header, rows = convert(args.data, args.days, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = Counter("base" if r["day"] == 0 else r["split"] for r in rows)
    print(json.dumps({"out": str(args.out), **header, "rows": dict(counts)}))


if __name__ == "__main__":
    main()
