"""The personalization stream format (JSONL): reading and checking it.

First line, a header naming the label set:  {"labels": ["not_ironic", "ironic"], ...}
  (or a sidecar FILE.labels.json holding that object, with no header line in FILE)
then one labelled example a line: user_id, text, context?, aspect?, image?, label, day, split.
`benchmarks/convert_multipico.py` documents the fields and writes one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = {"feedback", "test"}


class StreamError(ValueError):
    pass


@dataclass
class StreamRow:
    user_id: str | None
    text: str
    label: str
    day: int | None
    split: str
    context: str | None = None
    aspect: str | None = None
    image: str | None = None


@dataclass
class Stream:
    header: dict
    labels: list[str]
    rows: list[StreamRow] = field(default_factory=list)

    @property
    def base(self) -> list[StreamRow]:
        """Day 0: the base model's training data."""
        return [r for r in self.rows if r.split == "feedback" and r.day == 0]

    @property
    def days(self) -> int:
        return max((r.day for r in self.rows if r.split == "feedback"), default=0)

    def users(self) -> list[str]:
        fb = {r.user_id for r in self.rows if r.split == "feedback" and r.day}
        test = {r.user_id for r in self.rows if r.split == "test"}
        return sorted(fb & test)

    def feedback(self, user: str, day: int) -> list[StreamRow]:
        return [r for r in self.rows if r.split == "feedback" and r.user_id == user and r.day == day]

    def test(self, user: str) -> list[StreamRow]:
        return [r for r in self.rows if r.split == "test" and r.user_id == user]


def read_stream(path: Path) -> Stream:
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    sidecar = path.with_suffix(".labels.json")
    if lines and "labels" in json.loads(lines[0]) and "split" not in json.loads(lines[0]):
        header, body = json.loads(lines[0]), lines[1:]
    elif sidecar.exists():
        header, body = json.loads(sidecar.read_text()), lines
    else:
        raise StreamError(f"{path}: no header line with 'labels' and no sidecar {sidecar.name}")
    labels = header.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise StreamError(f"{path}: header 'labels' must list at least two label names")
    stream = Stream(header=header, labels=labels)
    base_dir = path.parent
    for n, line in enumerate(body, 2 if body is not lines else 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            row = StreamRow(
                user_id=raw.get("user_id"),
                text=raw["text"],
                label=raw["label"],
                day=raw.get("day"),
                split=raw["split"],
                context=raw.get("context"),
                aspect=raw.get("aspect"),
                image=str(base_dir / raw["image"]) if raw.get("image") else None,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise StreamError(f"{path}:{n}: {exc}") from None
        if row.split not in SPLITS:
            raise StreamError(f"{path}:{n}: split must be one of {sorted(SPLITS)}")
        if row.label not in labels:
            raise StreamError(f"{path}:{n}: label {row.label!r} is not in the header's labels")
        if row.split == "feedback" and not (isinstance(row.day, int) and row.day >= 0):
            raise StreamError(f"{path}:{n}: feedback rows need a day (0 = base training data, 1..N = nights)")
        if (row.split == "test" or row.day) and not row.user_id:
            raise StreamError(f"{path}:{n}: feedback (day >= 1) and test rows need a user_id")
        stream.rows.append(row)
    return stream
