"""Ids never reused: SQLite tables with surrogate integer ids become AUTOINCREMENT.

SQLite hands out max(rowid) + 1, so deleting the rows with the highest ids (a deleted user's
posts) gives those ids to the next rows: a rationale worker or a night still holding such an id
would then write onto another user's row. With AUTOINCREMENT SQLite keeps the highest id ever
used in `sqlite_sequence` and never goes below it. PostgreSQL's sequences never go back: there
this revision does nothing.

Each table is rebuilt in place, rows and ids kept (batch mode: copy into a new table, drop the
old one, rename). PRAGMA foreign_keys stays ON (it can't change inside the migration's
transaction), and `post` is referenced by prediction, feedback, rationale and rationalejob:
dropping it would delete its rows under theirs, which SQLite refuses. So `post` goes the other
way round, with foreign keys deferred to the commit: its rows are set aside, deleted (each
child row referencing one counts as a pending violation), the emptied table is rebuilt, and the
rows are put back under the same ids (which settles each of those violations again). A
violation left at the commit fails the commit and nothing is changed; so the children's rows
provably reference the same posts afterwards.

Ids already lost before this revision can't be known; the feedback sequence starts after the
highest feedback id any adapter version was trained through as well, which may name deleted feedback.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Tables with a surrogate integer id; `post` first (the others are not referenced by any table).
TABLES = ("post", "prediction", "feedback", "rationale", "adapterversion", "trainingrun")
PARENTS = frozenset({"post"})  # referenced by other tables' foreign keys


def upgrade() -> None:
    _rebuild(autoincrement=True)
    if op.get_bind().dialect.name == "sqlite":
        # Feedback ids an adapter was trained through must never name new feedback.
        trained = "(SELECT max(trained_through_feedback_id) FROM adapterversion)"
        op.execute(f"UPDATE sqlite_sequence SET seq = {trained} WHERE name = 'feedback' AND seq < {trained}")
        op.execute(
            f"INSERT INTO sqlite_sequence (name, seq) SELECT 'feedback', {trained} "
            f"WHERE {trained} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'feedback')"
        )


def downgrade() -> None:
    _rebuild(autoincrement=False)


def _rebuild(autoincrement: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return  # PostgreSQL: sequences never hand an id out twice
    # Foreign keys are checked at the commit, not at each statement (reset by the commit itself).
    op.execute("PRAGMA defer_foreign_keys = ON")
    for table in TABLES:
        if table in PARENTS:
            _rebuild_parent(table, autoincrement)
        else:
            with op.batch_alter_table(
                table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
            ):
                pass


def _rebuild_parent(table: str, autoincrement: bool) -> None:
    held = f"_nightowl_held_{table}"
    op.execute(f'CREATE TEMPORARY TABLE "{held}" AS SELECT * FROM "{table}"')
    op.execute(f'DELETE FROM "{table}"')  # deferred: the children's rows wait for their parents
    with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass
    columns = ", ".join(f'"{c["name"]}"' for c in sa.inspect(op.get_bind()).get_columns(table))
    op.execute(f'INSERT INTO "{table}" ({columns}) SELECT {columns} FROM "{held}" ORDER BY rowid')
    op.execute(f'DROP TABLE "{held}"')
