"""The store's schema migrations (Alembic), shipped inside the package.

`upgrade(engine)` brings any nightowl database to the newest revision; the runtime calls it at
start (`init_db`), so `nightowl serve` and every CLI command run on the current schema, and
`nightowl db upgrade` runs it on its own. No alembic.ini is needed: the configuration is built
here, pointing at this folder. (The alembic.ini at the repository root is for developers'
`alembic revision --autogenerate`; see its comment.)

A database made before migrations existed (tables from `create_all`, no `alembic_version`
table) is recognised and stamped at the initial revision, whose schema is exactly what
`create_all` made, then upgraded like any other: its rows stay where they are.

Two processes starting at once never both run DDL: everything below happens in one
transaction that first takes the database's write lock: `pg_advisory_xact_lock` on
PostgreSQL, `BEGIN IMMEDIATE` on SQLite (the engine from `make_engine` begins every
transaction that way). The second process waits, then finds the schema at head and does nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Connection, func, inspect, select, text
from sqlalchemy.engine import Engine

from nightowl.errors import NightowlError
from nightowl.memory.db import write_lock

# Alembic announces each of its built-in plugins at INFO when imported: noise in every
# `nightowl serve` start's log. Quieten that one logger before the first alembic import.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent

# The revision whose schema is what `create_all` made before migrations existed, and its tables.
INITIAL_REVISION = "0001"
INITIAL_TABLES = frozenset(
    {"user", "post", "prediction", "feedback", "rationale", "rationalejob", "adapterversion", "trainingrun", "lease"}
)

# Tables in nightowl's database that other code owns: APScheduler creates and migrates its job
# store itself. Migrations and drift checks leave them alone.
FOREIGN_TABLES = frozenset({"apscheduler_jobs"})

# pg_advisory_xact_lock key: any constant that nothing else in the database uses ("nightowl" in ASCII).
_PG_LOCK_KEY = 0x6E696768746F776C


class MigrationError(NightowlError):
    """The database can't be brought to the current schema safely (nothing was changed)."""


def include_name(name: str | None, type_: str, parent_names) -> bool:
    """Autogenerate's filter (env.py and the drift test): leave other owners' tables out."""
    return not (type_ == "table" and name in FOREIGN_TABLES)


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for this package's migrations, run on `connection` when given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection  # env.py runs on it, inside its transaction
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(config()).get_current_head()


def current(engine: Engine) -> str | None:
    """The database's revision; None for an empty database or one made before migrations."""
    with engine.connect() as conn:
        return _revision(conn)


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database to `revision` (default: head); returns (revision before, revision after)."""
    # Writers (this process's threads, other processes on the same SQLite file) queue on the
    # engine's write lock as every other writer does.
    with write_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held until this transaction ends: a second process waits here, then sees our commit.
            conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        # (SQLite: engine.begin() already ran BEGIN IMMEDIATE, the database's one write lock.)
        before = _revision(conn)
        if before is None and _made_before_migrations(conn):
            # Its schema is the initial revision's: record that, then upgrade it like any other.
            log.info("database made before migrations: stamping it at revision %s", INITIAL_REVISION)
            command.stamp(config(conn), INITIAL_REVISION)
            before = INITIAL_REVISION
        target = head() if revision == "head" else revision
        if before == target:
            return before, before  # the usual start: nothing to do, and no Alembic run
        command.upgrade(config(conn), revision)
        after = _revision(conn)
        log.info("database upgraded from %s to %s", before or "empty", after)
        return before, after


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(versions) > 1:  # only with branches, which nightowl's history never has
        raise MigrationError(f"database has several schema revisions at once: {', '.join(versions)}")
    return versions[0] if versions else None


def _made_before_migrations(conn: Connection) -> bool:
    """True for a database with nightowl's tables from `create_all` and no revision yet."""
    present = set(inspect(conn).get_table_names()) & INITIAL_TABLES
    if not present:
        return False  # empty (or only other owners' tables): migrate from the start
    missing = INITIAL_TABLES - present
    if missing:
        raise MigrationError(
            f"database has some of nightowl's tables but not {', '.join(sorted(missing))}, and no "
            "alembic_version table: it was not made by nightowl, so it is left unchanged"
        )
    return True


def init_db(engine: Engine) -> None:
    """Bring the database to the current schema: what every start of nightowl (a Runtime) runs first.

    Safe when several processes start at once, and on a database made before migrations existed.
    """
    upgrade(engine)
