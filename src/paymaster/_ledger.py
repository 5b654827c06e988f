"""The shared ledger: budgets, holds and revocations, and their atomic operations.

* **reserve** (one transaction): revocation check; for every budget the call counts
  against, ``committed = committed + x WHERE committed + x <= cap`` (the row lock of that
  conditional UPDATE is what keeps the cap under any concurrency); a pending hold.
* **settle** / **release** / **mark_unknown** (one transaction each): resolve the hold
  exactly once, correct ``committed`` by the difference, append the call's audit row.

``committed`` counts pending estimates plus settled actuals (plus holds of unknown
outcome), so a settle at exactly its estimate never touches the hot budget row. Holds
never expire: a crashed holder's hold stays counted until someone resolves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, and_, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError

from . import _audit as audit_log
from . import _statements as S
from . import _storable as storable
from ._alerts import AlertBatch, Alerter, BudgetRef, denial_alert, overrun_alert, revoke_alert
from ._audit import AuditEntry, Outcome
from ._db import read_only, unavailable_on_error
from ._errors import (
    GovernanceUnavailable,
    HoldAlreadyResolved,
    HoldNotFound,
    PolicyViolation,
    ViolationCode,
)
from ._money import MAX_AMOUNT, CurrencyMismatch, Money
from ._policy import EffectivePolicy
from ._schema import budget, hold, revocation

__all__ = [
    "BudgetStatus",
    "Hold",
    "HoldState",
    "Ledger",
    "LedgerObserver",
    "Reservation",
    "ReserveRequest",
    "Revocation",
    "RevocationScope",
]


T = TypeVar("T")


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


class LedgerObserver(Protocol):
    """Told of each ledger operation once it ends (telemetry); must not raise."""

    def reserved(self, request: ReserveRequest, seconds: float, ok: bool) -> None: ...

    def resolved(self, state: HoldState, hold: Hold | None, seconds: float) -> None: ...

    def denied(self, entry: AuditEntry) -> None: ...


@dataclass(frozen=True)
class _Exhausted:
    """The budget that refused a reserve for its cap, as the refusal saw it."""

    budget: BudgetRef
    committed: int
    cap: int
    refused: Money


class _Denied(Exception):
    def __init__(self, violation: PolicyViolation, exhausted: _Exhausted | None = None) -> None:
        self.violation = violation
        self.exhausted = exhausted


@dataclass
class _Step:
    """What resolving one attempt did: the hold as it now is, the change to its budgets'
    ``committed``, whether it froze them (an overrun), and what the attempt's audit row
    says (the amount it adds to what the ledger counts, and a note)."""

    hold: Hold
    delta: int
    counted: int
    note: str | None = None
    freeze: int = 0
    outcome: Outcome | None = None


def _token() -> str:
    """A write's own token, stored (unhashed) on the audit row it writes."""
    return uuid.uuid4().hex


def _written(conn: Connection, at: datetime, token: str) -> bool:
    """Whether the write holding ``token`` committed its audit row (its reply was lost)."""
    return conn.execute(S.AUDIT_WRITTEN, {"p_at": at, "p_token": token}).first() is not None


def _frozen_by(found: Hold) -> bool:
    """Whether ``found`` has an overrun still awaiting acknowledgement (its budgets are
    frozen by it already)."""
    return found.overrun is not None and found.overrun_acknowledged_at is None


def _joined(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None


def _overrun_note(step: _Step, per_call_cap: Money | None) -> str | None:
    over = step.hold.overrun
    actual = step.hold.actual
    if not step.freeze or over is None or actual is None or actual <= step.hold.estimate:
        return None
    note = (
        f"overrun: settled {actual.format()} above its reservation of "
        f"{step.hold.estimate.format()} (by {over.format()})"
    )
    if per_call_cap is not None and actual > per_call_cap:
        note += f", above the per-call cap of {per_call_cap.format()}"
    return (
        note + f"; its budgets are frozen until an operator acknowledges it "
        f"(paymaster holds acknowledge {step.hold.id})"
    )


class _Retry(Exception):
    """The transaction saw a state that changed under it; run it again."""


class _StaleBudgetId(Exception):
    """A cached budget id no longer exists (the database was reset); look it up again."""


def _template(outcome: Outcome, **fields: Any) -> AuditEntry:
    """An audit entry whose call fields :meth:`Ledger._resolve` fills from the hold."""
    return AuditEntry(agent="", vendor="", endpoint="", method="", outcome=outcome, **fields)


def _new_id() -> str:
    return uuid.uuid4().hex


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


def _target(scope: RevocationScope, target: str | None) -> str:
    """A revocation's target as the calls it stops store their agent type or run."""
    if scope is RevocationScope.ALL:
        return ""
    return storable.field("agent" if scope is RevocationScope.AGENT else "run", str(target))


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


def _budget_ref(key: tuple[str, ...], budget_id: int, run: str | None) -> BudgetRef:
    kind, agent, vendor, currency, _, window = key
    return BudgetRef(budget_id, kind, agent, vendor, currency, run, window or None)


_ATTEMPTS = 5
#: ``p_max_holders`` for resolutions that any number of holders may make.
_ANY_HOLDERS = 2**31 - 1
log = logging.getLogger("paymaster")
_MAX_CACHED_BUDGETS = 10_000
CALL_NOT_MADE = "so the call was not made"


def _not_recorded(hold_id: str) -> str:
    return (
        f"so the call's outcome was NOT recorded: hold {hold_id} stays counted against its "
        "budget until it is resolved; do not retry without checking the vendor"
    )


class Ledger:
    """Atomic ledger operations over one database (SQLite or PostgreSQL)."""

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        alerts: Alerter | None = None,
        observer: LedgerObserver | None = None,
    ) -> None:
        self._engine = engine
        #: Decides threshold alerts in the ledger's transactions; ``None``: no alert work.
        self.alerts = alerts
        #: Told of each operation (telemetry); ``None``: nothing measured.
        self.observer = observer
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        # Ids of committed budget rows only: an id seen inside a transaction that rolled
        # back may be handed to another budget (SQLite reuses rowids).
        self._budget_ids: dict[tuple[str, ...], int] = {}

    def now(self) -> datetime:
        """The injected clock, in UTC (audit hashes and UTC days depend on it)."""
        return self._clock().astimezone(timezone.utc)

    def _write(self, action: str, consequence: str, work: Callable[[Connection, bool], T]) -> T:
        """Run ``work`` in one write transaction; once more on a fresh connection if the
        pooled one turned out dead (``work`` is told it is a retry, for lost commits)."""
        with unavailable_on_error(self._engine, action, consequence):
            for attempt in range(2):
                try:
                    with self._engine.begin() as conn:
                        return work(conn, attempt > 0)
                except DBAPIError as exc:
                    if not exc.connection_invalidated or attempt > 0:
                        raise
        raise AssertionError("unreachable")

    # -- reserve -------------------------------------------------------------------------
    def reserve(self, request: ReserveRequest) -> Reservation:
        """Reserve the call's estimate against every budget it counts against.

        Raises :class:`PolicyViolation` (revoked, cap exceeded, call limit, ...) having
        written nothing but the denial's audit row, or :class:`GovernanceUnavailable`.
        """
        observer = self.observer
        if observer is None:
            return self._reserve_with_retries(request)
        started, ok = time.perf_counter(), False
        try:
            reservation = self._reserve_with_retries(request)
            ok = True
            return reservation
        finally:
            observer.reserved(request, time.perf_counter() - started, ok)

    def _reserve_with_retries(self, request: ReserveRequest) -> Reservation:
        # Fixed across attempts, so that a retry can recognise a hold that an attempt whose
        # COMMIT reply was lost did write: pending, and created at exactly this instant.
        hold_id, now = _new_id(), self.now()
        written: list[str] = []
        with unavailable_on_error(self._engine, "reserving", CALL_NOT_MADE):
            for attempt in range(_ATTEMPTS):
                new_ids: dict[tuple[str, ...], int] = {}
                batch = None if self.alerts is None else AlertBatch()
                try:
                    with self._engine.begin() as conn:
                        for candidate in written if attempt > 0 else ():
                            mine = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": candidate}).first()
                            if (
                                mine is not None
                                and mine.state == HoldState.PENDING.value
                                and mine.created_at == now
                            ):
                                return self._reservation_of(conn, Hold.from_row(mine))
                        reservation = self._reserve(
                            conn, request, now, new_ids, hold_id, written, batch
                        )
                except _Denied as denied:
                    self.record_denial(request, denied.violation, exhausted=denied.exhausted)
                    raise denied.violation from None
                except IntegrityError:
                    # A concurrent reserve with the same idempotency key committed first, or
                    # our own earlier attempt's commit landed meanwhile: the next attempt
                    # finds that hold.
                    # Or a call on the same subject did: the next attempt refuses it.
                    keyless = request.idempotency_key is None and request.subject is None
                    if keyless and attempt == 0:
                        raise
                except _StaleBudgetId:
                    self._budget_ids.clear()
                    if self.alerts is not None:
                        self.alerts.forget()
                except _Retry:
                    pass
                except DBAPIError as exc:
                    # A pooled connection that died (database restarted): one fresh try.
                    if not exc.connection_invalidated or attempt > 0:
                        raise
                else:
                    if len(self._budget_ids) > _MAX_CACHED_BUDGETS:  # one entry per run
                        self._budget_ids.clear()
                    self._budget_ids.update(new_ids)
                    if batch is not None and batch.seen:
                        assert self.alerts is not None
                        self.alerts.committed(batch)
                    return reservation
        raise GovernanceUnavailable(
            f"could not reserve after {_ATTEMPTS} attempts under contention, {CALL_NOT_MADE}"
        )

    def _reserve(
        self,
        conn: Connection,
        req: ReserveRequest,
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
        new_hold_id: str,
        written: list[str],
        batch: AlertBatch | None = None,
    ) -> Reservation:
        policy = req.policy
        x = req.estimate.amount
        existing = None
        key = None
        if req.idempotency_key is not None:
            key = hold_key(req.agent, req.run, req.idempotency_key)
            existing = conn.execute(S.HOLD_BY_KEY, {"p_key": key}).first()
        if existing is not None:
            found = Hold.from_row(existing)
            self._check_same_call(found, req)
            if found.state in (HoldState.PENDING, HoldState.UNKNOWN):
                return self._resume(conn, req, found)
            if _frozen_by(found):  # released with its overrun still unacknowledged
                self._refuse_if_frozen(conn, req, found.daily_budget_id, 1, daily=True)
            if found.state is HoldState.SETTLED:
                raise _Denied(
                    self._violation(
                        req,
                        ViolationCode.ALREADY_COMPLETED,
                        f"the call with idempotency key {req.idempotency_key!r} already settled "
                        f"at {found.resolved_at}; it is not repeated",
                    )
                )
        daily_key = ("daily", req.agent, req.vendor, policy.currency, "", now.date().isoformat())
        daily_id = self._budget_id(conn, daily_key, now, new_ids)
        run_id = run_key = None
        if policy.has_run_budget and req.run is None:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.RUN_CAP_EXCEEDED,
                    "the run policy sets a run budget but the call names no run",
                )
            )
        if req.run is not None:
            run_key = ("run", req.agent, req.vendor, policy.currency, req.run, "")
            # Once a run has a budget, it binds every call of the run, with or without a
            # run policy: look for it even when this call brings none.
            run_id = self._budget_id(conn, run_key, now, new_ids, create=policy.has_run_budget)
        fields = {
            "agent": req.agent,
            "run": req.run,
            "vendor": req.vendor,
            "endpoint": req.endpoint,
            "method": req.method,
            "customer": req.customer,
            "currency": req.estimate.currency,
            "estimate": x,
            "actual": None,
            "daily_budget_id": daily_id,
            "run_budget_id": run_id,
            "policy_id": policy.policy_id,
            "policy_hash": policy.hash,
            "state": HoldState.PENDING.value,
            "created_at": now,
            "resolved_at": None,
            "resolved_by": None,
            "resolution": None,
            "tool_call_id": req.tool_call_id,
            "vendor_key": req.idempotency_key,
            "subject": req.subject,
            "attempts": 1,
            "holders": 1,
            "overrun": None,
            "overrun_acknowledged_at": None,
            "overrun_acknowledged_by": None,
            "overrun_acknowledgement": None,
        }
        if req.subject is not None:
            self._check_subject_free(conn, req, None if existing is None else existing.id)
        if existing is None:
            hold_id = new_hold_id
            written.append(hold_id)
            conn.execute(S.INSERT_HOLD, {"id": hold_id, "idempotency_key": key, **fields})
        else:  # a released hold retried with its key: reserve it again
            hold_id = existing.id
            written.append(hold_id)
            rearm = {f"p_{k}": v for k, v in fields.items() if k not in ("attempts", "holders")}
            rearmed = conn.execute(S.REARM_HOLD, {"p_id": hold_id, **rearm})
            if rearmed.rowcount != 1:
                raise _Retry
        # Budget rows last, and the hottest (the agent type's day) last of all, so its row
        # lock is held only until the commit. Every transaction that touches both takes
        # the run's row before the day's: no lock cycles. The day's UPDATE also checks the
        # revocations, so a revoke committed before this statement started refuses it.
        run_left = run_cap = None
        if run_id is not None:
            assert run_key is not None
            run_cap, run_calls = self._run_limits(conn, req, run_id)
            run_left = self._take(
                conn,
                req,
                run_id,
                run_cap,
                run_calls,
                check_revoked=False,
                code=ViolationCode.RUN_CAP_EXCEEDED,
                key=run_key,
                created=run_key in new_ids,
            )
        daily_left = self._take(
            conn,
            req,
            daily_id,
            policy.daily_cap,
            policy.max_calls_per_day,
            check_revoked=True,
            code=ViolationCode.CAP_EXCEEDED,
            key=daily_key,
            created=daily_key in new_ids,
        )
        assert daily_left is not None
        if batch is not None:  # threshold alerts, once every budget row is taken
            if run_left is not None and run_cap is not None:
                assert run_key is not None
                assert run_id is not None
                run_budget = (run_key, run_id, req.run)
                self._alert_thresholds(conn, batch, run_budget, run_cap, run_left, now)
            daily_budget = (daily_key, daily_id, req.run)
            self._alert_thresholds(conn, batch, daily_budget, policy.daily_cap, daily_left, now)
        reserved = Hold(
            id=hold_id,
            idempotency_key=req.idempotency_key,
            agent=req.agent,
            run=req.run,
            vendor=req.vendor,
            endpoint=req.endpoint,
            method=req.method,
            customer=req.customer,
            estimate=req.estimate,
            actual=None,
            daily_budget_id=daily_id,
            run_budget_id=run_id,
            policy_id=policy.policy_id,
            policy_hash=policy.hash,
            state=HoldState.PENDING,
            created_at=now,
            resolved_at=None,
            resolved_by=None,
            resolution=None,
            tool_call_id=req.tool_call_id,
        )
        return Reservation(reserved, daily_left, run_left)

    def _check_subject_free(self, conn: Connection, req: ReserveRequest, own: str | None) -> None:
        """Refuse a call on a subject another call in flight is changing. The partial
        unique index on the hold's subject settles races between processes: the loser's
        insert fails, and its retry is refused here."""
        busy = conn.execute(S.HOLD_ON_SUBJECT, {"p_subject": req.subject}).first()
        if busy is not None and busy.id != own:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.SUBJECT_BUSY,
                    f"another call on {req.subject} is in flight ({busy.method} "
                    f"{busy.endpoint}, hold {busy.id}, {busy.state}); retry once it has "
                    "ended (an unknown one ends when an operator resolves it: "
                    f"paymaster holds resolve {busy.id})",
                )
            )

    def _check_same_call(self, found: Hold, req: ReserveRequest) -> None:
        """An idempotency key names one call: a different call reusing it is refused. A
        released hold (nothing moved) may come back at another price: a re-arm re-prices."""
        repriced = found.state is HoldState.RELEASED
        mine = (
            req.agent,
            req.run,
            req.vendor,
            req.endpoint,
            req.method,
            req.customer,
            None if repriced else req.estimate,
        )
        theirs = (
            found.agent,
            found.run,
            found.vendor,
            found.endpoint,
            found.method,
            found.customer,
            None if repriced else found.estimate,
        )
        if mine != theirs:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.IDEMPOTENCY_KEY_REUSED,
                    f"idempotency key {req.idempotency_key!r} belongs to another call "
                    f"({found.agent} {found.method} {found.endpoint} {found.estimate}); "
                    "use a new key for a new call",
                )
            )

    def _resume(self, conn: Connection, req: ReserveRequest, found: Hold) -> Reservation:
        """A retry of a call whose hold is still counted: no second reservation, one more
        attempt holding the hold (so that no single attempt may now release it). The kill
        switch, and a frozen budget, apply to retries too."""
        self._check_revoked(conn, req)
        for budget_id in (found.run_budget_id, found.daily_budget_id):
            state = (
                None
                if budget_id is None
                else conn.execute(S.BUDGET_STATE, {"p_bid": budget_id}).first()
            )
            if state is not None:
                daily = budget_id == found.daily_budget_id
                self._refuse_if_frozen(conn, req, budget_id, int(state.frozen), daily)  # type: ignore[arg-type]
        row = conn.execute(S.RESUME_HOLD, {"p_id": found.id}).first()
        if row is None:
            raise _Retry
        return self._reservation_of(conn, Hold.from_row(row), resumed=True)

    def _reservation_of(self, conn: Connection, found: Hold, resumed: bool = False) -> Reservation:
        """A reservation for a hold that already counts against its budgets."""
        daily = self._left(conn, found.daily_budget_id, found.estimate.currency)
        assert daily is not None
        run = None
        if found.run_budget_id is not None:
            run = self._left(conn, found.run_budget_id, found.estimate.currency)
        return Reservation(found, daily, run, resumed=resumed)

    def _left(self, conn: Connection, budget_id: int, currency: str) -> Money | None:
        row = conn.execute(S.BUDGET_STATE, {"p_bid": budget_id}).first()
        if row is None or row.cap is None:
            return None
        return Money(int(row.cap) - int(row.committed), currency)

    def _take(
        self,
        conn: Connection,
        req: ReserveRequest,
        budget_id: int,
        cap_money: Money | None,
        calls_cap: int | None,
        *,
        check_revoked: bool,
        code: ViolationCode,
        key: tuple[str, ...],
        created: bool = False,
    ) -> Money | None:
        currency = req.policy.currency
        label = key[0]  # daily | run
        x = req.estimate.amount
        cap = None if cap_money is None else cap_money.amount
        params: dict[str, Any] = {
            "p_bid": budget_id,
            "p_x": x,
            "p_cap": cap,
            "p_calls_cap": calls_cap,
        }
        if check_revoked:
            params.update(p_agent=req.agent, p_run=req.run)
        stmt = S.take_budget(
            capped=cap is not None, call_capped=calls_cap is not None, check_revoked=check_revoked
        )
        taken = conn.execute(stmt, params).first()
        if taken is not None:
            return None if cap is None else Money(cap - int(taken.committed), currency)
        # Refused: say why, in this order. A state that no longer refuses means another
        # transaction freed room since the UPDATE ran: run the reserve again.
        self._check_revoked(conn, req)
        row = conn.execute(S.BUDGET_STATE, {"p_bid": budget_id}).first()
        if row is None:
            raise _StaleBudgetId
        committed, calls = int(row.committed), int(row.calls)
        self._refuse_if_frozen(conn, req, budget_id, int(row.frozen), daily=check_revoked)
        policy = req.policy
        if cap is not None and committed + x > cap:
            left = Money(max(cap - committed, 0), currency)
            scope = f"run {req.run!r}" if label == "run" else "today"
            # A budget this transaction created (and will roll back), or one nothing was
            # spent from, is not exhausted: the call alone is too big for its cap.
            exhausted = (
                None
                if created or committed == 0
                else _Exhausted(_budget_ref(key, budget_id, req.run), committed, cap, req.estimate)
            )
            raise _Denied(
                PolicyViolation(
                    code,
                    f"{req.estimate.format()} would exceed the {label} cap of "
                    f"{Money(cap, currency).format()} for {req.agent}/{req.vendor} ({scope}): "
                    f"{Money(committed, currency).format()} already committed, "
                    f"{left.format()} remaining",
                    policy_id=policy.policy_id,
                    agent=req.agent,
                    run=req.run,
                    vendor=req.vendor,
                    endpoint=req.endpoint,
                    remaining=left,
                ),
                exhausted,
            )
        if calls_cap is not None and calls >= calls_cap:
            raise _Denied(
                PolicyViolation(
                    ViolationCode.CALL_LIMIT,
                    f"the {label} limit of {calls_cap} calls for {req.agent}/{req.vendor} is "
                    f"reached ({calls} made)",
                    policy_id=policy.policy_id,
                    agent=req.agent,
                    run=req.run,
                    vendor=req.vendor,
                    endpoint=req.endpoint,
                    calls_remaining=0,
                    remaining=None if cap is None else Money(cap - committed, currency),
                )
            )
        raise _Retry

    def _alert_thresholds(
        self,
        conn: Connection,
        batch: AlertBatch,
        budget: tuple[tuple[str, ...], int, str | None],
        cap: Money,
        left: Money,
        now: datetime,
    ) -> None:
        """Record the thresholds this reserve took the budget (key, id, the call's run) to:
        no I/O unless one is reached that this process has not seen fire."""
        assert self.alerts is not None
        committed = cap.amount - left.amount
        due = self.alerts.due(budget[1], committed, cap.amount)
        if due:
            ref = _budget_ref(*budget)
            self.alerts.record(conn, batch, ref, due, committed=committed, cap=cap.amount, at=now)

    def _budget_id(
        self,
        conn: Connection,
        key: tuple[str, ...],
        now: datetime,
        new_ids: dict[tuple[str, ...], int],
        *,
        create: bool = True,
    ) -> Any:
        """The id of the budget row ``key`` names, created race-free if absent (or, with
        ``create=False``, ``None`` if absent)."""
        cached = self._budget_ids.get(key) or new_ids.get(key)
        if cached is not None:
            return cached
        kind, agent, vendor, currency, run, window = key
        where = and_(
            budget.c.kind == kind,
            budget.c.agent == agent,
            budget.c.vendor == vendor,
            budget.c.currency == currency,
            budget.c.run == run,
            budget.c.window == window,
        )
        found = conn.execute(select(budget.c.id).where(where)).scalar()
        if found is None and not create:
            return None
        if found is None:
            dialect_insert = pg_insert if self._postgres else sqlite_insert
            conn.execute(
                dialect_insert(budget)
                .values(
                    kind=kind,
                    agent=agent,
                    vendor=vendor,
                    currency=currency,
                    run=run,
                    window=window,
                    committed=0,
                    calls=0,
                    created_at=now,
                )
                .on_conflict_do_nothing()
            )
            found = conn.execute(select(budget.c.id).where(where)).scalar_one()
        new_ids[key] = int(found)  # cached by reserve() only once this transaction commits
        return int(found)

    def _run_limits(
        self, conn: Connection, req: ReserveRequest, budget_id: int
    ) -> tuple[Money | None, int | None]:
        """The run budget's limits for this call: those it stored, narrowed by the call's
        run policy. Widening is refused: a run's budget binds for the run's whole life."""
        row = conn.execute(S.RUN_BUDGET_LOCKED, {"p_bid": budget_id}).first()
        if row is None:
            raise _StaleBudgetId
        currency = req.policy.currency
        stored_cap = None if row.cap is None else Money(int(row.cap), currency)
        stored_calls = None if row.calls_cap is None else int(row.calls_cap)
        asked_cap, asked_calls = req.policy.run_cap, req.policy.run_max_calls
        widened = []
        if asked_cap is not None and stored_cap is not None and asked_cap > stored_cap:
            widened.append(f"cap {asked_cap.format()} above its {stored_cap.format()}")
        if asked_calls is not None and stored_calls is not None and asked_calls > stored_calls:
            widened.append(f"max_calls {asked_calls} above its {stored_calls}")
        if widened:
            raise _Denied(
                self._violation(
                    req,
                    ViolationCode.RUN_POLICY_WIDENED,
                    f"run {req.run!r} already has a budget; a run policy may narrow it, never "
                    f"widen it ({'; '.join(widened)})",
                )
            )
        cap = min((c for c in (stored_cap, asked_cap) if c is not None), default=None)
        calls = min((c for c in (stored_calls, asked_calls) if c is not None), default=None)
        return cap, calls

    def _refuse_if_frozen(
        self, conn: Connection, req: ReserveRequest, budget_id: int, frozen: int, daily: bool
    ) -> None:
        """Refuse a call on a budget that an unacknowledged overrun froze: one of its own
        holds' (its ``frozen`` count) or, for a daily budget, any of its agent type's, so
        that a freeze outlives the day it happened on."""
        if frozen <= 0 and not daily:
            return
        overruns = conn.execute(
            S.UNACKNOWLEDGED_OVERRUNS,
            {
                "p_bid": budget_id,
                "p_agent": req.agent,
                "p_vendor": req.vendor,
                "p_currency": req.policy.currency,
            },
        ).all()
        if not overruns and frozen <= 0:
            return
        named = ", ".join(
            f"hold {r.id} (over by {Money(int(r.overrun), r.currency).format()})" for r in overruns
        )
        first = overruns[0].id if overruns else "HOLD"
        raise _Denied(
            self._violation(
                req,
                ViolationCode.BUDGET_FROZEN,
                f"the budget is frozen: a call moved money its reservation did not cover "
                f"({named or 'an overrun'}); an operator must acknowledge it first: "
                f"Governor.acknowledge_overrun({first!r}, reason=...) or "
                f"`paymaster holds acknowledge {first} --reason ...`",
            )
        )

    def _check_revoked(self, conn: Connection, req: ReserveRequest) -> None:
        row = conn.execute(S.ACTIVE_REVOCATION, {"p_agent": req.agent, "p_run": req.run}).first()
        if row is not None:
            what = "everything" if row.kind == "all" else f"{row.kind} {row.target!r}"
            raise _Denied(
                self._violation(req, ViolationCode.REVOKED, f"{what} is revoked: {row.reason}")
            )

    @staticmethod
    def _violation(req: ReserveRequest, code: ViolationCode, message: str) -> PolicyViolation:
        return PolicyViolation(
            code,
            message,
            policy_id=req.policy.policy_id,
            agent=req.agent,
            run=req.run,
            vendor=req.vendor,
            endpoint=req.endpoint,
        )

    def active_revocation(self, agent: str, run: str | None) -> str | None:
        """Why ``agent`` (or ``run``) is revoked now, or ``None``: the kill switch for
        calls that reserve nothing."""
        agent, run = storable.field("agent", agent), storable.field("run", run)
        with (
            unavailable_on_error(self._engine, "reading revocations", CALL_NOT_MADE),
            read_only(self._engine) as conn,
        ):
            row = conn.execute(S.ACTIVE_REVOCATION, {"p_agent": agent, "p_run": run}).first()
        if row is None:
            return None
        what = "everything" if row.kind == "all" else f"{row.kind} {row.target!r}"
        return f"{what} is revoked: {row.reason}"

    def record(self, entry: AuditEntry) -> None:
        """Append the audit row of a call that reserved nothing (a free tool's call, or an
        attempt that ended before anything was reserved)."""
        at, token = self.now(), _token()

        def work(conn: Connection, retrying: bool) -> None:
            if not (retrying and _written(conn, at, token)):
                audit_log.append(conn, entry, at, token)

        self._write("auditing a call", "so this call's audit row was not written", work)

    def record_denial(
        self,
        request: ReserveRequest | None,
        violation: PolicyViolation,
        *,
        entry: AuditEntry | None = None,
        exhausted: _Exhausted | None = None,
    ) -> None:
        """Append the audit row of a refused call (nothing else is written but, with alerts
        on, the 100% threshold of the budget whose cap refused it, the first time)."""
        if entry is None:
            assert request is not None
            entry = AuditEntry(
                agent=request.agent,
                run=request.run,
                vendor=request.vendor,
                endpoint=request.endpoint,
                method=request.method,
                customer=request.customer,
                outcome=Outcome.DENIED,
                currency=request.estimate.currency,
                estimate=request.estimate.amount,
                actual=0,
                policy_id=request.policy.policy_id,
                policy_hash=request.policy.hash,
                violation_code=violation.code.value,
                error=violation.message,
                tool_call_id=request.tool_call_id,
                credential=request.credential,
            )
        consequence = f"the call was refused ({violation.code}) but its audit row was not written"
        at, token = self.now(), _token()
        alerts = self.alerts
        batches: list[AlertBatch] = []

        def work(conn: Connection, retrying: bool) -> None:
            batches.clear()
            if retrying and _written(conn, at, token):  # the first try's COMMIT reply was lost
                return
            if alerts is not None and exhausted is not None:
                # Before the audit append: alert rows, then the chain head (one lock order).
                ref, committed, cap = exhausted.budget, exhausted.committed, exhausted.cap
                due = alerts.due(ref.id, committed, cap, refused=True)
                if due:
                    batch = AlertBatch()
                    batches.append(batch)
                    alerts.record(
                        conn,
                        batch,
                        ref,
                        due,
                        committed=committed,
                        cap=cap,
                        at=at,
                        refused=exhausted.refused,
                    )
            audit_log.append(conn, entry, at, token)

        self._write("auditing a denial", consequence, work)
        if alerts is not None:
            for batch in batches:
                alerts.committed(batch)
            alerts.publish([denial_alert(entry, violation, at)])
        if self.observer is not None:
            self.observer.denied(entry)

    # -- resolve -------------------------------------------------------------------------
    def settle(
        self,
        hold_id: str,
        actual: Money,
        *,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
        per_call_cap: Money | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> Hold:
        """The call succeeded and cost ``actual``. Above the estimate it is an overrun:
        recorded as it is, and the hold's budgets are frozen until acknowledged
        (:meth:`acknowledge_overrun`). A hold another attempt already settled is raised
        to ``actual`` if that is more (the ledger never counts less than was moved)."""
        return self._resolve(
            hold_id,
            HoldState.SETTLED,
            actual,
            _template(
                Outcome.ALLOWED,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
            per_call_cap=per_call_cap,
        )

    def release(
        self,
        hold_id: str,
        *,
        outcome: Outcome = Outcome.FAILED,
        http_status: int | None = None,
        vendor_request_id: str | None = None,
        duration_ms: int | None = None,
        error: str | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> Hold:
        """This attempt failed and moved no money: free the estimate, unless another
        attempt holds the hold too (then it stays counted; this attempt's row is written)."""
        return self._resolve(
            hold_id,
            HoldState.RELEASED,
            None,
            _template(
                outcome,
                http_status=http_status,
                vendor_request_id=vendor_request_id,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
        )

    def mark_unknown(
        self,
        hold_id: str,
        *,
        error: str,
        duration_ms: int | None = None,
        tool_call_id: str | None = None,
        credential: str | None = None,
    ) -> Hold:
        """Whether money moved is unknown: keep the hold counted, flag it for reconciliation.

        ``tool_call_id`` (for each resolver) names the attempt on its audit row; ``None``:
        the hold's, as its first attempt gave it. ``credential`` names what the attempt
        was presented with (a proxy's vault key id)."""
        return self._resolve(
            hold_id,
            HoldState.UNKNOWN,
            None,
            _template(
                Outcome.UNKNOWN,
                duration_ms=duration_ms,
                error=error,
                tool_call_id=tool_call_id,
                credential=credential,
            ),
        )

    def resolve_hold(
        self,
        hold_id: str,
        *,
        settle: Money | None = None,
        release: bool = False,
        reason: str,
        by: str,
    ) -> Hold:
        """An operator resolves a pending or unknown hold (e.g. one left by a crash)."""
        if (settle is None) == (not release):
            raise ValueError("resolve a hold with exactly one of settle=<Money> or release=True")
        if not reason.strip():
            raise ValueError("a reason is required to resolve a hold")
        reason, by = storable.field("reason", reason), storable.field("by", by)
        state = HoldState.SETTLED if settle is not None else HoldState.RELEASED
        outcome = Outcome.ALLOWED if settle is not None else Outcome.FAILED
        return self._resolve(
            hold_id,
            state,
            settle,
            _template(outcome, error=f"resolved by {by}: {reason}"),
            by=by,
            reason=reason,
            operator=True,
        )

    def _resolve(
        self,
        hold_id: str,
        state: HoldState,
        actual: Money | None,
        template: AuditEntry,
        *,
        by: str | None = None,
        reason: str | None = None,
        operator: bool = False,
        per_call_cap: Money | None = None,
    ) -> Hold:
        """Record how one attempt (or an operator) ended a hold, with the attempt's audit
        row, in one transaction.

        An attempt finds its hold as it left it (pending, or unknown after a retry) in the
        common case: one UPDATE. Otherwise another attempt holding the same hold, or an
        operator, got there first, and :meth:`_late` records this attempt's truth on top.
        """
        if actual is not None:
            check_amount(actual, "actual")
        amount = actual.amount if actual is not None else 0
        now, token = self.now(), _token()
        action = f"recording hold {hold_id} as {state}"
        alerts = self.alerts
        batches: list[AlertBatch] = []
        overruns: list[Hold] = []

        def work(conn: Connection, retrying: bool) -> Hold:
            batches.clear()
            overruns.clear()
            if retrying:  # the first attempt may have committed with its reply lost
                mine = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
                if mine is not None and _written(conn, now, token):
                    return Hold.from_row(mine)
            step = self._transition(conn, hold_id, state, amount, now, by, reason, operator)
            resolved = step.hold
            currency = resolved.estimate.currency
            if actual is not None and actual.currency != currency:
                raise CurrencyMismatch(  # rolls the transaction back
                    f"hold {hold_id} is in {currency}; cannot settle it in {actual.currency}"
                )
            if step.delta or step.freeze:
                beyond = self._adjust(conn, resolved, step.delta, step.freeze, now, batches)
                recorded = 0 if resolved.overrun is None else resolved.overrun.amount
                if beyond > recorded and not operator and not step.freeze:
                    # Money counted late (the hold had been freed under this attempt, and
                    # the room given to other calls) took a budget past its cap: the cap
                    # did not bound it, so it is an overrun like any other.
                    step.hold, step.freeze = self._beyond_cap(conn, resolved, beyond, now)
                    resolved = step.hold
                    step.note = _joined(
                        step.note,
                        f"counting it took its budget {Money(beyond, currency).format()} past "
                        "its cap: an overrun; its budgets are frozen until an operator "
                        f"acknowledges it (paymaster holds acknowledge {hold_id})",
                    )
            if step.freeze:
                overruns.append(resolved)
            entry = replace(
                template,
                agent=resolved.agent,
                run=resolved.run,
                vendor=resolved.vendor,
                endpoint=resolved.endpoint,
                method=resolved.method,
                customer=resolved.customer,
                currency=currency,
                estimate=resolved.estimate.amount,
                actual=step.counted,
                policy_id=resolved.policy_id,
                policy_hash=resolved.policy_hash,
                hold_id=hold_id,
                tool_call_id=template.tool_call_id or resolved.tool_call_id,
                error=_joined(template.error, step.note, _overrun_note(step, per_call_cap)),
                outcome=Outcome.OVERRUN if step.freeze else step.outcome or template.outcome,
            )
            audit_log.append(conn, entry, now, token)
            return resolved

        observer = self.observer
        started, done = time.perf_counter(), None
        try:
            done = self._write(action, _not_recorded(hold_id), work)
        finally:
            if observer is not None:
                observer.resolved(state, done, time.perf_counter() - started)
        for over in overruns:
            log.warning(
                "overrun: hold %s (%s/%s %s %s) moved %s that its reservation of %s did not "
                "cover; its budgets are frozen until an operator acknowledges it",
                over.id,
                over.agent,
                over.vendor,
                over.method,
                over.endpoint,
                over.overrun,
                over.estimate,
            )
        if alerts is not None:
            for batch in batches:
                alerts.committed(batch)
            alerts.publish([overrun_alert(over, now) for over in overruns])
        return done

    def _transition(
        self,
        conn: Connection,
        hold_id: str,
        state: HoldState,
        amount: int,
        now: datetime,
        by: str | None,
        reason: str | None,
        operator: bool,
    ) -> _Step:
        """Move the hold to ``state`` as the rules allow, and say what that did to its
        budgets (``delta``), whether it froze them, and what the attempt's row counts."""
        settle = state is HoldState.SETTLED
        if operator or settle:
            sources: tuple[HoldState, ...] = (HoldState.PENDING, HoldState.UNKNOWN)
        else:
            sources = (HoldState.PENDING,)
        # A release is an attempt saying "nothing I did moved money": it frees the hold
        # only if no other attempt still holds it (those that ended before it said the
        # same, or the hold would be settled or unknown). An operator decides for all.
        max_holders = 1 if state is HoldState.RELEASED and not operator else _ANY_HOLDERS
        for previous in sources:
            # Only an unknown hold can carry an overrun already (money counted late past
            # its cap): that one stays as it is, neither frozen again nor acknowledged.
            prior = self._locked(conn, hold_id) if previous is HoldState.UNKNOWN else None
            row = conn.execute(
                S.RESOLVE_HOLD,
                {
                    "p_id": hold_id,
                    "p_from": previous.value,
                    "p_state": state.value,
                    "p_actual": amount if settle else None,
                    "p_at": now,
                    "p_by": by,
                    "p_reason": reason,
                    "p_max_holders": max_holders,
                    "p_done": 0 if operator else 1,
                },
            ).first()
            if row is None:
                continue
            resolved = Hold.from_row(row)
            estimate = resolved.estimate.amount
            delta = (
                amount - estimate if settle else (-estimate if state is HoldState.RELEASED else 0)
            )
            step = _Step(resolved, delta, counted=amount if settle else 0)
            if previous is HoldState.UNKNOWN and operator:
                step.outcome = Outcome.RECONCILED
            if prior is not None and prior.overrun is not None:
                # Money was counted past its cap already: the larger of the two facts
                # stands, and only more than was recorded freezes (or is acknowledged).
                new_over = 0 if resolved.overrun is None else resolved.overrun.amount
                step.hold, step.freeze = self._overrun_again(
                    conn, prior, resolved, new_over, now, by, reason, operator
                )
            elif resolved.overrun is not None:
                if operator:  # the operator saw the amount: recorded, acknowledged
                    step.hold = self._acknowledged(conn, resolved, now, by, reason)
                else:
                    step.freeze = 1
            return step
        current = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
        if current is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        found = Hold.from_row(current)
        if operator:
            raise HoldAlreadyResolved(
                f"hold {hold_id} is already {found.state} (at {found.resolved_at}); "
                "a hold resolves exactly once"
            )
        dropped = conn.execute(S.DROP_HOLDER, {"p_id": hold_id, "p_done": 1}).one()
        return self._late(conn, Hold.from_row(dropped), state, amount, now)

    @staticmethod
    def _locked(conn: Connection, hold_id: str) -> Hold | None:
        row = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
        return None if row is None else Hold.from_row(row)

    def _overrun_again(
        self,
        conn: Connection,
        prior: Hold,
        now_hold: Hold,
        new_over: int,
        now: datetime,
        by: str | None,
        reason: str | None,
        operator: bool,
    ) -> tuple[Hold, int]:
        """A hold that carried an overrun (``prior``) is resolved again as ``now_hold``
        with ``new_over`` beyond what it covered: keep the larger amount. More than was
        recorded is a new overrun: it freezes (unless one still awaiting acknowledgement
        freezes already), or an operator's own settle acknowledges it. Returns the hold
        and the freeze to apply."""
        assert prior.overrun is not None
        recorded = prior.overrun.amount
        waiting = _frozen_by(prior)
        actual = None if now_hold.actual is None else now_hold.actual.amount
        if new_over <= recorded:  # nothing new: the prior overrun stands as it was
            keep = Money(recorded, prior.estimate.currency)
            return self._set(conn, now_hold, now_hold.state, actual, now, keep, prior), 0
        larger = Money(new_over, prior.estimate.currency)
        hold_now = self._set(conn, now_hold, now_hold.state, actual, now, larger)
        if operator and not waiting:
            return self._acknowledged(conn, hold_now, now, by, reason), 0
        return hold_now, 0 if waiting else 1

    def _late(
        self, conn: Connection, found: Hold, state: HoldState, amount: int, now: datetime
    ) -> _Step:
        """An attempt ends after another attempt holding the same hold (or an operator)
        resolved it. Its own row is written whatever it finds; money it reports that the
        hold does not count yet is counted (the ledger never counts less than moved)."""
        estimate = found.estimate.amount
        if state is HoldState.RELEASED:
            if found.state is HoldState.PENDING:  # shared: another attempt may pay
                note = (
                    f"this attempt moved no money, but {found.holders} other attempt(s) "
                    "still hold this hold: it stays counted until they end"
                )
            else:
                note = f"the hold was already {found.state} by another attempt"
            return _Step(found, 0, counted=0, note=note)
        if state is HoldState.UNKNOWN:
            if found.state is HoldState.RELEASED:  # released under this attempt: recount
                hold_now = self._set(
                    conn, found, HoldState.UNKNOWN, None, now, found.overrun, found
                )
                note = "the hold had been released, but this attempt may have paid: counted again"
                return _Step(hold_now, estimate, counted=0, note=note)
            note = f"the hold was already {found.state} by another attempt"
            return _Step(found, 0, counted=0, note=note)
        # A settle: the vendor says this attempt's call cost ``amount``.
        if found.state is HoldState.SETTLED:
            settled = found.actual.amount if found.actual is not None else 0
            if amount <= settled:
                note = f"another attempt settled this hold at {found.actual}; the vendor acted once"
                return _Step(found, 0, counted=0, note=note)
            base, note = settled, f"another attempt settled this hold at {found.actual}; raised"
        else:  # released (by an operator, say) while this attempt's call paid
            base, note = estimate, "the hold had been released, but this attempt paid"
        delta = amount - base if found.state is HoldState.SETTLED else amount
        over = max(amount - estimate, 0)
        if found.overrun is not None:
            hold_now, freeze = self._overrun_again(
                conn, found, found, over, now, None, None, operator=False
            )
            hold_now = self._set(
                conn, hold_now, HoldState.SETTLED, amount, now, hold_now.overrun, hold_now
            )
            return _Step(hold_now, delta, counted=delta, note=note, freeze=freeze)
        overrun = Money(over, found.estimate.currency) if over else None
        hold_now = self._set(conn, found, HoldState.SETTLED, amount, now, overrun)
        return _Step(hold_now, delta, counted=delta, note=note, freeze=int(over > 0))

    def _set(
        self,
        conn: Connection,
        found: Hold,
        state: HoldState,
        actual: int | None,
        now: datetime,
        overrun: Money | None,
        acknowledged: Hold | None = None,
    ) -> Hold:
        """Rewrite a locked hold's resolution: its overrun awaiting acknowledgement, or
        acknowledged as ``acknowledged``'s was."""
        ack = acknowledged
        row = conn.execute(
            S.SET_HOLD_RESOLUTION,
            {
                "p_id": found.id,
                "p_state": state.value,
                "p_actual": actual,
                "p_at": now,
                "p_by": found.resolved_by,
                "p_reason": found.resolution,
                "p_overrun": None if overrun is None else overrun.amount,
                "p_ack_at": None if ack is None else ack.overrun_acknowledged_at,
                "p_ack_by": None if ack is None else ack.overrun_acknowledged_by,
                "p_ack_reason": None if ack is None else ack.overrun_acknowledgement,
            },
        ).one()
        return Hold.from_row(row)

    def _acknowledged(
        self, conn: Connection, found: Hold, now: datetime, by: str | None, reason: str | None
    ) -> Hold:
        return Hold.from_row(
            conn.execute(
                S.SET_HOLD_RESOLUTION,
                {
                    "p_id": found.id,
                    "p_state": found.state.value,
                    "p_actual": None if found.actual is None else found.actual.amount,
                    "p_at": found.resolved_at,
                    "p_by": found.resolved_by,
                    "p_reason": found.resolution,
                    "p_overrun": None if found.overrun is None else found.overrun.amount,
                    "p_ack_at": now,
                    "p_ack_by": by,
                    "p_ack_reason": reason,
                },
            ).one()
        )

    def _adjust(
        self,
        conn: Connection,
        resolved: Hold,
        delta: int,
        freeze: int,
        now: datetime,
        batches: list[AlertBatch],
    ) -> int:
        """Move the hold's budgets by ``delta`` (and freeze them), run's row first: the
        reserve's order, so no lock cycles. Returns how far this delta took a budget past
        its cap (0 when none)."""
        rising = delta > 0  # may cross a threshold, or the cap
        adjusted = []
        for budget_id in (resolved.run_budget_id, resolved.daily_budget_id):
            if budget_id is None:
                continue
            params = {"p_bid": budget_id, "p_delta": delta, "p_freeze": freeze}
            if rising:
                adjusted.append(conn.execute(S.ADJUST_BUDGET_RETURNING, params).one())
            else:
                conn.execute(S.ADJUST_BUDGET, params)
        if adjusted and self.alerts is not None:
            batches.append(AlertBatch())
            self._alert_adjusted(conn, batches[0], resolved, adjusted, now)
        beyond = [
            min(delta, int(row.committed) - int(row.cap)) for row in adjusted if row.cap is not None
        ]
        return max([0, *beyond])

    def _beyond_cap(
        self, conn: Connection, found: Hold, beyond: int, now: datetime
    ) -> tuple[Hold, int]:
        """Record on ``found`` (locked by this transaction) that money counted late went
        ``beyond`` its cap, freezing its budgets until that is acknowledged (unless an
        overrun of the hold freezes them already). Returns the hold and the freeze."""
        if found.overrun is not None:
            hold_now, freeze = self._overrun_again(
                conn, found, found, beyond, now, None, None, operator=False
            )
        else:
            actual = None if found.actual is None else found.actual.amount
            over = Money(beyond, found.estimate.currency)
            hold_now, freeze = self._set(conn, found, found.state, actual, now, over), 1
        if freeze:
            for budget_id in (found.run_budget_id, found.daily_budget_id):
                if budget_id is not None:
                    params = {"p_bid": budget_id, "p_delta": 0, "p_freeze": 1}
                    conn.execute(S.ADJUST_BUDGET, params)
        return hold_now, freeze

    def acknowledge_overrun(self, hold_id: str, *, reason: str, by: str) -> Hold:
        """An operator has looked at an overrun: unfreeze the budgets it froze (they keep
        counting what was spent). Audited. Raises :class:`ValueError` if the hold has no
        overrun awaiting acknowledgement."""
        if not reason.strip():
            raise ValueError("acknowledging an overrun needs a reason")
        reason, by = storable.field("reason", reason), storable.field("by", by)
        now = self.now()

        def work(conn: Connection, retrying: bool) -> Hold:
            row = conn.execute(S.HOLD_BY_ID_LOCKED, {"p_id": hold_id}).first()
            if row is None:
                raise HoldNotFound(f"no hold {hold_id!r}")
            found = Hold.from_row(row)
            if retrying and found.overrun_acknowledged_at == now:
                return found
            if found.overrun is None or found.overrun_acknowledged_at is not None:
                raise ValueError(
                    f"hold {hold_id} has no overrun awaiting acknowledgement"
                    + (
                        f" (acknowledged by {found.overrun_acknowledged_by} at "
                        f"{found.overrun_acknowledged_at})"
                        if found.overrun_acknowledged_at is not None
                        else ""
                    )
                )
            acknowledged = self._acknowledged(conn, found, now, by, reason)
            for budget_id in (found.run_budget_id, found.daily_budget_id):
                if budget_id is not None:
                    conn.execute(
                        S.ADJUST_BUDGET, {"p_bid": budget_id, "p_delta": 0, "p_freeze": -1}
                    )
            audit_log.append(
                conn,
                AuditEntry(
                    agent=found.agent,
                    run=found.run,
                    vendor=found.vendor,
                    endpoint=found.endpoint,
                    method=found.method,
                    customer=found.customer,
                    outcome=Outcome.ACKNOWLEDGED,
                    currency=found.estimate.currency,
                    estimate=found.estimate.amount,
                    actual=0,
                    policy_id=found.policy_id,
                    policy_hash=found.policy_hash,
                    hold_id=found.id,
                    tool_call_id=found.tool_call_id,
                    error=f"overrun of {found.overrun} acknowledged by {by}: {reason}",
                ),
                now,
            )
            return acknowledged

        return self._write(
            f"acknowledging the overrun of hold {hold_id}", "so its budgets stay frozen", work
        )

    def overruns(self, *, acknowledged: bool = False) -> list[Hold]:
        """Holds settled above their reservation: by default those whose overrun still
        freezes their budgets, oldest first."""
        ack = hold.c.overrun_acknowledged_at
        query = select(hold).where(
            hold.c.overrun.is_not(None), ack.is_not(None) if acknowledged else ack.is_(None)
        )
        with read_only(self._engine) as conn:
            return [Hold.from_row(r) for r in conn.execute(query.order_by(hold.c.resolved_at))]

    def _alert_adjusted(
        self, conn: Connection, batch: AlertBatch, hold: Hold, rows: list[Any], now: datetime
    ) -> None:
        """Thresholds crossed by a settle above its estimate (budget rows as adjusted)."""
        assert self.alerts is not None
        currency = hold.estimate.currency
        for row in rows:
            if row.cap is None:
                continue
            committed, cap = int(row.committed), int(row.cap)
            due = self.alerts.due(int(row.id), committed, cap)
            if due:
                ref = BudgetRef(
                    int(row.id),
                    row.kind,
                    hold.agent,
                    hold.vendor,
                    currency,
                    hold.run,
                    row.window or None,
                )
                self.alerts.record(conn, batch, ref, due, committed=committed, cap=cap, at=now)

    # -- revocations ---------------------------------------------------------------------
    def revoke(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Refuse every later reserve in ``scope`` until restored; returns the revocation id."""
        scope = RevocationScope(scope)
        if scope is not RevocationScope.ALL and not target:
            raise ValueError(f"revoking a {scope} needs its name")
        if not reason.strip():
            raise ValueError("a revocation needs a reason")
        at, name = self.now(), _target(scope, target)
        reason, by = storable.field("reason", reason), storable.field("by", by)
        fields = {"kind": scope.value, "target": name, "reason": reason, "revoked_by": by}

        def work(conn: Connection, retrying: bool) -> int:
            if retrying:  # written already by an attempt whose COMMIT reply was lost?
                found = conn.execute(
                    select(revocation.c.id).where(
                        *(revocation.c[k] == v for k, v in fields.items()),
                        revocation.c.revoked_at == at,
                    )
                ).scalar()
                if found is not None:
                    return int(found)
            inserted = insert(revocation).values(**fields, revoked_at=at)
            return int(conn.execute(inserted.returning(revocation.c.id)).scalar_one())

        revocation_id = self._write("revoking", "so nothing was revoked", work)
        if self.alerts is not None:
            self.alerts.publish([revoke_alert(scope.value, name, reason=reason, by=by, at=at)])
        return revocation_id

    def restore(self, scope: RevocationScope, target: str | None, *, reason: str, by: str) -> int:
        """Lift the active revocations of exactly this scope; returns how many."""
        scope = RevocationScope(scope)
        at, name = self.now(), _target(scope, target)
        reason, by = storable.field("reason", reason), storable.field("by", by)
        same_scope = (revocation.c.kind == scope.value, revocation.c.target == name)

        def work(conn: Connection, retrying: bool) -> int:
            earlier = 0
            if retrying:  # lifted already by an attempt whose COMMIT reply was lost?
                earlier = int(
                    conn.execute(
                        select(func.count()).where(
                            *same_scope, revocation.c.lifted_at == at, revocation.c.lifted_by == by
                        )
                    ).scalar_one()
                )
            lifted = conn.execute(
                update(revocation)
                .where(revocation.c.lifted_at.is_(None), *same_scope)
                .values(lifted_at=at, lifted_by=by, lift_reason=reason)
            )
            return earlier + int(lifted.rowcount)

        return self._write("restoring", "so nothing was restored", work)

    def revocations(self, *, active_only: bool = True) -> list[Revocation]:
        query = select(revocation).order_by(revocation.c.id)
        if active_only:
            query = query.where(revocation.c.lifted_at.is_(None))
        with read_only(self._engine) as conn:
            return [
                Revocation(
                    id=int(r.id),
                    scope=RevocationScope(r.kind),
                    target=r.target,
                    reason=r.reason,
                    revoked_by=r.revoked_by,
                    revoked_at=r.revoked_at,
                    lifted_at=r.lifted_at,
                )
                for r in conn.execute(query)
            ]

    def flag_stale_holds(self, older_than: timedelta) -> tuple[datetime, list[Hold]]:
        """Mark the unresolved holds created ``older_than`` ago or earlier that were never
        flagged, and return when and which: each hold is returned once, to one caller, of
        all processes on the ledger (until it is released and reserved again)."""
        if older_than < timedelta(0):
            raise ValueError("older_than must not be negative")
        at = self.now()

        def work(conn: Connection, retrying: bool) -> list[Hold]:
            if retrying:  # flagged already by an attempt whose COMMIT reply was lost?
                mine = conn.execute(select(hold).where(hold.c.stale_alerted_at == at)).all()
                if mine:
                    return [Hold.from_row(row) for row in mine]
            rows = conn.execute(S.STALE_HOLDS, {"p_cutoff": at - older_than, "p_at": at}).all()
            return sorted((Hold.from_row(row) for row in rows), key=lambda h: h.created_at)

        return at, self._write("flagging stale holds", "so no hold was flagged", work)

    # -- inspection ----------------------------------------------------------------------
    def hold_for_key(self, idempotency_key: str, *, agent: str, run: str | None) -> Hold | None:
        """The hold an idempotency key names for this agent type and run, if any: a retry
        is priced as the call it repeats, not re-priced from a world its first attempt may
        have changed."""
        key = hold_key(agent, run, idempotency_key)
        with (
            unavailable_on_error(self._engine, "reading a hold by its idempotency key"),
            read_only(self._engine) as conn,
        ):
            row = conn.execute(select(hold).where(hold.c.idempotency_key == key)).first()
        return None if row is None else Hold.from_row(row)

    def get_hold(self, hold_id: str) -> Hold:
        with read_only(self._engine) as conn:
            row = conn.execute(select(hold).where(hold.c.id == hold_id)).first()
        if row is None:
            raise HoldNotFound(f"no hold {hold_id!r}")
        return Hold.from_row(row)

    def holds(
        self,
        *,
        states: Sequence[HoldState] = (HoldState.PENDING, HoldState.UNKNOWN),
        older_than: timedelta | None = None,
        run: str | None = None,
    ) -> list[Hold]:
        """Holds in the given states (by default the unresolved ones), oldest first."""
        query = select(hold).where(hold.c.state.in_([s.value for s in states]))
        if older_than is not None:
            query = query.where(hold.c.created_at <= self.now() - older_than)
        if run is not None:
            query = query.where(hold.c.run == storable.field("run", run))
        with read_only(self._engine) as conn:
            return [Hold.from_row(r) for r in conn.execute(query.order_by(hold.c.created_at))]

    def budgets(self, *, day: date | None = None) -> list[BudgetStatus]:
        """Budgets of one UTC day (default today) and the runs with holds that day."""
        window = (day or self.now().date()).isoformat()
        with read_only(self._engine) as conn:
            daily = conn.execute(
                select(budget).where(budget.c.kind == "daily", budget.c.window == window)
            ).all()
            daily_ids = [int(r.id) for r in daily]
            run_ids = (
                conn.execute(
                    select(hold.c.run_budget_id)
                    .where(hold.c.daily_budget_id.in_(daily_ids), hold.c.run_budget_id.is_not(None))
                    .distinct()
                )
                .scalars()
                .all()
            )
            runs = conn.execute(select(budget).where(budget.c.id.in_(run_ids))).all()
            sums: dict[int, tuple[int, int]] = {}
            for column in (hold.c.daily_budget_id, hold.c.run_budget_id):
                for row in conn.execute(
                    select(
                        column.label("bid"),
                        func.sum(case((hold.c.state == "settled", hold.c.actual), else_=0)),
                        func.sum(
                            case(
                                (hold.c.state.in_(["pending", "unknown"]), hold.c.estimate), else_=0
                            )
                        ),
                    )
                    .where(column.in_(daily_ids + list(run_ids)))
                    .group_by(column)
                ):
                    sums[int(row[0])] = (int(row[1] or 0), int(row[2] or 0))
        result = []
        for row in [*daily, *runs]:
            settled, pending = sums.get(int(row.id), (0, 0))
            result.append(
                BudgetStatus(
                    id=int(row.id),
                    kind=row.kind,
                    agent=row.agent,
                    vendor=row.vendor,
                    run=row.run,
                    window=row.window,
                    cap=None if row.cap is None else Money(int(row.cap), row.currency),
                    committed=Money(int(row.committed), row.currency),
                    settled=Money(settled, row.currency),
                    pending=Money(pending, row.currency),
                    calls=int(row.calls),
                    calls_cap=None if row.calls_cap is None else int(row.calls_cap),
                    frozen=int(row.frozen) > 0,
                )
            )
        return result
