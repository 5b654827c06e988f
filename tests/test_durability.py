"""Crashes, revokes from other processes, an unreachable ledger, and schema versions."""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from conftest import refund_policy
from paymaster import (
    GovernanceUnavailable,
    Governor,
    HoldState,
    Money,
    PolicyViolation,
    SchemaVersionError,
    ViolationCode,
)
from tcp_proxy import TcpProxy
from workers import reserve_then_die, revoke_agent

SPAWN = multiprocessing.get_context("spawn")


def _run(target: object, *args: object) -> int:
    process = SPAWN.Process(target=target, args=args)
    process.start()
    process.join(60)
    assert process.exitcode is not None, "child did not finish"
    return process.exitcode


@pytest.mark.slow
def test_sigkilled_holder_leaves_its_hold_pending_and_counted(db_url: str) -> None:
    fields = refund_policy().model_dump(mode="json")
    exitcode = _run(reserve_then_die, db_url, fields, 4000)
    assert exitcode == -9  # SIGKILL: no finally, no atexit ran
    gov = Governor(db_url, policies=[refund_policy()])  # a restart
    try:
        [held] = gov.holds()
        assert held.state is HoldState.PENDING and held.estimate == Money(4000, "USD")
        assert gov.budgets()[0].committed == Money(4000, "USD")
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(5000, "USD"),
        ) as call:
            call.settle()
        with (
            pytest.raises(PolicyViolation) as info,
            gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(1001, "USD"),
            ),
        ):
            pass
        assert info.value.remaining == Money(1000, "USD")  # the dead hold still counts
        gov.resolve_hold(held.id, settle=Money(4000, "USD"), reason="Stripe shows re_1", by="ops")
        assert gov.holds() == []
        outcomes = [r.outcome for r in gov.audit.query()]
        assert outcomes.count("allowed") == 2  # the live call and the resolved crashed one
    finally:
        gov.close()


@pytest.mark.slow
def test_revoke_from_another_process_refuses_the_next_reserve(db_url: str) -> None:
    gov = Governor(db_url, policies=[refund_policy()])
    try:
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
        ) as call:
            call.settle()
        fields = refund_policy().model_dump(mode="json")
        assert _run(revoke_agent, db_url, fields, "refund-agent") == 0
        ran = []
        with (
            pytest.raises(PolicyViolation) as info,
            gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(100, "USD"),
            ),
        ):
            ran.append(True)
        assert info.value.code is ViolationCode.REVOKED and not ran
        assert "runaway loop" in str(info.value)
    finally:
        gov.close()


def test_unreachable_postgres_fails_closed(pg_admin_url: str) -> None:
    url = make_url(pg_admin_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    schema = "t_failclosed_" + str(proxy.port)
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    gov = Governor(f"{proxied}?options=-csearch_path%3D{schema}", policies=[refund_policy()])
    try:
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
        ) as call:
            call.settle()
        proxy.cut()
        ran = []
        with pytest.raises(GovernanceUnavailable, match="so the call was not made"):
            with gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(100, "USD"),
            ):
                ran.append(True)
        assert not ran
    finally:
        gov.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_unreachable_sqlite_fails_closed(tmp_path: Path) -> None:
    home = tmp_path / "ledger"
    home.mkdir()
    gov = Governor(f"sqlite:///{home / 'l.db'}", policies=[refund_policy()])
    try:
        gov.engine.dispose()  # drop pooled connections, as a restart of the volume would
        shutil.rmtree(home)  # the ledger's volume is gone
        ran = []
        with pytest.raises(GovernanceUnavailable, match="unable to open database"):
            with gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(100, "USD"),
            ):
                ran.append(True)
        assert not ran
    finally:
        gov.close()


def test_governor_refuses_to_start_without_a_ledger() -> None:
    with pytest.raises(GovernanceUnavailable, match=r"127\.0\.0\.1:1"):
        Governor("postgresql+psycopg://root@127.0.0.1:1/test", policies=[refund_policy()])


def test_schema_is_created_then_reused_and_newer_schema_refused(db_url: str) -> None:
    Governor(db_url, policies=[refund_policy()]).close()
    Governor(db_url, policies=[refund_policy()]).close()  # already at head: nothing to do
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="upgrade paymaster"):
        Governor(db_url, policies=[refund_policy()])


def test_fresh_database_without_upgrade_is_refused(db_url: str) -> None:
    with pytest.raises(SchemaVersionError, match="upgrade_schema=True"):
        Governor(db_url, policies=[refund_policy()], upgrade_schema=False)


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="not durable"):
        Governor("sqlite://", policies=[refund_policy()])


def test_dead_pooled_connections_do_not_lose_settles_denials_or_revokes(
    pg_admin_url: str,
) -> None:
    """PostgreSQL restarted (its backends killed) between steps: each write is retried
    once on a fresh connection, so nothing a call did goes unrecorded."""
    url, drop = _pg_schema(pg_admin_url)
    app = "pm_" + url.rsplit("%3D", 1)[-1]
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")

    def kill_backends() -> None:
        with admin.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app"
                ),
                {"app": app},
            ).scalar_one()
        assert killed >= 1

    gov = Governor(f"{url}&application_name={app}", policies=[refund_policy()])
    try:
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(1000, "USD"),
        ) as call:
            kill_backends()  # during the vendor call
            call.settle(Money(900, "USD"))  # below the estimate: the budget row moves
        kill_backends()
        with pytest.raises(PolicyViolation):
            with gov.guard(agent="refund-agent", vendor="stripe", endpoint="/v1/charges"):
                pass
        kill_backends()
        gov.revoke(agent="refund-agent", reason="after failover", by="ops")
        assert [h.state for h in gov.ledger.holds(states=list(HoldState))] == [HoldState.SETTLED]
        assert [r.outcome for r in gov.audit.query()] == ["allowed", "denied"]
        assert gov.budgets()[0].committed == Money(900, "USD")
        assert len(gov.revocations()) == 1
    finally:
        gov.close()
        admin.dispose()
        drop()


def _pg_schema(admin_url: str) -> tuple[str, Callable[[], None]]:
    from conftest import _pg_schema_url

    return _pg_schema_url(admin_url)
