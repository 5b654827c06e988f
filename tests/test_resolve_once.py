"""One attempt records its outcome once, even when two resolutions race (two threads or
tasks settling, a settle and a fail, the async call and the sync call it wraps): the
second is refused with HoldAlreadyResolved before it reaches the ledger, so the attempt
keeps one audit row and the budget counts the one outcome recorded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from paymaster import GovernedCall, Governor, HoldAlreadyResolved, HoldState, Money

REFUND: dict[str, Any] = {
    "agent": "refund-agent",
    "vendor": "stripe",
    "endpoint": "/v1/refunds",
    "estimate": Money.parse("40.00 USD"),
}
WAIT = 10  # seconds: a bound on a wait that should end at once, never a synchronisation


def _second_resolution(call: GovernedCall, how: str) -> Callable[[], object]:
    if how == "settle":
        return lambda: call.settle(Money.parse("5.00 USD"))
    if how == "fail":
        return lambda: call.fail(http_status=402, error="declined")
    return lambda: call.unknown("timed out")


@pytest.mark.parametrize("second", ["settle", "fail", "unknown"])
def test_a_resolution_racing_the_first_is_refused_before_the_ledger(
    make_governor: Callable[..., Governor], monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    gov = make_governor()
    settle = gov.ledger.settle
    refused: list[BaseException] = []

    with gov.guard(**REFUND) as call:
        racer = _second_resolution(call, second)

        def settle_while_another_resolves(*args: Any, **kwargs: Any) -> Any:
            # The second resolution arrives while the first is inside the ledger (here
            # from the same thread, so the race is deterministic).
            try:
                racer()
            except HoldAlreadyResolved as exc:
                refused.append(exc)
            return settle(*args, **kwargs)

        monkeypatch.setattr(gov.ledger, "settle", settle_while_another_resolves)
        call.settle(Money.parse("30.00 USD"))

    assert len(refused) == 1
    assert "being recorded" in str(refused[0])
    rows = gov.audit.query(agent="refund-agent")
    assert [(str(r.outcome), r.actual) for r in rows] == [("allowed", 3000)]
    [budget] = [b for b in gov.budgets() if b.cap is not None]
    assert budget.committed == Money.parse("30.00 USD")


def test_two_threads_settling_one_call_record_one_outcome(
    make_governor: Callable[..., Governor], monkeypatch: pytest.MonkeyPatch
) -> None:
    gov = make_governor()
    settle = gov.ledger.settle
    inside, results = threading.Event(), []
    release_first = threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert release_first.wait(WAIT)
        return settle(*args, **kwargs)

    monkeypatch.setattr(gov.ledger, "settle", gated)
    with gov.guard(**REFUND) as call:
        first = threading.Thread(target=lambda: results.append(call.settle(3000)))
        first.start()
        assert inside.wait(WAIT)
        with pytest.raises(HoldAlreadyResolved, match="being recorded"):
            call.settle(500)  # while the first thread is inside the ledger
        release_first.set()
        first.join(WAIT)
    [hold] = results
    assert hold.state is HoldState.SETTLED and hold.actual == Money(3000, "USD")
    assert len(gov.audit.query(agent="refund-agent")) == 1


def test_the_async_call_and_the_sync_call_it_wraps_resolve_once(
    make_governor: Callable[..., Governor],
) -> None:
    gov = make_governor()

    async def main() -> list[object]:
        async with gov.aguard(**REFUND) as call:
            return await asyncio.gather(
                call.settle(3000),
                asyncio.to_thread(call.sync_call.settle, 500),
                return_exceptions=True,
            )

    outcomes = asyncio.run(main())
    assert sum(isinstance(o, HoldAlreadyResolved) for o in outcomes) == 1
    rows = gov.audit.query(agent="refund-agent")
    assert len(rows) == 1 and str(rows[0].outcome) == "allowed"
    [budget] = [b for b in gov.budgets() if b.cap is not None]
    assert budget.committed == Money(rows[0].actual or 0, "USD")


@pytest.mark.parametrize("how", ["settle", "fail"])
def test_an_interrupt_after_the_outcome_committed_leaves_the_attempt_one_row(
    make_governor: Callable[..., Governor], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Ctrl-C (KeyboardInterrupt) delivered just after the settle's or fail's COMMIT, before
    the call learns it is resolved: the guard then records the attempt as of unknown
    outcome, which must find the outcome already recorded by this attempt, not write a
    second row (nor count a released hold again as if it may have paid)."""
    gov = make_governor()
    write = gov.ledger._write
    interrupted: list[str] = []

    def commit_then_interrupt(action: str, *args: Any) -> Any:
        done = write(action, *args)
        if action.startswith("recording hold") and not interrupted:
            interrupted.append(action)
            raise KeyboardInterrupt  # as a signal handler would, once COMMIT returned
        return done

    monkeypatch.setattr(gov.ledger, "_write", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt), gov.guard(**REFUND, tool_call_id="call-1") as call:
        if how == "settle":
            call.settle(Money.parse("30.00 USD"))
        else:
            call.fail(http_status=402, error="declined")

    assert len(interrupted) == 1
    rows = gov.audit.query(agent="refund-agent")
    expected = ("allowed", 3000) if how == "settle" else ("failed", 0)
    assert [(str(r.outcome), r.actual) for r in rows] == [expected]
    [hold] = gov.ledger.holds(states=list(HoldState))
    assert hold.state == (HoldState.SETTLED if how == "settle" else HoldState.RELEASED)
    [budget] = [b for b in gov.budgets() if b.cap is not None]
    assert budget.committed == Money.parse("30.00 USD" if how == "settle" else "0.00 USD")
