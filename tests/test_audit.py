"""The audit log: one row per call, queries, run summaries, secrets and tamper evidence."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from conftest import Clock, refund_policy
from paymaster import Governor, Money, PolicyViolation
from paymaster._audit.chain import scrub

MakeGov = Callable[..., Governor]


def _calls(gov: Governor, clock: Clock) -> None:
    """Two agents: allowed, failed, errored and denied calls across two runs."""
    for run, amount in (("run-a", 1000), ("run-a", 2000), ("run-b", 500)):
        with gov.guard(
            agent="refund-agent",
            run=run,
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(amount, "USD"),
        ) as call:
            call.settle(http_status=200, vendor_request_id=f"req_{amount}")
        clock.advance(minutes=1)
    with gov.guard(
        agent="refund-agent",
        run="run-a",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money(100, "USD"),
    ) as call:
        call.fail(http_status=402, error="card_declined")
    with (
        pytest.raises(KeyError),
        gov.guard(
            agent="refund-agent",
            run="run-a",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
        ),
    ):
        raise KeyError("amount")
    with (
        pytest.raises(PolicyViolation),
        gov.guard(
            agent="refund-agent",
            run="run-a",
            vendor="stripe",
            endpoint="/v1/charges",
        ),
    ):
        pass
    with gov.guard(
        agent="lookup-agent",
        run="run-b",
        vendor="stripe",
        endpoint="/v1/charges",
        method="GET",
        free=True,
    ) as call:
        call.settle(http_status=200)


def _two_agents(make_governor: MakeGov) -> Governor:
    lookup = refund_policy(id="lookups", agent="lookup-agent", endpoints=["/v1/charges"])
    return make_governor(refund_policy(), lookup)


def test_every_call_has_one_row_with_its_fields(make_governor: MakeGov, clock: Clock) -> None:
    gov = _two_agents(make_governor)
    _calls(gov, clock)
    rows = gov.audit.query()
    assert [r.outcome for r in rows] == [
        "allowed",
        "allowed",
        "allowed",
        "failed",
        "errored",
        "denied",
        "allowed",
    ]
    first = rows[0]
    assert (first.run, first.agent, first.vendor, first.endpoint, first.method) == (
        "run-a",
        "refund-agent",
        "stripe",
        "/v1/refunds",
        "POST",
    )
    assert (first.http_status, first.vendor_request_id, first.cost) == (
        200,
        "req_1000",
        Money(1000, "USD"),
    )
    assert first.policy_id == "refunds" and len(first.policy_hash or "") == 64
    assert first.hold_id and first.at == clock.now.replace(minute=0)
    assert rows[3].http_status == 402 and rows[3].error == "card_declined"
    assert rows[4].error == "KeyError: 'amount'"
    assert rows[5].violation_code == "endpoint_not_allowed" and rows[5].hold_id is None


def test_queries_and_run_summary(make_governor: MakeGov, clock: Clock) -> None:
    gov = _two_agents(make_governor)
    _calls(gov, clock)
    assert len(gov.audit.query(run="run-b")) == 2
    assert len(gov.audit.query(agent="lookup-agent")) == 1
    assert len(gov.audit.query(vendor="stripe", outcome="denied")) == 1
    assert len(gov.audit.query(since=clock.now.replace(minute=1))) == 6
    assert len(gov.audit.query(until=clock.now.replace(minute=1))) == 1
    assert gov.audit.query(limit=1, newest_first=True)[0].agent == "lookup-agent"
    summary = gov.audit.run_summary("run-a")
    assert summary.calls == 5
    assert summary.outcomes == {"allowed": 2, "failed": 1, "errored": 1, "denied": 1}
    assert summary.spend == {"USD": Money(3000, "USD")}
    assert summary.agents == ["refund-agent"]
    assert [r.id for r in gov.audit.iter_records(batch=2)] == [r.id for r in gov.audit.query()]


@pytest.mark.tampers_with_audit
def test_verify_names_the_first_tampered_row(make_governor: MakeGov, clock: Clock) -> None:
    gov = _two_agents(make_governor)
    _calls(gov, clock)
    assert gov.audit.verify().ok
    rows = gov.audit.query()
    with gov.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            with pytest.raises(DBAPIError, match="append-only"), conn.begin_nested():
                conn.execute(text("UPDATE paymaster_audit SET actual = 1"))
            conn.execute(text("ALTER TABLE paymaster_audit DISABLE TRIGGER USER"))
        conn.execute(
            text("UPDATE paymaster_audit SET actual = 1 WHERE id = :id"), {"id": rows[2].id}
        )
    result = gov.audit.verify()
    assert not result.ok
    assert result.first_bad_id == rows[2].id
    assert "does not match its hash" in (result.reason or "")


@pytest.mark.tampers_with_audit
def test_verify_detects_deleted_rows(make_governor: MakeGov, clock: Clock) -> None:
    gov = _two_agents(make_governor)
    _calls(gov, clock)
    rows = gov.audit.query(agent="refund-agent")
    with gov.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE paymaster_audit DISABLE TRIGGER USER"))
        conn.execute(text("DELETE FROM paymaster_audit WHERE id = :id"), {"id": rows[1].id})
    result = gov.audit.verify()
    assert result.first_bad_id == rows[2].id and "missing" in (result.reason or "")
    with gov.engine.begin() as conn:
        conn.execute(text("DELETE FROM paymaster_audit WHERE id = :id"), {"id": rows[-1].id})
    assert not gov.audit.verify().ok  # a truncated tail is caught by the chain head


def test_secrets_are_scrubbed_and_long_errors_truncated(make_governor: MakeGov) -> None:
    gov = make_governor()
    secret = "auth failed for sk_live_51HxAbCdEfGh card 4242 4242 4242 4242 Bearer abc.def.ghi123"
    with gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(100, "USD")
    ) as call:
        call.fail(http_status=401, error=secret + " " + "x" * 5000)
    [row] = gov.audit.query()
    assert row.error is not None
    assert "sk_live" not in row.error and "4242 4242" not in row.error
    assert "abc.def" not in row.error
    assert len(row.error) == 2000 and row.error.endswith("]") and "…[cut, sha256:" in row.error
    assert scrub(None) is None


@pytest.mark.tampers_with_audit
def test_verify_flags_a_chain_whose_head_row_was_deleted(
    make_governor: MakeGov, clock: Clock
) -> None:
    gov = _two_agents(make_governor)
    _calls(gov, clock)
    with gov.engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # as the owner could: its guard trigger off
            conn.execute(text("ALTER TABLE paymaster_audit_chain DISABLE TRIGGER USER"))
        conn.execute(text("DELETE FROM paymaster_audit_chain"))
    result = gov.audit.verify()
    assert not result.ok
    assert result.first_bad_id == gov.audit.query()[0].id
    assert "no head row" in (result.reason or "")


def test_a_non_utc_clock_still_verifies_and_uses_the_utc_day(make_governor: MakeGov) -> None:
    from datetime import datetime, timedelta, timezone

    tokyo = timezone(timedelta(hours=9))
    gov = make_governor(clock=lambda: datetime(2026, 11, 25, 8, 0, tzinfo=tokyo))
    with gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(100, "USD")
    ) as call:
        call.settle()
    assert gov.audit.verify().ok
    assert gov.budgets()[0].window == "2026-11-24"  # 08:00 in Tokyo is still the 24th in UTC
