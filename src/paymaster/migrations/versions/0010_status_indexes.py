"""Indexes for ``paymaster status``, so that it reads one day's rows, not the whole ledger.

``status`` (``Ledger.budgets(day)``) finds the day's budgets by ``kind`` and ``window``,
and sums the holds of each run budget by ``run_budget_id``; neither had an index. The
budgets were scanned whole (a row per agent type, vendor and day: 75,000 rows after 500
days of 200 budgets), and the holds too: on a ledger of 10 million audit rows and 9
million holds on PostgreSQL, the run budgets' sum was a parallel sequential scan of a
second and more, however few holds the day had.

``ix_hold_run_budget`` covers only the holds that have a run budget (calls made in a run
with a run policy), so the others cost no index entry. Its predicate is implied by the
query's ``run_budget_id IN (...)`` on both backends (an ``IN`` is NULL-rejecting), so
both planners use it. The budgets' index costs nothing per call: a budget row is inserted
once per day and agent type, and the columns a call updates are not indexed.

Both are built with ``CREATE INDEX`` inside the migration's transaction, which holds off
writes to the table while it builds (on PostgreSQL, ``CONCURRENTLY`` cannot run in a
transaction): a few seconds for millions of holds. Upgrade when a pause of governed calls
is acceptable, or build the index beforehand with ``CREATE INDEX CONCURRENTLY
ix_hold_run_budget ON paymaster_hold (run_budget_id) WHERE run_budget_id IS NOT NULL``;
the migration then skips it (``IF NOT EXISTS``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with_run_budget = sa.text("run_budget_id IS NOT NULL")
    op.create_index(
        "ix_hold_run_budget",
        "paymaster_hold",
        ["run_budget_id"],
        sqlite_where=with_run_budget,
        postgresql_where=with_run_budget,
        if_not_exists=True,
    )
    op.create_index(
        "ix_budget_kind_window", "paymaster_budget", ["kind", "window"], if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index("ix_budget_kind_window", table_name="paymaster_budget")
    op.drop_index("ix_hold_run_budget", table_name="paymaster_hold")
