"""The personalization benchmark end to end on a tiny synthetic stream (structure, not quality)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

from benchmarks.personalize import app

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
        "--stream", str(stream), "--out", str(out), "--min-feedback", "1", "--min-test", "1",
        "--seed", "0", "--seed", "1", "--row", "nightowl", "--row", "joint_annotator_embedding",
        "--protocol", "labelled", "--protocol", "realistic", "--p-correct", "0.3",
        "--base-epochs", "1", "--joint-epochs", "1", "--work", str(tmp_path / "work"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["n_users"] == 3 and data["nights"] == 2 and data["labels"] == LABELS and data["seeds"] == [0, 1]
    assert set(data["protocols"]) == {"labelled", "realistic_p0.3"}
    labelled = {r["name"]: r for r in data["protocols"]["labelled"]["rows"]}
    realistic = {r["name"]: r for r in data["protocols"]["realistic_p0.3"]["rows"]}
    assert set(labelled) == {"base", "nightowl", "joint_annotator_embedding"}
    assert set(realistic) == {"base", "nightowl"}  # the joint reference learns from every label: labelled only
    for r in list(labelled.values()) + list(realistic.values()):
        assert 0 <= r["macro_f1_mean"] <= 100 and 0 <= r["share_better"] <= 1 and 0 <= r["share_worse"] <= 1
        assert r["gain_ci95"][0] <= r["gain_mean"] <= r["gain_ci95"][1]
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
    assert labelled["base"]["gain_mean"] == 0 and labelled["base"]["share_better"] == 0
    for rows in (labelled, realistic):
        night = rows["nightowl"]
        assert [c["night"] for c in night["gain_by_night"]] == [1, 2]
        assert night["forgetting"] is not None and night["seconds_per_user_night_median"] > 0
        assert night["update_changes"] == {}  # the product's defaults
        stats = night["answers_vs_base"]  # its test answers against the base's, post by post
        assert 0 <= stats["share_changed"] <= 1 and stats["users"] == 3
        assert stats["users_clearly_better"] + stats["users_clearly_worse"] <= 3
    assert labelled["base"]["answers_vs_base"] is None
    # every post labelled vs only some corrections: the realistic users give fewer labels
    assert labelled["nightowl"]["labels_given_per_user"] == 16
    assert realistic["nightowl"]["labels_given_per_user"] < 16
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


def test_the_run_cache_is_keyed_by_every_nightowl_source_file():
    """A finished run is reused only by the same code: every module of nightowl the benchmark
    runs (the night's code in continual/, the store's in memory/, ...) is in the digest."""
    import sys

    from benchmarks.personalize import code_files

    files = set(code_files())
    loaded = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())
              if (name == "nightowl" or name.startswith("nightowl.")) and getattr(m, "__file__", None)}
    assert loaded and loaded <= files, sorted(str(f) for f in loaded - files)
    import nightowl.continual.update as update

    assert Path(update.__file__).resolve() in files


def test_the_rationale_row_trains_on_the_default_providers_rationales(tmp_path):
    """`nightowl_rationales`: the local generator writes one rationale per feedback post (once,
    kept for later runs), and the product's worker stores each on its post before the night."""
    from benchmarks.stream import read_stream

    stream = write_stream(tmp_path / "tiny.jsonl", users=("ann_a",), days=1)
    out, work = tmp_path / "r.json", tmp_path / "work"
    args = ["--stream", str(stream), "--out", str(out), "--min-feedback", "1", "--min-test", "1", "--seed", "0",
            "--row", "nightowl_rationales", "--protocol", "labelled", "--base-epochs", "1", "--work", str(work)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [written] = work.glob("rationales-*.jsonl")
    lines = [json.loads(x) for x in written.read_text().splitlines()]
    posts = {r.text for r in read_stream(stream).rows if r.user_id == "ann_a" and r.split == "feedback"}
    assert {r["text"] for r in lines} == posts and all(r["rationale"].strip() for r in lines)
    row = {r["name"]: r for r in json.loads(out.read_text())["protocols"]["labelled"]["rows"]}["nightowl_rationales"]
    assert row["update_changes"] == {}
    # the run kept per night how many rationales the worker stored: every post of the day
    [run] = [json.loads(f.read_text()) for f in (work / "runs").glob("nightowl_rationales-*.json")]
    assert run["per_night"][0]["rationales_stored"] == len(posts) == 8


def test_an_interrupted_rationale_file_is_resumed_without_its_torn_line(tmp_path):
    from benchmarks.rationales import _finished

    partial = tmp_path / "rationales-x.jsonl.partial"
    done = [{"text": "a", "aspect": None, "image": None, "rationale": "r1"},
            {"text": "b", "aspect": "t", "image": None, "rationale": None}]  # the provider gave none: not retried
    partial.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"text": "c", "asp')
    assert _finished(partial) == {("a", None, None), ("b", "t", None)}
    assert [json.loads(x) for x in partial.read_text().splitlines()] == done  # the torn tail is gone


def test_a_second_run_in_the_same_work_folder_is_refused(tmp_path):
    """Two runs in one work folder would write into each other's homes: the second is refused,
    also while a killed run's worker still holds its task."""
    import pytest

    from benchmarks.personalize import work_in_use
    from benchmarks.stream import StreamError

    with work_in_use(tmp_path, exclusive=True):
        with work_in_use(tmp_path, exclusive=False):  # the run's own workers share it
            pass
        with pytest.raises(StreamError, match="in use by another benchmark run"):
            with work_in_use(tmp_path, exclusive=True):
                pass
    with work_in_use(tmp_path, exclusive=False):  # a worker whose run is gone
        with pytest.raises(StreamError, match="in use"):
            with work_in_use(tmp_path, exclusive=True):
                pass
    with work_in_use(tmp_path, exclusive=True):  # free again
        pass
