"""Zero overshoot and no false denials under threads, asyncio tasks and OS processes.

Cap $100.00, calls of $3.00: exactly floor(10000 / 300) = 33 succeed, whatever the
interleaving, and pending + settled (summed from the holds, inside every call) never
exceeds the cap. Every attempt leaves exactly one audit row.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import refund_policy
from paymaster import Governor, Money, PolicyViolation, ViolationCode
from workers import exposure, spend_until_denied

CAP, X = 10_000, 300
EXPECTED = CAP // X  # 33
MakeGov = Callable[..., Governor]


def _fields() -> dict[str, object]:
    return refund_policy().model_dump(mode="json")


def test_sixteen_threads_hold_the_cap_exactly(make_governor: MakeGov) -> None:
    gov = make_governor()
    start = threading.Barrier(16)

    def worker() -> dict[str, int]:
        start.wait()
        allowed = max_seen = 0
        while True:
            try:
                with gov.guard(
                    agent="refund-agent",
                    vendor="stripe",
                    endpoint="/v1/refunds",
                    estimate=Money(X, "USD"),
                ) as call:
                    max_seen = max(max_seen, exposure(gov.engine))
                    call.settle(http_status=200)
                allowed += 1
            except PolicyViolation as violation:
                assert violation.code is ViolationCode.CAP_EXCEEDED
                return {"allowed": allowed, "max_seen": max_seen}

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: worker(), range(16)))
    assert sum(r["allowed"] for r in results) == EXPECTED
    assert max(r["max_seen"] for r in results) <= CAP
    assert gov.budgets()[0].committed == Money(EXPECTED * X, "USD")
    assert gov.audit.count() == EXPECTED + 16  # every allowed call and every denial
    assert gov.audit.count(outcome="denied") == 16
    assert gov.audit.verify().ok


def test_two_hundred_asyncio_tasks_hold_the_cap_exactly(make_governor: MakeGov) -> None:
    gov = make_governor()
    seen: list[int] = []

    async def one() -> bool:
        try:
            async with gov.aguard(
                agent="refund-agent",
                vendor="stripe",
                endpoint="/v1/refunds",
                estimate=Money(X, "USD"),
            ) as call:
                seen.append(await asyncio.to_thread(exposure, gov.engine))
                await asyncio.sleep(0)  # let other tasks interleave
                await call.settle(http_status=200)
            return True
        except PolicyViolation:
            return False

    async def main() -> list[bool]:
        return await asyncio.gather(*(one() for _ in range(200)))

    outcomes = asyncio.run(main())
    assert outcomes.count(True) == EXPECTED
    assert max(seen) <= CAP
    assert gov.audit.count() == 200
    assert gov.audit.count(outcome="allowed") == EXPECTED


@pytest.mark.slow
def test_four_processes_hold_the_cap_exactly(db_url: str) -> None:
    Governor(db_url, policies=[refund_policy()]).close()  # create the schema once
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            results = pool.starmap(spend_until_denied, [(db_url, _fields(), X, start)] * 4)
    assert sum(r["allowed"] for r in results) == EXPECTED
    assert max(r["max_seen"] for r in results) <= CAP
    gov = Governor(db_url, policies=[refund_policy()])
    try:
        assert gov.budgets()[0].committed == Money(EXPECTED * X, "USD")
        assert gov.audit.count() == EXPECTED + 4
        assert gov.audit.verify().ok
    finally:
        gov.close()


def test_first_use_of_a_window_is_race_free(make_governor: MakeGov) -> None:
    """Many first calls of a new day at once: one budget row, no error."""
    govs = [make_governor() for _ in range(4)]
    start = threading.Barrier(8)

    def first_call(i: int) -> None:
        start.wait()
        with govs[i % 4].guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(100, "USD"),
        ) as call:
            call.settle()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(first_call, range(8)))
    [budget] = govs[0].budgets()
    assert budget.committed == Money(800, "USD") and budget.calls == 8
