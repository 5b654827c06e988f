"""The ledger's value types: holds and their states, reserve requests and reservations,
revocations, budget windows, and the pure helpers that name or check them (no I/O)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from .. import _storable as storable
from .._money import MAX_AMOUNT, Money
from .._policy import EffectivePolicy

__all__ = [
    "BudgetRef",
    "BudgetStatus",
    "Hold",
    "HoldState",
    "Reservation",
    "ReserveRequest",
    "Revocation",
    "RevocationScope",
    "check_amount",
    "hold_key",
]


class HoldState(str, Enum):
    PENDING = "pending"
    SETTLED = "settled"
    RELEASED = "released"
    UNKNOWN = "unknown"  # outcome not known (cancelled or timed out mid-call): still counted

    def __str__(self) -> str:
        return self.value


class RevocationScope(str, Enum):
    ALL = "all"
    AGENT = "agent"
    RUN = "run"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ReserveRequest:
    """One call to reserve for, already checked against ``policy``'s pure rules."""

    agent: str
    vendor: str
    endpoint: str
    method: str
    estimate: Money
    policy: EffectivePolicy
    run: str | None = None
    customer: str | None = None
    idempotency_key: str | None = None
    tool_call_id: str | None = None
    free: bool = False
    """Declared to move no money: its failures leave nothing to reconcile."""
    subject: str | None = None
    """The object this call changes (``stripe:in_123``): while its hold is pending or
    unknown, every other call on the same subject is refused (``subject_busy``)."""
    credential: str | None = None
    """What the call was presented with (a proxy's vault key id), for its audit rows."""


@dataclass(frozen=True)
class Hold:
    """A reserved call: its estimate counts against its budgets until it is resolved."""

    id: str
    idempotency_key: str | None
    agent: str
    run: str | None
    vendor: str
    endpoint: str
    method: str
    customer: str | None
    estimate: Money
    actual: Money | None
    daily_budget_id: int
    run_budget_id: int | None
    policy_id: str
    policy_hash: str
    state: HoldState
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution: str | None
    tool_call_id: str | None = None
    attempts: int = 1
    """Attempts that held this hold: its first, plus each retry that resumed it by its key."""
    holders: int = 1
    """Of those, the attempts that have not ended yet."""
    overrun: Money | None = None
    """What it moved that its reservation did not cover: spent above the estimate, or
    counted late past its budget's cap (its budgets froze until acknowledged)."""
    overrun_acknowledged_at: datetime | None = None
    overrun_acknowledged_by: str | None = None
    overrun_acknowledgement: str | None = None
    """The acknowledging operator's reason."""
    subject: str | None = None
    """The object the call changes; no other call on it may start while this is held."""

    @property
    def shared(self) -> bool:
        """More than one attempt holds it: none of them may release it alone."""
        return self.attempts > 1

    @classmethod
    def from_row(cls, row: Any) -> Hold:
        m = row._mapping
        currency = m["currency"]
        overrun = m.get("overrun")
        return cls(
            id=m["id"],
            idempotency_key=m.get("vendor_key"),
            agent=m["agent"],
            run=m["run"],
            vendor=m["vendor"],
            endpoint=m["endpoint"],
            method=m["method"],
            customer=m["customer"],
            estimate=Money(int(m["estimate"]), m["currency"]),
            actual=None if m["actual"] is None else Money(int(m["actual"]), m["currency"]),
            daily_budget_id=int(m["daily_budget_id"]),
            run_budget_id=None if m["run_budget_id"] is None else int(m["run_budget_id"]),
            policy_id=m["policy_id"],
            policy_hash=m["policy_hash"],
            state=HoldState(m["state"]),
            created_at=m["created_at"],
            resolved_at=m["resolved_at"],
            resolved_by=m["resolved_by"],
            resolution=m["resolution"],
            tool_call_id=m.get("tool_call_id"),
            attempts=int(m.get("attempts") or 1),
            holders=int(m.get("holders") or 0),
            overrun=None if overrun is None else Money(int(overrun), currency),
            overrun_acknowledged_at=m.get("overrun_acknowledged_at"),
            overrun_acknowledged_by=m.get("overrun_acknowledged_by"),
            overrun_acknowledgement=m.get("overrun_acknowledgement"),
            subject=m.get("subject"),
        )


@dataclass(frozen=True)
class Reservation:
    """The result of a successful reserve."""

    hold: Hold
    remaining: Money  # what is left of the daily budget after this reservation
    run_remaining: Money | None  # of the run's budget, if it has a money cap
    resumed: bool = False  # an existing pending hold was found by its idempotency key


@dataclass(frozen=True)
class Revocation:
    id: int
    scope: RevocationScope
    target: str
    reason: str
    revoked_by: str
    revoked_at: datetime
    lifted_at: datetime | None


@dataclass(frozen=True)
class BudgetStatus:
    """One budget window as the ledger sees it now."""

    id: int
    kind: str
    agent: str
    vendor: str
    run: str
    window: str
    cap: Money | None
    committed: Money
    settled: Money
    pending: Money  # pending and unknown holds' estimates
    calls: int
    calls_cap: int | None
    frozen: bool = False
    """An overrun on it awaits an operator's acknowledgement: every reserve is refused."""

    @property
    def remaining(self) -> Money | None:
        return None if self.cap is None else self.cap - self.committed


@dataclass(frozen=True)
class BudgetRef:
    """The budget window a threshold alert is about."""

    id: int
    kind: str  # daily | run
    agent: str
    vendor: str
    currency: str
    run: str | None
    window: str | None


def hold_key(agent: str, run: str | None, idempotency_key: str) -> str:
    """The ledger's key for a caller's idempotency key: scoped to the agent type and the
    run, so that another run presenting the same key makes another call (with its own
    budgets and revocations) instead of resuming this run's hold. It is made of the texts'
    storable forms, as a call stores them, so every caller finds the hold whichever form
    it holds (:mod:`paymaster._storable`)."""
    stored = storable.field
    material = json.dumps(
        [stored("agent", agent), stored("run", run), stored("idempotency_key", idempotency_key)],
        ensure_ascii=True,
    )
    return "k1:" + hashlib.sha256(material.encode()).hexdigest()


def check_amount(value: Money, field: str) -> None:
    """Refuse an amount the ledger cannot count: negative, or above :data:`MAX_AMOUNT`."""
    if not isinstance(value, Money):
        raise TypeError(
            f"{field} must be paymaster.Money, got {type(value).__name__} {value!r}: "
            f"write {_as_money(value)}"
        )
    if value.amount < 0:
        raise ValueError(f"{field} cannot be negative ({value.format()})")
    if value.amount > MAX_AMOUNT:
        raise ValueError(
            f"{field} {value.amount} minor units is above the ledger's limit of "
            f"{MAX_AMOUNT}: check the amount's unit (minor units, e.g. cents)"
        )


def _as_money(value: object) -> str:
    """How to write ``value`` as Money (for the error refusing it)."""
    if isinstance(value, str) and value.strip():
        return f'Money.parse("{value.strip()}")'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'Money({value}, "USD") (an int of minor units, with its currency)'
    if isinstance(value, (float, Decimal)):
        return f'Money.of("{value}", "USD") (major units as a str, with its currency)'
    return 'Money.parse("25.00 USD") or Money(2500, "USD")'
