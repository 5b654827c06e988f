"""Money safety in the core (issue "Money safety, part 1"): one regression test per defect
an adversarial review found, each on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import refund_policy
from paymaster import (
    GovernedCall,
    Governor,
    HoldAlreadyResolved,
    HoldState,
    Money,
    PolicyViolation,
    RunPolicy,
    ViolationCode,
)
from paymaster._money import MAX_AMOUNT

MakeGov = Callable[..., Governor]
USD = "USD"
REFUND: dict[str, Any] = {"agent": "refund-agent", "vendor": "stripe", "endpoint": "/v1/refunds"}


def usd(text: str) -> Money:
    return Money.parse(f"{text} USD")


def outcomes(gov: Governor) -> list[str]:
    return [row.outcome for row in gov.audit.query(limit=1000)]


# -- 1. a shared hold is never released by one of its attempts ---------------------------
def test_a_shared_hold_is_not_released_under_a_paying_attempt(make_governor: MakeGov) -> None:
    """Attempt 2 resumes attempt 1's hold by its key; attempt 1 then fails with "nothing
    moved" while attempt 2's call pays. Before: attempt 1 released the hold, attempt 2's
    settle met HoldAlreadyResolved, and the vendor paid $20 against a $10 cap."""
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    first = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k1")
    call_1 = first.__enter__()
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k1") as call_2:
        assert call_2.reservation.resumed and call_2.hold_id == call_1.hold_id
        call_1.fail(http_status=409, error="idempotency key in use")  # nothing moved for it
        first.__exit__(None, None, None)
        assert gov.ledger.get_hold(call_1.hold_id).state is HoldState.PENDING
        # the cap is still held: nothing else fits
        with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND, estimate=usd("1.00")):
            pass
        assert refused.value.code is ViolationCode.CAP_EXCEEDED
        call_2.settle(usd("10.00"))
    [status] = gov.budgets()
    assert status.committed == status.settled == usd("10.00")
    assert gov.ledger.get_hold(call_1.hold_id).state is HoldState.SETTLED
    # one row per attempt: attempt 1's failure, the refusal, attempt 2's settle
    assert outcomes(gov) == ["failed", "denied", "allowed"]


def test_an_attempt_ending_after_another_resolved_the_hold_still_writes_its_row(
    make_governor: MakeGov,
) -> None:
    """Before: a resumed attempt that exited normally after the other attempt settled the
    hold raised HoldAlreadyResolved and wrote no audit row."""
    gov = make_governor()
    first = gov.guard(**REFUND, estimate=usd("20.00"), idempotency_key="k")
    call_1 = first.__enter__()
    with gov.guard(**REFUND, estimate=usd("20.00"), idempotency_key="k") as call_2:
        call_1.settle(usd("20.00"))
        first.__exit__(None, None, None)
        # the vendor replayed the first attempt's result to the second: same amount
    assert call_2.resolved
    assert outcomes(gov) == ["allowed", "allowed"]
    [status] = gov.budgets()
    assert status.committed == status.settled == usd("20.00")
    rows = gov.audit.query()
    assert sorted(row.actual for row in rows) == [0, 2000]  # counted once


def test_a_late_attempt_that_paid_more_raises_the_settled_amount(make_governor: MakeGov) -> None:
    gov = make_governor()
    first = gov.guard(**REFUND, estimate=usd("20.00"), idempotency_key="k")
    call_1 = first.__enter__()
    with gov.guard(**REFUND, estimate=usd("20.00"), idempotency_key="k") as call_2:
        call_1.settle(usd("15.00"))
        first.__exit__(None, None, None)
        call_2.settle(usd("18.00"))
    [status] = gov.budgets()
    assert status.settled == usd("18.00")  # never less than the vendor reported


def test_a_late_unknown_keeps_a_released_hold_counted(make_governor: MakeGov) -> None:
    """An operator released a hold while its call was in flight; the call then timed out:
    it may have paid, so the hold is counted again."""
    gov = make_governor()
    with pytest.raises(TimeoutError), gov.guard(**REFUND, estimate=usd("30.00")) as call:
        gov.resolve_hold(call.hold_id, release=True, reason="looked stuck", by="ops")
        assert gov.budgets()[0].committed == usd("0.00")
        raise TimeoutError("read timed out")
    assert gov.ledger.get_hold(call.hold_id).state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == usd("30.00")


def test_the_same_attempt_cannot_record_twice(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(**REFUND, estimate=usd("5.00")) as call:
        call.settle()
        with pytest.raises(HoldAlreadyResolved):
            call.fail()
    assert outcomes(gov) == ["allowed"]


# -- 2. no settle above the reservation goes unflagged -----------------------------------
def test_a_call_without_an_estimate_is_refused_and_audited(make_governor: MakeGov) -> None:
    """Before: estimate=None reserved $0, and one settle put committed at 950% of the cap
    with an ``allowed`` row."""
    gov = make_governor()
    ran = []
    with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND):
        ran.append(True)
    assert not ran
    assert refused.value.code is ViolationCode.ESTIMATE_REQUIRED
    assert "estimate=" in refused.value.message and "free=True" in refused.value.message
    [row] = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", "estimate_required")


def test_a_free_call_may_carry_no_estimate_but_may_not_cost(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(**REFUND, free=True) as call:
        call.settle(usd("95.00"))  # a "free" call that charged: an overrun, flagged
    [row] = gov.audit.query()
    assert row.outcome == "overrun"
    assert gov.budgets()[0].frozen


def test_an_overrun_is_recorded_and_freezes_the_budget_until_acknowledged(
    make_governor: MakeGov,
) -> None:
    gov = make_governor(refund_policy(daily_cap="100.00", per_call_cap="50.00"))
    with gov.guard(**REFUND, estimate=usd("10.00")) as call:
        call.settle(usd("60.00"))  # above the estimate, and above the per-call cap
    [row] = gov.audit.query()
    assert (row.outcome, row.actual) == ("overrun", 6000)
    assert row.error is not None and "per-call cap of $50.00" in row.error
    [status] = gov.budgets()
    assert status.committed == usd("60.00") and status.frozen
    with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND, estimate=usd("1.00")):
        pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    assert call.hold_id in refused.value.message
    [over] = gov.overruns()
    assert over.id == call.hold_id and over.overrun == usd("50.00")

    with pytest.raises(ValueError, match="reason"):
        gov.acknowledge_overrun(call.hold_id, reason=" ")
    acknowledged = gov.acknowledge_overrun(call.hold_id, reason="vendor fee", by="ops")
    assert acknowledged.overrun_acknowledged_by == "ops"
    assert gov.overruns() == []
    assert not gov.budgets()[0].frozen
    with pytest.raises(ValueError, match="no overrun awaiting"):
        gov.acknowledge_overrun(call.hold_id, reason="again")
    with gov.guard(**REFUND, estimate=usd("40.00")):
        pass  # 60 + 40 = the cap
    assert outcomes(gov)[-2:] == ["acknowledged", "allowed"]
    assert gov.audit.verify().ok


def test_a_retry_on_a_frozen_budget_is_refused(make_governor: MakeGov) -> None:
    gov = make_governor()
    pending = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k")
    pending.__enter__()
    with gov.guard(**REFUND, estimate=usd("5.00")) as other:
        other.settle(usd("6.00"))
    with pytest.raises(PolicyViolation) as refused:
        with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k"):
            pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    pending.__exit__(None, None, None)


def test_an_operator_settle_above_the_estimate_is_recorded_but_not_frozen(
    make_governor: MakeGov,
) -> None:
    gov = make_governor()
    with pytest.raises(TimeoutError), gov.guard(**REFUND, estimate=usd("10.00")) as call:
        raise TimeoutError
    gov.resolve_hold(call.hold_id, settle=usd("12.00"), reason="Stripe says 12", by="ops")
    [status] = gov.budgets()
    assert status.committed == usd("12.00") and not status.frozen
    assert gov.overruns() == []
    [acknowledged] = gov.overruns(acknowledged=True)
    assert acknowledged.overrun_acknowledged_by == "ops"


# -- 3. an idempotency key is scoped to agent type and run -------------------------------
def test_a_key_presented_by_another_run_is_another_call(make_governor: MakeGov) -> None:
    """Before: run r4 resumed revoked run r3's hold; r4's run budget was never charged and
    the audit showed an ``allowed`` row under the revoked r3."""
    gov = make_governor()
    r3 = gov.guard(**REFUND, run="r3", estimate=usd("10.00"), idempotency_key="k")
    r3.__enter__()
    gov.revoke(run="r3", reason="runaway")
    r4_policy = RunPolicy(cap="20.00 USD")
    r4_call = gov.guard(
        **REFUND, run="r4", estimate=usd("10.00"), idempotency_key="k", run_policy=r4_policy
    )
    with r4_call as r4:
        assert not r4.reservation.resumed
        assert r4.hold.run == "r4"
    runs = {b.run: b for b in gov.budgets() if b.kind == "run"}
    assert runs["r4"].committed == usd("10.00")
    with pytest.raises(PolicyViolation) as refused:  # r3's own retry is revoked
        with gov.guard(**REFUND, run="r3", estimate=usd("10.00"), idempotency_key="k"):
            pass
    assert refused.value.code is ViolationCode.REVOKED
    r3.__exit__(None, None, None)


# -- 4. a run budget binds every call of the run ----------------------------------------
def test_a_run_budget_binds_calls_without_a_run_policy(make_governor: MakeGov) -> None:
    gov = make_governor()
    with gov.guard(**REFUND, run="r", estimate=usd("8.00"), run_policy=RunPolicy(cap="10 USD")):
        pass
    with pytest.raises(PolicyViolation) as refused:  # no run policy: the run's cap binds
        with gov.guard(**REFUND, run="r", estimate=usd("5.00")):
            pass
    assert refused.value.code is ViolationCode.RUN_CAP_EXCEEDED
    with gov.guard(**REFUND, run="r", estimate=usd("2.00")):
        pass
    with gov.guard(**REFUND, run="another", estimate=usd("5.00")):  # runs without a budget
        pass


def test_a_later_run_policy_may_narrow_but_never_widen(make_governor: MakeGov) -> None:
    gov = make_governor()
    narrow, wide = RunPolicy(cap="10 USD", max_calls=5), RunPolicy(cap="50 USD")
    with gov.guard(**REFUND, run="r", estimate=usd("4.00"), run_policy=narrow):
        pass
    with pytest.raises(PolicyViolation) as refused:
        with gov.guard(**REFUND, run="r", estimate=usd("4.00"), run_policy=wide):
            pass
    assert refused.value.code is ViolationCode.RUN_POLICY_WIDENED
    assert "$50.00" in refused.value.message and "$10.00" in refused.value.message
    assert outcomes(gov)[-1] == "denied"
    tighter = RunPolicy(cap="6 USD")
    with gov.guard(**REFUND, run="r", estimate=usd("2.00"), run_policy=tighter):
        pass
    with pytest.raises(PolicyViolation) as capped:  # 6 stored now: 4 + 2 + 1 > 6
        with gov.guard(**REFUND, run="r", estimate=usd("1.00")):
            pass
    assert capped.value.code is ViolationCode.RUN_CAP_EXCEEDED
    [run] = [b for b in gov.budgets() if b.kind == "run"]
    assert run.cap == usd("6.00")


# -- 5. huge limits are refused where they are given -------------------------------------
def test_huge_limits_are_refused_when_loaded(make_governor: MakeGov) -> None:
    """Before: max_calls_per_day=2**64 raised a raw OverflowError (SQLite) or
    GovernanceUnavailable (PostgreSQL) on every reserve."""
    with pytest.raises(ValidationError, match="max_calls_per_day"):
        refund_policy(max_calls_per_day=2**64)
    with pytest.raises(ValidationError, match="daily_cap"):
        refund_policy(daily_cap=f"{MAX_AMOUNT} USD")  # major units: 100x the limit
    with pytest.raises(ValidationError, match="max_calls"):
        RunPolicy(max_calls=2**63)


def test_huge_amounts_are_refused_when_passed(make_governor: MakeGov) -> None:
    """Before: on SQLite a settle past 2**63-1 silently turned ``committed`` into a REAL."""
    gov = make_governor()
    with (
        pytest.raises(ValueError, match="estimate"),
        gov.guard(**REFUND, estimate=Money(MAX_AMOUNT + 1, USD)),
    ):
        pass
    with pytest.raises(TypeError, match=r"estimate must be paymaster.Money.*Money.parse"):
        with gov.guard(**REFUND, estimate="5.00 USD"):  # type: ignore[arg-type]
            pass
    with (
        pytest.raises(ValueError, match="actual"),
        gov.guard(**REFUND, estimate=usd("1.00")) as call,
    ):
        call.settle(Money(2**63, USD))
    [held] = gov.holds()  # the settle failed after the call: kept counted, not released
    assert held.state is HoldState.UNKNOWN
    [status] = gov.budgets()
    assert isinstance(status.committed.amount, int) and status.committed == usd("1.00")


def test_concurrent_attempts_on_one_key_count_once_and_each_leave_a_row(
    make_governor: MakeGov,
) -> None:
    """Eight threads present one key at once: one hold, one reservation, eight rows."""
    gov = make_governor()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def attempt(n: int) -> None:
        try:
            barrier.wait()
            with gov.guard(
                **REFUND, estimate=usd("30.00"), idempotency_key="same", tool_call_id=f"t{n}"
            ) as call:
                if n % 2:
                    call.fail(http_status=409, error="in progress")
                else:
                    call.settle()
        except PolicyViolation as refused:  # came after the settle: refused, audited
            if refused.code is not ViolationCode.ALREADY_COMPLETED:
                errors.append(refused)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(gov.audit.query()) == 8
    [status] = gov.budgets()
    assert status.committed == usd("30.00")
    assert gov.audit.verify().ok


def test_rows_with_a_tool_call_id_verify(make_governor: MakeGov) -> None:
    """Before: row_hash hashed tool_call_id but verify() recomputed without it, so every
    row an adapter wrote failed verification."""
    gov = make_governor()
    with gov.guard(**REFUND, estimate=usd("1.00"), tool_call_id="call_1"):
        pass
    assert gov.audit.verify().ok


def test_a_hold_is_released_when_every_attempt_on_it_moved_nothing(make_governor: MakeGov) -> None:
    """Both attempts of an overlapping pair are refused by the vendor: nothing moved, so
    the last one to end frees the hold (found by the vendor-truth simulation)."""
    gov = make_governor()
    first = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k", tool_call_id="a")
    call_1 = first.__enter__()
    with gov.guard(
        **REFUND, estimate=usd("10.00"), idempotency_key="k", tool_call_id="b"
    ) as call_2:
        call_1.fail(http_status=402, error="card_declined")
        first.__exit__(None, None, None)
        assert gov.ledger.get_hold(call_2.hold_id).state is HoldState.PENDING
        call_2.fail(http_status=402, error="card_declined")
    assert gov.ledger.get_hold(call_2.hold_id).state is HoldState.RELEASED
    assert gov.budgets()[0].committed == usd("0.00")
    # each row names its own attempt
    assert [(r.tool_call_id, r.outcome) for r in gov.audit.query()] == [
        ("a", "failed"),
        ("b", "failed"),
    ]


def test_a_refused_retry_of_an_unknown_hold_leaves_it_unknown(make_governor: MakeGov) -> None:
    """Before: resuming reset an ``unknown`` hold to ``pending``, and the retry's refusal
    left it pending, no longer flagged for reconciliation (the vendor had charged)."""
    gov = make_governor()
    with pytest.raises(TimeoutError):
        with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k"):
            raise TimeoutError  # the vendor may have charged
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as retry:
        assert retry.reservation.resumed
        retry.fail(http_status=429, error="rate limited")
    held = gov.ledger.get_hold(retry.hold_id)
    assert held.state is HoldState.UNKNOWN and held.holders == 0
    assert gov.budgets()[0].committed == usd("10.00")
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as again:
        again.settle(usd("10.00"))  # the vendor replays the charge: reconciled by the retry
    assert gov.ledger.get_hold(retry.hold_id).state is HoldState.SETTLED
    assert outcomes(gov)[-1] == "allowed"


def test_a_cancelled_resume_gives_up_its_share(make_governor: MakeGov) -> None:
    """An aguard whose reserve resumed a hold and was then cancelled never ran its call:
    it stops holding the hold, so the other attempt's "nothing moved" frees it."""
    import asyncio

    gov = make_governor()
    first = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k")
    call_1 = first.__enter__()

    async def cancelled_resume() -> None:
        task = asyncio.ensure_future(
            gov.aguard(**REFUND, estimate=usd("10.00"), idempotency_key="k").__aenter__()
        )
        await asyncio.sleep(0)  # let the reserve start in its worker thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_resume())
    call_1.fail(http_status=402, error="declined")
    first.__exit__(None, None, None)
    held = gov.ledger.get_hold(call_1.hold_id)
    assert held.state is HoldState.RELEASED, held
    assert gov.audit.verify().ok


def test_a_tool_spec_without_an_estimate_is_refused_when_wrapped() -> None:
    from paymaster import FREE, ToolSpec
    from paymaster._toolspec import check_specs

    with pytest.raises(ValueError, match=r"'refund' has no estimate.*paymaster.FREE"):
        check_specs(["refund", "look"], {"refund": ToolSpec("stripe", "/v1/refunds"), "look": FREE})


# -- found by the adversarial review of this work -----------------------------------------
def test_a_decorated_call_whose_actual_raises_keeps_its_hold_counted(
    make_governor: MakeGov,
) -> None:
    """The function returned (the vendor acted) and ``actual=`` then raised. Before: the
    hold was released as if nothing had moved, and the ValueError passed as the model's."""
    from paymaster import SpecError

    gov = make_governor()
    paid: list[int] = []

    def broken_actual(result: dict[str, int]) -> Money:
        return Money(result["amount_refunded"], USD)  # the vendor's field is "amount"

    @gov.governed(**REFUND, estimate=usd("10.00"), actual=broken_actual)
    def refund() -> dict[str, int]:
        paid.append(1000)
        return {"amount": 1000}

    with pytest.raises(SpecError, match=r"actual= of .*refund raised after the call returned"):
        refund()
    assert paid == [1000]
    [hold] = gov.holds()
    assert hold.state is HoldState.UNKNOWN
    assert gov.budgets()[0].committed == usd("10.00")
    assert outcomes(gov) == ["unknown"]


def test_an_async_decorated_call_whose_actual_raises_keeps_its_hold_counted(
    make_governor: MakeGov,
) -> None:
    import asyncio

    from paymaster import SpecError

    gov = make_governor()

    @gov.governed(**REFUND, estimate=usd("10.00"), actual=lambda result: result["missing"])
    async def refund() -> dict[str, int]:
        return {"amount": 1000}

    with pytest.raises(SpecError):
        asyncio.run(refund())
    [hold] = gov.holds()
    assert hold.state is HoldState.UNKNOWN


def _released_under_an_attempt(gov: Governor) -> tuple[Any, GovernedCall]:
    """An operator releases a pending hold while its attempt's call is still in flight."""
    block = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k")
    call = block.__enter__()
    gov.resolve_hold(call.hold_id, release=True, reason="looked stuck", by="ops")
    return block, call


def test_a_late_settle_that_takes_a_budget_past_its_cap_is_an_overrun(
    make_governor: MakeGov,
) -> None:
    """Before: the released room went to another call, the late settle then counted $10
    more, and the budget stood at $20 against its $10 cap with no overrun and no freeze."""
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    block, call = _released_under_an_attempt(gov)
    with gov.guard(**REFUND, estimate=usd("10.00")):
        pass  # the freed room, taken
    call.settle(usd("10.00"))  # the vendor did pay the first call
    block.__exit__(None, None, None)
    [status] = gov.budgets()
    assert status.committed == usd("20.00") and status.frozen
    [over] = gov.overruns()
    assert over.id == call.hold_id and over.overrun == usd("10.00")
    assert outcomes(gov)[-1] == "overrun"
    with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND, estimate=usd("1.00")):
        pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    gov.acknowledge_overrun(call.hold_id, reason="the operator's release was wrong", by="ops")
    assert not gov.budgets()[0].frozen
    assert gov.audit.verify().ok


def test_a_late_unknown_that_takes_a_budget_past_its_cap_is_an_overrun(
    make_governor: MakeGov,
) -> None:
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    block, call = _released_under_an_attempt(gov)
    with gov.guard(**REFUND, estimate=usd("10.00")):
        pass
    assert not block.__exit__(TimeoutError, TimeoutError(), None)  # the block timed out
    held = gov.ledger.get_hold(call.hold_id)
    assert held.state is HoldState.UNKNOWN and held.overrun == usd("10.00")
    assert gov.budgets()[0].frozen
    # reconciling it keeps the overrun awaiting acknowledgement
    gov.resolve_hold(call.hold_id, settle=usd("10.00"), reason="Stripe says paid", by="ops")
    assert [over.id for over in gov.overruns()] == [call.hold_id]
    gov.acknowledge_overrun(call.hold_id, reason="seen", by="ops")
    assert not gov.budgets()[0].frozen


def test_a_rearmed_hold_is_not_released_by_the_attempt_an_operator_left_running(
    make_governor: MakeGov,
) -> None:
    """Before: the re-arm reset the hold's holder count to 1, so the first attempt's "no
    money moved" released the hold under the second attempt's paying call."""
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    block, call_1 = _released_under_an_attempt(gov)
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as call_2:
        assert call_2.hold_id == call_1.hold_id  # the released hold, re-armed
        call_1.fail(http_status=409, error="idempotency key in use")
        block.__exit__(None, None, None)
        assert gov.ledger.get_hold(call_1.hold_id).state is HoldState.PENDING
        with pytest.raises(PolicyViolation), gov.guard(**REFUND, estimate=usd("10.00")):
            pass  # the cap is still held for call 2
        call_2.settle(usd("10.00"))
    [status] = gov.budgets()
    assert status.committed == usd("10.00") and not status.frozen


def test_a_freeze_outlives_the_day_it_happened_on(make_governor: MakeGov, clock: Any) -> None:
    """Before: a new UTC day's budget row was unfrozen, so the agent went on at midnight
    with its overrun never acknowledged."""
    gov = make_governor()
    with gov.guard(**REFUND, estimate=usd("10.00")) as call:
        call.settle(usd("12.00"))
    clock.advance(days=1)
    with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND, estimate=usd("1.00")):
        pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    assert call.hold_id in refused.value.message
    gov.acknowledge_overrun(call.hold_id, reason="vendor fee", by="ops")
    with gov.guard(**REFUND, estimate=usd("1.00")):
        pass


@pytest.mark.parametrize(
    ("arguments", "error", "code"),
    [
        ({"estimate": Money(-1, USD)}, ValueError, "invalid_request"),
        ({"estimate": Money(MAX_AMOUNT + 1, USD)}, ValueError, "invalid_request"),
        ({"estimate": usd("1.00"), "free": True}, ValueError, "invalid_request"),
        ({"estimate": 100}, TypeError, "invalid_request"),
        (
            {"estimate": usd("1.00"), "run": "r", "run_policy": RunPolicy(cap="500.00 USD")},
            ValueError,
            "run_policy_widened",
        ),
    ],
)
def test_an_attempt_refused_for_bad_input_leaves_its_row(
    make_governor: MakeGov, arguments: dict[str, Any], error: type[Exception], code: str
) -> None:
    """Before: these raised before anything was audited, so the attempt left no row."""
    gov = make_governor()
    with pytest.raises(error), gov.guard(**REFUND, **arguments):
        pass
    [row] = gov.audit.query()
    assert (row.outcome, row.violation_code) == ("denied", code)
    assert row.error
    assert gov.audit.verify().ok


def test_an_aguard_cancelled_while_it_is_checked_leaves_its_row(make_governor: MakeGov) -> None:
    """Before: the checks ran in one worker job and the reserve in another; a task
    cancelled between them reserved nothing and wrote no row."""
    import asyncio

    gov = make_governor()
    entered, go_on = threading.Event(), threading.Event()
    require = gov.policies.require

    def slow_require(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        go_on.wait(timeout=10)
        return require(*args, **kwargs)

    gov.policies.require = slow_require  # type: ignore[method-assign]

    async def cancelled() -> None:
        task = asyncio.ensure_future(gov.aguard(**REFUND, estimate=usd("10.00")).__aenter__())
        await asyncio.get_running_loop().run_in_executor(None, entered.wait)
        task.cancel()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    [row] = gov.audit.query()
    assert row.outcome == "errored" and row.error == "task cancelled before the call was made"
    assert gov.budgets()[0].committed == usd("0.00")


def _lose_the_first_try(gov: Governor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next ledger write's first transaction dies before its COMMIT (rolled back); the
    write is then retried, told that it may have committed."""
    ledger = gov.ledger
    real_write = ledger._write

    class Lost(Exception):
        pass

    def write(action: str, consequence: str, work: Callable[..., Any]) -> Any:
        monkeypatch.setattr(ledger, "_write", real_write)
        try:
            with ledger._engine.begin() as conn:
                work(conn, False)
                raise Lost
        except Lost:
            pass
        with ledger._engine.begin() as conn:
            return work(conn, True)

    monkeypatch.setattr(ledger, "_write", write)


def test_a_retried_resolve_never_takes_another_attempts_row_for_its_own(
    make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two attempts on one hold end at the same instant; the second one's first try is
    lost. Before: its retry found the first attempt's row (same hold, same time), took it
    for its own, and wrote nothing: its settle vanished and the hold stayed pending."""
    gov = make_governor()
    first = gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k")
    call_1 = first.__enter__()
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as call_2:
        call_1.fail(http_status=409, error="in progress")
        first.__exit__(None, None, None)
        _lose_the_first_try(gov, monkeypatch)
        call_2.settle(usd("10.00"))
    assert outcomes(gov) == ["failed", "allowed"]
    assert gov.ledger.get_hold(call_1.hold_id).state is HoldState.SETTLED


def test_a_retried_denial_never_takes_another_attempts_row_for_its_own(
    make_governor: MakeGov, monkeypatch: pytest.MonkeyPatch
) -> None:
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    for lost in (False, True):
        if lost:
            _lose_the_first_try(gov, monkeypatch)
        with pytest.raises(PolicyViolation), gov.guard(**REFUND, estimate=usd("11.00")):
            pass
    assert outcomes(gov) == ["denied", "denied"]


@pytest.mark.parametrize("broken", ["estimate", "customer", "run"])
@pytest.mark.parametrize("is_async", [False, True])
def test_a_decorated_call_whose_own_arguments_raise_leaves_its_row(
    make_governor: MakeGov, broken: str, is_async: bool
) -> None:
    """Before: the decorator worked out estimate=/customer=/run= before the guard, so an
    exception there escaped with no audit row."""
    import asyncio

    from paymaster import SpecError

    gov = make_governor()

    def fails(*args: Any) -> Any:
        raise KeyError(broken)

    arguments: dict[str, Any] = {"estimate": usd("1.00"), broken: fails}
    ran: list[bool] = []
    if is_async:

        @gov.governed(**REFUND, **arguments)
        async def refund_async() -> None:
            ran.append(True)

        with pytest.raises(SpecError, match=f"{broken}="):
            asyncio.run(refund_async())
    else:

        @gov.governed(**REFUND, **arguments)
        def refund() -> None:
            ran.append(True)

        with pytest.raises(SpecError):
            refund()
    assert ran == []
    [row] = gov.audit.query()
    assert row.outcome == "errored" and row.error and "KeyError" in row.error
    assert gov.holds() == []


def _late_unknown_past_the_cap(gov: Governor) -> str:
    """A's hold is released by an operator, the room goes to other pending calls, then A
    times out: its late unknown is counted past the cap (an overrun of its estimate)."""
    block, call = _released_under_an_attempt(gov)
    others = [gov.guard(**REFUND, estimate=usd("20.00")) for _ in range(5)]
    calls = [other.__enter__() for other in others]
    block.__exit__(TimeoutError, TimeoutError(), None)
    for other, other_call in zip(others, calls, strict=True):
        other_call.fail(http_status=402)
        other.__exit__(None, None, None)
    return call.hold_id


def test_a_larger_overrun_on_a_hold_that_had_one_freezes_again(make_governor: MakeGov) -> None:
    """Before: B resumed A's unknown hold, whose $10 overrun an operator had acknowledged,
    and settled $60 on its $10 estimate (per-call cap $20): the row said allowed, the hold
    kept the old $10 overrun, and nothing froze."""
    gov = make_governor(refund_policy(daily_cap="100.00", per_call_cap="20.00"))
    hold_id = _late_unknown_past_the_cap(gov)
    assert gov.ledger.get_hold(hold_id).overrun == usd("10.00")
    gov.acknowledge_overrun(hold_id, reason="A's late unknown", by="ops")
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as b:
        assert b.reservation.resumed
        b.settle(usd("60.00"))
    held = gov.ledger.get_hold(hold_id)
    assert held.overrun == usd("50.00") and held.overrun_acknowledged_at is None
    assert outcomes(gov)[-1] == "overrun"
    with pytest.raises(PolicyViolation) as refused, gov.guard(**REFUND, estimate=usd("5.00")):
        pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    gov.acknowledge_overrun(hold_id, reason="seen", by="ops")
    assert not any(status.frozen for status in gov.budgets())


def test_a_smaller_settle_keeps_an_unacknowledged_overrun(make_governor: MakeGov) -> None:
    gov = make_governor(refund_policy(daily_cap="100.00", per_call_cap="20.00"))
    hold_id = _late_unknown_past_the_cap(gov)
    with pytest.raises(PolicyViolation):  # a retry of it is refused while it freezes
        with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k"):
            pass
    gov.resolve_hold(hold_id, settle=usd("4.00"), reason="Stripe says 4", by="ops")
    held = gov.ledger.get_hold(hold_id)
    assert held.overrun == usd("10.00") and held.overrun_acknowledged_at is None
    assert [over.id for over in gov.overruns()] == [hold_id]
    gov.acknowledge_overrun(hold_id, reason="seen", by="ops")
    assert not any(status.frozen for status in gov.budgets())


def test_a_released_hold_with_an_unacknowledged_overrun_cannot_be_rearmed(
    make_governor: MakeGov, clock: Any
) -> None:
    """Before: the re-arm wiped the overrun, unfreezing the agent type with nobody having
    acknowledged it, and left the old day's budget frozen with nothing to acknowledge."""
    gov = make_governor(refund_policy(daily_cap="100.00", per_call_cap="20.00"))
    hold_id = _late_unknown_past_the_cap(gov)
    gov.resolve_hold(hold_id, release=True, reason="Stripe has no such refund", by="ops")
    clock.advance(days=1)
    with pytest.raises(PolicyViolation) as refused:
        with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k"):
            pass
    assert refused.value.code is ViolationCode.BUDGET_FROZEN
    assert gov.ledger.get_hold(hold_id).overrun == usd("10.00")
    gov.acknowledge_overrun(hold_id, reason="seen", by="ops")
    assert not any(status.frozen for status in gov.budgets())
    with gov.guard(**REFUND, estimate=usd("10.00"), idempotency_key="k") as again:
        assert again.hold_id == hold_id  # re-armed once acknowledged


# -- part 2: subjects and credentials ------------------------------------------------------
def test_one_call_in_flight_per_subject(make_governor: MakeGov) -> None:
    """While a call changing an object is in flight (pending or unknown), every other call
    on it is refused and audited; a retry of the same call (its key) is not another."""
    gov, other_process = make_governor(), make_governor()
    on_invoice: dict[str, Any] = {**REFUND, "subject": "stripe:in_1"}
    finalize = gov.guard(**on_invoice, estimate=usd("10.00"), idempotency_key="fin")
    first = finalize.__enter__()
    with pytest.raises(PolicyViolation) as busy:
        with other_process.guard(**on_invoice, estimate=usd("1.00")):
            pass
    assert busy.value.code is ViolationCode.SUBJECT_BUSY
    assert first.hold_id in busy.value.message
    with gov.guard(**on_invoice, estimate=usd("10.00"), idempotency_key="fin") as retry:
        assert retry.reservation.resumed
        retry.fail(http_status=409, error="the first attempt is in progress")
    with gov.guard(**REFUND, subject="stripe:in_2", estimate=usd("1.00")):
        pass  # another subject
    assert not finalize.__exit__(TimeoutError, TimeoutError(), None)  # unknown: still busy
    with pytest.raises(PolicyViolation), gov.guard(**on_invoice, estimate=usd("1.00")):
        pass
    gov.resolve_hold(first.hold_id, settle=usd("10.00"), reason="Stripe: paid", by="ops")
    with gov.guard(**on_invoice, estimate=usd("1.00")):
        pass
    assert outcomes(gov).count("denied") == 2
    assert gov.audit.verify().ok


def test_concurrent_calls_on_one_subject_never_both_proceed(make_governor: MakeGov) -> None:
    """Processes racing for one subject: the partial unique index lets one hold exist."""
    govs = [make_governor() for _ in range(4)]
    barrier = threading.Barrier(len(govs))
    entered: list[str] = []
    refused: list[ViolationCode] = []
    lock = threading.Lock()
    release = threading.Event()

    def race(gov: Governor) -> None:
        barrier.wait()
        try:
            with gov.guard(**REFUND, subject="stripe:in_9", estimate=usd("1.00")) as call:
                with lock:
                    entered.append(call.hold_id)
                release.wait(timeout=30)
        except PolicyViolation as violation:
            with lock:
                refused.append(violation.code)
            if len(refused) == len(govs) - 1:
                release.set()

    threads = [threading.Thread(target=race, args=(gov,)) for gov in govs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(entered) == 1
    assert refused == [ViolationCode.SUBJECT_BUSY] * (len(govs) - 1)


def test_a_credential_is_on_every_row_and_verifies(make_governor: MakeGov) -> None:
    gov = make_governor(refund_policy(daily_cap="10.00", per_call_cap="10.00"))
    with gov.guard(**REFUND, estimate=usd("5.00"), credential="pmk_a") as call:
        call.settle(usd("5.00"))
    with pytest.raises(PolicyViolation):
        with gov.guard(**REFUND, estimate=usd("9.00"), credential="pmk_b"):
            pass
    gov.free_call(**REFUND, credential="pmk_c")(None, 1)
    assert [row.credential for row in gov.audit.query()] == ["pmk_a", "pmk_b", "pmk_c"]
    assert gov.audit.verify().ok
