"""The ledger driven directly (no Governor), on both backends: reserve then settle or
release, a refusal at the cap, an overrun, the unknown state and a revocation, each
checked in the budget figures, the audit rows, and the events its observer is told."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Engine

from conftest import Clock, refund_policy
from paymaster import AuditLog, Money, PolicyViolation, ViolationCode, effective_policy
from paymaster._audit import AuditEntry
from paymaster._db import connect, ensure_schema
from paymaster._ledger import (
    BudgetRef,
    BudgetStatus,
    Hold,
    HoldState,
    Ledger,
    ReserveRequest,
    RevocationScope,
    observing,
)

USD = "USD"


def usd(text: str) -> Money:
    return Money.parse(f"{text} {USD}")


@dataclass
class Recorder:
    """A ledger observer that writes down every event it is told, in order."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    rose: list[tuple[int, int, BudgetRef, Money | None]] = field(default_factory=list)

    def budget_rose(
        self,
        conn: Connection,
        budget_id: int,
        committed: int,
        cap: int,
        at: datetime,
        budget: Callable[[], BudgetRef],
        refused: Money | None = None,
    ) -> Any:
        self.rose.append((committed, cap, budget(), refused))
        return ("note", budget_id, committed)

    def after_commit(self, note: Any) -> None:
        self.events.append(("after_commit", *note[1:]))

    def budgets_reset(self) -> None:
        self.events.append(("budgets_reset",))

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None:
        assert seconds >= 0
        self.events.append(("reserved", request.estimate, ok))

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("resolved", state, None if hold is None else hold.id))

    def overran(self, hold: Hold, at: datetime) -> None:
        self.events.append(("overran", hold.id, hold.overrun))

    def denied(self, entry: AuditEntry, violation: PolicyViolation, at: datetime) -> None:
        self.events.append(("denied", entry.violation_code, violation.code))

    def revoked(
        self, scope: RevocationScope, target: str, *, reason: str, by: str, at: datetime
    ) -> None:
        self.events.append(("revoked", scope, target, reason, by))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == name]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    ensure_schema(engine)
    yield engine
    assert AuditLog(engine).verify().ok  # every row the test left is a valid chain
    engine.dispose()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def ledger(engine: Engine, clock: Clock, recorder: Recorder) -> Ledger:
    return Ledger(engine, clock, observer=recorder)


def request(estimate: str, **fields: Any) -> ReserveRequest:
    """A refund call under the tests' policy: $100 a day."""
    values: dict[str, Any] = {
        "agent": "refund-agent",
        "vendor": "stripe",
        "endpoint": "/v1/refunds",
        "method": "POST",
        "estimate": usd(estimate),
        "policy": effective_policy(refund_policy()),
    }
    values.update(fields)
    return ReserveRequest(**values)


def daily(ledger: Ledger) -> BudgetStatus:
    [status] = [b for b in ledger.budgets() if b.kind == "daily"]
    return status


def test_reserve_then_settle_counts_the_actual(ledger: Ledger, recorder: Recorder) -> None:
    reservation = ledger.reserve(request("30.00"))
    assert reservation.remaining == usd("70.00")
    assert reservation.hold.state is HoldState.PENDING
    status = daily(ledger)
    assert (status.committed, status.pending, status.settled) == (
        usd("30.00"),
        usd("30.00"),
        usd("0.00"),
    )

    settled = ledger.settle(reservation.hold.id, usd("25.00"), http_status=200)
    assert settled.state is HoldState.SETTLED and settled.actual == usd("25.00")
    status = daily(ledger)
    assert (status.committed, status.pending, status.settled, status.calls) == (
        usd("25.00"),
        usd("0.00"),
        usd("25.00"),
        1,
    )
    assert status.remaining == usd("75.00")
    [row] = AuditLog(ledger._engine).query()
    assert (row.outcome, row.estimate, row.actual, row.hold_id, row.http_status) == (
        "allowed",
        3000,
        2500,
        settled.id,
        200,
    )
    # Told of the reserve and the settle; the reserve took the day's budget to 30 of 100.
    assert recorder.named("reserved") == [("reserved", usd("30.00"), True)]
    assert recorder.named("resolved") == [("resolved", HoldState.SETTLED, settled.id)]
    [(committed, cap, ref, refused)] = recorder.rose
    assert (committed, cap, refused) == (3000, 10000, None)
    assert (ref.kind, ref.agent, ref.vendor, ref.currency, ref.run) == (
        "daily",
        "refund-agent",
        "stripe",
        USD,
        None,
    )
    assert ref.id == status.id and ref.window == status.window
    assert recorder.named("after_commit") == [("after_commit", status.id, 3000)]
    assert not recorder.named("overran") and not recorder.named("denied")


def test_reserve_then_release_frees_the_estimate(ledger: Ledger, recorder: Recorder) -> None:
    hold = ledger.reserve(request("40.00")).hold
    released = ledger.release(hold.id, error="vendor said 402")
    assert released.state is HoldState.RELEASED and released.actual is None
    status = daily(ledger)
    assert (status.committed, status.pending, status.settled) == (
        usd("0.00"),
        usd("0.00"),
        usd("0.00"),
    )
    [row] = AuditLog(ledger._engine).query()
    assert (row.outcome, row.estimate, row.actual, row.error) == (
        "failed",
        4000,
        0,
        "vendor said 402",
    )
    assert recorder.named("resolved") == [("resolved", HoldState.RELEASED, hold.id)]
    assert len(recorder.rose) == 1  # only the reserve raised a budget


def test_a_reserve_over_the_cap_is_refused_and_audited(ledger: Ledger, recorder: Recorder) -> None:
    first = ledger.reserve(request("80.00")).hold
    with pytest.raises(PolicyViolation) as refused:
        ledger.reserve(request("30.00"))
    assert refused.value.code is ViolationCode.CAP_EXCEEDED
    assert refused.value.remaining == usd("20.00")
    status = daily(ledger)
    assert status.committed == usd("80.00") and status.calls == 1  # nothing taken
    assert [h.id for h in ledger.holds()] == [first.id]
    [row] = AuditLog(ledger._engine).query()
    assert (row.outcome, row.violation_code, row.estimate, row.actual, row.hold_id) == (
        "denied",
        "cap_exceeded",
        3000,
        0,
        None,
    )
    assert recorder.named("reserved") == [
        ("reserved", usd("80.00"), True),
        ("reserved", usd("30.00"), False),
    ]
    assert recorder.named("denied") == [("denied", "cap_exceeded", ViolationCode.CAP_EXCEEDED)]
    # The refusal at the cap is told as the budget's exhaustion, with the refused amount.
    assert [(c, cap, r) for c, cap, _, r in recorder.rose] == [
        (8000, 10000, None),
        (8000, 10000, usd("30.00")),
    ]
    assert recorder.named("after_commit") == [
        ("after_commit", status.id, 8000),
        ("after_commit", status.id, 8000),
    ]


def test_a_settle_above_the_estimate_is_an_overrun_that_freezes(
    ledger: Ledger, recorder: Recorder
) -> None:
    hold = ledger.reserve(request("10.00")).hold
    settled = ledger.settle(hold.id, usd("15.00"))
    assert settled.overrun == usd("5.00") and settled.overrun_acknowledged_at is None
    status = daily(ledger)
    assert status.committed == usd("15.00") and status.frozen
    [row] = AuditLog(ledger._engine).query()
    assert (row.outcome, row.estimate, row.actual) == ("overrun", 1000, 1500)
    assert row.error is not None and "overrun: settled $15.00" in row.error
    assert recorder.named("overran") == [("overran", hold.id, usd("5.00"))]
    # The settle raised the budget by the difference: told with the row as adjusted.
    assert [(c, cap, r) for c, cap, _, r in recorder.rose] == [
        (1000, 10000, None),
        (1500, 10000, None),
    ]
    with pytest.raises(PolicyViolation) as frozen:
        ledger.reserve(request("1.00"))
    assert frozen.value.code is ViolationCode.BUDGET_FROZEN

    acknowledged = ledger.acknowledge_overrun(hold.id, reason="vendor fee", by="ops")
    assert acknowledged.overrun_acknowledged_by == "ops"
    assert not daily(ledger).frozen
    assert ledger.reserve(request("1.00")).remaining == usd("84.00")
    outcomes = [r.outcome for r in AuditLog(ledger._engine).query()]
    assert outcomes == ["overrun", "denied", "acknowledged"]


def test_an_unknown_outcome_stays_counted_until_resolved(
    ledger: Ledger, recorder: Recorder
) -> None:
    hold = ledger.reserve(request("20.00")).hold
    unknown = ledger.mark_unknown(hold.id, error="timed out")
    assert unknown.state is HoldState.UNKNOWN
    status = daily(ledger)
    assert status.committed == usd("20.00") and status.pending == usd("20.00")
    assert [h.id for h in ledger.holds()] == [hold.id]

    resolved = ledger.resolve_hold(hold.id, settle=usd("12.00"), reason="checked", by="ops")
    assert resolved.state is HoldState.SETTLED and resolved.actual == usd("12.00")
    status = daily(ledger)
    assert (status.committed, status.settled, status.pending) == (
        usd("12.00"),
        usd("12.00"),
        usd("0.00"),
    )
    assert ledger.holds() == []
    rows = AuditLog(ledger._engine).query()
    assert [(r.outcome, r.actual) for r in rows] == [("unknown", 0), ("reconciled", 1200)]
    assert rows[1].error == "resolved by ops: checked"
    assert recorder.named("resolved") == [
        ("resolved", HoldState.UNKNOWN, hold.id),
        ("resolved", HoldState.SETTLED, hold.id),
    ]


def test_a_revocation_refuses_reserves_until_restored(ledger: Ledger, recorder: Recorder) -> None:
    revocation_id = ledger.revoke(RevocationScope.AGENT, "refund-agent", reason="bug", by="ops")
    [revocation] = ledger.revocations()
    assert (revocation.id, revocation.scope, revocation.target) == (
        revocation_id,
        RevocationScope.AGENT,
        "refund-agent",
    )
    assert ledger.active_revocation("refund-agent", None) == "agent 'refund-agent' is revoked: bug"
    assert recorder.named("revoked") == [
        ("revoked", RevocationScope.AGENT, "refund-agent", "bug", "ops")
    ]
    with pytest.raises(PolicyViolation) as refused:
        ledger.reserve(request("5.00"))
    assert refused.value.code is ViolationCode.REVOKED
    assert ledger.holds() == []
    assert all(b.committed == usd("0.00") for b in ledger.budgets())
    [row] = AuditLog(ledger._engine).query()
    assert (row.outcome, row.violation_code) == ("denied", "revoked")
    assert recorder.named("denied") == [("denied", "revoked", ViolationCode.REVOKED)]

    assert ledger.restore(RevocationScope.AGENT, "refund-agent", reason="fixed", by="ops") == 1
    assert ledger.revocations() == []
    assert ledger.active_revocation("refund-agent", None) is None
    assert ledger.reserve(request("5.00")).remaining == usd("95.00")


def test_observing_fans_out_to_every_observer(engine: Engine, clock: Clock) -> None:
    first, second = Recorder(), Recorder()
    assert observing(None, None) is None
    assert observing(None, first) is first
    ledger = Ledger(engine, clock, observer=observing(first, second))
    hold = ledger.reserve(request("60.00")).hold
    ledger.settle(hold.id, usd("60.00"))
    for recorder in (first, second):
        assert recorder.named("reserved") == [("reserved", usd("60.00"), True)]
        assert recorder.named("resolved") == [("resolved", HoldState.SETTLED, hold.id)]
        assert recorder.named("after_commit") == [("after_commit", hold.daily_budget_id, 6000)]


def test_a_ledger_without_an_observer_does_the_same(engine: Engine, clock: Clock) -> None:
    ledger = Ledger(engine, clock)
    hold = ledger.reserve(request("60.00")).hold
    assert ledger.settle(hold.id, usd("61.00")).overrun == usd("1.00")
    status = daily(ledger)
    assert status.committed == usd("61.00") and status.frozen
