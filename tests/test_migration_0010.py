"""Revision 0010: the indexes ``paymaster status`` reads one day through.

A ledger with budgets and holds (run budgets among them) goes down to 0009 and up again:
the indexes are the ones ``_schema.py`` declares, status reads the same budgets, and the
partial index on ``run_budget_id`` is one both planners can use for status's ``IN``.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text

from conftest import Clock, refund_policy
from paymaster import Governor, Money, RunPolicy
from paymaster._db import _alembic_config
from paymaster._schema import hold, metadata

NEW_INDEXES = {"paymaster_hold": "ix_hold_run_budget", "paymaster_budget": "ix_budget_kind_window"}


def _indexes(engine: Engine, table: str) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes(table) if index["name"]}


def _index_diffs(engine: Engine) -> list[Any]:
    """What alembic would change in the hold and budget tables' indexes to match
    ``_schema.py``: nothing, when the migrations made them."""
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    return [
        d
        for d in diff
        if not isinstance(d, list)
        and d[0] in ("add_index", "remove_index")
        and d[1].table.name in NEW_INDEXES
    ]


def test_a_ledger_at_0009_upgrades_and_status_reads_the_same(db_url: str, clock: Clock) -> None:
    gov = Governor(db_url, policies=[refund_policy()], clock=clock)
    try:
        for n in range(4):
            run_policy = RunPolicy(cap="20.00 USD") if n % 2 == 0 else None
            with gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(100 + n, "USD"),
                run=f"run-{n}",
                run_policy=run_policy,
            ) as call:
                call.settle()
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(300, "USD"),
            run="run-0",
        ):
            pass  # left pending: counted as pending in its run budget
        before = gov.budgets()
        assert any(b.kind == "run" for b in before)
        engine = gov.engine
        assert _index_diffs(engine) == []
        with engine.begin() as conn:
            command.downgrade(_alembic_config(conn), "0009")
        for table, index in NEW_INDEXES.items():
            assert index not in _indexes(engine, table)
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")
        for table, index in NEW_INDEXES.items():
            assert index in _indexes(engine, table)
        assert _index_diffs(engine) == []
        assert gov.budgets() == before
        assert gov.audit.verify().ok
    finally:
        gov.close()


def test_the_run_budget_index_serves_status_in_query(db_url: str, clock: Clock) -> None:
    """Its predicate (``run_budget_id IS NOT NULL``) must follow from status's
    ``run_budget_id IN (...)``, or the planner may not use a partial index."""
    gov = Governor(db_url, policies=[refund_policy()], clock=clock)
    try:
        query = select(hold.c.id).where(hold.c.run_budget_id.in_([1, 2, 3]))
        with gov.engine.begin() as conn:
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            if conn.dialect.name == "postgresql":
                # An empty table is read whole unless a scan of it is ruled out.
                conn.execute(text("SET LOCAL enable_seqscan = off"))
                plan = conn.execute(text(f"EXPLAIN {compiled}")).scalars().all()
            else:
                plan = [r[-1] for r in conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]
        assert any("ix_hold_run_budget" in line for line in plan), plan
    finally:
        gov.close()
