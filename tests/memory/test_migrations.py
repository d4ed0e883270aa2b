"""The store's schema migrations (Alembic), on SQLite and PostgreSQL.

- the migrated schema has no drift from the models;
- the initial revision is exactly the schema `create_all` made before migrations existed;
- a database made by that code (tests/fixtures/pre_alembic/, frozen from it) upgrades in place,
  rows and all;
- upgrading is idempotent, safe when several processes start at once, and `nightowl db upgrade`
  does it from the command line.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, func, select
from typer.testing import CliRunner

from nightowl.cli import app
from nightowl.memory import migrations
from nightowl.memory.db import make_engine, session_scope
from nightowl.memory.migrations import init_db
from nightowl.memory.models import (
    AdapterStatus,
    AdapterVersion,
    Feedback,
    JobStatus,
    Lease,
    Post,
    Prediction,
    Rationale,
    RationaleJob,
    RunStatus,
    TrainingRun,
    User,
)

PRE_ALEMBIC = Path(__file__).resolve().parents[1] / "fixtures" / "pre_alembic"
# What the fixtures hold (see tests/fixtures/pre_alembic/README.md), table by table.
FIXTURE_ROWS = {User: 2, Post: 3, Prediction: 2, Feedback: 1, Rationale: 1, RationaleJob: 2, AdapterVersion: 1,
                TrainingRun: 1, Lease: 1}


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def _backend(engine) -> str:
    return engine.dialect.name


def _load_pre_alembic(engine) -> None:
    """Put the frozen pre-migration database (schema from create_all, rows, APScheduler's table) in place."""
    if _backend(engine) == "sqlite":
        con = sqlite3.connect(engine.url.database)
        try:
            con.executescript((PRE_ALEMBIC / "sqlite.sql").read_text())
        finally:
            con.close()
        return
    # pg_dump's script resets the session's search_path: run it on a connection of its own.
    loader = create_engine(engine.url, poolclass=NullPool)
    try:
        raw = loader.raw_connection()
        try:
            with raw.cursor() as cur:
                cur.execute((PRE_ALEMBIC / "postgresql.sql").read_text())
            raw.commit()
        finally:
            raw.close()
    finally:
        loader.dispose()


def _drift(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_name": migrations.include_name, "compare_type": True}
        )
        return compare_metadata(ctx, SQLModel.metadata)


def _schema(engine) -> dict:
    """Everything about nightowl's tables that a migration could get wrong, in a comparable form."""
    insp = inspect(engine)
    out = {}
    for table in sorted(migrations.INITIAL_TABLES):
        out[table] = {
            "columns": [(c["name"], repr(c["type"]), c["nullable"], c["default"]) for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                          for f in insp.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)),
            "uniques": sorted((u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)),
        }
    if _backend(engine) == "postgresql":
        out["enums"] = sorted((e["name"], tuple(e["labels"])) for e in insp.get_enums())
    return out


def _counts(engine) -> dict:
    with Session(engine) as s:
        return {model: s.exec(select(func.count()).select_from(model)).one() for model in FIXTURE_ROWS}


# -- the schema ---------------------------------------------------------------------------------

def test_migrated_schema_has_no_drift_from_the_models(engine):
    before, after = migrations.upgrade(engine)
    assert (before, after) == (None, migrations.head())
    assert migrations.current(engine) == migrations.head()
    assert _drift(engine) == []


def test_initial_revision_is_the_schema_create_all_made(engine):
    """The initial revision against the frozen pre-migration database, table by table."""
    _load_pre_alembic(engine)
    made_by_create_all = _schema(engine)
    _wipe(engine)
    migrations.upgrade(engine, migrations.INITIAL_REVISION)
    assert migrations.current(engine) == migrations.INITIAL_REVISION
    assert _schema(engine) == made_by_create_all


def _wipe(engine) -> None:
    if _backend(engine) == "sqlite":
        engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(engine.url.database + suffix).unlink(missing_ok=True)
    else:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    assert inspect(engine).get_table_names() == []


# -- a database made before migrations ----------------------------------------------------------

def test_database_made_before_migrations_upgrades_in_place_with_its_rows(engine):
    _load_pre_alembic(engine)
    assert migrations.current(engine) is None
    assert set(migrations.INITIAL_TABLES) <= set(inspect(engine).get_table_names())

    init_db(engine)  # what every start of nightowl does

    assert migrations.current(engine) == migrations.head()
    assert _drift(engine) == []
    assert _counts(engine) == FIXTURE_ROWS
    with Session(engine) as s:
        alice = s.get(User, "alice")
        assert (alice.name, alice.token_hash) == ("Alice", "a" * 64)
        post = s.get(Post, 2)
        assert (post.text, post.context) == ("so great, another $T$ \u2603 100%", "it's Monday again")
        assert post.created_at == datetime(2025, 3, 1, 12, 1, tzinfo=timezone.utc)
        assert s.get(Prediction, 1).probabilities == {"negative": 0.1, "neutral": 0.2, "positive": 0.7}
        assert s.get(Feedback, 1).reason == "sarcasm"
        assert s.get(RationaleJob, 3).status is JobStatus.failed
        adapter = s.get(AdapterVersion, 1)
        assert (adapter.status, adapter.metrics["encoder_id"]) == (AdapterStatus.active, "base@abc")
        assert s.get(TrainingRun, 1).status is RunStatus.promoted
        assert s.get(Lease, "night").holder == "host:1234"
    # APScheduler's own table is not ours: still there, its job untouched.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM apscheduler_jobs")).scalars().all() == ["nightowl-nightly"]

    # And the store works on it as before: new rows get fresh ids after the old ones.
    with session_scope(engine) as s:
        s.add(Post(user_id="bob", text="new after the upgrade"))
    with Session(engine) as s:
        assert s.exec(select(Post.id).where(Post.text == "new after the upgrade")).one() == 4


def test_a_database_with_only_some_of_the_tables_is_left_alone(engine):
    with engine.begin() as conn:
        SQLModel.metadata.tables["lease"].create(conn)
    with pytest.raises(migrations.MigrationError, match="not made by nightowl"):
        migrations.upgrade(engine)
    assert migrations.current(engine) is None
    assert set(inspect(engine).get_table_names()) == {"lease"}


# -- running it ---------------------------------------------------------------------------------

def test_upgrade_is_idempotent(engine):
    head = migrations.head()
    assert migrations.upgrade(engine) == (None, head)
    schema = _schema(engine)
    assert migrations.upgrade(engine) == (head, head)
    init_db(engine)
    assert _schema(engine) == schema and migrations.current(engine) == head


def test_downgrade_to_base_and_back(engine):
    migrations.upgrade(engine)
    with engine.begin() as conn:
        command.downgrade(migrations.config(conn), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    if _backend(engine) == "postgresql":
        assert inspect(engine).get_enums() == []
    migrations.upgrade(engine)
    assert _drift(engine) == []


def test_processes_starting_at_once_migrate_once(db_url):
    """Separate engines, as separate processes would have: one migrates, the others wait for it."""
    n = 4
    engines = [make_engine(db_url) for _ in range(n)]
    start = threading.Barrier(n)
    results, errors = [], []

    def starting(eng):
        start.wait()
        try:
            results.append(migrations.upgrade(eng))
        except Exception as exc:  # pragma: no cover - the failure this test is about
            errors.append(exc)

    threads = [threading.Thread(target=starting, args=(eng,)) for eng in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        head = migrations.head()
        assert sorted(results, key=str) == sorted([(None, head)] + [(head, head)] * (n - 1), key=str)
        assert _drift(engines[0]) == []
    finally:
        for eng in engines:
            eng.dispose()


@pytest.fixture
def cli(tmp_path, monkeypatch, db_url):
    monkeypatch.setenv("NIGHTOWL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTOWL_RATIONALE_PROVIDER", "none")
    if not db_url.startswith("sqlite"):  # SQLite: the fresh home's own database
        monkeypatch.setenv("NIGHTOWL_DATABASE_URL", db_url)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args))

    return run


def test_cli_db_upgrade_on_a_fresh_home(cli, tmp_path, db_url):
    head = migrations.head()
    r = cli("db", "current")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["current"] is None and json.loads(r.stdout)["head"] == head

    r = cli("db", "upgrade")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["from"], out["to"]) == (None, head)
    if db_url.startswith("sqlite"):
        assert out["database"] == f"sqlite:///{tmp_path / 'home' / 'nightowl.db'}"

    r = cli("db", "upgrade")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.stdout)["from"], json.loads(r.stdout)["to"]) == (head, head)
    assert json.loads(cli("db", "current").stdout)["current"] == head

    url = db_url if not db_url.startswith("sqlite") else f"sqlite:///{tmp_path / 'home' / 'nightowl.db'}"
    eng = make_engine(make_url(url).render_as_string(hide_password=False))
    try:
        assert _drift(eng) == []
    finally:
        eng.dispose()


def test_cli_db_upgrade_refuses_a_foreign_database_with_a_message(cli, tmp_path, db_url):
    url = db_url if not db_url.startswith("sqlite") else f"sqlite:///{tmp_path / 'home' / 'nightowl.db'}"
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            SQLModel.metadata.tables["lease"].create(conn)
    finally:
        eng.dispose()
    r = cli("db", "upgrade")
    assert r.exit_code == 1
    assert "not made by nightowl" in r.stderr
