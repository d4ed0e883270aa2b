"""The CLI does the same operations as the API, with clear messages and exit codes on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nightowl.cli import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTOWL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTOWL_RATIONALE_PROVIDER", "none")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args))

    return run


def test_cli_flow(cli, tmp_path):
    r = cli("users", "create", "alice", "--name", "Alice")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["token"]) > 20

    r = cli("post", "alice", "$T$ is everything", "--aspect", "Chuck Bass", "--key", "p-1")
    assert r.exit_code == 0, r.output
    post = json.loads(r.stdout)
    assert post["prediction"]["label"] in ("negative", "neutral", "positive")

    r1 = cli("feedback", "alice", str(post["post_id"]), "negative", "--reason", "sarcasm", "--key", "f-1")
    r2 = cli("feedback", "alice", str(post["post_id"]), "negative", "--reason", "sarcasm", "--key", "f-1")
    assert r1.exit_code == r2.exit_code == 0
    assert json.loads(r2.stdout)["duplicate"] is True

    r = cli("history", "alice", "--limit", "5")
    listing = json.loads(r.stdout)
    assert listing["total"] == 1 and listing["items"][0]["feedback"][0]["reason"] == "sarcasm"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("post", "nobody", "hi"), 3, "unknown user"),
        (("post", "../etc", "hi"), 2, "user_id"),
        (("feedback", "alice", "1", "ecstatic"), 2, "not one of"),
        (("feedback", "alice", "424242", "positive"), 3, "not found"),
        (("post", "alice", "hi", "--image", "/no/such/file.jpg"), 1, "not found"),
        (("users", "create", "alice"), 4, "already exists"),
    ],
)
def test_cli_bad_input(cli, args, code, message):
    assert cli("users", "create", "alice").exit_code == 0
    r = cli(*args)
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "env, message",
    [
        ('{"epoch": 3}', "update.epoch: Extra inputs are not permitted"),
        ('{"epochs": "many"}', "update.epochs: Input should be a valid integer"),
        ('{"replay": "fais"}', "update.replay: Input should be 'faiss', 'random' or 'none'"),
        ('{"holdout_fraction": 1.5}', "update.holdout_fraction: Input should be less than 1"),
    ],
)
def test_cli_bad_configuration_is_a_message(cli, monkeypatch, env, message):
    """A bad [update] value stops every command (serve included) at start, not the night at 02:30."""
    monkeypatch.setenv("NIGHTOWL_UPDATE", env)
    for args in (("health",), ("serve", "--port", "1")):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "error: configuration: update" in r.output and message in r.output
        assert "Traceback" not in r.output


def test_bench_forwards_to_the_checkouts_benchmark(tmp_path, monkeypatch):
    """`nightowl bench personalize ...` runs `python -m benchmarks.personalize ...` in a checkout,
    and says what is wrong anywhere else."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "nightowl.cli", "bench", "personalize", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--p-correct" in out.stdout and "--protocol" in out.stdout
    monkeypatch.chdir(tmp_path)
    elsewhere = CliRunner().invoke(app, ["bench", "personalize", "--stream", "x.jsonl"])
    assert elsewhere.exit_code == 2 and "nightowl checkout" in elsewhere.output
    unknown = CliRunner().invoke(app, ["bench", "run", "nope"])
    assert unknown.exit_code == 2 and "unknown benchmark" in unknown.output


def test_train_base_and_evaluate_on_any_label_set(tmp_path):
    """`nightowl train-base` then `nightowl evaluate`, as a user with another dataset runs them:
    a label set of their own (two labels here), images for some rows only."""
    from tests.conftest import FIXTURES

    lines = (FIXTURES / "twitter_small.tsv").read_text(encoding="utf-8").splitlines()
    # The fixture's sentiment ids 0-2 as a two-label task: "mentioned" (1) or not (0).
    rows = [lines[0]] + ["\t".join([c[0], "1" if c[1] == "2" else "0", *c[2:]]) for c in (ln.split("\t") for ln in lines[1:])]
    data = tmp_path / "two_labels.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "base"
    runner = CliRunner()

    r = runner.invoke(app, ["train-base", "--train", str(data), "--select", str(data), "--out", str(out),
                            "--labels", "other,mentioned", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    trained = json.loads(r.stdout)  # stdout is the report alone (progress goes to stderr)
    assert trained["out"] == str(out) and (out / "nightowl_config.json").exists()

    r = runner.invoke(app, ["evaluate", "--model", str(out), "--data", str(data), "--images", str(FIXTURES / "images")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["labels"] == ["other", "mentioned"] and report["n"] == len(rows) - 1
    assert report["images_missing"] == 6  # the fixture folder holds 6 of the 12 rows' images
    assert 0 <= report["accuracy"] <= 100 and len(report["confusion"]) == 2

    r = runner.invoke(app, ["train-base", "--train", str(data), "--out", str(tmp_path / "x"), "--labels", "only"])
    assert r.exit_code != 0 and "at least two" in r.output

    # a student learning from the model above as its teacher (soft labels beside the labels)
    student = tmp_path / "student"
    r = runner.invoke(app, ["train-base", "--train", str(data), "--out", str(student), "--labels", "other,mentioned",
                            "--epochs", "1", "--teacher", str(out), "--distill-alpha", "0.7"])
    assert r.exit_code == 0, r.output
    config = json.loads((student / "nightowl_config.json").read_text())
    assert config["training"]["teacher"] == [str(out)] and config["training"]["recipe"]["distill_alpha"] == 0.7
    r = runner.invoke(app, ["train-base", "--train", str(data), "--out", str(tmp_path / "y"), "--teacher", str(tmp_path)])
    assert r.exit_code == 2 and "not a saved base model" in r.output
    r = runner.invoke(app, ["train-base", "--train", str(data), "--out", str(tmp_path / "y"), "--teacher", str(out)])
    assert r.exit_code == 2 and "labels" in r.output  # the teacher has 2 labels, the default --labels 3
