"""``aguard`` under cancellation (:mod:`paymaster._governor.cancellation`): a task cancelled while
it reserves, while its block runs or while it records the outcome ends cancelled, and
its hold is resolved exactly once, with its audit row. No sleeps: threads and tasks are
stepped with events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from paymaster import GovernedCall, Governor, HoldState, Money, PolicyViolation
from paymaster._governor import conclude
from paymaster._governor.cancellation import AsyncGovernedCall, aconclude, finish, to_completion
from paymaster._outcomes import Resolution, Verdict

MakeGov = Callable[..., Governor]
REFUND: dict[str, Any] = {
    "agent": "refund-agent",
    "vendor": "stripe",
    "endpoint": "/v1/refunds",
    "estimate": Money.parse("10.00 USD"),
}
WAIT = 10  # seconds: a bound on a wait that should end at once, never a synchronisation


class Gate:
    """Pauses a ledger method in its worker thread: ``entered`` is set when it is called,
    and it goes on once ``opened``; ``calls`` counts its calls."""

    def __init__(self, method: Callable[..., Any], *, after: bool = False) -> None:
        self._method = method
        self._after = after
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self._after:  # the write lands first, then the thread waits
            result = self._method(*args, **kwargs)
            self._pause()
            return result
        self._pause()
        return self._method(*args, **kwargs)

    def _pause(self) -> None:
        self.entered.set()
        assert self.opened.wait(WAIT), "the gate was never opened"


class Counter:
    """Counts the calls of a ledger method (each one a resolution of a hold)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._method(*args, **kwargs)


async def _in_thread(event: threading.Event) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, WAIT)


async def _cancel_at(task: asyncio.Task[Any], gate: Gate) -> None:
    """Cancel ``task`` once its ledger write reached ``gate``, then let the write go on;
    the task must end cancelled."""
    await _in_thread(gate.entered)
    task.cancel()
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task


def _resolutions(gov: Governor) -> dict[str, Counter]:
    ledger = gov.ledger
    counters = {name: Counter(getattr(ledger, name)) for name in ("settle", "release")}
    counters["mark_unknown"] = Counter(ledger.mark_unknown)
    for name, counter in counters.items():
        setattr(ledger, name, counter)
    return counters


# -- cancelled while reserving ----------------------------------------------------------


@pytest.mark.parametrize("lands", ["before", "after"])
def test_cancelled_while_reserving_frees_the_hold_once(make_governor: MakeGov, lands: str) -> None:
    gov = make_governor()
    gate = Gate(gov.ledger.reserve, after=lands == "after")
    gov.ledger.reserve = gate  # type: ignore[method-assign]
    counted = _resolutions(gov)
    body_ran = False

    async def governed() -> None:
        nonlocal body_ran
        async with gov.aguard(**REFUND):
            body_ran = True

    async def main() -> None:
        await _cancel_at(asyncio.ensure_future(governed()), gate)

    asyncio.run(main())
    assert not body_ran
    assert gate.calls == 1
    [row] = gov.audit.query()
    assert row.outcome == "errored" and row.error == "task cancelled before the call was made"
    assert gov.ledger.get_hold(row.hold_id).state is HoldState.RELEASED
    assert counted["release"].calls == 1
    assert counted["settle"].calls == counted["mark_unknown"].calls == 0
    assert gov.budgets()[0].committed == Money.parse("0.00 USD")


def test_refused_while_being_cancelled_ends_cancelled_with_its_refusal_row(
    make_governor: MakeGov,
) -> None:
    gov = make_governor()
    gate = Gate(gov.ledger.reserve)
    gov.ledger.reserve = gate  # type: ignore[method-assign]
    gov.revoke(agent="refund-agent", reason="stop", by="test")

    async def main() -> None:
        task = asyncio.ensure_future(gov.aguard(**REFUND).__aenter__())
        await _in_thread(gate.entered)
        task.cancel()
        gate.opened.set()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert isinstance(info.value.__cause__, PolicyViolation)

    asyncio.run(main())
    [row] = gov.audit.query()
    assert row.outcome == "denied" and row.violation_code == "revoked"
    assert gov.holds() == []


# -- cancelled while the block runs -----------------------------------------------------


@pytest.mark.parametrize("free", [False, True])
def test_cancelled_inside_the_block_keeps_or_frees_the_hold_once(
    make_governor: MakeGov, free: bool
) -> None:
    gov = make_governor()
    counted = _resolutions(gov)
    spec = {**REFUND, "estimate": None, "free": True} if free else REFUND
    inside = asyncio.Event()
    holds: list[str] = []

    async def governed() -> None:
        async with gov.aguard(**spec) as call:
            holds.append(call.hold_id)
            inside.set()
            await asyncio.Event().wait()  # the vendor call, cut off by the cancellation

    async def main() -> None:
        task = asyncio.ensure_future(governed())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [row] = gov.audit.query()
    hold = gov.ledger.get_hold(holds[0])
    if free:  # a call that moves no money: nothing to reconcile
        assert hold.state is HoldState.RELEASED and row.outcome == "errored"
        assert (counted["release"].calls, counted["mark_unknown"].calls) == (1, 0)
    else:  # the vendor may have acted: kept counted, for reconciliation
        assert hold.state is HoldState.UNKNOWN and row.outcome == "unknown"
        assert (counted["release"].calls, counted["mark_unknown"].calls) == (0, 1)
        assert "CancelledError" in (row.error or "")
    assert counted["settle"].calls == 0


# -- cancelled while recording the outcome ----------------------------------------------


@pytest.mark.parametrize("how", ["settle", "fail", "block end", "block raised"])
def test_cancelled_while_recording_the_outcome_records_it_once(
    make_governor: MakeGov, how: str
) -> None:
    gov = make_governor()
    counted = _resolutions(gov)
    name = "release" if how in ("fail", "block raised") else "settle"
    gate = Gate(counted[name])
    setattr(gov.ledger, name, gate)
    seen: list[AsyncGovernedCall] = []

    async def governed() -> None:
        async with gov.aguard(**REFUND) as call:
            seen.append(call)
            if how == "settle":
                await call.settle(Money.parse("7.00 USD"), http_status=200)
            elif how == "fail":
                await call.fail(http_status=402, error="declined")
            elif how == "block raised":  # before the vendor call: the hold is freed
                raise RuntimeError("the request could not be built")
            # "block end": leaving the block settles at the estimate

    async def main() -> None:
        await _cancel_at(asyncio.ensure_future(governed()), gate)

    asyncio.run(main())
    [call] = seen
    assert call.resolved
    [row] = gov.audit.query()
    assert row.hold_id == call.hold_id
    hold = gov.ledger.get_hold(call.hold_id)
    if how == "fail":
        assert hold.state is HoldState.RELEASED and row.outcome == "failed"
    elif how == "block raised":  # the task still ends cancelled, not with RuntimeError
        assert hold.state is HoldState.RELEASED and row.outcome == "errored"
        assert row.error == "RuntimeError: the request could not be built"
    else:
        assert hold.state is HoldState.SETTLED and row.outcome == "allowed"
        expected = "7.00" if how == "settle" else "10.00"
        assert hold.actual == Money.parse(f"{expected} USD")
    assert gate.calls == 1
    assert sum(counter.calls for counter in counted.values()) == 1
    assert gov.holds() == []


# -- the pieces -------------------------------------------------------------------------


def test_to_completion_finishes_the_work_and_reports_the_cancellation(
    make_governor: MakeGov,
) -> None:
    gov = make_governor()
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []
    cancels: list[bool] = []

    def work(value: str) -> str:
        started.set()
        assert release.wait(WAIT)
        finished.append(value)
        return value

    async def main() -> tuple[str, bool]:
        inner = asyncio.ensure_future(
            to_completion(gov._executor, work, "done", on_cancel=lambda: cancels.append(True))
        )
        await _in_thread(started)
        inner.cancel()
        release.set()
        return await inner

    assert asyncio.run(main()) == ("done", True)
    assert finished == ["done"]
    assert cancels == [True]


def test_finish_ends_cancelled_once_the_work_is_done(make_governor: MakeGov) -> None:
    gov = make_governor()
    started, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def work() -> None:
        started.set()
        assert release.wait(WAIT)
        finished.append(1)

    async def main() -> None:
        task = asyncio.ensure_future(finish(gov._executor, work))
        await _in_thread(started)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [1]

    asyncio.run(main())


def test_the_async_call_wraps_a_governed_call(make_governor: MakeGov) -> None:
    gov = make_governor()

    async def main() -> None:
        async with gov.aguard(**REFUND, tool_call_id="tc_1") as call:
            assert isinstance(call, AsyncGovernedCall)
            assert not isinstance(call, GovernedCall)
            sync = call.sync_call
            assert isinstance(sync, GovernedCall)
            assert (call.hold_id, call.estimate, call.tool_call_id) == (
                sync.hold_id,
                sync.estimate,
                "tc_1",
            )
            assert call.unknown_on == sync.unknown_on and not call.resolved
            with pytest.raises(TypeError, match="use conclude"):
                await aconclude(sync, Verdict(Resolution.SETTLE))
            # conclude records an aguard's call from a worker thread, as adapters do
            await gov.in_worker(conclude, call, Verdict(Resolution.SETTLE))
            assert call.resolved and call.hold.state is HoldState.SETTLED

    asyncio.run(main())
    [row] = gov.audit.query()
    assert row.outcome == "allowed" and row.tool_call_id == "tc_1"
