"""The personalization benchmark end to end on a tiny synthetic stream (structure, not quality)."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from benchmarks.personalize import ROWS, app

LABELS = ["not_ironic", "ironic"]
OPENERS = ["Oh great,", "Wonderful,", "Just what I needed:", "Love it,", "Sure,", "Fine,"]
EVENTS = ["the train is late again", "my phone died at noon", "it rains on my day off",
          "the meeting ran two hours", "we won the final", "the cake turned out perfect"]


def write_stream(path, users=("ann_a", "ann_b", "ann_c"), days=2, header=True):
    rng = random.Random(0)
    lines = [json.dumps({"stream": "synthetic", "labels": LABELS})] if header else []

    def row(user, day, split, i):
        opener, event = rng.choice(OPENERS), rng.choice(EVENTS)
        # ann_a calls every "great"/"wonderful" ironic; the others follow the event's polarity
        bad = event in EVENTS[:4]
        ironic = opener in OPENERS[:2] if user == "ann_a" else bad
        # one reply answers a post far longer than the serving limit (real streams have them)
        context = "How was your day? " * (150 if (day, i) == (1, 0) else 1)
        return json.dumps({"user_id": user, "text": f"{opener} {event} #{i}", "context": context.strip(),
                           "label": LABELS[ironic], "day": day, "split": split})

    lines += [row(None, 0, "feedback", i) for i in range(40)]
    for u in users:
        lines += [row(u, d, "feedback", i) for d in range(1, days + 1) for i in range(8)]
        lines += [row(u, None, "test", i) for i in range(6)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_personalize_writes_every_row(tmp_path):
    stream = write_stream(tmp_path / "tiny.jsonl")
    out = tmp_path / "results" / "personalization-tiny.json"
    result = CliRunner().invoke(app, [
        "--stream", str(stream), "--out", str(out), "--users", "0",
        "--base-epochs", "1", "--update-epochs", "2", "--joint-epochs", "1", "--work", str(tmp_path / "work"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["n_users"] == 3 and data["nights"] == 2 and data["labels"] == LABELS
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == set(ROWS)
    for r in rows.values():
        for key in ("macro_f1_mean", "accuracy_mean", "gain_vs_base_mean", "share_users_gained", "per_night"):
            assert key in r
        assert 0 <= r["macro_f1_mean"] <= 100 and 0 <= r["share_users_gained"] <= 1
    assert rows["base"]["gain_vs_base_mean"] == 0 and rows["base"]["share_users_gained"] == 0
    for name in ("lora_no_replay", "lora_random_replay", "nightowl"):
        nights = rows[name]["per_night"]
        assert [n["night"] for n in nights] == [1, 2]
        assert sum(nights[0]["statuses"].values()) == 3  # every user with feedback got a night
        assert rows[name]["forgetting_mean"] is not None and rows[name]["bwt_mean"] is not None
        assert rows[name]["nightly_seconds_per_user_median"] > 0
    assert all((out.parent / p).is_file() for p in data["plots"])


def test_bench_personalize_rejects_a_bad_stream(tmp_path):
    no_header = write_stream(tmp_path / "plain.jsonl", header=False)
    result = CliRunner().invoke(app, ["--stream", str(no_header), "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "labels" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"labels": LABELS}) + "\n" + json.dumps(
        {"user_id": "u", "text": "t", "label": "sarcastic", "day": 1, "split": "feedback"}) + "\n")
    result = CliRunner().invoke(app, ["--stream", str(bad), "--out", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and "sarcastic" in result.output
    missing = CliRunner().invoke(app, ["--stream", str(tmp_path / "nope.jsonl"), "--out", "r.json"])
    assert missing.exit_code != 0 and "not found" in missing.output
    assert not (tmp_path / "r.json").exists()
