"""A hypothesis state machine over reserve / settle / release / unknown / revoke / restore /
day rollover, checking the ledger against a plain model after every step."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import Clock, refund_policy
from paymaster import Governor, HoldState, Money, PolicyViolation, RunPolicy, ViolationCode
from paymaster._ledger import Hold
from workers import exposure

CAP, PER_CALL, RUN_CAP = 10_000, 5_000, 6_000


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class Ledger(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = Clock()
            self.agent = "agent-" + uuid.uuid4().hex[:8]  # a fresh scope per example
            self.gov = Governor(url, policies=[refund_policy(agent=self.agent)], clock=self.clock)
            self.open: list[tuple[Hold, str]] = []  # (hold, day it counts against)
            self.committed: dict[str, int] = {}
            self.run_committed: dict[str, int] = {}
            self.revoked = False
            self.rows = 0

        def day(self) -> str:
            return self.clock.now.date().isoformat()

        @rule(amount=st.integers(0, PER_CALL), run=st.sampled_from(["r1", "r2", None]))
        def reserve(self, amount: int, run: str | None) -> None:
            today = self.day()
            fits = self.committed.get(today, 0) + amount <= CAP
            run_fits = run is None or self.run_committed.get(run, 0) + amount <= RUN_CAP
            try:
                reservation = self.gov.ledger.reserve(
                    self.gov._prepare(
                        agent=self.agent,
                        vendor="stripe",
                        endpoint="/v1/refunds",
                        method="POST",
                        estimate=Money(amount, "USD"),
                        customer=None,
                        run=run,
                        run_policy=RunPolicy(cap=Money(RUN_CAP, "USD")) if run else None,
                        idempotency_key=None,
                    )
                )
            except PolicyViolation as violation:
                self.rows += 1
                if self.revoked:
                    assert violation.code is ViolationCode.REVOKED
                elif not run_fits:  # the run's budget is taken before the day's
                    assert violation.code is ViolationCode.RUN_CAP_EXCEEDED
                else:
                    assert not fits
                    assert violation.code is ViolationCode.CAP_EXCEEDED
                return
            assert not self.revoked and fits and run_fits, "a reserve the model refuses"
            self.committed[today] = self.committed.get(today, 0) + amount
            if run:
                self.run_committed[run] = self.run_committed.get(run, 0) + amount
            self.open.append((reservation.hold, today))

        def _resolve(self, index: int, delta_of: int) -> tuple[Hold, str]:
            held, day = self.open.pop(index % len(self.open))
            self.committed[day] += delta_of
            if held.run:
                self.run_committed[held.run] += delta_of
            self.rows += 1
            return held, day

        @precondition(lambda self: self.open)
        @rule(index=st.integers(0, 100), fraction=st.integers(0, 100))
        def settle(self, index: int, fraction: int) -> None:
            held, _ = self.open[index % len(self.open)]
            actual = held.estimate.amount * fraction // 100
            self._resolve(index, actual - held.estimate.amount)
            self.gov.ledger.settle(held.id, Money(actual, "USD"))

        @precondition(lambda self: self.open)
        @rule(index=st.integers(0, 100))
        def release(self, index: int) -> None:
            held, _ = self.open[index % len(self.open)]
            self._resolve(index, -held.estimate.amount)
            self.gov.ledger.release(held.id)

        @precondition(lambda self: self.open)
        @rule(index=st.integers(0, 100))
        def outcome_unknown(self, index: int) -> None:
            held, _ = self.open[index % len(self.open)]
            self._resolve(index, 0)  # still counted
            assert self.gov.ledger.mark_unknown(held.id, error="timeout").state is (
                HoldState.UNKNOWN
            )

        @rule()
        def revoke(self) -> None:
            self.gov.revoke(agent=self.agent, reason="test", by="machine")
            self.revoked = True

        @rule()
        def restore(self) -> None:
            self.gov.restore(agent=self.agent, by="machine")
            self.revoked = False

        @rule()
        def next_day(self) -> None:
            self.clock.advance(days=1)

        @invariant()
        def ledger_matches_model(self) -> None:
            for budget in self.gov.budgets(day=self.clock.now.date()):
                if budget.agent == self.agent and budget.kind == "daily":
                    assert budget.committed.amount == self.committed.get(self.day(), 0)
                    assert budget.committed.amount <= CAP
                    assert budget.settled + budget.pending == budget.committed

        @invariant()
        def one_row_per_finished_call(self) -> None:
            assert self.gov.audit.count(agent=self.agent) == self.rows

        def teardown(self) -> None:
            self.gov.close()

    return Ledger


@pytest.mark.parametrize("examples", [25])
def test_ledger_state_machine(db_url: str, examples: int) -> None:
    machine = make_machine(db_url)
    machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    machine.TestCase().runTest()


def test_exposure_helper_matches_budget(db_url: str) -> None:
    gov = Governor(db_url, policies=[refund_policy()], clock=Clock())
    try:
        with gov.guard(
            agent="refund-agent",
            vendor="stripe",
            endpoint="/v1/refunds",
            estimate=Money(700, "USD"),
        ) as call:
            assert exposure(gov.engine) == 700
            call.settle(Money(500, "USD"))
        assert exposure(gov.engine) == 500 == gov.budgets()[0].committed.amount
    finally:
        gov.close()
