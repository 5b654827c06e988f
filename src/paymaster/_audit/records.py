"""The audit log's row types: what the governor writes (:class:`AuditEntry`), what a
stored row reads back as (:class:`AuditRecord`), and a run's totals (:class:`RunSummary`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .._money import Money
from .._outcome import Outcome


def _outcome(value: str | Outcome) -> str:
    """``value`` as a stored outcome, or a ``ValueError`` that lists the outcomes."""
    try:
        return Outcome(value).value
    except ValueError:
        known = ", ".join(o.value for o in Outcome)
        raise ValueError(f"outcome {value!r} is not an outcome; use one of: {known}") from None


#: The largest ``duration_ms`` a row stores (the column is a 32-bit integer: 24 days).
MAX_DURATION_MS = 2**31 - 1


def row_number_problem(*, http_status: object = None, duration_ms: object = None) -> str | None:
    """What is wrong with a row's ``http_status`` or ``duration_ms``, or ``None``: each is
    an int in its range (an HTTP status 100-599; 0 to :data:`MAX_DURATION_MS`)."""
    for name, value, low, high in (
        ("http_status", http_status, 100, 599),
        ("duration_ms", duration_ms, 0, MAX_DURATION_MS),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"{name} must be an int from {low} to {high}, not {value!r}"
    return None


#: Rows that record an operator's or a reconciler's act on an earlier attempt's hold.
_NOT_ATTEMPTS = frozenset({Outcome.RECONCILED.value, Outcome.ACKNOWLEDGED.value})


@dataclass(frozen=True)
class AuditEntry:
    """What the governor knows about a call when it writes the call's row."""

    agent: str
    vendor: str
    endpoint: str
    method: str
    outcome: Outcome
    run: str | None = None
    customer: str | None = None
    http_status: int | None = None
    vendor_request_id: str | None = None
    currency: str | None = None
    estimate: int = 0
    actual: int = 0
    policy_id: str | None = None
    policy_hash: str | None = None
    violation_code: str | None = None
    error: str | None = None
    hold_id: str | None = None
    duration_ms: int | None = None
    tool_call_id: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One stored audit row."""

    id: int
    at: datetime
    run: str | None
    agent: str
    vendor: str
    endpoint: str
    method: str
    customer: str | None
    outcome: str
    http_status: int | None
    vendor_request_id: str | None
    currency: str | None
    estimate: int
    actual: int
    policy_id: str | None
    policy_hash: str | None
    violation_code: str | None
    error: str | None
    hold_id: str | None
    duration_ms: int | None
    chain: str
    seq: int
    prev_hash: str
    hash: str
    tool_call_id: str | None = None
    credential: str | None = None
    """What the call was presented with: a proxy's vault key id."""

    @property
    def cost(self) -> Money | None:
        """The actual cost, or ``None`` for a row without a currency."""
        return Money(self.actual, self.currency) if self.currency else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


@dataclass
class RunSummary:
    """Counts per outcome and spend per currency for one run."""

    run: str
    calls: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    spend: dict[str, Money] = field(default_factory=dict)
    agents: list[str] = field(default_factory=list)
    vendors: list[str] = field(default_factory=list)
    first_at: datetime | None = None
    last_at: datetime | None = None
