"""The governed-call API on both backends: reserve, settle, release, deny, audit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest

from conftest import Clock, refund_policy
from paymaster import (
    GovernanceUnavailable,
    Governor,
    HoldAlreadyResolved,
    HoldState,
    Money,
    Outcome,
    Policy,
    PolicyError,
    PolicyViolation,
    RunPolicy,
    ViolationCode,
)

USD = "USD"
MakeGov = Callable[..., Governor]


def refund(gov: Governor, amount: str, **kw: object) -> None:
    """One governed refund settled at its estimate."""
    args: dict[str, object] = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money.parse(f"{amount} USD"),
    }
    args.update(kw)
    with gov.guard(**args) as call:  # type: ignore[arg-type]
        call.settle(http_status=200, vendor_request_id="req_1")


def test_at_cap_passes_and_over_cap_fails(make_governor: MakeGov) -> None:
    gov = make_governor()
    refund(gov, "50.00")
    refund(gov, "50.00")  # exactly at the $100 cap
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "0.01")
    assert info.value.code is ViolationCode.CAP_EXCEEDED
    assert info.value.remaining == Money(0, USD)
    assert info.value.policy_id == "refunds"


def test_cumulative_spend_counts_actuals(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("50.00 USD"),
    ) as call:
        call.settle(Money.parse("30.00 USD"))
    [daily] = gov.budgets()
    assert daily.committed == Money(3000, USD)
    assert daily.settled == Money(3000, USD)
    refund(gov, "50.00")
    refund(gov, "20.00")
    with pytest.raises(PolicyViolation):
        refund(gov, "0.01")


def test_denied_call_never_runs_and_is_audited_once(make_governor: MakeGov) -> None:
    gov = make_governor()
    ran = []
    with (
        pytest.raises(PolicyViolation) as info,
        gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/charges",
            estimate=Money.parse("1.00 USD"),
        ),
    ):
        ran.append(True)
    assert not ran
    assert info.value.code is ViolationCode.ENDPOINT_NOT_ALLOWED
    [row] = gov.audit.query()
    assert row.outcome == Outcome.DENIED.value
    assert row.violation_code == "endpoint_not_allowed"
    assert row.actual == 0
    assert row.hold_id is None
    assert gov.holds() == []


def test_refunds_subpath_allowed_and_lookalike_denied(make_governor: MakeGov) -> None:
    gov = make_governor()
    refund(gov, "1.00", endpoint="/v1/refunds/re_abc123", method="GET")
    for path in ("/v1/refundsX", "/v1/refunds/../charges", "/v1/refunds/%2e%2e/charges"):
        with pytest.raises(PolicyViolation) as info:
            refund(gov, "1.00", endpoint=path)
        assert info.value.code is ViolationCode.ENDPOINT_NOT_ALLOWED


def test_no_policy_is_denied_and_audited(make_governor: MakeGov) -> None:
    gov = make_governor()
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00", agent="someone-else")
    assert info.value.code is ViolationCode.NO_POLICY
    assert gov.audit.query()[0].violation_code == "no_policy"


def test_customer_allowlist_and_currency(make_governor: MakeGov) -> None:
    gov = make_governor(refund_policy(customers=["cus_ok"]))
    refund(gov, "1.00", customer="cus_ok")
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00", customer="cus_other")
    assert info.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00")
    assert info.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    with (
        pytest.raises(PolicyViolation) as info,
        gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            customer="cus_ok",
            estimate=Money.parse("1.00 EUR"),
        ),
    ):
        pass
    assert info.value.code is ViolationCode.CURRENCY_MISMATCH


def test_a_pricing_lookup_may_pass_a_customer_allowlist_if_free(make_governor: MakeGov) -> None:
    policy = refund_policy(customers=["cus_ok"], endpoints=["/v1/refunds", "/v1/charges"])
    gov = make_governor(policy)
    lookup = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/charges/ch_1",
        "method": "GET",
    }
    with pytest.raises(PolicyViolation) as info, gov.guard(**lookup):
        pass
    assert info.value.code is ViolationCode.CUSTOMER_NOT_ALLOWED
    with gov.guard(**lookup, pricing_lookup=True) as call:
        call.settle(http_status=200)
    assert [r.outcome for r in gov.audit.query()] == ["denied", "allowed"]
    free_only = {**lookup, "pricing_lookup": True, "estimate": Money.parse("1.00 USD")}
    with pytest.raises(ValueError, match="free call"), gov.guard(**free_only):
        pass


def test_jpy_and_kwd_amounts_are_exact(make_governor: MakeGov) -> None:
    jpy = Policy(
        agent="jp-agent",
        vendor="stripe",
        currency="JPY",
        daily_cap="1000",
        endpoints=["/v1/refunds"],
    )
    kwd = Policy(
        agent="kw-agent",
        vendor="stripe",
        currency="KWD",
        daily_cap="1.000",
        endpoints=["/v1/refunds"],
    )
    gov = make_governor(jpy, kwd)
    assert jpy.daily_cap.amount == 1000  # ¥1,000 is 1000 minor units
    assert kwd.daily_cap.amount == 1000  # 1.000 KWD is 1000 fils
    for _ in range(2):
        with gov.guard(
            agent="jp-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.of("500", "JPY"),
        ) as call:
            call.settle(500)
    with (
        pytest.raises(PolicyViolation),
        gov.guard(
            agent="jp-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money.of("1", "JPY")
        ),
    ):
        pass
    with gov.guard(
        agent="kw-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money.of("0.999", "KWD")
    ) as call:
        call.settle()
    with (
        pytest.raises(PolicyViolation) as info,
        gov.guard(
            agent="kw-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.of("0.002", "KWD"),
        ),
    ):
        pass
    assert info.value.remaining == Money(1, "KWD")
    spend = {b.agent: b.settled for b in gov.budgets()}
    assert spend == {"jp-agent": Money(1000, "JPY"), "kw-agent": Money(999, "KWD")}


def test_exception_in_block_releases_and_reraises_unchanged(make_governor: MakeGov) -> None:
    gov = make_governor()
    boom = RuntimeError("card_declined")
    with (
        pytest.raises(RuntimeError) as info,
        gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.parse("50.00 USD"),
        ),
    ):
        raise boom
    assert info.value is boom
    [row] = gov.audit.query()
    assert row.outcome == "errored"
    assert row.error == "RuntimeError: card_declined"
    assert gov.budgets()[0].committed == Money(0, USD)
    refund(gov, "50.00")
    refund(gov, "50.00")


def test_explicit_fail_releases_with_status(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("50.00 USD"),
    ) as call:
        call.fail(http_status=402, vendor_request_id="req_x", error="card_declined")
    [row] = gov.audit.query()
    assert (row.outcome, row.http_status, row.vendor_request_id) == ("failed", 402, "req_x")
    assert gov.ledger.get_hold(call.hold_id).state is HoldState.RELEASED


def test_timeout_keeps_hold_counted_as_unknown(make_governor: MakeGov) -> None:
    gov = make_governor()
    with (
        pytest.raises(TimeoutError),
        gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money.parse("50.00 USD"),
        ),
    ):
        raise TimeoutError("read timed out")
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == Money(5000, USD)
    assert gov.audit.query()[0].outcome == "unknown"
    resolved = gov.resolve_hold(held.id, release=True, reason="Stripe shows no refund", by="ops")
    assert resolved.state is HoldState.RELEASED
    assert gov.budgets()[0].committed == Money(0, USD)
    assert [r.outcome for r in gov.audit.query()] == ["unknown", "reconciled"]
    with pytest.raises(HoldAlreadyResolved):
        gov.resolve_hold(held.id, release=True, reason="again", by="ops")


def test_settle_resolves_exactly_once(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("5.00 USD"),
    ) as call:
        call.settle()
        with pytest.raises(HoldAlreadyResolved):
            call.settle()
    assert len(gov.audit.query()) == 1


def test_actual_above_estimate_is_recorded_as_an_overrun(make_governor: MakeGov) -> None:
    gov = make_governor()
    estimate = Money.parse("40.00 USD")
    refund = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}
    with gov.guard(**refund, estimate=estimate) as call:
        call.settle(Money.parse("45.00 USD"))
    [row] = gov.audit.query()
    assert (row.outcome, row.actual) == ("overrun", 4500)
    assert row.error is not None and "(by $5.00)" in row.error
    assert gov.budgets()[0].committed == Money(4500, USD)
    assert gov.budgets()[0].frozen
    assert [h.id for h in gov.overruns()] == [call.hold_id]


def test_per_call_cap_and_call_limit(make_governor: MakeGov) -> None:
    gov = make_governor(refund_policy(max_calls_per_day=2))
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "50.01")
    assert info.value.code is ViolationCode.PER_CALL_CAP
    refund(gov, "1.00")
    refund(gov, "1.00")
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00")
    assert info.value.code is ViolationCode.CALL_LIMIT


def test_run_budget_counts_besides_daily(make_governor: MakeGov) -> None:
    gov = make_governor()
    tight = RunPolicy(cap="30.00 USD", max_calls=5)
    refund(gov, "20.00", run="run-1", run_policy=tight)
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "20.00", run="run-1", run_policy=tight)
    assert info.value.code is ViolationCode.RUN_CAP_EXCEEDED
    assert info.value.remaining == Money(1000, USD)
    refund(gov, "20.00", run="run-2", run_policy=tight)  # another run has its own budget
    daily = next(b for b in gov.budgets() if b.kind == "daily")
    assert daily.committed == Money(4000, USD)  # both runs count against the day
    with pytest.raises(PolicyError, match="per_call_cap"):
        refund(gov, "1.00", run="run-3", run_policy=RunPolicy(per_call_cap="99.00 USD"))


def test_expiry_uses_the_injected_clock(make_governor: MakeGov, clock: Clock) -> None:
    gov = make_governor(refund_policy(expires_at=clock.now.replace(hour=13)))
    refund(gov, "1.00")  # future expiry passes
    clock.advance(hours=1)
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00")
    assert info.value.code is ViolationCode.EXPIRED


def test_day_rollover_opens_a_new_budget(make_governor: MakeGov, clock: Clock) -> None:
    gov = make_governor()
    refund(gov, "50.00")
    with gov.guard(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("50.00 USD"),
    ) as late_call:
        clock.advance(days=1)  # the call straddles midnight UTC: it settles against yesterday
        late_call.settle(Money.parse("40.00 USD"))
    refund(gov, "50.00")
    refund(gov, "50.00")
    with pytest.raises(PolicyViolation):
        refund(gov, "0.01")
    [today] = gov.budgets()
    [yesterday] = gov.budgets(day=clock.now.date() - timedelta(days=1))
    assert today.committed == Money(10000, USD)
    assert yesterday.committed == Money(9000, USD)


def test_idempotency_key_finds_the_same_hold(make_governor: MakeGov) -> None:
    gov = make_governor()
    args = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money.parse("40.00 USD"),
        "idempotency_key": "refund-order-7",
    }
    with pytest.raises(TimeoutError), gov.guard(**args):  # type: ignore[arg-type]
        raise TimeoutError
    # Unknown outcome: the retry with the same key resumes that hold (Stripe replays or
    # runs the request once), so the estimate is counted once, not twice.
    with gov.guard(**args) as retry:  # type: ignore[arg-type]
        assert retry.reservation.resumed
        retry.settle()
    assert gov.budgets()[0].committed == Money(4000, USD)
    with pytest.raises(PolicyViolation) as info, gov.guard(**args):  # type: ignore[arg-type]
        pass
    assert info.value.code is ViolationCode.ALREADY_COMPLETED
    args["idempotency_key"] = "refund-order-8"
    with pytest.raises(ValueError, match="bad request"), gov.guard(**args):  # type: ignore[arg-type]
        raise ValueError("bad request")
    with gov.guard(**args) as again:  # type: ignore[arg-type]  # released: reserve again
        assert again.idempotency_key == "refund-order-8"
        assert not again.reservation.resumed
        again.settle()
    assert gov.budgets()[0].committed == Money(8000, USD)


def test_idempotency_key_of_another_call_is_refused(make_governor: MakeGov) -> None:
    gov = make_governor()
    base = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "idempotency_key": "refund-42",
    }
    with pytest.raises(TimeoutError), gov.guard(**base, estimate=Money(1000, USD)):  # type: ignore[arg-type]
        raise TimeoutError
    with pytest.raises(PolicyViolation) as info, gov.guard(**base, estimate=Money(5000, USD)):  # type: ignore[arg-type]
        pass
    assert info.value.code is ViolationCode.IDEMPOTENCY_KEY_REUSED


def test_a_revoked_retry_does_not_resume_its_hold(make_governor: MakeGov) -> None:
    gov = make_governor()
    args = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money(1000, USD),
        "idempotency_key": "k-9",
    }
    with pytest.raises(TimeoutError), gov.guard(**args):  # type: ignore[arg-type]
        raise TimeoutError
    gov.revoke(agent="refund-agent", reason="incident", by="ops")
    ran = []
    with pytest.raises(PolicyViolation) as info, gov.guard(**args):  # type: ignore[arg-type]
        ran.append(True)
    assert info.value.code is ViolationCode.REVOKED
    assert not ran


def test_failed_settle_keeps_the_hold_counted(make_governor: MakeGov) -> None:
    """The vendor call returned; recording it failed: the hold must not be released."""
    gov = make_governor()
    with (
        pytest.raises(ValueError, match="negative"),
        gov.guard(
            agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(4000, USD)
        ) as call,
    ):
        call.settle(-5000)
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == Money(4000, USD)


def test_http_client_timeouts_are_outcome_unknown(make_governor: MakeGov) -> None:
    class ReadTimeout(OSError):  # the shape of requests' and httpx's timeouts
        pass

    class APIConnectionError(Exception):  # Stripe's and OpenAI's lost connection
        pass

    gov = make_governor()
    for exc in (ReadTimeout("read timed out"), APIConnectionError("connection reset")):
        with (
            pytest.raises(type(exc)),
            gov.guard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(1000, USD),
            ),
        ):
            raise exc
    assert [h.state for h in gov.holds()] == [HoldState.UNKNOWN, HoldState.UNKNOWN]
    assert gov.budgets()[0].committed == Money(2000, USD)


def test_budget_cache_never_points_at_another_budget(make_governor: MakeGov, clock: Clock) -> None:
    """A budget row created in a transaction that rolled back must not stay cached:
    SQLite hands its rowid to the next budget created."""
    other = refund_policy(id="other", agent="other-agent")
    gov1 = make_governor(refund_policy(), other)
    gov2 = make_governor(refund_policy(), other)
    run_cap = RunPolicy(cap="10.00 USD")
    refund(gov1, "50.00")
    refund(gov1, "50.00")  # refund-agent's day is full
    with pytest.raises(PolicyViolation) as info:  # creates r1's row, then rolls back
        refund(gov1, "10.00", run="r1", run_policy=run_cap)
    assert info.value.code is ViolationCode.CAP_EXCEEDED
    refund(gov2, "10.00", agent="other-agent", run="r2", run_policy=run_cap)
    clock.advance(days=1)
    refund(gov1, "10.00", run="r1", run_policy=run_cap)
    with pytest.raises(PolicyViolation) as info:
        refund(gov1, "10.00", run="r1", run_policy=run_cap)
    assert info.value.code is ViolationCode.RUN_CAP_EXCEEDED
    runs = {b.run: b.committed for b in gov1.budgets() if b.kind == "run"}
    assert runs == {"r1": Money(1000, USD)}
    [r2] = [b for b in gov2.budgets(day=clock.now.date() - timedelta(days=1)) if b.run == "r2"]
    assert r2.committed == Money(1000, USD)


def test_engine_without_the_ledger_settings_is_refused(tmp_path: object) -> None:
    from sqlalchemy import create_engine

    with pytest.raises(ValueError, match=r"paymaster\.connect\(\)"):
        Governor(create_engine(f"sqlite:///{tmp_path}/x.db"), policies=[refund_policy()])


def test_pending_hold_is_resumed_by_key(make_governor: MakeGov) -> None:
    gov = make_governor()
    first = make_governor()  # another "process" on the same database
    args = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money.parse("40.00 USD"),
        "idempotency_key": "k-1",
    }
    reservation = first.ledger.reserve(
        first._prepare(run=None, run_policy=None, customer=None, method="POST", **args)
    )  # type: ignore[arg-type]
    with gov.guard(**args) as call:  # type: ignore[arg-type]
        assert call.reservation.resumed
        assert call.hold_id == reservation.hold.id
        call.settle()
    assert gov.budgets()[0].committed == Money(4000, USD)


def test_decorator_governs_sync_and_async(make_governor: MakeGov) -> None:
    gov = make_governor()

    @gov.governed(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=lambda amount: Money.parse(f"{amount} USD"),
        actual=lambda result: result["amount"],
    )
    def issue_refund(amount: str) -> dict[str, int]:
        return {"amount": Money.parse(f"{amount} USD").amount}

    @gov.governed(
        agent="refund-agent",
        vendor="stripe",
        endpoint="/v1/refunds",
        estimate=Money.parse("30.00 USD"),
    )
    async def issue_refund_async() -> str:
        return "ok"

    assert issue_refund("45.00") == {"amount": 4500}
    assert asyncio.run(issue_refund_async()) == "ok"
    with pytest.raises(PolicyViolation):
        issue_refund("30.00")
    assert [r.outcome for r in gov.audit.query()] == ["allowed", "allowed", "denied"]


def test_aguard_settles_and_denies(make_governor: MakeGov) -> None:
    gov = make_governor()

    async def scenario() -> list[str]:
        seen = []
        for _ in range(3):
            try:
                async with gov.aguard(
                    agent="refund-agent",
                    vendor="stripe",
                    endpoint="/v1/refunds",
                    estimate=Money.parse("40.00 USD"),
                ) as call:
                    await call.settle(http_status=200)
                    seen.append("ok")
            except PolicyViolation as violation:
                seen.append(violation.code.value)
        return seen

    assert asyncio.run(scenario()) == ["ok", "ok", "cap_exceeded"]


def test_cancelled_task_keeps_hold_for_reconciliation(make_governor: MakeGov) -> None:
    gov = make_governor()

    async def scenario() -> None:
        inside = asyncio.Event()

        async def call_vendor() -> None:
            async with gov.aguard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money.parse("40.00 USD"),
            ):
                inside.set()
                await asyncio.Event().wait()  # the vendor never answers

        task = asyncio.create_task(call_vendor())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == Money(4000, USD)
    [row] = gov.audit.query()
    assert row.outcome == "unknown" and row.hold_id == held.id


def test_revoke_and_restore(make_governor: MakeGov) -> None:
    gov = make_governor()
    other = make_governor()  # a second instance on the same ledger
    refund(gov, "1.00", run="run-9")
    other.revoke(run="run-9", reason="looping", by="ops")
    with pytest.raises(PolicyViolation) as info:
        refund(gov, "1.00", run="run-9")
    assert info.value.code is ViolationCode.REVOKED
    refund(gov, "1.00", run="run-10")
    other.revoke(agent="refund-agent", reason="incident 12", by="ops")
    with pytest.raises(PolicyViolation, match="incident 12"):
        refund(gov, "1.00", run="run-10")
    assert other.restore(agent="refund-agent", by="ops") == 1
    refund(gov, "1.00", run="run-10")
    other.revoke(everything=True, reason="kill switch", by="ops")
    with pytest.raises(PolicyViolation, match="kill switch"):
        refund(gov, "1.00")
    assert [r.scope.value for r in other.revocations()] == ["run", "all"]
    with pytest.raises(ValueError, match="exactly one"):
        other.revoke(agent="a", run="b", reason="x")


def test_a_resumed_hold_is_never_released_by_an_exception(make_governor: MakeGov) -> None:
    """The first attempt timed out (money may have moved); the retry's own error must not
    free that budget."""
    gov = make_governor()
    args = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money(5000, USD),
        "idempotency_key": "k-resume",
    }
    with pytest.raises(TimeoutError), gov.guard(**args):  # type: ignore[arg-type]
        raise TimeoutError
    with pytest.raises(RuntimeError), gov.guard(**args):  # type: ignore[arg-type]
        raise RuntimeError("409 idempotency key in use")
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == Money(5000, USD)


def test_a_caught_failed_settle_is_not_recorded_at_the_estimate(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(1000, USD)
    ) as call:
        with pytest.raises(ValueError, match="negative"):
            call.settle(-1)  # the user logs the failure and leaves the block normally
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert [r.outcome for r in gov.audit.query()] == ["unknown"]


def test_a_lost_connection_is_outcome_unknown(make_governor: MakeGov) -> None:
    gov = make_governor()
    with (
        pytest.raises(ConnectionResetError),
        gov.guard(
            agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(100, USD)
        ),
    ):
        raise ConnectionResetError("connection reset by peer")
    assert [h.state for h in gov.holds()] == [HoldState.UNKNOWN]


@pytest.mark.parametrize("lost_commit", [1, 2], ids=["reserve", "settle"])
def test_a_lost_commit_reply_is_recognised_on_retry(
    make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch, lost_commit: int
) -> None:
    """The server commits the reserve (or the settle) but the reply is lost: the retry
    finds that commit instead of reserving twice (or settling twice)."""
    gov = make_governor()
    dialect = gov.engine.dialect
    original = dialect.do_commit
    lost: list[bool] = []
    commits: list[int] = []

    def commit_then_drop(dbapi_connection: object) -> None:
        original(dbapi_connection)  # type: ignore[arg-type]
        commits.append(1)
        if not lost and len(commits) == lost_commit:
            lost.append(True)
            if dialect.name == "sqlite":
                import sqlite3

                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            import psycopg

            # Close the driver's connection under the pool's proxy, as a dropped socket would.
            dbapi_connection.dbapi_connection.close()  # type: ignore[attr-defined]
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(dialect, "do_commit", commit_then_drop)
    with gov.guard(
        agent="refund-agent", vendor="stripe", endpoint="/v1/refunds", estimate=Money(3000, USD)
    ) as call:
        call.settle(Money(2000, USD))
    assert lost
    assert gov.holds() == []
    assert gov.budgets()[0].committed == Money(2000, USD)
    assert [r.outcome for r in gov.audit.query()] == ["allowed"]


def test_a_settle_whose_reply_and_retry_were_both_lost_is_not_recorded_twice(
    make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settle commits but its reply is lost, and the ledger's one retry loses its
    reply too: the settle raises GovernanceUnavailable, and the guard then records the
    call as unknown. That looks for the settle's commit first and finds it: the attempt
    keeps its one row, and the hold stays settled at what the vendor moved."""
    gov = make_governor()
    dialect = gov.engine.dialect
    original = dialect.do_commit
    losing: list[int] = []

    def commit_then_drop(dbapi_connection: object) -> None:
        original(dbapi_connection)  # type: ignore[arg-type]
        if losing:
            losing.pop()
            if dialect.name == "sqlite":
                import sqlite3

                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            import psycopg

            dbapi_connection.dbapi_connection.close()  # type: ignore[attr-defined]
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(dialect, "do_commit", commit_then_drop)
    with (
        pytest.raises(GovernanceUnavailable),
        gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(3000, USD),
            tool_call_id="call-1",
        ) as call,
    ):
        losing.extend([1, 1])  # the settle's commit, then its retry's
        call.settle(Money(2000, USD))
    assert not losing
    assert [(r.outcome, r.actual) for r in gov.audit.query()] == [("allowed", 2000)]
    assert gov.holds() == []
    assert gov.budgets()[0].committed == Money(2000, USD)
    assert gov.audit.verify().ok


def test_the_first_attempt_cannot_release_a_hold_its_retry_left_unknown(
    make_governor: MakeGov,
) -> None:
    gov = make_governor()
    other = make_governor()  # the retrying worker
    args = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "estimate": Money(5000, USD),
        "idempotency_key": "k-race",
    }
    with pytest.raises(RuntimeError), gov.guard(**args):  # type: ignore[arg-type]
        with pytest.raises(TimeoutError), other.guard(**args) as retry:  # type: ignore[arg-type]
            assert retry.reservation.resumed
            raise TimeoutError  # the retry's request may have charged
        raise RuntimeError("409 idempotency key in use")  # the first attempt's own error
    [held] = gov.holds()
    assert held.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == Money(5000, USD)
