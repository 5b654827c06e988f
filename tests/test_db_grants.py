"""Least privilege on PostgreSQL: ``paymaster db grants`` / :func:`paymaster.grants_sql`.

The PostgreSQL tests make a database of their own (the admin role, as owner, migrates it
into schema ``ledger``), a login role that owns nothing, and apply the printed SQL as the
owner. Connected as that role, the whole call path runs; tampering with the audit log,
its trigger or the tables is refused. The database and the role are dropped afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ProgrammingError
from typer.testing import CliRunner

from conftest import Clock, refund_policy
from paymaster import (
    AlertConfig,
    CallbackSink,
    Governor,
    HoldState,
    Money,
    PolicyViolation,
    ViolationCode,
)
from paymaster._db import connect, ensure_schema
from paymaster._grants import SEQUENCES, TABLE_PRIVILEGES, grants_sql
from paymaster._schema import metadata
from paymaster._vault import VaultKeyRefused, VaultKeys
from paymaster.cli.app import app
from paymaster.proxy.replay import ReplayStore

SCHEMA = "ledger"


def usd(amount: str) -> Money:
    return Money.parse(f"{amount} USD")


# -- the SQL itself (no database) ------------------------------------------------------------
def test_every_table_is_granted_and_the_audit_table_is_insert_and_select_only() -> None:
    assert set(TABLE_PRIVILEGES) == {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    assert TABLE_PRIVILEGES["paymaster_audit"][0] == ("SELECT", "INSERT")
    granted = {p for privileges, _why in TABLE_PRIVILEGES.values() for p in privileges}
    assert granted <= {"SELECT", "INSERT", "UPDATE", "DELETE"}  # never TRUNCATE, TRIGGER
    deleters = [t for t, (privileges, _why) in TABLE_PRIVILEGES.items() if "DELETE" in privileges]
    assert deleters == ["paymaster_proxy_replay"]
    sql = grants_sql("pm_app", schema=SCHEMA)
    assert 'GRANT SELECT, INSERT ON TABLE "ledger"."paymaster_audit" TO "pm_app";' in sql
    assert "TRUNCATE" in sql and "GRANT TRUNCATE" not in sql  # only in the comments
    for sequence in SEQUENCES:
        assert f'GRANT USAGE ON SEQUENCE "ledger"."{sequence}" TO "pm_app";' in sql
    assert "paymaster db upgrade" in sql  # migrations are the owner's
    assert sql.count("BEGIN;") == 1 and sql.rstrip().endswith("COMMIT;")


def test_names_are_quoted_and_bad_ones_refused() -> None:
    sql = grants_sql('we"ird', schema="it's")
    assert 'TO "we""ird";' in sql and '"it\'s"."paymaster_hold"' in sql
    assert "app CONSTANT name := 'we\"ird';" in sql and "ledger CONSTANT name := 'it''s';" in sql
    for bad in (
        "",
        " ",
        "public",
        "PUBLIC",
        "x\x00y",
        "a" * 64,
        "$paymaster_grants$",
        "x\nALTER TABLE t DISABLE TRIGGER ALL;--",
        "x\ry",
        "x\u2028y",
        "x\u202ey",
    ):
        with pytest.raises(ValueError):
            grants_sql(bad)


def test_the_cli_prints_the_sql() -> None:
    result = CliRunner().invoke(app, ["db", "grants", "--role", "pm_app", "--schema", SCHEMA])
    assert result.exit_code == 0, result.output
    assert result.output == grants_sql("pm_app", schema=SCHEMA)
    refused = CliRunner().invoke(app, ["db", "grants", "--role", "public"])
    assert refused.exit_code == 2 and "PUBLIC" in refused.output


# -- on PostgreSQL ---------------------------------------------------------------------------
@dataclass
class Ledger:
    owner_url: str  # the admin role, owner of everything, on the test's database
    app_url: str  # the least-privilege role
    role: str


def _url(base: URL, **changes: object) -> str:
    return base.set(**changes).render_as_string(hide_password=False)  # type: ignore[arg-type]


def _apply(url: str, sql: str) -> None:
    """Run the printed SQL as psql would: one script, its own BEGIN/COMMIT."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.fixture(scope="module")
def ledger(pg_admin_url: str) -> Iterator[Ledger]:
    suffix = secrets.token_hex(5)
    database, role, password = f"pm_grants_{suffix}", f"pm_app_{suffix}", secrets.token_hex(16)
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
        # A password too, in case this PostgreSQL does not trust local connections.
        conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"))
    base = make_url(pg_admin_url)
    search_path = {"options": f"-csearch_path={SCHEMA}"}
    query = {**base.query, **search_path}
    owner_url = _url(base, database=database, query=query)
    app_url = _url(base, database=database, username=role, password=password, query=query)
    try:
        owner = create_engine(owner_url, isolation_level="AUTOCOMMIT")
        with owner.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
        owner.dispose()
        engine = connect(owner_url)
        ensure_schema(engine)  # the owner migrates
        engine.dispose()
        _apply(owner_url, grants_sql(role, schema=SCHEMA))
        yield Ledger(owner_url, app_url, role)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


REFUND = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}


@pytest.mark.postgres
def test_the_role_runs_the_whole_call_path(ledger: Ledger) -> None:
    clock = Clock()
    alerts: list[object] = []
    # Default settings: the schema is at head, so the Governor only reads its revision.
    gov = Governor(
        ledger.app_url,
        policies=[refund_policy()],
        clock=clock,
        alerts=AlertConfig(thresholds=(0.1,), sinks=[CallbackSink(alerts.append)]),
    )
    try:
        with gov.guard(**REFUND, estimate=usd("10.00"), run="r1") as call:  # allowed
            call.settle(usd("9.00"), http_status=200, vendor_request_id="req_1")
        with pytest.raises(PolicyViolation) as refused:  # over the per-call cap
            with gov.guard(**REFUND, estimate=usd("60.00")):
                pass
        assert refused.value.code is ViolationCode.PER_CALL_CAP
        with gov.guard(**REFUND, estimate=usd("5.00")) as call:  # released
            call.fail(http_status=402, error="card_declined")
        with pytest.raises(TimeoutError), gov.guard(**REFUND, estimate=usd("5.00")) as call:
            raise TimeoutError("read timed out")  # unknown
        [held] = gov.holds(older_than=timedelta(0))
        assert held.state is HoldState.UNKNOWN
        assert gov.check_stale_holds(timedelta(0))  # flags it (an UPDATE of the hold)
        gov.resolve_hold(held.id, release=True, reason="Stripe shows none", by="ops")

        gov.revoke(agent="refund-agent", reason="incident", by="ops")
        with pytest.raises(PolicyViolation) as revoked, gov.guard(**REFUND, estimate=usd("1")):
            pass
        assert revoked.value.code is ViolationCode.REVOKED
        assert gov.restore(agent="refund-agent", by="ops") == 1

        with gov.guard(**REFUND, estimate=usd("1.00"), idempotency_key="k1") as call:
            call.settle(usd("3.00"))  # an overrun: freezes the budget
        assert gov.budgets()[0].frozen
        gov.acknowledge_overrun(call.hold_id, reason="vendor fee", by="ops")
        assert not gov.budgets()[0].frozen

        record = gov.free_call(agent="refund-agent", vendor="stripe", endpoint="/v1/balance")
        record(duration_ms=3, http_status=200)

        assert gov.flush_alerts()
        assert any(getattr(a, "kind", None) == "threshold" for a in alerts)
        outcomes = [r.outcome for r in gov.audit.query()]
        expected = {"allowed", "denied", "failed", "unknown", "reconciled", "overrun"}
        assert expected | {"acknowledged"} <= set(outcomes)
        assert gov.audit.run_summary("r1").calls == 1
        verified = gov.audit.verify()
        assert verified.ok and verified.rows_checked == len(outcomes)
        assert gov.revocations() == []  # lifted
    finally:
        gov.close()

    # The proxy's tables: vault keys, failed authentications, replays.
    engine = connect(ledger.app_url)
    try:
        keys = VaultKeys(engine, clock)
        made = keys.create("refund-agent", by="ops", label="grants")
        assert keys.authenticate(made.secret).id == made.record.id
        with pytest.raises(VaultKeyRefused):
            keys.authenticate(made.secret[:-4] + "AAAA")
        keys.record_failure(made.record.id, "bad_secret")
        keys.record_failure(made.record.id, "bad_secret")
        assert [f.count for f in keys.failures(made.record.id)] == [2]
        replays = ReplayStore(engine, clock, timedelta(hours=24))
        replays.keep("k1", "refund-agent", made.record.run, made.record.id, 200, {"a": "b"}, b"{}")
        found = replays.find("k1", "refund-agent", made.record.id)
        assert found is not None and found.body == b"{}"
        clock.advance(days=2)
        assert replays.purge() == 1
        assert keys.revoke(made.record.id, by="ops", reason="done").revoked_at is not None
    finally:
        engine.dispose()

    # An operator's command as the role (the CLI never upgrades the schema).
    verify = CliRunner().invoke(app, ["audit", "verify", "--db", ledger.app_url])
    assert verify.exit_code == 0, verify.output


TAMPERING = [
    "UPDATE paymaster_audit SET error = 'nothing happened'",
    "DELETE FROM paymaster_audit",
    "TRUNCATE paymaster_audit",
    "ALTER TABLE paymaster_audit DISABLE TRIGGER paymaster_audit_append_only",
    "ALTER TABLE paymaster_audit DISABLE TRIGGER ALL",
    "DROP TRIGGER paymaster_audit_append_only ON paymaster_audit",
    "CREATE OR REPLACE FUNCTION paymaster_audit_append_only() RETURNS trigger "
    "AS $$ BEGIN RETURN NEW; END $$ LANGUAGE plpgsql",
    "DROP TABLE paymaster_audit",
    "ALTER TABLE paymaster_audit RENAME TO paymaster_audit_old",
    "DROP TABLE paymaster_audit_chain",
    "TRUNCATE paymaster_hold",
    "DELETE FROM paymaster_hold",
    "DELETE FROM paymaster_budget",
    "UPDATE alembic_version SET version_num = '0001'",
    "SELECT setval('paymaster_audit_id_seq', 1)",
    "CREATE TABLE paymaster_shadow (id int)",
]


@pytest.mark.postgres
def test_the_role_cannot_tamper_with_the_audit_log(ledger: Ledger) -> None:
    with Governor(ledger.app_url, policies=[refund_policy()], upgrade_schema=False) as gov:
        with gov.guard(**REFUND, estimate=usd("1.00")) as call:
            call.settle(usd("1.00"))
    engine = create_engine(ledger.app_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM paymaster_audit")).scalar_one()
            assert rows >= 1
            for statement in TAMPERING:
                with pytest.raises(ProgrammingError) as denied:
                    conn.execute(text(statement))
                conn.rollback()
                code = getattr(denied.value.orig, "sqlstate", None)
                assert code == "42501", (statement, denied.value)  # insufficient_privilege
            after = conn.execute(text("SELECT count(*) FROM paymaster_audit")).scalar_one()
            assert after == rows
    finally:
        engine.dispose()
    with Governor(ledger.app_url, policies=[refund_policy()], upgrade_schema=False) as gov:
        assert gov.audit.verify().ok


@pytest.mark.postgres
def test_a_temporary_table_cannot_stand_in_for_the_audit_table(ledger: Ledger) -> None:
    """Any role may make a temporary table, and PostgreSQL looks in the session's
    temporary schema first: named by bare name, the chain-head check would read the
    role's own ``paymaster_audit`` and let it wind a head past the rows that exist."""
    with Governor(ledger.app_url, policies=[refund_policy()], upgrade_schema=False) as gov:
        with gov.guard(**REFUND, estimate=usd("1.00")) as call:
            call.settle(usd("1.00"))
    conninfo = make_url(ledger.app_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False)) as conn:
        forged = "'" + "f" * 64 + "'"
        conn.execute("CREATE TEMP TABLE paymaster_audit (chain varchar, seq bigint, hash varchar)")
        conn.execute(f"INSERT INTO paymaster_audit VALUES ('refund-agent', 1, {forged})")
        conn.execute(f"INSERT INTO paymaster_audit VALUES ('refund-agent', 2, {forged})")
        conn.commit()
        with pytest.raises(psycopg.errors.RaiseException, match="names no row"):
            conn.execute(f"UPDATE paymaster_audit_chain SET head = {forged}")
            conn.execute("UPDATE paymaster_audit_chain SET seq = seq + 1")
            conn.commit()
    with Governor(ledger.app_url, policies=[refund_policy()], upgrade_schema=False) as gov:
        assert gov.audit.verify().ok


@pytest.mark.postgres
def test_the_grants_refuse_a_role_that_could_undo_them(ledger: Ledger) -> None:
    """A superuser, a member of the owner's role, or a CREATEROLE role is refused: grants
    and revokes cannot restrict an owner."""
    owner = make_url(ledger.owner_url).username
    assert owner
    with pytest.raises(psycopg.errors.RaiseException, match=r"superuser|owns"):
        _apply(ledger.owner_url, grants_sql(owner, schema=SCHEMA))
    member = f"pm_member_{secrets.token_hex(5)}"
    admin = create_engine(ledger.owner_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE ROLE "{member}" IN ROLE "{owner}"'))
        with pytest.raises(psycopg.errors.RaiseException, match="owns the paymaster tables"):
            _apply(ledger.owner_url, grants_sql(member, schema=SCHEMA))
        with admin.connect() as conn:
            conn.execute(text(f'REVOKE "{owner}" FROM "{member}"'))
            conn.execute(text(f'ALTER ROLE "{member}" CREATEROLE'))
        with pytest.raises(psycopg.errors.RaiseException, match="CREATEROLE"):
            _apply(ledger.owner_url, grants_sql(member, schema=SCHEMA))
        with pytest.raises(psycopg.errors.RaiseException, match="does not exist"):
            _apply(ledger.owner_url, grants_sql(member + "_nobody", schema=SCHEMA))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE IF EXISTS "{member}"'))
        admin.dispose()
