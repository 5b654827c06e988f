"""The ledger's statements on the driver's cursor (paymaster._driver): the same rows and the
same errors as through SQLAlchemy, on both backends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, Insert, Update, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from paymaster import Governor, Money, PolicyViolation, _driver, _statements, connect, ensure_schema
from paymaster._schema import budget, hold

MakeGov = Callable[..., Governor]
AT = datetime(2026, 12, 3, 12, 30, 15, 123456, tzinfo=timezone.utc)


def _every_statement() -> list[tuple[str, Any]]:
    found = [(name, getattr(_statements, name)) for name in _statements.__all__]
    statements = [(name, s) for name, s in found if not callable(s)]
    statements += [
        (
            f"take_budget({c},{k},{r})",
            _statements.take_budget(capped=c, call_capped=k, check_revoked=r),
        )
        for c in (False, True)
        for k in (False, True)
        for r in (False, True)
    ]
    statements += [
        ("alert_insert(pg)", _statements.alert_insert(True)),
        ("alert_insert(sqlite)", _statements.alert_insert(False)),
        ("audit_insert_and_head", _statements.audit_insert_and_head()),
    ]
    return statements


#: A dialect's own statements (ON CONFLICT; a data-modifying CTE).
_ONLY_ON = {
    "alert_insert(pg)": "postgresql",
    "alert_insert(sqlite)": "sqlite",
    "audit_insert_and_head": "postgresql",
}


@pytest.mark.parametrize(
    "dialect", [sqlite.dialect(), postgresql.psycopg.dialect()], ids=["sqlite", "postgresql"]
)
def test_every_ledger_statement_compiles_once_for_the_driver(dialect: Any) -> None:
    for name, statement in _every_statement():
        if _ONLY_ON.get(name, dialect.name) != dialect.name:
            continue
        keys = tuple(c.key for c in statement.table.c) if isinstance(statement, Insert) else ()
        prepared = _driver._prepare(statement, dialect, keys)
        assert prepared.sql, name
        # Fixed SQL: nothing left for SQLAlchemy to render at execution time.
        assert "POSTCOMPILE" not in prepared.sql, name


def test_an_insert_that_leaves_out_a_defaulted_column_is_refused() -> None:
    keys = tuple(c.key for c in hold.c if c.key != "attempts")
    with pytest.raises(ValueError, match="attempts"):
        _driver._prepare(_statements.INSERT_HOLD, sqlite.dialect(), keys)


def _hold(hold_id: str, key: str | None = None) -> dict[str, Any]:
    return {
        "id": hold_id,
        "idempotency_key": key,
        "agent": "refund-agent",
        "run": None,
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "method": "POST",
        "customer": None,
        "currency": "JPY",
        "estimate": 500,
        "actual": None,
        "daily_budget_id": 1,
        "run_budget_id": None,
        "policy_id": "p",
        "policy_hash": "h",
        "state": "pending",
        "created_at": AT,
        "resolved_at": None,
        "resolved_by": None,
        "resolution": None,
        "tool_call_id": None,
        "vendor_key": None,
        "subject": None,
        "attempts": 1,
        "holders": 1,
        "overrun": None,
        "overrun_acknowledged_at": None,
        "overrun_acknowledged_by": None,
        "overrun_acknowledgement": None,
    }


@pytest.fixture
def engine(db_url: str) -> Any:
    made = connect(db_url)
    ensure_schema(made)
    yield made
    made.dispose()


def test_rows_read_on_the_driver_equal_sqlalchemys(engine: Engine) -> None:
    with engine.begin() as conn:
        _driver.run(conn, _statements.INSERT_HOLD, _hold("h1"))
        mine = _driver.run(conn, _statements.HOLD_BY_ID, {"p_id": "h1"}).one()
        theirs = conn.execute(_statements.HOLD_BY_ID, {"p_id": "h1"}).one()
    assert mine._mapping == dict(theirs._mapping)
    assert mine.created_at == AT and mine.created_at.tzinfo is not None
    assert mine.estimate == 500 and mine.state == "pending"


def test_rowcount_and_no_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        _driver.run(conn, _statements.INSERT_HOLD, _hold("h1"))
        rearm = _statements.REARM_HOLD
        assert isinstance(rearm, Update)
        # REARM_HOLD only takes a released hold: this one is pending, nothing changes.
        params = {f"p_{k}": v for k, v in _hold("h1").items() if k not in ("id", "idempotency_key")}
        params = {k: v for k, v in params.items() if k not in ("p_attempts", "p_holders")}
        changed = _driver.run(conn, rearm, {**params, "p_id": "h1"})
        assert changed.rowcount == 0
        assert _driver.run(conn, _statements.HOLD_BY_ID, {"p_id": "none"}).first() is None
        assert _driver.run(conn, _statements.HOLD_BY_ID, {"p_id": "none"}).scalar() is None


def test_a_constraint_violation_is_sqlalchemys_integrity_error(engine: Engine) -> None:
    with engine.begin() as conn:
        _driver.run(conn, _statements.INSERT_HOLD, _hold("h1", key="k"))
    with pytest.raises(IntegrityError) as raised, engine.begin() as conn:
        _driver.run(conn, _statements.INSERT_HOLD, _hold("h2", key="k"))
    assert raised.value.orig is not None
    assert not raised.value.connection_invalidated
    with engine.connect() as conn:  # nothing of the failed transaction was kept
        assert conn.execute(select(hold.c.id)).scalars().all() == ["h1"]


def test_a_missing_parameter_is_refused_before_anything_is_sent(engine: Engine) -> None:
    with pytest.raises(Exception, match="p_id"), engine.begin() as conn:
        _driver.run(conn, _statements.HOLD_BY_ID, {})


@pytest.mark.postgres
def test_a_lost_connection_is_invalidated_and_says_so(pg_admin_url: str, engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("a server that can drop a session is PostgreSQL's")
    admin = connect(pg_admin_url)
    try:
        with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with admin.begin() as other:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            _driver.run(conn, _statements.BUDGET_STATE, {"p_bid": 1})
        assert raised.value.connection_invalidated
        # The pool hands out a working connection afterwards.
        with engine.begin() as conn:
            assert _driver.run(conn, _statements.BUDGET_STATE, {"p_bid": 1}).first() is None
            assert conn.execute(select(budget.c.id)).first() is None
    finally:
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("call", ["settle", "deny"])
def test_a_commit_sent_with_the_last_statement_and_its_reply_lost_is_found_on_retry(
    make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """PostgreSQL: the audit row's COMMIT goes in its pipeline. The server commits it and
    the reply is lost: the ledger retries on a fresh connection and finds that commit,
    writing nothing twice."""
    gov = make_governor()
    if gov.engine.dialect.name != "postgresql":
        pytest.skip("the pipelined COMMIT is PostgreSQL's")
    import psycopg

    original = psycopg.Pipeline.__exit__
    lost: list[bool] = []

    def exit_then_drop(self: psycopg.Pipeline, *exc_info: Any) -> None:
        original(self, *exc_info)
        conn = self._conn
        if not lost and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            lost.append(True)  # this pipeline's COMMIT was carried out
            conn.close()  # as a dropped socket would
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    args: dict[str, Any] = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
    with gov.guard(**args, estimate=Money(3000, "USD")) as warm:  # the budget row exists
        warm.settle()
    monkeypatch.setattr(psycopg.Pipeline, "__exit__", exit_then_drop)
    if call == "settle":
        with gov.guard(**args, estimate=Money(3000, "USD")) as paid:
            paid.settle(Money(2000, "USD"))
    else:
        with pytest.raises(PolicyViolation), gov.guard(**args, estimate=Money(10**9, "USD")):
            pass
    assert lost
    assert gov.holds() == []
    assert gov.budgets()[0].committed == Money(5000 if call == "settle" else 3000, "USD")
    outcomes = [r.outcome for r in gov.audit.query()]
    assert outcomes == ["allowed", "allowed" if call == "settle" else "denied"]
    assert gov.audit.verify().ok


@pytest.mark.postgres
def test_a_postgresql_engine_made_elsewhere_governs_as_one_made_by_connect(db_url: str) -> None:
    """An engine the application made (psycopg with its own BEGINs, no BEGIN owed): the
    same calls, rows and chain as through :func:`paymaster.connect`."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite engines must come from paymaster.connect")
    from sqlalchemy import create_engine

    from conftest import refund_policy

    engine = create_engine(db_url)
    try:
        with Governor(engine, policies=[refund_policy()]) as gov:
            args: dict[str, Any] = {"agent": "refund-agent", "vendor": "stripe"}
            with gov.guard(**args, endpoint="/v1/refunds", estimate=Money(3000, "USD")) as call:
                call.settle(Money(2500, "USD"))
            with (
                pytest.raises(PolicyViolation),
                gov.guard(**args, endpoint="/v1/refunds", estimate=Money(10**9, "USD")),
            ):
                pass
            assert [r.outcome for r in gov.audit.query()] == ["allowed", "denied"]
            assert gov.budgets()[0].committed == Money(2500, "USD")
            assert gov.audit.verify().ok
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_after_a_restart_the_one_retry_gets_a_fresh_connection(
    pg_admin_url: str, make_governor: MakeGov
) -> None:
    """Every pooled connection died (a PostgreSQL restart): the first call's retry, and
    every call after it, gets a new connection, not the next dead one in the pool."""
    gov = make_governor()
    if gov.engine.dialect.name != "postgresql":
        pytest.skip("a server that can drop every session is PostgreSQL's")
    args: dict[str, Any] = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
    with gov.guard(**args, estimate=Money(100, "USD")) as warm:  # budget and chain exist
        warm.settle()
    pooled = [gov.engine.connect() for _ in range(6)]
    pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in pooled]
    for conn in pooled:
        conn.close()  # back to the pool, alive
    admin = connect(pg_admin_url)
    try:
        with admin.begin() as other:
            for pid in pids:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    finally:
        admin.dispose()
    for _ in range(4):
        with gov.guard(**args, estimate=Money(100, "USD")) as call:
            call.settle()
    assert [r.outcome for r in gov.audit.query()] == ["allowed"] * 5
