"""Alembic's environment for the store's migrations.

Run two ways:
- by nightowl (`nightowl.memory.migrations.upgrade`): the connection arrives in
  `config.attributes["connection"]`, already inside the transaction that holds the database's
  write lock; everything runs in it and the caller commits.
- by the `alembic` command (developers; the repository's alembic.ini): on the URL given with
  `-x url=...`, else alembic.ini's `sqlalchemy.url`. (To upgrade a deployed database use
  `nightowl db upgrade`: it also takes the lock and recognises a database made before migrations.)
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from nightowl.memory import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from nightowl.memory.db import make_engine
from nightowl.memory.migrations import include_name

config = context.config
target_metadata = SQLModel.metadata


def render_item(type_, obj, autogen_context):
    """Write SQLModel's column types as the plain SQLAlchemy types they stand for, so revision
    files don't depend on sqlmodel's internals."""
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False  # everything else: Alembic's default rendering


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_name=include_name,
        render_item=render_item,
        # SQLite can't ALTER most things: batch mode recreates the table (copy, drop, rename).
        # Note: PRAGMA foreign_keys stays ON (it can't change inside a transaction); a batch
        # step on a table that others reference must keep their rows valid.
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_on(connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():  # inside the caller's transaction: a no-op, the caller commits
        context.run_migrations()


def url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")


if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():  # `alembic upgrade head --sql`: print the SQL
    _configure(url=url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run_on(config.attributes["connection"])
else:
    engine = make_engine(url())  # nightowl's own: SQLite's pragmas and BEGIN IMMEDIATE
    try:
        with engine.begin() as connection:
            run_on(connection)
    finally:
        engine.dispose()
